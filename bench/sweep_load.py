"""Sweep load test: many tiny trials on the local cluster (bench/README.md, "Sweep load").

One sweep of N trials (default 50) with the basic search drawing optim.lr log-uniformly over 1e-4 .. 1e4 and ASHA
stopping weak trials, C at a time: small learning rates finish, some are stopped by the scheduler, and the largest
turn the loss non-finite so that their trials fail with the error (train.on_nonfinite=stop, sweep.max_failures=0).
It checks and reports

    accounted      every trial in trials.csv, each done, stopped or failed with its error (no trial lost)
    leaked groups  placement groups not REMOVED once the sweep has returned (60 s grace: removal is asynchronous)
    driver RSS     the driver process's resident memory, sampled every second, against the trials started so far
                   (trial directories; Tune writes a stopped trial's status only at the end, so "ended" lags): the
                   least-squares slope from the 10th trial's start to the last's (MB per trial), the values then,
                   and the value after the sweep's outputs (the Pareto plot imports matplotlib)

Run: ``.venv/bin/python -m bench.sweep_load [--trials 50] [--concurrency 2] [--steps 2]`` (about 10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import _draftray_compat  # noqa: F401

CONFIG = Path(__file__).parents[1] / "configs" / "toy-kl-sweep.yaml"
MB = 1e6


def _overrides(out: str, trials: int, concurrency: int, steps: int) -> list[str]:
    return [f"run.output_dir={out}", f"train.steps={steps}", "train.eval_every=1", "train.checkpoint_every=100",
            "data.eval_seeds=[0,1]", "data.eval_prompts=[a red circle]", "sampler.steps=3", "sampler.truncation_steps=1",
            "sweep.name=load", f"sweep.num_samples={trials}", f"sweep.max_concurrent={concurrency}", "sweep.inference={}",
            "sweep.max_failures=0", "sweep.checkpoint_evals=false", "sweep.params={optim.lr: {loguniform: [1.0e-4, 1.0e4]}}",
            "sweep.scheduler={grace_period: 1, reduction_factor: 2}"]  # fmt: skip


class Sampler(threading.Thread):
    """(seconds, driver RSS in bytes, trials started, trials ended) every ``every`` seconds until stopped."""

    def __init__(self, trials_dir: Path, every: float = 1.0):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.trials_dir, self.every = psutil.Process(), trials_dir, every
        self.samples: list[tuple[float, int, int, int]] = []
        self.halt = threading.Event()

    def counts(self) -> tuple[int, int]:
        from rayjobs.runlog import read_status

        dirs = [d for d in self.trials_dir.glob("*") if (d / "trial.json").exists()] if self.trials_dir.exists() else []
        return len(dirs), sum(1 for d in dirs if read_status(d)["status"] in ("done", "stopped", "failed"))

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.halt.wait(self.every):
            self.samples.append((time.monotonic() - t0, self.proc.memory_info().rss, *self.counts()))


def _slope(points: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of RSS (bytes) over trials ended."""
    n = len(points)
    if n < 2:
        return None
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def _leaked_groups(grace: float = 60.0) -> int:
    import ray

    deadline = time.time() + grace
    while True:
        alive = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        if not alive or time.time() > deadline:
            return len(alive)
        time.sleep(1.0)


def _summary(rows: list[dict], samples: list, trials: int) -> dict:
    status = {}
    for r in rows:
        status.setdefault(r["trial"], (r["status"], r.get("error", "")))
    counts = {s: sum(1 for v, _ in status.values() if v == s) for s in ("done", "stopped", "failed")}
    errors = sorted({e.splitlines()[0][:120] for v, e in status.values() if v == "failed" and e})
    steady = [(started, rss) for _, rss, started, _ in samples if 10 <= started < trials] + [
        next(((started, rss) for _, rss, started, _ in samples if started == trials), (trials, samples[-1][1]))]
    slope = _slope(steady)
    at = {n: next((rss for _, rss, started, _ in samples if started >= n), None) for n in (1, 10, trials)}
    mb = lambda b: None if b is None else round(b / MB, 1)  # noqa: E731
    return {"trials": trials, "in_trials_csv": len(status), **counts, "failed_with_error": sum(1 for v, e in status.values() if v == "failed" and e),
            "errors": errors, "rss_start_mb": mb(samples[0][1]), "rss_first_trial_mb": mb(at[1]), "rss_10th_trial_mb": mb(at[10]),
            "rss_last_trial_mb": mb(at[trials]), "rss_end_mb": mb(samples[-1][1]),
            "rss_slope_mb_per_trial": None if slope is None else round(slope / MB, 3)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--trace", type=Path, help="also write the samples [seconds, driver RSS MB, trials started, ended] to this JSON file")
    args = ap.parse_args()

    import ray

    from rayjobs.cluster.driver import start_local_ray
    from rayjobs.config import load_config
    from rayjobs.errors import TrainingStopped
    from rayjobs.tune.pareto import read_csv
    from rayjobs.tune.sweep import run_sweep

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    start_local_ray(num_cpus=args.concurrency)
    try:
        with tempfile.TemporaryDirectory(prefix="draftray-bench-load-") as tmp:
            cfg = load_config(CONFIG, _overrides(tmp, args.trials, args.concurrency, args.steps))
            sampler = Sampler(Path(tmp) / "load" / "trials")
            sampler.start()
            t0 = time.perf_counter()
            try:
                run_sweep(cfg)
            except TrainingStopped as err:  # "k of N trials failed": expected, they are counted below
                print(f"sweep: {err}")
            wall = time.perf_counter() - t0
            sampler.halt.set()
            sampler.join()
            out = _summary(read_csv(Path(tmp) / "load" / "trials.csv"), sampler.samples, args.trials)
            out.update(wall_s=round(wall, 1), leaked_placement_groups=_leaked_groups(),
                       cpus_free=ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"])  # fmt: skip
            if args.trace:
                args.trace.write_text(json.dumps([(round(t, 1), round(rss / MB, 1), n, e) for t, rss, n, e in sampler.samples]))
    finally:
        ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
