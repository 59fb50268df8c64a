"""`draftray submit` / `draftray jobs` against a real head: `ray start --head` as a separate process on
loopback, with its own temp dir, ports and auth token (token auth on: RAY_AUTH_MODE=token, as cluster.yaml does). Only the
processes this module started are stopped, found by PID through the token in their environment."""

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from shortrun import SHORT

from rayjobs.cli import main
from rayjobs.runlog import read_metrics

pytestmark = pytest.mark.ray

ROOT = Path(__file__).parents[1]
FAST = [*SHORT, "sampler.truncation_steps=1", "train.batch_size=1", "train.eval_every=0", "train.checkpoint_every=1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ours(token: str) -> list[int]:
    """PIDs of the processes whose environment holds this module's token: the head and all it started."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"RAY_AUTH_TOKEN={token}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


@pytest.fixture(scope="module")
def head():
    token = secrets.token_hex(16)
    temp = tempfile.mkdtemp(prefix="drs-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = _free_port()
    ports = {f"--{k}": str(_free_port()) for k in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")}
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT / "tests"), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2", RAY_worker_niceness="0")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats",
               *(f"{k}={v}" for k, v in ports.items())]  # fmt: skip
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ADDRESS=f"http://127.0.0.1:{dashboard}")
    _reload_token()
    try:
        _wait_for_dashboard(dashboard)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reload_token()
        for pid in [proc.pid, *_ours(token)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)


def _reload_token() -> None:
    """Ray caches the auth mode and the token per process: after an earlier cluster in this pytest run
    they would shadow RAY_AUTH_MODE / RAY_AUTH_TOKEN (as ray's own _enable_token_auth re-reads them)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _wait_for_dashboard(port: int, seconds: float = 120) -> None:
    from ray.job_submission import JobSubmissionClient

    end = time.monotonic() + seconds
    while True:
        try:
            JobSubmissionClient(f"http://127.0.0.1:{port}").list_jobs()
            return
        except Exception:  # noqa: BLE001  (not up yet)
            if time.monotonic() > end:
                raise
            time.sleep(1)


def _submit(capsys, *args) -> tuple[int, str, str]:
    code = main(["submit", str(ROOT / "configs" / "tiny.yaml"), *args, "--working-dir", str(ROOT)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_submitted_run_succeeds_with_its_logs_streamed(head, tmp_path, capsys):
    code, out, err = _submit(capsys, *FAST, "train.steps=2", f"run.output_dir={tmp_path}", "run.name=ok", "--follow")
    assert code == 0, err
    assert out.splitlines()[0] == "ok" and str(tmp_path / "ok") in out  # the id, then the job's own output
    assert (tmp_path / "ok" / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["jobs", "status", "ok"]) == 0 and capsys.readouterr().out.strip() == "SUCCEEDED"
    assert main(["jobs", "list"]) == 0 and "ok\tSUCCEEDED" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failed_run_resubmitted_under_its_name_resumes(head, tmp_path, capsys):
    nan = ["reward.name=faults:NaNFrom", "reward.kwargs={at_call: 2}"]
    code, _, _ = _submit(capsys, *FAST, "train.steps=3", f"run.output_dir={tmp_path}", "run.name=again", *nan, "--follow")
    assert code == 1  # the run stopped itself at step 2: the job failed, its step-1 checkpoint kept
    code, out, err = _submit(capsys, *FAST, "train.steps=3", f"run.output_dir={tmp_path}", "run.name=again", "--follow")
    assert code == 0 and out.splitlines()[0] == "again.retry1" and "resuming it" in err
    assert [m["resumed_from_step"] for m in read_metrics(tmp_path / "again") if "resumed_from_step" in m] == [1]


@pytest.mark.slow
def test_an_active_run_is_refused_and_stop_stops_it(head, tmp_path, capsys):
    code, out, _ = _submit(capsys, *FAST, "train.steps=1000", f"run.output_dir={tmp_path}", "run.name=long")
    assert code == 0 and out.strip() == "long"
    code, _, err = _submit(capsys, *FAST, f"run.output_dir={tmp_path}", "run.name=long")
    assert code == 2 and "run long: job long is still" in err and "draftray jobs stop long" in err
    assert main(["jobs", "stop", "long"]) == 0
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head)
    end = time.monotonic() + 60
    while not client.get_job_status("long").is_terminal() and time.monotonic() < end:
        time.sleep(0.5)
    assert str(client.get_job_status("long").value) == "STOPPED"
    assert main(["jobs", "logs", "long"]) == 0 and "Running entrypoint for job long" in capsys.readouterr().out


def test_bad_submissions_are_one_line_and_send_nothing(head, tmp_path, capsys):
    code, _, err = _submit(capsys, "optim.lr=-1", "run.name=bad")
    assert code == 2 and err.startswith("draftray: error: config optim.lr") and err.count("\n") == 1
    outside = tmp_path / "c.yaml"
    outside.write_text("train: {steps: 2}\n")
    assert main(["submit", str(outside), "--working-dir", str(ROOT)]) == 2
    assert "must be inside the uploaded working directory" in capsys.readouterr().err
    assert main(["submit", str(ROOT / "configs" / "tiny.yaml"), "--sweep", "--working-dir", str(ROOT)]) == 2
    assert "--sweep: " in capsys.readouterr().err
    assert main(["jobs", "status", "no-such-job"]) == 2
    assert main(["jobs", "list"]) == 0 and "bad" not in capsys.readouterr().out


@pytest.mark.slow
def test_the_plain_ray_job_submit_way_works_too(head, tmp_path):
    """docs/cluster.md's `ray job submit` command, as written there (with this test's run settings)."""
    runtime_env = '{"working_dir": ".", "excludes": [".venv", "runs", ".git"]}'
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head, "--runtime-env-json", runtime_env,
               "--", "python", "-m", "rayjobs.cli", "train", "configs/tiny.yaml", *FAST, "train.steps=1",
               f"run.output_dir={tmp_path}", "run.name=plain"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "plain" / "export" / "pytorch_lora_weights.safetensors").is_file()
