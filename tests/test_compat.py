"""Directories written before rayjobs/ was split into wings still resume (rayjobs/compat.py).

tests/fixtures/sweep-v0.1 is a sweep directory written by draftray 0.1 (tests/fixtures/README.md): its Tune state
names the sweep's callback by the old module path ``rayjobs.sweep_resources``.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rayjobs.compat import OLD_MODULES

FIXTURE = Path(__file__).parent / "fixtures" / "sweep-v0.1"
WRITTEN_AT = "/tmp/oldruns"  # run.output_dir when the fixture was made; its text files name it


def test_every_old_module_path_is_the_new_module():
    for old, new in OLD_MODULES.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    assert not any(Path(__file__).parents[1].joinpath(*old.split(".")).with_suffix(".py").exists() for old in OLD_MODULES)


def test_an_old_tuner_state_unpickles_in_a_fresh_process():
    """What `Tuner.restore` reads first: without the aliases this fails with "No module named 'rayjobs.sweep_resources'"."""
    code = (
        "import pickle, sys\n"
        f"state = pickle.loads(open({str(FIXTURE / 'tune' / 'tuner.pkl')!r}, 'rb').read())\n"
        "callbacks = state['_run_config'].callbacks\n"
        "print(sorted(type(c).__module__ + '.' + type(c).__name__ for c in callbacks))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rayjobs.tune.resources.ReleaseTrainResources" in done.stdout


def old_sweep(tmp_path: Path) -> Path:
    """A copy of the fixture whose text files point at the copy (as if it had been written there)."""
    out = tmp_path / "oldsweep"
    shutil.copytree(FIXTURE, out)
    for f in out.rglob("*"):
        if f.suffix in (".yaml", ".json", ".csv", ".md", ".jsonl"):
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # Tune's search-algorithm state is a pickle despite its .json name
                continue
            f.write_text(text.replace(WRITTEN_AT, str(tmp_path)), encoding="utf-8")
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_and_a_run_written_by_the_old_layout_resume(cluster, tmp_path):
    from rayjobs.cluster.driver import fit
    from rayjobs.config import load_config
    from rayjobs.runlog import read_metrics
    from rayjobs.tune.pareto import read_csv
    from rayjobs.tune.sweep import resume_sweep

    out = resume_sweep(old_sweep(tmp_path))
    rows = read_csv(out / "trials.csv")
    assert {(r["trial"], r["status"]) for r in rows} == {("_trial_7783a_00000", "done"), ("_trial_7783a_00001", "done")}
    assert (out / "summary.md").exists() and (out / "pareto.png").exists()

    run = out / "trials" / "_trial_7783a_00000"
    fit(load_config(run / "config.yaml", ["train.steps=3"]))  # `draftray train <old run>/config.yaml train.steps=3`
    metrics = read_metrics(run)
    assert [m["resumed_from_step"] for m in metrics if "resumed_from_step" in m] == [2]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
