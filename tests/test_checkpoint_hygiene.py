"""Checkpoint writes that cannot be flushed to the disk are said, not skipped silently (docs/reliability.md):
the save still completes (the rename makes each file whole under its name), and a warning names the file and
the OSError, because such a file may not survive a crash of the machine."""

import errno
import logging
import os

import torch

from rayjobs.training import checkpoint

LOGGER = "rayjobs.training.checkpoint"


def _save(directory):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint.save(directory, 0, 3, {"w": param.detach()}, optimizer, schedule)


def test_a_file_that_cannot_be_opened_for_fsync_is_logged(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if os.path.basename(path).startswith(checkpoint.TMP_PREFIX + checkpoint.WEIGHTS):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "open", failing_open)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _save(tmp_path / "ckpt")
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert f"{checkpoint.TMP_PREFIX}{checkpoint.WEIGHTS}" in message and str(tmp_path / "ckpt") in message
    assert "Permission denied" in message
    assert checkpoint.verify(tmp_path / "ckpt")  # the save itself went through


def test_a_failed_fsync_of_a_file_is_logged(tmp_path, monkeypatch, caplog):
    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _save(tmp_path / "ckpt")
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    # every file (rng, weights, optimizer, state, manifest); the directory's own fsync failing is not a loss
    assert len(messages) == 5 and all("Input/output error" in m for m in messages), messages
    assert not any(m.startswith(f"checkpoint: fsync of {tmp_path / 'ckpt'} ") for m in messages)


def test_a_normal_save_logs_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _save(tmp_path / "ckpt")
    assert [r for r in caplog.records if r.name == LOGGER] == []
