"""CPU benchmarks: three ratios measured side by side in one run (bench/README.md).

    (a) ray_overhead   DRaFT+ step time inside Ray Train (1 worker) / plain in-process loop   <= 1.10
    (b) sampler        draftray sampler throughput / diffusers StableDiffusionPipeline         >= 1.00
    (c) reference_mem  peak RSS, LoRA with a frozen UNet copy as reference / adapters disabled (reported)

Run: ``.venv/bin/python -m bench.core`` (``--quick`` for a short run, ``--only a,c`` for a subset).
Everything runs on the tiny model built in code (and, for (c), a larger UNet built in code): no download.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import models  # noqa: E402,F401  (import-time fix-ups before diffusers)
from models.components import Components, build_tiny  # noqa: E402
from models.objective import Objective, Weights  # noqa: E402
from models.policy import Policy  # noqa: E402
from models.sampler import SamplerSettings, sample  # noqa: E402
from rayjobs.config import Config, load_config  # noqa: E402
from rayjobs.config.data import EVAL_PROMPTS  # noqa: E402
from rewards.simple import Colorfulness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 2  # first optimizer steps left out of the per-step medians


@dataclass
class Result:
    name: str
    value: float
    target: str  # e.g. "<= 1.10", or "report" for numbers without a pass/fail
    passed: bool | None  # None: reported only
    detail: str


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def pythonpath_with_root() -> str:
    """$PYTHONPATH with the repository root first (once): child processes can import bench.core."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    return os.pathsep.join([str(ROOT), *parts])


# ---- (a) Ray Train vs a plain in-process loop ------------------------------------------------


class ThreadProbe(Colorfulness):
    """The colourfulness reward, plus: the first training call writes torch's thread count to ``path``.

    Used by name ('bench.core:ThreadProbe') on both sides of (a), so it proves how many
    threads the Ray Train worker really computed with. Its cost is the reward's (negligible).
    """

    def __init__(self, path: str):
        super().__init__()
        self.path, self.written = Path(path), False

    def forward(self, images, prompts):
        if not self.written and torch.is_grad_enabled():
            info = {"pid": os.getpid(), "threads": torch.get_num_threads(), "nice": os.nice(0), "omp": os.environ.get("OMP_NUM_THREADS")}
            self.path.write_text(json.dumps(info), encoding="utf-8")
            self.written = True
        return super().forward(images, prompts)


def train_cfg(out_dir: Path, name: str, steps: int, threads: int) -> Config:
    """configs/tiny.yaml (random tiny model, T=10, K=5, batch 2, kl 0.1) with cheap evals and no mid-run checkpoints."""
    probe = out_dir / f"{name}.threads.json"
    return load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", [
        f"run.output_dir={out_dir}", f"run.name={name}", f"train.steps={steps}",
        "train.eval_every=0", "train.checkpoint_every=100000",
        "data.eval_prompts=[a red circle on a blue background]", "data.eval_seeds=[0,1]",
        "reward.name=bench.core:ThreadProbe", f"reward.kwargs={{path: '{probe}'}}",
        f"ray.cpus_per_worker={threads}",
    ])


def step_times(run_dir: Path) -> list[float]:
    """step_time_s of every optimizer step after the warm-up ones (from metrics.jsonl)."""
    from rayjobs.runlog import read_metrics

    times = [m["step_time_s"] for m in read_metrics(run_dir) if "step_time_s" in m]
    return times[WARMUP_STEPS:]


def run_plain(cfg: Config) -> tuple[list[float], float, dict]:
    from rayjobs.training.loop import LocalContext, train_loop

    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    t0 = time.perf_counter()
    train_loop(cfg, run_dir, LocalContext(run_dir))
    wall = time.perf_counter() - t0
    return step_times(run_dir), wall, json.loads(Path(cfg.reward.kwargs["path"]).read_text())


def run_ray(cfg: Config) -> tuple[list[float], float, dict]:
    """fit() starts a local Ray, runs the TorchTrainer and shuts Ray down: wall includes all of it."""
    from rayjobs.cluster.driver import fit

    # Ray workers inherit the driver's environment: let them import bench.core (ThreadProbe).
    os.environ["PYTHONPATH"] = pythonpath_with_root()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):  # progress bar, eval lines
        run_dir = fit(cfg)
    wall = time.perf_counter() - t0
    return step_times(run_dir), wall, json.loads(Path(cfg.reward.kwargs["path"]).read_text())


