"""`draftray submit` and `draftray jobs`: training runs and sweeps as Ray Jobs (docs/cluster.md).

A submission uploads the working directory (without .venv, run outputs and caches) and runs a thin
driver on the cluster: ``python -m rayjobs.cli train|sweep CONFIG overrides run.name=NAME``. The
driver loads no model. Weights are loaded inside the Train workers and never pass through the
object store.

The run name is chosen here, before submitting. It is the submission id, and the Train run name
(sweeps: sweep.name). A run whose earlier job failed or was stopped is resubmitted as NAME.retry<k>
under the same run name, so it resumes from its checkpoints. A run with a job still pending or running
is refused.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rayjobs.errors import UserError

EXCLUDES = [".venv", "runs", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".cache", ".ray", "*.pyc",
            # credentials never travel with the upload (docs/security.md)
            ".env", ".env.*", ".netrc", ".aws", ".config/gcloud", "*.pem", "*.key", "auth_token", "*_token"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_OK = "SUCCEEDED"
JOBS_COMMANDS = ("list", "status", "logs", "stop")


@dataclass(frozen=True)
class Submission:
    """What to submit; `draftray submit` builds it from its arguments (rayjobs/cli.py)."""

    config: str  # YAML config file inside working_dir (it is uploaded with it)
    overrides: tuple[str, ...] = ()  # dotted key=value overrides, passed on to the job's command line
    sweep: bool = False  # run `draftray sweep` on the cluster (the config needs a sweep: section), else `draftray train`
    working_dir: str = "."  # directory uploaded as the job's working directory


def address_of(given: str | None) -> str:
    env = os.environ.get("RAY_ADDRESS", "")
    return given or (env if env.startswith("http") else DEFAULT_ADDRESS)


def connect(address: str):
    """A JobSubmissionClient, or one line on why not (token auth: docs/security.md says what Ray 2.60 does)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001  (connection, auth and version errors all land here)
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(
            f"--address {address}: cannot reach the Ray dashboard ({first.strip()[:200]}); with token auth "
            "(the default) export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the head's ~/.ray/auth_token> (docs/cluster.md)"
        ) from None


def plan(submission: Submission) -> tuple[str, str, dict]:
    """(run name, entrypoint, runtime_env) of a submission, all checked before anything is sent."""
    from rayjobs.config import load_config

    overrides = list(submission.overrides)
    working = Path(submission.working_dir).resolve()
    config = Path(submission.config).resolve()
    if not config.is_relative_to(working):
        raise UserError(f"{submission.config}: the config must be inside the uploaded working directory {working}; move it there or pass --working-dir")
    cfg = load_config(config, overrides)  # a bad config fails here, exit 2, nothing submitted
    refuse_secret_overrides(overrides)
    sweep = submission.sweep
    if sweep and cfg.sweep is None:
        raise UserError(f"--sweep: {submission.config} has no sweep: section (see configs/toy-kl-sweep.yaml), or submit without --sweep")
    key = "sweep.name" if sweep else "run.name"
    name = (cfg.sweep.name if sweep else cfg.run.name) or f"{'sweep' if sweep else cfg.objective.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    command = ["python", "-m", "rayjobs.cli", "sweep" if sweep else "train", str(config.relative_to(working))]
    command += [*overrides, f"{key}={name}"] + (["--or-resume"] if sweep else [])
    runtime_env = {"working_dir": str(working), "excludes": EXCLUDES}
    return name, shlex.join(command), {"runtime_env": runtime_env, "resources": dict(cfg.ray.driver_resources)}


def refuse_secret_overrides(overrides: list[str]) -> None:
    """The entrypoint is readable by everyone with dashboard access (`ray job list`, the dashboard):
    an override that carries a credential is refused; credentials come from the cluster's
    environment or IAM roles (docs/security.md)."""
    from rayjobs.config import apply_override
    from rayjobs.redaction import redact

    for item in overrides:
        data: dict = {}
        apply_override(data, item)
        if redact(data) != data:
            key = item.partition("=")[0]
            raise UserError(f"override {key}=...: looks like a credential, and a job's entrypoint is visible to everyone "
                            "who can reach the dashboard; set it in the cluster's environment instead (docs/security.md)")


