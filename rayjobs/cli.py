"""The `draftray` command: train, sweep, pareto, sample, score, weights, toy, submit, jobs.

Bad input prints one line ``draftray: error: ...`` and exits 2 with nothing
written; a run that stops itself (non-finite loss) exits 1; a sweep interrupted by a signal exits
128 + its number (130 for Ctrl-C) after printing its ``--resume`` command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rayjobs.cluster import submit
from rayjobs.errors import Interrupted, TrainingStopped, UserError

if TYPE_CHECKING:  # the annotation only: importing rayjobs.tools.sample loads torch and diffusers
    from rayjobs.tools.sample import SampleRequest


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

    w = sub.add_parser("sweep", help="Ray Tune sweep over config keys; writes the reward-diversity Pareto front")
    w.description = (
        "Run every trial of CONFIG's sweep: section (e.g. configs/toy-kl-sweep.yaml), each a full training run, then "
        "write trials.csv, pareto.csv, pareto.json, pareto.png, front/ and summary.md. Prints the sweep directory as the "
        "last line on stdout. Interrupted (Ctrl-C, SIGTERM), it lists every trial's state in trials.csv, prints the "
        "`draftray sweep --resume SWEEP_DIR` command that continues it and exits 130 (143 for SIGTERM); --resume also "
        "continues a sweep whose driver was killed."
    )
    w.add_argument("config", nargs="?", help="YAML config with a sweep: section (not with --resume)")
    w.add_argument("--resume", metavar="SWEEP_DIR", help="continue this sweep (done, stopped and failed trials are kept, interrupted ones resume, the rest start)")
    w.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base config, e.g. train.steps=20")
    w.add_argument("--address", help="Ray cluster address to join (default: $RAY_ADDRESS, else start a local Ray)")
    w.add_argument("--verbose", action="store_true", help="Tune's status table and the workers' logs")
    w.add_argument("--or-resume", action="store_true", help="if sweep.name already holds a sweep, resume it (what `draftray submit --sweep` runs)")

    a = sub.add_parser("pareto", help="rebuild a sweep's front, plot, grids and summary from its trials.csv")
    a.add_argument("sweep_dir", help="a sweep directory (holds trials.csv and sweep.yaml)")

    _toy_parser(sub)
    _submit_parsers(sub)

    s = sub.add_parser("sample", help="generate (or, with --image, edit; with --image --mask, inpaint) images with diffusers' pipelines (+ a trained LoRA / embeddings)")
    s.add_argument("--model", required=True, help="'tiny', 'tiny-sdxl', 'tiny-inpaint', 'toy', a diffusers-layout directory (SD 1.x or SDXL), or a hub id")
    s.add_argument("--lora", help="directory holding pytorch_lora_weights.safetensors (a run's export/)")
    s.add_argument("--prompt", required=True, help="the text prompt")
    s.add_argument("--negative-prompt", default=None, help="text for the unconditional branch")
    s.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (each in 0 .. 2**32 - 1)")
    s.add_argument("--steps", type=int, default=50, help="denoising steps (1 .. the model's training timesteps, 1000)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the pipeline's, 7.5 SD 1.x, 5.0 SDXL)")
    s.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 up to 16384 (default: the model's native size)")
    s.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 up to 16384 (default: the model's native size)")
    s.add_argument("--num-images", type=int, default=1, help="how many images")
    s.add_argument("--scheduler", choices=["ddim", "pndm", "euler", "euler_a", "dpmsolver++"], help="sampling scheduler (default: the model's)")
    s.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA (0 = the base model)")
    s.add_argument("--embeddings", action="append", default=[],
                   help="textual-inversion safetensors file or directory (learned_embeds.safetensors; SDXL: a file of clip_l and clip_g rows); repeatable")
    s.add_argument("--token", help="SDXL embeddings: the token to load them under when the file's metadata names none")
    s.add_argument("--vae", help="a VAE in diffusers layout replacing the model's (e.g. the fp16-fix SDXL VAE)")
    s.add_argument("--refiner", help="SDXL: a refiner in diffusers layout (or 'tiny-refiner') that finishes the base's denoising")
    s.add_argument("--refiner-start", type=float, default=0.8, help="with --refiner: the fraction of the steps the base runs before the refiner (in (0, 1))")
    s.add_argument("--prompt-weighting", choices=["none", "compel"], default="none",
                   help="'compel': weighted prompts like '(oil on canvas)+++' or '(word)1.3' (needs pip install 'draftray[compel]')")
    s.add_argument("--image", help="InstructPix2Pix: edit this image (the model's UNet must have 8 input channels); with --mask: the image to inpaint")
    s.add_argument("--image-guidance", type=float, default=1.5, help="InstructPix2Pix image guidance scale (with --image)")
    s.add_argument("--mask", help="inpainting: repaint the white part of this mask over --image (black = keep; grey thresholded at 0.5); "
                                  "any SD 1.x or SDXL model, a dedicated 9-channel inpainting UNet or a 4-channel text-to-image one")
    s.add_argument("--strength", type=float, default=None,
                   help="with --mask: how much noise covers the masked region, in (0, 1] (default 1.0: repaint from pure noise)")
    s.add_argument("--paste-back", action="store_true",
                   help="with --mask: copy the input's pixels back outside the mask, so only the white part changes")
    s.add_argument("--out", required=True, help="output directory for PNGs")
    _score_parser(sub)
    _weights_parser(sub)
    return p


def _submit_parsers(sub) -> None:
    address = f"the cluster's dashboard (default: $RAY_ADDRESS if http, else {submit.DEFAULT_ADDRESS})"
    s = sub.add_parser("submit", help="submit a training run or a sweep to a Ray cluster as a Ray Job")
    s.add_argument("config", help="YAML config inside the working directory (it is uploaded with it)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, passed on to the job")
    s.add_argument("--sweep", action="store_true", help="run `draftray sweep` (the config needs a sweep: section)")
    s.add_argument("--address", help=address)
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
        p.add_argument("--address", help=address)


def _score_parser(sub) -> None:
    c = sub.add_parser("score", help="score a folder of images with registered rewards (and a diversity metric)")
    c.description = (
        "Score every *.png/*.jpg/*.jpeg in --images with each reward (no gradients); print a table and a summary "
        "(mean, std, min, max, what each reward is), e.g. `draftray score --reward pickscore,hpsv2 --images samples/ "
        "--prompts prompts.txt --out scores.csv`."
    )
    c.add_argument("--reward", required=True, help="comma-separated reward names, e.g. pickscore,hpsv2")
    c.add_argument("--images", required=True, help="directory of *.png / *.jpg / *.jpeg images (not searched recursively)")
    c.add_argument("--prompts", required=True, help="a .jsonl file (file_name, prompt per line) or text (one prompt a line, file-name order)")
    c.add_argument("--diversity", help="diversity metric over the images sharing a prompt, e.g. lpips")
    c.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a reward's or the metric's setting, e.g. pickscore.model=/models/PickScore_v1 (repeatable)")  # fmt: skip
    c.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available")
    c.add_argument("--out", help="also write the table here as CSV (a new .csv path)")


def _weights_parser(sub) -> None:
    w = sub.add_parser("weights", help="list or download the preference rewards' and LPIPS' weights")
    ws = w.add_subparsers(dest="weights_command", required=True)
    ws.add_parser("list", help="each weight location with default settings, and whether it is on this machine")
    f = ws.add_parser("fetch", help="download the default weights of rewards / metrics (network needed)")
    f.add_argument("names", nargs="+", metavar="NAME", help="e.g. pickscore hpsv2 lpips")


def _train(args) -> int:
    # Config values may contain '=' only after the first; a CONFIG containing '=' is an override.
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    if args.address:
        overrides.append(f"ray.address={args.address}")
    from rayjobs.cluster.driver import fit
    from rayjobs.config import load_config

    cfg = load_config(config, overrides)
    run_dir = fit(cfg, verbose=args.verbose)
    print(run_dir)
    return 0


def _toy_parser(sub) -> None:
    y = sub.add_parser("toy", help="the toy world (a small synthetic domain for CPU runs): pretrain its diffusion model and reward, check accuracy")
    ys = y.add_subparsers(dest="toy_command", required=True)
    p = ys.add_parser("pretrain", help="train the toy diffusion model from scratch (about 35 min on 2 CPU cores)")
    p.add_argument("--out", required=True, help="output directory (diffusers layout); the shipped copy is models/weights/toy")
    p.add_argument("--seed", type=int, default=0, help="init and data seed")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE optimizer steps (default: PretrainSettings)")
    p.add_argument("--unet-steps", type=int, default=None, help="UNet + text encoder optimizer steps (default: PretrainSettings)")
    r = ys.add_parser("reward", help="train the toy reward model / classifier (about 7 min on 2 CPU cores)")
    r.add_argument("--out", required=True, help="output .safetensors; the shipped copy is rewards/weights/toy_net.safetensors")
    r.add_argument("--steps", type=int, default=None, help="optimizer steps (default: RewardTrainSettings)")
    d = ys.add_parser("dataset", help="render training data for the supervised toy presets (configs/toy-*.yaml)")
    d.add_argument("--out", required=True, help="output directory (created)")
    d.add_argument("--kind", choices=["captions", "subject", "edits"], required=True,
                   help="captions: images + .txt; subject: DreamBooth instance images; edits: InstructPix2Pix triples")  # fmt: skip
    d.add_argument("--n", type=int, default=64, help="number of items")
    d.add_argument("--seed", type=int, default=0, help="toy-world seed")
    c = ys.add_parser("check", help="caption accuracy of a model's samples, judged by the toy classifier")
    c.add_argument("--model", default="toy", help="'toy' or a diffusers-layout directory")
    c.add_argument("--lora", help="a run's export/ directory to apply")
    c.add_argument("--steps", type=int, default=20, help="DDIM steps")
    c.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    c.add_argument("--grid", help="write the sampled images as a PNG grid here")


def _sweep(args) -> int:
    """An interrupted sweep (Ctrl-C, SIGTERM) prints one line with the `draftray sweep --resume` command that
    continues it and exits 128 + the signal (130 for Ctrl-C); the sweep directory is not printed then."""
    try:
        print(_run_or_resume_sweep(args))
    except Interrupted as err:
        print(f"draftray: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def _run_or_resume_sweep(args) -> Path:
    overrides = list(args.overrides) + ([f"ray.address={args.address}"] if args.address else [])
    from rayjobs.config import load_config
    from rayjobs.tune.sweep import TUNE, resume_sweep, run_sweep, sweep_dir_for

    if args.resume:
        if args.config or overrides:
            raise UserError("--resume: give only the sweep directory (its sweep.yaml holds the config)")
        return resume_sweep(args.resume, verbose=args.verbose)
    if not args.config:
        raise UserError("sweep: give a CONFIG with a sweep: section, or --resume SWEEP_DIR")
    cfg = load_config(args.config, overrides)
    if args.or_resume and (existing := sweep_dir_for(cfg)).joinpath(TUNE).is_dir():  # a resubmitted job (draftray submit)
        return resume_sweep(existing, verbose=args.verbose)
    return run_sweep(cfg, verbose=args.verbose)


def _pareto(args) -> int:
    from rayjobs.tune.pareto import rebuild

    print(rebuild(args.sweep_dir))
    return 0


def _toy(args) -> int:
    import json
    from dataclasses import replace

    out = getattr(args, "out", None)
    if out and Path(out).exists() and (Path(out).is_file() or any(Path(out).iterdir())):
        raise UserError(f"--out {out}: already exists; give a new path (the shipped weights are never overwritten in place)")
    if args.toy_command == "pretrain":
        from rayjobs.tools.toy import PretrainSettings, pretrain

        s = PretrainSettings(seed=args.seed)
        s = replace(s, vae_steps=args.vae_steps or s.vae_steps, unet_steps=args.unet_steps or s.unet_steps)
        print(pretrain(args.out, s))
    elif args.toy_command == "dataset":
        from rayjobs.tools.toy_data import write_dataset

        if args.n < 1:
            raise UserError(f"--n must be >= 1, got {args.n}")
        print(write_dataset(args.out, args.kind, args.n, args.seed))
    elif args.toy_command == "reward":
        from rayjobs.tools.toy import train_reward

        print(json.dumps(train_reward(args.out, args.steps)))
    else:
        from models.components import ModelNotFoundError
        from models.export import LORA_FILE
        from rayjobs.tools.toy import caption_accuracy

        if args.steps < 1:
            raise UserError(f"--steps must be >= 1, got {args.steps}")
        if args.lora and not (Path(args.lora) / LORA_FILE).is_file():
            raise UserError(f"--lora {args.lora}: no {LORA_FILE} there (give a run's export/ directory)")
        try:
            report = caption_accuracy(args.model, steps=args.steps, guidance=args.guidance, lora=args.lora)
        except ModelNotFoundError as err:
            raise UserError(f"--model: {err}") from None
        images = report.pop("images")
        if args.grid:
            from PIL import Image

            from rayjobs.runlog import image_grid

            Image.fromarray(image_grid(list(images.split(8)), min_cell=64)).save(args.grid)
        print(json.dumps(report))
    return 0


def sample_request(args: argparse.Namespace) -> SampleRequest:
    """The ``SampleRequest`` of `draftray sample`'s parsed arguments: each option is the field of its name."""
    from dataclasses import fields

    from rayjobs.tools.sample import SampleRequest

    return SampleRequest(**{f.name: getattr(args, f.name) for f in fields(SampleRequest)})


