"""The driver's check of a run's checkpoints against Ray Train's record of them (rayjobs/cluster/recovery.py), and the
names a worker writes after a fall-back (rayjobs/cluster/worker.py: next_generation). No Ray cluster: the record is
written here in Ray Train V2's snapshot format; tests/test_ray_faults.py runs the same states through Ray."""

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from rayjobs.cluster.recovery import SNAPSHOT, newest_complete, reconcile
from rayjobs.cluster.worker import next_generation
from rayjobs.training import checkpoint
from rayjobs.training.manifest import CheckpointError, checkpoint_name, newest_first, parse_name, verify


def save(root: Path, step: int, generation: int = 0) -> Path:
    """A real checkpoint (weights, AdamW and schedule state, manifest) of optimizer step ``step``."""
    torch.manual_seed(step)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    directory = root / checkpoint_name(step, generation)
    checkpoint.save(directory, 0, step, {"w": w}, opt, schedule)
    return directory


def record(root: Path, held: list[str], latest: str | None) -> Path:
    """Ray Train V2's checkpoint_manager_snapshot.json holding ``held`` (the fields its format has)."""
    entry = lambda n: {"version": 0, "checkpoint_dir_name": n, "metrics": {"step": parse_name(n)[0]}}  # noqa: E731
    state = {"ray_version": "2.60.0", "checkpoint_results": [entry(n) for n in held], "checkpoint_report_indices": list(range(len(held))),
             "latest_checkpoint_result": entry(latest) if latest else None, "pending_training_results": [], "pending_validation_specs": [],
             "current_report_index": len(held), "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
             "failed_validation_checkpoint_dir_names": []}  # fmt: skip
    path = root / SNAPSHOT
    path.write_text(json.dumps(state))
    return path


def tear(directory: Path) -> None:
    """Cut trainable.safetensors in half, as a write interrupted by a crash of the storage would."""
    f = directory / checkpoint.WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def set_aside(root: Path) -> list[str]:
    return [p.name for p in root.glob(f"{SNAPSHOT}.stale-*")]


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "checkpoints"
    r.mkdir()
    return r


def test_a_new_run_is_left_alone(tmp_path, capsys):
    assert reconcile(str(tmp_path / "none"), 3, "r") is None
    assert reconcile(str(tmp_path), 3, "r") is None
    assert capsys.readouterr().err == ""


def test_a_record_that_matches_its_checkpoints_is_kept(root, capsys):
    for s in (1, 2, 3):
        save(root, s)
    snap = record(root, ["step_000001", "step_000002", "step_000003"], "step_000003").read_text()
    assert reconcile(str(root), 3, "r") is None  # Ray's record decides
    assert (root / SNAPSHOT).read_text() == snap and dirs(root) == ["step_000001", "step_000002", "step_000003"]
    assert capsys.readouterr().err == ""


def test_the_newest_torn_is_removed_and_the_record_set_aside(root, capsys):
    """The registered latest is torn: Ray would hand it to the workers, they would fall back to step 2 and write
    step_000003 again under a name the record holds. Instead: it goes, and the run starts from step 2."""
    for s in (1, 2, 3):
        save(root, s)
    tear(root / "step_000003")
    record(root, ["step_000001", "step_000002", "step_000003"], "step_000003")
    assert reconcile(str(root), 3, "r") == "step_000002"
    assert dirs(root) == ["step_000001", "step_000002"] and not (root / SNAPSHOT).exists() and len(set_aside(root)) == 1
    err = capsys.readouterr().err
    assert "removed the torn checkpoint step_000003 of run r" in err and "resumes from its newest complete checkpoint, step_000002" in err
    assert "bytes" in err  # why: the size differs from the manifest's


def test_the_only_checkpoint_torn_starts_again_from_step_0(root, capsys):
    save(root, 1)
    tear(root / "step_000001")
    record(root, ["step_000001"], "step_000001")
    assert reconcile(str(root), 3, "r") is None
    assert dirs(root) == [] and not (root / SNAPSHOT).exists()
    err = capsys.readouterr().err
    assert "no complete checkpoint of run r is left: it starts again from step 0" in err
    assert "resume" not in err.replace("resumes", "")  # never the advice to resume what cannot be resumed


