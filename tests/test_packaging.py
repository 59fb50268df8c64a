"""The wheel holds every package of the tree (rayjobs' wings included) and its shipped weights, and imports on its
own: built here, unpacked outside the repository, and imported with the unpacked copy first on the path."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (whl,) = out.glob("draftray-*.whl")
    return whl


def test_the_wheel_holds_every_package_and_the_shipped_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(p.parent.relative_to(ROOT).as_posix() for top in ("models", "rewards", "rayjobs") for p in (ROOT / top).rglob("__init__.py"))
    assert "rayjobs/training" in packages and "rayjobs/tune" in packages
    assert [p for p in packages if f"{p}/__init__.py" not in names] == []
    sources = sorted(f.relative_to(ROOT).as_posix() for top in ("models", "rewards", "rayjobs") for f in (ROOT / top).rglob("*.py"))
    assert [s for s in sources if s not in names] == []
    assert "models/weights/toy/model_index.json" in names and any(n.startswith("rewards/weights/") for n in names)


def test_every_module_imports_from_the_unpacked_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    modules = sorted(".".join(p.relative_to(site).with_suffix("").parts).removesuffix(".__init__") for p in site.rglob("*.py")
                     if p.relative_to(site).parts[0] in ("models", "rewards", "rayjobs"))  # fmt: skip
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = [m for m in {modules!r} if not sys.modules[m].__file__.startswith({str(site)!r})]\n"
        "print(len(bad)); assert not bad, bad\n"
        "import rayjobs.sweep_resources as old; assert old.__name__ == 'rayjobs.tune.resources'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
