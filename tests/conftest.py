"""Shared fixtures: tiny components (seeded, built in code), nothing downloaded."""

import os
import tempfile

# Build the offline tokenizer into a per-session cache, never the user's home, and never touch a hub.
os.environ.setdefault("DRAFTRAY_CACHE", tempfile.mkdtemp(prefix="draftray-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny model gains nothing from a second thread, and a busy core stalls every 2-thread op.
torch.set_num_threads(int(os.environ.get("DRAFTRAY_TEST_THREADS", "1")))

import models  # noqa: E402,F401  (applies the torchvision guard first)
from models.components import build_tiny  # noqa: E402


@pytest.fixture
def tiny():
    """Fresh tiny SD components (the same weights every time)."""
    return build_tiny()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster (2 CPUs) per test module that asks for it: each start costs seconds on 2 cores."""
    import ray

    from rayjobs.cluster.driver import start_local_ray

    # Workers of a local cluster inherit this environment: they can import tests/faults.py.
    tests_dir = os.path.dirname(__file__)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)


@pytest.fixture
def tmpfs(tmp_path):
    """A factory of small real filesystems (tmpfs mounts; needs root with CAP_SYS_ADMIN, else the test skips):
    ``tmpfs("name", "16m")`` mounts one, unmounted after the test. A full or read-only filesystem is then the
    kernel's own ENOSPC/EROFS, not a Python mock."""
    import subprocess

    mounted = []

    def mount(name: str, size: str = "16m", readonly: bool = False):
        path = tmp_path / name
        path.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root with CAP_SYS_ADMIN")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)

