"""`draftray submit` and `draftray jobs`: training runs and sweeps as Ray Jobs (issue 7).

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
from datetime import datetime
from pathlib import Path

from rayjobs.errors import UserError

EXCLUDES = [".venv", "runs", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".cache", ".ray", "*.pyc",
            # credentials never travel with the upload (docs/security.md)
            ".env", ".env.*", ".netrc", ".aws", ".config/gcloud", "*.pem", "*.key", "auth_token", "*_token"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_OK = "SUCCEEDED"


def add_parsers(sub) -> None:
    s = sub.add_parser("submit", help="submit a training run or a sweep to a Ray cluster as a Ray Job")
    s.add_argument("config", help="YAML config inside the working directory (it is uploaded with it)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, passed on to the job")
    s.add_argument("--sweep", action="store_true", help="run `draftray sweep` (the config needs a sweep: section)")
    s.add_argument("--address", help=f"the cluster's dashboard (default: $RAY_ADDRESS if http, else {DEFAULT_ADDRESS})")
    s.add_argument("--working-dir", default=".", help="directory uploaded as the job's working directory (default: .)")
    s.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it succeeded")
    j = sub.add_parser("jobs", help="list, inspect, follow or stop submitted jobs")
    js = j.add_subparsers(dest="jobs_command", required=True)
    for name, text in (("list", "every job: id, status, start time, entrypoint"), ("status", "one job's status"),
                       ("logs", "one job's logs"), ("stop", "stop one job (its checkpoints stay; resubmit to resume)")):  # fmt: skip
        p = js.add_parser(name, help=text)
        if name != "list":
            p.add_argument("id", help="submission id (= the run name, or NAME.retry<k>)")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.add_argument("--address", help=f"the cluster's dashboard (default: $RAY_ADDRESS if http, else {DEFAULT_ADDRESS})")


def address_of(given: str | None) -> str:
    env = os.environ.get("RAY_ADDRESS", "")
    return given or (env if env.startswith("http") else DEFAULT_ADDRESS)


def connect(address: str):
    """A JobSubmissionClient, or one line on why not (token auth is on by default since Ray 2.59)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001  (connection, auth and version errors all land here)
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(
            f"--address {address}: cannot reach the Ray dashboard ({first.strip()[:200]}); with token auth "
            "(the default) export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the head's ~/.ray/auth_token> (docs/cluster.md)"
        ) from None


def plan(args) -> tuple[str, str, dict]:
    """(run name, entrypoint, runtime_env) of a submission, all checked before anything is sent."""
    from rayjobs.config import load_config

    working = Path(args.working_dir).resolve()
    config = Path(args.config).resolve()
    if not config.is_relative_to(working):
        raise UserError(f"{args.config}: the config must be inside the uploaded working directory {working}; move it there or pass --working-dir")
    cfg = load_config(config, args.overrides)  # a bad config fails here, exit 2, nothing submitted
    refuse_secret_overrides(args.overrides)
    if args.sweep and cfg.sweep is None:
        raise UserError(f"--sweep: {args.config} has no sweep: section (see configs/toy-kl-sweep.yaml), or submit without --sweep")
    key = "sweep.name" if args.sweep else "run.name"
    name = (cfg.sweep.name if args.sweep else cfg.run.name) or f"{'sweep' if args.sweep else cfg.objective.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    command = ["python", "-m", "rayjobs.cli", "sweep" if args.sweep else "train", str(config.relative_to(working))]
    command += [*args.overrides, f"{key}={name}"] + (["--or-resume"] if args.sweep else [])
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


def submit(args) -> int:
    name, entrypoint, env = plan(args)
    client = connect(address_of(args.address))
    sid = submission_id(client, name)
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=env["runtime_env"],
                          entrypoint_num_cpus=0, entrypoint_resources=env["resources"] or None)  # fmt: skip
    except RuntimeError as err:
        raise UserError(f"submission id {sid}: refused by the cluster ({str(err).splitlines()[0][:200]})") from None
    print(f"draftray: submitted {sid}: {entrypoint}", file=sys.stderr)
    print(sid)
    return follow(client, sid) if args.follow else 0


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


def jobs(args) -> int:
    client = connect(address_of(args.address))
    if args.jobs_command == "list":
        for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            started = datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else "-"
            print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{started}\t{job.entrypoint}")
        return 0
    try:
        if args.jobs_command == "status":
            print(_status(client, args.id))
        elif args.jobs_command == "logs":
            return follow(client, args.id) if args.follow else (print(client.get_job_logs(args.id), end="") or 0)
        else:
            stopped = client.stop_job(args.id)
            print(f"{args.id}\t{'stopping' if stopped else _status(client, args.id)}")
    except RuntimeError as err:
        raise UserError(f"job {args.id}: {str(err).splitlines()[0][:200]} (`draftray jobs list` shows the ids)") from None
    return 0