def bench_ray(args) -> list[Result]:
    """Interleaved repeats (ray, plain, plain, ray, ...): medians of per-run median step times."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("bench (a) starts and stops its own local Ray; a Ray is already running in this process")
    steps, repeats = (6, 1) if args.quick else (12, 3)
    med = {"ray": [], "plain": []}
    wall = {"ray": [], "plain": []}
    threads, nice = {}, {}
    with tempfile.TemporaryDirectory(prefix="draftray-bench-") as tmp:
        for rep in range(repeats):
            order = ("ray", "plain") if rep % 2 == 0 else ("plain", "ray")
            for side in order:
                cfg = train_cfg(Path(tmp), f"{side}{rep}", steps, args.threads)
                times, w, probe = (run_ray if side == "ray" else run_plain)(cfg)
                med[side].append(median(times))
                wall[side].append(w)
                threads[side], nice[side] = probe["threads"], probe["nice"]
                print(f"  (a) rep {rep} {side:5s}: median step {med[side][-1]:.3f} s over {len(times)} steps, wall {w:.1f} s, "
                      f"torch threads {probe['threads']}, nice {probe['nice']}, load avg {os.getloadavg()[0]:.2f}", flush=True)
    ray_s, plain_s = median(med["ray"]), median(med["plain"])
    ratio = ray_s / plain_s
    wall_ray, wall_plain = median(wall["ray"]) / steps, median(wall["plain"]) / steps
    fixed = median(wall["ray"]) - median(wall["plain"])
    return [
        Result("(a) step time ray/plain", ratio, "<= 1.10", ratio <= 1.10,
               f"median step {ray_s:.3f} s (Ray Train, 1 worker) vs {plain_s:.3f} s (plain); {steps} steps, first {WARMUP_STEPS} excluded, "
               f"{repeats} repeats; torch threads ray={threads['ray']} plain={threads['plain']}; process nice ray={nice['ray']} plain={nice['plain']}"),
        Result("(a) wall/step incl. start-up ray/plain", wall_ray / wall_plain, "report", None,
               f"{wall_ray:.2f} s vs {wall_plain:.2f} s per step over a {steps}-step run (build, 2 evals, export included); "
               f"Ray fixed cost ~{fixed:.1f} s per run (ray.init + trainer start + shutdown)"),
    ]


# ---- (b) draftray sampler vs diffusers StableDiffusionPipeline -------------------------------


def timed(fn) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    images = fn()
    return images, time.perf_counter() - t0


def bench_sampler(args) -> list[Result]:
    """Same components objects (the pipeline gets the policy's UNet, LoRA B=0 included), prompts, seed, T, w."""
    policy = Policy(build_tiny(), "lora")
    pipe = policy.components.pipeline()
    prompts, seed = list(EVAL_PROMPTS), 0
    settings = SamplerSettings(steps=20, guidance=7.5, height=32, width=32)

    def ours():
        gen = torch.Generator().manual_seed(seed)
        return sample(policy, prompts, settings, gen, track_grad=False).images  # [B, 3, H, W]

    def theirs():
        gen = torch.Generator().manual_seed(seed)
        out = pipe(prompts, height=32, width=32, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                   eta=settings.eta, generator=gen, output_type="pt")
        return out.images  # [B, 3, H, W] in [0, 1]

    a, _ = timed(ours)  # warm-up, and the images compared below
    b, _ = timed(theirs)
    diff = float((a - b).abs().max())
    repeats = 2 if args.quick else 6
    t = {"draftray": [], "diffusers": []}
    for rep in range(repeats):  # back-to-back pairs, order alternating: a pair shares the machine's state
        for side, fn in (("draftray", ours), ("diffusers", theirs))[:: 1 if rep % 2 == 0 else -1]:
            t[side].append(timed(fn)[1])
    pairs = [d / o for o, d in zip(t["draftray"], t["diffusers"])]
    ratio = median(pairs)  # throughput ratio = inverse time ratio
    ours_s, theirs_s = median(t["draftray"]), median(t["diffusers"])
    n = len(prompts)
    return [
        Result("(b) sampler throughput draftray/diffusers", ratio, ">= 1.00", ratio >= 1.0,
               f"{n / ours_s:.2f} vs {n / theirs_s:.2f} img/s ({n} prompts, 32 px, T={settings.steps}, w={settings.guidance}, "
               f"median of {repeats} paired ratios, pairs {min(pairs):.3f}..{max(pairs):.3f}; {torch.get_num_threads()} torch thread(s))"),
        Result("(b) images max |draftray - diffusers|", diff, "== 0", diff == 0.0, f"same seed {seed}, images in [0, 1]"),
    ]


# ---- (c) peak memory: adapters-disabled reference vs a frozen UNet copy ----------------------


def big_components() -> Components:
    """The tiny VAE, text encoder and tokenizer with a ~70 M-parameter UNet (268 MB float32), seeded."""
    from diffusers import UNet2DConditionModel

    comps = build_tiny()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        comps.unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        ).requires_grad_(False).eval()
    return comps