def test_a_record_naming_a_missing_directory_is_set_aside(root, capsys):
    """Ray's TrainController refuses a record whose checkpoints are gone, on every start: the run resumes from
    the newest complete checkpoint on disk instead."""
    for s in (1, 2, 3):
        save(root, s)
    record(root, ["step_000002", "step_000003", "step_000004"], "step_000004")
    assert reconcile(str(root), 3, "r") == "step_000003"
    assert "names missing step_000004" in capsys.readouterr().err and not (root / SNAPSHOT).exists()


def test_a_complete_checkpoint_ray_never_registered_is_resumed(root):
    """Uploaded, then the driver died before Ray registered it: it is whole, so the run goes on from it."""
    for s in (1, 2):
        save(root, s)
    record(root, ["step_000001"], "step_000001")
    assert reconcile(str(root), 3, "r") == "step_000002"


def test_no_record_at_all_resumes_from_the_newest_complete(root):
    save(root, 1)
    save(root, 2)
    (root / "step_000003").mkdir()  # an upload cut short: no manifest
    assert reconcile(str(root), 3, "r") == "step_000002"
    assert dirs(root) == ["step_000001", "step_000002"]


def test_an_unreadable_record_is_set_aside(root):
    save(root, 1)
    (root / SNAPSHOT).write_text("{not json")
    assert reconcile(str(root), 3, "r") == "step_000001" and len(set_aside(root)) == 1


def test_leftovers_older_than_the_record_are_pruned_unless_every_checkpoint_is_kept(root, capsys):
    """Ray writes its record before it deletes what num_to_keep dropped: a kill in between leaves directories
    nobody would delete. A sweep keeps every evaluated checkpoint (keep None): nothing is pruned there."""
    for s in (1, 2, 3):
        save(root, s)
    record(root, ["step_000002", "step_000003"], "step_000003")
    assert reconcile(str(root), None, "r") is None and dirs(root) == ["step_000001", "step_000002", "step_000003"]
    assert reconcile(str(root), 3, "r") is None and dirs(root) == ["step_000002", "step_000003"]
    assert "removed 1 checkpoint(s) no longer kept (step_000001)" in capsys.readouterr().err


def test_remote_storage_is_checked_by_size_without_downloading(root):
    """On s3:// or gs:// the driver reads the manifests and sizes the files (no download to hash them): a
    torn file is caught by its size; a same-size change is left to the worker, which hashes what it loads."""
    for s in (1, 2):
        save(root, s)
    remote = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())  # not a LocalFileSystem: the remote path
    tear(root / "step_000002")
    assert newest_complete(remote, "", ["step_000002", "step_000001"])[0] == "step_000001"
    save(root, 2)
    f = root / "step_000002" / checkpoint.WEIGHTS
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert newest_complete(remote, "", ["step_000002", "step_000001"])[0] == "step_000002"  # sizes match
    with pytest.raises(CheckpointError, match="sha256"):
        verify(root / "step_000002")  # the worker's check


def test_names_sort_by_step_then_generation():
    names = ["step_000004", "step_000005-1", "step_000005", "step_000004-1", "checkpoint_manager_snapshot.json", "step_12", "torn"]
    assert newest_first(names) == ["step_000005-1", "step_000005", "step_000004-1", "step_000004"]
    assert parse_name("step_000007-2") == (7, 2) and parse_name("step_000007") == (7, 0) and parse_name("step_7") is None
    assert checkpoint_name(7) == "step_000007" and checkpoint_name(7, 2) == "step_000007-2"


@pytest.mark.parametrize(
    "restored, registered, beside, want",
    [
        ("step_000003", "step_000003", ["step_000003", "step_000002"], 0),  # the registered one: same names
        ("step_000004-1", "step_000004-1", ["step_000005", "step_000004-1", "step_000004"], 1),  # keeps its generation
        ("step_000002", "step_000003", ["step_000003", "step_000002"], 1),  # a fall-back: a new generation
        ("step_000004-1", "step_000005-1", ["step_000005-1", "step_000005", "step_000004-1"], 2),  # a second one
        (None, "step_000001", ["step_000001"], 1),  # nothing complete: step 0, and still no name the record holds
        ("step_000002", None, ["step_000002", "step_000001"], 0),  # the driver's choice (the record set aside)
        (None, None, [], 0),
    ],
)
def test_after_a_fall_back_no_registered_name_is_written_again(restored, registered, beside, want):
    assert next_generation(restored, registered, beside) == want
    if registered and restored != registered:  # every name of the new generation is new to the storage
        assert all(parse_name(n)[1] < want for n in beside)
