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
