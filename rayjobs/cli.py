"""The `draftray` command: train, sample.

Bad input prints one line ``draftray: error: ...`` and exits 2 with nothing
written; a run that stops itself (non-finite loss) exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rayjobs.errors import TrainingStopped, UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draftray", description="Reward fine-tuning of text-to-image diffusion models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune (DRaFT+ by default) on a local or remote Ray cluster")
    t.description = (
        "Train with CONFIG (a YAML preset; none = the embedded tiny default) and dotted key=value overrides, "
        "e.g. `draftray train configs/tiny.yaml objective.kl_coeff=0.5 ray.num_workers=2`. "
        "Prints the run directory as the last line on stdout."
    )
    t.add_argument("config", nargs="?", help="YAML config file (default: the embedded tiny DRaFT+ config)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-4")
    t.add_argument("--address", help="Ray cluster address to join (default: $RAY_ADDRESS, else start a local Ray)")
    t.add_argument("--verbose", action="store_true", help="forward Ray worker logs to this terminal")

    s = sub.add_parser("sample", help="generate images with diffusers' StableDiffusionPipeline (+ a trained LoRA)")
    s.add_argument("--model", required=True, help="'tiny', a diffusers-layout directory, or a hub id")
    s.add_argument("--lora", help="directory holding pytorch_lora_weights.safetensors (a run's export/)")
    s.add_argument("--prompt", required=True, help="the text prompt")
    s.add_argument("--negative-prompt", default=None, help="text for the unconditional branch")
    s.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    s.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    s.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    s.add_argument("--num-images", type=int, default=1, help="how many images")
    s.add_argument("--out", required=True, help="output directory for PNGs")
    return p


def _train(args) -> int:
    # Config values may contain '=' only after the first; a CONFIG containing '=' is an override.
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    if args.address:
        overrides.append(f"ray.address={args.address}")
    from rayjobs.config import load_config
    from rayjobs.train import fit

    cfg = load_config(config, overrides)
    run_dir = fit(cfg, verbose=args.verbose)
    print(run_dir)
    return 0


def _sample(args) -> int:
    from rayjobs.sample import generate

    for path in generate(args):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    try:
        return {"train": _train, "sample": _sample}[args.command](args)
    except UserError as err:
        print(f"draftray: error: {err}", file=sys.stderr)
        return err.exit_code
    except TrainingStopped as err:
        print(f"draftray: stopped: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("draftray: interrupted; start the same run name again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