def submission_id(client, name: str) -> str:
    """NAME for a new run; NAME.retry<k> when earlier jobs of the run ended; refused while one is active."""
    earlier = [j for j in client.list_jobs() if j.submission_id == name or (j.submission_id or "").startswith(f"{name}.retry")]
    active = [j.submission_id for j in earlier if not j.status.is_terminal()]
    if active:
        raise UserError(f"run {name}: job {active[0]} is still {_status(client, active[0])}; `draftray jobs stop {active[0]}` first, or set another run name")
    if not earlier:
        return name
    print(f"draftray: run {name} had {len(earlier)} earlier job(s) ({', '.join(f'{j.submission_id} {j.status}' for j in earlier)}); resuming it", file=sys.stderr)
    return f"{name}.retry{len(earlier)}"


def submit(submission: Submission, *, address: str | None = None, follow_logs: bool = False) -> int:
    """Submits the job and prints its submission id; ``follow_logs``: then streams its logs, 0 only if it succeeded.
    ``address``: the cluster's dashboard (None: $RAY_ADDRESS if http, else DEFAULT_ADDRESS)."""
    name, entrypoint, env = plan(submission)
    client = connect(address_of(address))
    sid = submission_id(client, name)
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=env["runtime_env"],
                          entrypoint_num_cpus=0, entrypoint_resources=env["resources"] or None)  # fmt: skip
    except RuntimeError as err:
        raise UserError(f"submission id {sid}: refused by the cluster ({str(err).splitlines()[0][:200]})") from None
    print(f"draftray: submitted {sid}: {entrypoint}", file=sys.stderr)
    print(sid)
    return follow(client, sid) if follow_logs else 0


def follow(client, sid: str) -> int:
    """Streams the job's logs to stdout until it ends; 0 if it succeeded, 1 otherwise."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    status = _wait_terminal(client, sid)
    print(f"draftray: job {sid} {status}", file=sys.stderr)
    return 0 if status == TERMINAL_OK else 1


def _wait_terminal(client, sid: str, timeout: float = 60.0) -> str:
    """The log stream can end a moment before the status turns terminal."""
    end = time.monotonic() + timeout
    while True:
        status = client.get_job_status(sid)
        if status.is_terminal() or time.monotonic() > end:
            return str(status.value)
        time.sleep(0.5)


def _status(client, sid: str) -> str:
    return str(client.get_job_status(sid).value)


def jobs(command: str, job_id: str | None = None, *, address: str | None = None, follow_logs: bool = False) -> int:
    """`draftray jobs COMMAND`: ``list`` every job, or ``status`` / ``logs`` / ``stop`` the job ``job_id``;
    ``follow_logs`` (logs): stream until the job ends."""
    # checked before connecting: a mistyped command must not fall through to stopping the job
    if command not in JOBS_COMMANDS or (command != "list" and not job_id):
        raise ValueError(f"jobs: give one of {', '.join(JOBS_COMMANDS)} (and a job id unless 'list'), got {command!r} {job_id!r}")
    client = connect(address_of(address))
    if command == "list":
        for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            started = datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else "-"
            print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{started}\t{job.entrypoint}")
        return 0
    try:
        if command == "status":
            print(_status(client, job_id))
        elif command == "logs":
            return follow(client, job_id) if follow_logs else (print(client.get_job_logs(job_id), end="") or 0)
        else:
            stopped = client.stop_job(job_id)
            print(f"{job_id}\t{'stopping' if stopped else _status(client, job_id)}")
    except RuntimeError as err:
        raise UserError(f"job {job_id}: {str(err).splitlines()[0][:200]} (`draftray jobs list` shows the ids)") from None
    return 0
