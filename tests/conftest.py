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

    # Workers of a local cluster inherit this environment: they can import tests/faults.py. Restored afterwards.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), saved]))
    try:
        start_local_ray(num_cpus=2)
        yield
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


NEEDS_MOUNT = "storage fault not tested: cannot mount a tmpfs here, needs root with CAP_SYS_ADMIN"


def pytest_terminal_summary(terminalreporter):
    """Say it on the last lines when the storage-fault tests could not run (no root or no CAP_SYS_ADMIN): a
    CI without privileges must not drop the claims of docs/reliability.md silently."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NEEDS_MOUNT in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"WARNING: {len(skipped)} storage-fault tests SKIPPED: {NEEDS_MOUNT}", yellow=True, bold=True)


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
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip(f"{NEEDS_MOUNT} (no mount command)")
        if done.returncode != 0:
            pytest.skip(f"{NEEDS_MOUNT} ({done.stderr.strip() or done.returncode})")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)

