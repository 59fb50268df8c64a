"""Storage faults without Ray (docs/reliability.md): a read-only or full output path or storage, a missing bucket, and the
retry of a failed upload (the read-only and full rows of docs/errors.md are in tests/test_errors.py). The filesystems are real tmpfs mounts (conftest.py ``tmpfs``): ENOSPC and EROFS come
from the kernel. The same faults during a Ray run are in tests/test_ray_faults.py."""

import pyarrow.fs as pafs
import pytest
from faults import fill

from rayjobs.cluster.storage import PROBE_BYTES, StorageError, check_writable, retrying
from rayjobs.errors import UserError


def test_a_filesystem_with_less_than_the_probe_free_is_full(tmpfs):
    almost = tmpfs("almost", "4m")
    ballast = fill(almost)
    with open(ballast, "r+b") as f:  # give back half a probe: a small file fits, a run's checkpoints would not
        f.truncate(ballast.stat().st_size - PROBE_BYTES // 2)
    with pytest.raises(UserError, match=r"^ray.storage_path: cannot write to .*No space left on device"):
        check_writable(str(almost), "ray.storage_path")


def test_missing_bucket_or_unreachable_storage_is_one_line_without_credentials():
    """No network here: resolving the bucket fails (a missing bucket fails at the same call, HeadBucket). The
    credentials pasted into the URI are not echoed."""
    with pytest.raises(UserError) as err:
        check_writable("s3://AKIDEXAMPLE:SECRETSENTINEL@draftray-no-such-bucket-7f3a/runs", "ray.storage_path")
    message = str(err.value)
    assert message.startswith("ray.storage_path: cannot write to s3://AKIDEXAMPLE:***@draftray-no-such-bucket-7f3a/runs (")
    assert "SECRETSENTINEL" not in message and "\n" not in message and "check that the bucket exists" in message


def _copy_to(dest_dir, src):
    local = pafs.LocalFileSystem()
    return lambda: pafs.copy_files(str(src), str(dest_dir / "ckpt.bin"), source_filesystem=local, destination_filesystem=local)


def test_a_failed_upload_is_retried_with_backoff(tmpfs, tmp_path):
    """pyarrow's copy onto a full filesystem fails with ENOSPC; space comes back during the first wait; the
    second attempt lands the whole file."""
    store = tmpfs("store", "2m")
    src = tmp_path / "ckpt.bin"
    src.write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    ballast = fill(store)
    waits = []
    retrying(_copy_to(store, src), "upload", attempts=3, backoff_s=0.5, sleep=lambda s: (waits.append(s), ballast.unlink()))
    assert waits == [0.5] and (store / "ckpt.bin").read_bytes() == src.read_bytes()


def test_an_upload_failing_every_time_names_what_and_why(tmpfs, tmp_path, capsys):
    store = tmpfs("store", "2m")
    src = tmp_path / "ckpt.bin"
    src.write_bytes(bytes(256 * 1024))
    fill(store)
    waits = []
    with pytest.raises(StorageError, match=r"^upload of ckpt.bin failed 3 times \(last: .*No space left on device"):
        retrying(_copy_to(store, src), "upload of ckpt.bin", attempts=3, backoff_s=0.5, sleep=waits.append)
    assert waits == [0.5, 1.0]  # doubled
    assert capsys.readouterr().err.count("draftray: upload of ckpt.bin failed (") == 2
