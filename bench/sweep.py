"""Sweep throughput on the local cluster (bench/README.md, "Sweeps").

Side by side in one run, on one local cluster started once:
    single   one trial's config trained alone with `run_trainer` (Train worker start, training, evaluations, teardown)
    sweep    `run_sweep` over N such trials (a kl_coeff grid), `max_concurrent` C at once

    ideal              = N * single / C          (every slot busy with training work only)
    overhead per trial = (sweep - ideal) * C / N (what each trial costs its slot beyond a lone run)
    peak concurrency   = most trials whose [config written, last metric] spans overlap

Run: ``.venv/bin/python -m bench.sweep [--trials 4] [--concurrency 2] [--steps 4]``. Target: overhead per
trial under 10 s with C = the CPUs here (2), and the peak concurrency equal to C.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import _draftray_compat  # noqa: F401

CONFIG = Path(__file__).parents[1] / "configs" / "toy-kl-sweep.yaml"


def _overrides(out: str, steps: int) -> list[str]:
    return [f"run.output_dir={out}", f"train.steps={steps}", f"train.eval_every={steps // 2}", "data.eval_seeds=[0,1]",
            "sampler.steps=5", "sampler.truncation_steps=2", "sweep.inference={}", "ray.num_workers=1", "ray.cpus_per_worker=1"]  # fmt: skip


def _peak(trials: Path) -> int:
    spans = []
    for d in trials.glob("*"):
        if (d / "metrics.jsonl").exists():
            spans.append((os.path.getmtime(d / "config.yaml"), os.path.getmtime(d / "metrics.jsonl")))  # start, last record
    return max((sum(1 for a, b in spans if a <= t < b) for t, _ in spans), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    from rayjobs.cluster.driver import prepare_run_dir, run_trainer, start_local_ray
    from rayjobs.config import load_config
    from rayjobs.tune.sweep import run_sweep, trial_config

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    start_local_ray(num_cpus=args.concurrency)
    with tempfile.TemporaryDirectory(prefix="draftray-bench-sweep-") as tmp:
        kls = [round(0.01 * 10 ** (i / 2), 4) for i in range(args.trials)]
        cfg = load_config(CONFIG, _overrides(tmp, args.steps) + [
            "sweep.name=bench", f"sweep.max_concurrent={args.concurrency}", f"sweep.params={{objective.kl_coeff: {{grid: {kls}}}}}"])  # fmt: skip
        one = trial_config(cfg.model_dump(mode="json"), {"objective.kl_coeff": kls[0]}, "single", tmp)
        prepare_run_dir(one, Path(tmp) / "single")
        t0 = time.perf_counter()
        run_trainer(one, Path(tmp) / "single", progress=False)
        single = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run_sweep(cfg)
        sweep = time.perf_counter() - t0
        peak = _peak(out / "trials")
    ideal = args.trials * single / args.concurrency
    print(json.dumps({
        "trials": args.trials, "concurrency": args.concurrency, "steps": args.steps, "single_s": round(single, 1),
        "sweep_s": round(sweep, 1), "ideal_s": round(ideal, 1), "overhead_per_trial_s": round((sweep - ideal) * args.concurrency / args.trials, 1),
        "peak_concurrency": peak,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