def _sample(args) -> int:
    from rayjobs.tools.sample import generate

    for path in generate(sample_request(args)):
        print(path)
    return 0


def _score(args) -> int:
    from rayjobs.tools.score import score

    options = ("reward", "images", "prompts", "diversity", "settings", "batch_size", "device", "out")
    return score(**{k: getattr(args, k) for k in options})


def _submit(args) -> int:
    run = submit.Submission(config=args.config, overrides=tuple(args.overrides), sweep=args.sweep, working_dir=args.working_dir)
    return submit.submit(run, address=args.address, follow_logs=args.follow)


def _jobs(args) -> int:
    return submit.jobs(args.jobs_command, getattr(args, "id", None), address=args.address, follow_logs=getattr(args, "follow", False))


def _weights(args) -> int:
    from rayjobs.tools.weights import weights_fetch, weights_list

    return weights_list() if args.weights_command == "list" else weights_fetch(args.names)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes' CPU backend (the 8bit extra) warns at import on avx512-bf16 CPUs that an optional kernel it
    # would fetch from a hub is missing; the line is noise in every command's output (8-bit AdamW works without it)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = _parser().parse_args(argv)
    try:
        commands = {"train": _train, "sweep": _sweep, "pareto": _pareto, "toy": _toy, "sample": _sample, "score": _score, "weights": _weights,
                    "submit": _submit, "jobs": _jobs}  # fmt: skip
        return commands[args.command](args)
    except UserError as err:
        print(f"draftray: error: {err}", file=sys.stderr)
        return err.exit_code
    except TrainingStopped as err:
        print(f"draftray: stopped: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as err:  # SIGTERM to `draftray train` (a sweep's own handler prints its --resume line)
        print(f"draftray: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("draftray: interrupted; start the same run name again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
