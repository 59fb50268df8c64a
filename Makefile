# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
# Installs into .venv with pip (the CPU torch wheel is found by pip) pinned by constraints.txt.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt $(PIP_EXTRA)
RUNTIME := $(VENV)/.installed
DEV := $(VENV)/.installed-dev

.PHONY: demo test test-slow test-all bench clean

$(RUNTIME): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch (or one pulled in by a dependency) is a CUDA build with ~20 nvidia packages.
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(DEV): $(RUNTIME)
	# deepspeed is an sdist whose setup.py imports torch: build it against the pinned torch, no C++ ops ahead
	# of time (the one comm op it needs on CPU is JIT-compiled on first use, ~30-90 s, cached).
	$(PIP) 'setuptools>=68'
	DS_BUILD_OPS=0 $(PIP) --no-build-isolation deepspeed
	$(PIP) -e '.[dev]'
	touch $@

## DRaFT+ on the embedded toy model (shipped weights), local Ray; prints the run directory.
demo: $(RUNTIME)
	$(VENV)/bin/draftray train

# $(call timed,what,command): run it, then print how long it took (docs/benchmarks.md records these).
timed = @start=$$(date +%s); $(2); rc=$$?; echo "$(1): $$(( $$(date +%s) - start )) s"; exit $$rc
PYTEST := $(PY) -m pytest -q

## The fast tier (what CI and the README run; slow- and gpu-marked tests deselected): the tests without Ray on
## both cores (pytest-xdist), then the Ray tests one at a time (each starts its own cluster).
test: $(DEV)
	$(call timed,fast tier without Ray,$(PYTEST) -n 2 --dist loadfile -m "not slow and not gpu and not ray")
	$(call timed,fast tier with Ray,$(PYTEST) -m "ray and not slow and not gpu")

## The slow tier alone (the tests `make test` leaves out; gpu tests skip without a GPU).
test-slow: $(DEV)
	$(call timed,slow tier without Ray,$(PYTEST) -n 2 --dist loadfile -m "(slow or gpu) and not ray")
	$(call timed,slow tier with Ray,$(PYTEST) -m "slow and ray")

## Everything: both tiers, the fast one first.
test-all: test test-slow

## The CPU benchmark suite (bench/README.md; `python -m bench gpu` on a GPU); results go to docs/benchmarks.md by hand.
bench: $(RUNTIME)
	$(PY) -m bench cpu

clean:
	rm -rf $(VENV) runs .pytest_cache