def proc_status_mb(key: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process, MiB, from /proc (Linux).

    Not getrusage's ru_maxrss: after fork+exec it starts at the PARENT's high-water mark
    (the kernel keeps the old mm's peak across execve), which hid this bench's baseline.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Sets VmHWM to the current RSS (Linux >= 4.0), so the peak counts from here."""
    Path("/proc/self/clear_refs").write_text("5")


def mem_child(variant: str, steps: int, threads: int) -> None:
    """Runs in a fresh process: build, `steps` DRaFT+ steps (kl > 0); prints one JSON line."""
    torch.set_num_threads(threads)
    gc.collect()
    reset_peak_rss()
    base = proc_status_mb("VmRSS")  # after every import
    comps = big_components()
    unet_bytes = sum(p.numel() * p.element_size() for p in comps.unet.parameters())
    built = proc_status_mb("VmHWM")
    frozen_copy = copy.deepcopy(comps.unet).requires_grad_(False).eval() if variant == "copy" else None  # before LoRA
    policy = Policy(comps, "lora")
    if frozen_copy is not None:
        policy._reference = frozen_copy  # the naive reference: a second UNet in memory
    settings = SamplerSettings(steps=3, guidance=3.0, truncation_steps=1, height=32, width=32)
    objective = Objective(Weights(reward=1.0, kl_coeff=0.1), settings, Colorfulness())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        batch = {"prompts": EVAL_PROMPTS[:2], "generator": torch.Generator().manual_seed(step)}
        loss, metrics = objective(policy, batch)
        loss.backward()
        opt.step()
    assert float(metrics["kl"]) >= 0 and (policy._reference is None) == (variant == "adapters")
    print(json.dumps({"variant": variant, "base_mb": base, "built_mb": built, "peak_mb": proc_status_mb("VmHWM"), "unet_bytes": unet_bytes}))


def run_mem_child(variant: str, steps: int, threads: int) -> dict:
    code = f"from bench.core import mem_child; mem_child({variant!r}, {steps}, {threads})"
    env = dict(os.environ, PYTHONPATH=pythonpath_with_root())
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(args) -> list[Result]:
    steps, repeats = (2, 1) if args.quick else (2, 2)
    delta = {"adapters": [], "copy": []}
    built = []  # RSS after building the components, before the policy: the same in both variants
    for rep in range(repeats):
        for variant in ("adapters", "copy") if rep % 2 == 0 else ("copy", "adapters"):
            out = run_mem_child(variant, steps, args.threads)
            delta[variant].append(out["peak_mb"] - out["base_mb"])
            built.append(out["built_mb"] - out["base_mb"])
            print(f"  (c) rep {rep} {variant:8s}: peak RSS - baseline = {delta[variant][-1]:.0f} MB (components built: {built[-1]:.0f} MB)", flush=True)
    a, b = median(delta["adapters"]), median(delta["copy"])
    unet_mb = out["unet_bytes"] / 2**20
    return [
        Result("(c) peak RSS delta, adapters-off ref (MB)", a, "report", None,
               f"Policy(comps, 'lora'); {steps} DRaFT+ steps (T=3, K=1, batch 2, kl=0.1); of which building the components: {median(built):.0f} MB"),
        Result("(c) peak RSS delta, frozen-copy ref (MB)", b, "report", None, "same LoRA policy, reference = deepcopy(UNet) made before LoRA"),
        Result("(c) memory copy/adapters", b / a, "> 1 (report)", b > a,
               f"difference {b - a:.0f} MB vs UNet parameters {out['unet_bytes']:,} bytes ({unet_mb:.0f} MB); median of {repeats}"),
    ]


# ---- report ----------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    verdict = {True: "PASS", False: "FAIL", None: "-"}
    width = max(len(r.name) for r in results)
    print(f"\n{'benchmark':{width}s}  {'value':>10s}  {'target':>12s}  result")
    print("-" * (width + 34))
    for r in results:
        print(f"{r.name:{width}s}  {r.value:10.4g}  {r.target:>12s}  {verdict[r.passed]}")
    print()
    for r in results:
        print(f"{r.name}: {r.detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (about a third of the time)")
    parser.add_argument("--only", default="a,b,c", help="comma-separated subset of a,b,c")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on every side (and ray.cpus_per_worker)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    benches = {"a": bench_ray, "b": bench_sampler, "c": bench_memory}
    results: list[Result] = []
    t0 = time.perf_counter()
    for key in args.only.split(","):
        print(f"running ({key}) ...", flush=True)
        t_key = time.perf_counter()
        results += benches[key.strip()](args)
        print(f"  ({key}) took {time.perf_counter() - t_key:.0f} s", flush=True)
    print_table(results)
    print(f"\ntotal bench time {time.perf_counter() - t0:.0f} s ({'quick' if args.quick else 'full'}, {args.threads} torch thread(s))")
    return 1 if args.strict and any(r.passed is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
