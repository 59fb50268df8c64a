"""Supervised step (DreamBooth: denoise + prior) beside the DRaFT+ step, samples per second, side by side.

    python -m bench.supervised [--steps 6] [--repeats 3] [--threads 1]

Both run ``Worker.train_step`` on the shipped toy model (LoRA, batch 4, 32 px) in this process, in
alternating order. DRaFT+ samples T=10 DDIM steps per image (K=1, KL); the supervised step is two
UNet forwards and backwards (instance + class batch) plus the VAE encodes. Samples/s counts images
per optimizer step (DreamBooth: the instance images; its class images are the prior's extra cost).
Recorded in docs/benchmarks.md#supervised.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import _draftray_compat  # noqa: F401  (first: the torchvision guard)
from rayjobs.config import load_config
from rayjobs.tools.toy_data import write_dataset
from rayjobs.training.loop import LocalContext, Worker


def _worker(root: Path, kind: str) -> Worker:
    common = [f"run.output_dir={root}", "train.batch_size=4", "train.eval_every=0", "optim.warmup_steps=0"]
    if kind == "draftplus":
        return Worker(load_config(None, common), LocalContext(root / kind))
    extra = ["objective.preset=dreambooth", f"data.source={root / 'subject'}", "data.fixed_caption=a sks star",
             f"data.class_dir={root / 'class'}", "data.class_prompt=a star", "data.num_class_images=8"]  # fmt: skip
    worker = Worker(load_config(None, common + extra), LocalContext(root / kind))
    worker.make_class_images()
    return worker


def timed_steps(worker: Worker, steps: int, offset: int) -> list[float]:
    times = []
    for step in range(offset, offset + steps):
        t0 = time.perf_counter()
        worker.train_step(step)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per repeat and side")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="draftray-bench-sup-") as tmp:
        root = Path(tmp)
        write_dataset(root / "subject", "subject", 8)
        workers = {kind: _worker(root, kind) for kind in ("draftplus", "dreambooth")}
        for w in workers.values():
            timed_steps(w, 1, 0)  # warm-up
        times = {kind: [] for kind in workers}
        for rep in range(args.repeats):
            order = list(workers) if rep % 2 == 0 else list(reversed(workers))
            for kind in order:
                times[kind] += timed_steps(workers[kind], args.steps, 1 + rep * args.steps)
    batch = 4
    print("| step | median s/step | samples/s |")
    print("|---|---|---|")
    for kind, ts in times.items():
        med = statistics.median(ts)
        print(f"| {kind} | {med:.3f} | {batch / med:.1f} |")
    ratio = statistics.median(times["draftplus"]) / statistics.median(times["dreambooth"])
    print(f"\nDreamBooth step is {ratio:.1f}x the DRaFT+ step's throughput (same batch, same process)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
