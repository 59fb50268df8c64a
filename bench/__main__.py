"""`python -m bench cpu|gpu [options]`: the benchmark suite, one command each (bench/README.md).

    cpu   bench.core (Ray Train overhead, sampler vs diffusers' pipeline, reference memory), bench.supervised,
          bench.rewards, bench.sweep: each in its own process, one after the other, on the tiny/toy models.
          --quick: the short variants (a smoke test: ~5 min on 2 cores instead of ~12).
    gpu   bench.gpu: SD 1.5 / SDXL DRaFT+ LoRA, ours beside the baseline (without CUDA: says so, exit 0);
          --tiny runs the identical harness on the CPU. Options: `python -m bench gpu --help`.

Each benchmark prints its own table; paste them into docs/benchmarks.md with the printed header (date,
machine, versions) and the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (module, full arguments, --quick arguments)
CPU = (
    ("bench.core", [], ["--quick"]),
    ("bench.supervised", [], ["--steps", "3", "--repeats", "1"]),
    ("bench.rewards", [], ["--repeats", "2"]),
    ("bench.sweep", [], ["--trials", "2", "--concurrency", "2", "--steps", "2"]),
)


def cpu(argv: list[str]) -> int:
    """Every CPU benchmark in its own process (a fresh Ray, a fresh allocator each); exit 1 if any failed."""
    quick = "--quick" in argv
    only = next((a.split("=", 1)[1] for a in argv if a.startswith("--only=")), None)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))
    failed = []
    for module, full, short in CPU:
        if only and module.removeprefix("bench.") not in only.split(","):
            continue
        cmd = [sys.executable, "-m", module, *(short if quick else full)]
        print(f"\n==== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        print(f"==== {module}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(module)
    if failed:
        print(f"bench cpu: failed: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("cpu", "gpu"):
        print(__doc__.strip())
        return 2
    if argv[0] == "cpu":
        if "-h" in argv or "--help" in argv:
            print(__doc__.strip() + "\n  cpu options: --quick, --only=core,supervised,rewards,sweep")
            return 0
        return cpu(argv[1:])
    import models  # noqa: F401  (the torchvision guard, before diffusers)
    from bench import gpu

    return gpu.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
