"""`draftray score`: score a folder of images with registered rewards (and a diversity metric).

All input is checked before any model is built or anything written: one UserError line naming the culprit.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from rayjobs.errors import UserError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FILE_KEYS = ("file_name", "file")
PROMPT_KEYS = ("prompt", "text", "caption")


@dataclass
class Job:
    files: list[Path]
    sizes: list[tuple[int, int]]  # (H, W) per image
    prompts: list[str]
    rewards: dict[str, dict]  # name -> kwargs, in column order
    diversity: tuple[str, dict] | None
    groups: list[list[int]]  # image indices sharing a prompt (>= 2 each), for the diversity metric
    device: torch.device
    batch_size: int
    out: Path | None


def read_image(path: Path) -> torch.Tensor:
    """PIL -> RGB -> float [3, H, W] in [0, 1]; UserError naming the file when it cannot be read."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # noqa: BLE001  (PIL fails with OSError, SyntaxError, ValueError, ...)
        raise UserError(f"--images: cannot read {path} ({first_line(err)})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(255)


def list_images(directory: str) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"--images {directory}: no such directory")
    files = sorted((p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
    if not files:
        raise UserError(f"--images {directory}: no *.png, *.jpg or *.jpeg images there")
    return files


def load_prompts(path: str, files: list[Path]) -> list[str]:
    """One prompt per image: a .jsonl file naming the images, or one prompt per non-empty line in file-name order."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--prompts {path}: cannot read ({first_line(err)})") from None
    if path.lower().endswith(".jsonl"):
        return _jsonl_prompts(path, text, files)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(prompts) != len(files):
        raise UserError(
            f"--prompts {path}: {len(prompts)} prompts for {len(files)} images "
            "(one prompt per non-empty line, matched to the images in file-name order)"
        )
    return prompts


def _jsonl_prompts(path: str, text: str, files: list[Path]) -> list[str]:
    names, found = {f.name for f in files}, {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--prompts {path}:{n}: not valid JSON ({err.msg})") from None
        entry = entry if isinstance(entry, dict) else {}
        file = next((entry[k] for k in FILE_KEYS if k in entry), None)
        prompt = next((entry[k] for k in PROMPT_KEYS if k in entry), None)
        if not isinstance(file, str) or not isinstance(prompt, str):
            raise UserError(f"--prompts {path}:{n}: expected an object with string 'file_name' (or 'file') and 'prompt' (or 'text', 'caption')")
        if file not in names:
            raise UserError(f"--prompts {path}:{n}: {file!r} is not an image in --images")
        if file in found:
            raise UserError(f"--prompts {path}:{n}: a second entry for {file!r}")
        found[file] = prompt
    missing = [f.name for f in files if f.name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more images)" if len(missing) > 1 else ""
        raise UserError(f"--prompts {path}: no entry for {missing[0]}{more}")
    return [found[f.name] for f in files]


def parse_settings(items: list[str], names: list[str]) -> dict[str, dict]:
    """'NAME.KEY=VALUE' (VALUE read as YAML) -> {NAME: {KEY: value}}; NAME may contain dots (hpsv2.1)."""
    import yaml

    kwargs: dict[str, dict] = {n: {} for n in names}
    for item in items:
        lhs, eq, value = item.partition("=")
        name = max((n for n in names if lhs.startswith(n + ".")), key=len, default=None)
        if not eq or name is None or lhs == name + ".":
            raise UserError(f"--set {item}: expected NAME.KEY=VALUE with NAME one of {', '.join(names)}")
        try:
            kwargs[name][lhs[len(name) + 1 :]] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UserError(f"--set {item}: value is not valid YAML ({first_line(err)})") from None
    return kwargs


def _check_model(name: str, kwargs: dict, kind: str) -> None:
    """Name, settings and weight locations of one reward / metric, without loading big weights."""
    import rewards

    flag = "--reward" if kind == "reward" else "--diversity"
    table = rewards.REWARDS if kind == "reward" else rewards.DIVERSITY_METRICS
    try:
        if name in table:
            inspect.signature(table[name]).bind(**kwargs)  # unknown settings, before anything is built
        rewards.check(name, kwargs, kind=kind, where=f"--set {name}")
    except (TypeError, ValueError, KeyError, OSError, RuntimeError) as err:
        msg, where = first_line(err).removeprefix(f"{name}: "), ("--set" if kwargs and not isinstance(err, KeyError) else flag)
        raise UserError(msg if msg.startswith("--set ") else f"{where} {name}: {msg}") from None


def _indices(keys: list) -> list[list[int]]:
    """Indices of equal keys, grouped, in order of first appearance."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.values())


def _diversity_groups(job: Job) -> list[list[int]]:
    groups = [g for g in _indices(job.prompts) if len(g) >= 2]
    if not groups:
        raise UserError(f"--diversity {job.diversity[0]}: no prompt has >= 2 images (it compares images of the same prompt)")
    for g in groups:
        if len({job.sizes[i] for i in g}) > 1:
            raise UserError(f"--diversity: images of prompt {job.prompts[g[0]]!r} differ in size ({', '.join(job.files[i].name for i in g)})")
    return groups


def _check_out(out: str) -> Path:
    p = Path(out)
    for bad, why in ((p.suffix.lower() != ".csv", "must be a .csv file"), (p.exists(), "already exists; choose a new path"),
                     (not p.parent.is_dir(), f"directory {p.parent} does not exist")):  # fmt: skip
        if bad:
            raise UserError(f"--out {out}: {why}")
    return p


def prepare(reward, images, prompts, diversity=None, settings=(), batch_size=8, device="auto", out=None) -> Job:
    """Every check of `draftray score`'s input; nothing built, nothing written."""
    out_path = _check_out(out) if out is not None else None
    names = [n.strip() for n in reward.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"--reward {reward!r}: give distinct reward names separated by commas, e.g. pickscore,hpsv2")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU visible (use --device cpu or auto)")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    files = list_images(images)
    sizes = [tuple(read_image(f).shape[1:]) for f in files]
    texts = load_prompts(prompts, files)
    kwargs = parse_settings(list(settings), names + ([diversity] if diversity and diversity not in names else []))
    for name in names:
        _check_model(name, kwargs[name], "reward")
    div = (diversity, kwargs[diversity]) if diversity else None
    job = Job(files, sizes, texts, {n: kwargs[n] for n in names}, div, [], dev, batch_size, out_path)
    if div:
        _check_model(*div, "diversity")
        job.groups = _diversity_groups(job)
    return job


def _build(kind: str, name: str, kwargs: dict):
    """-> (the reward or metric, its describe() line or its name)."""
    import rewards

    try:
        model = (rewards.build_reward if kind == "reward" else rewards.build_diversity)(name, **kwargs)
    except (ValueError, OSError) as err:
        raise UserError(f"--{kind} {name}: {first_line(err)}") from None
    describe = getattr(model, "describe", None)
    return model, (describe() if callable(describe) else name)


def score_rewards(job: Job) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Each reward built, moved to the device and run over all images (one reward in memory at a time)."""
    scores, about = {}, {}
    for name, kwargs in job.rewards.items():
        reward, about[name] = _build("reward", name, kwargs)
        if isinstance(reward, torch.nn.Module):
            reward = reward.to(job.device)
        scores[name] = values = [0.0] * len(job.files)
        batches = [g[k : k + job.batch_size] for g in _indices(job.sizes) for k in range(0, len(g), job.batch_size)]  # one size each
        with torch.no_grad():
            for idx in batches:
                images = torch.stack([read_image(job.files[i]) for i in idx]).to(job.device)
                try:
                    out = reward(images, [job.prompts[i] for i in idx]).float().cpu().tolist()
                except ValueError as err:  # e.g. a prompt the reward cannot read
                    raise UserError(f"--reward {name}: {first_line(err)}") from None
                for i, v in zip(idx, out):
                    values[i] = v
        del reward
    return scores, about


def score_diversity(job: Job) -> tuple[float, str]:
    metric, about = _build("diversity", *job.diversity)
    with torch.no_grad():
        return float(metric([torch.stack([read_image(job.files[i]) for i in g]) for g in job.groups])), about


def columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def report(job: Job, scores: dict[str, list[float]], about: dict[str, str], diversity=None) -> str:
    """The per-image table, then per reward mean / std / min / max and what the reward is."""
    short = [p if len(p) <= 40 else p[:37] + "..." for p in job.prompts]
    rows = [[f.name, short[i], *(f"{scores[n][i]:.4g}" for n in scores)] for i, f in enumerate(job.files)]
    stats = []
    for name, v in scores.items():
        std = statistics.stdev(v) if len(v) > 1 else 0.0
        stats.append([name, *(f"{x:.4g}" for x in (statistics.fmean(v), std, min(v), max(v))), about[name]])
    text = columns(["file", "prompt", *scores], rows) + f"\n\n{len(job.files)} images\n"
    text += columns(["reward", "mean", "std", "min", "max", "about"], stats)
    if diversity is not None:
        value, what = diversity
        text += f"\n\ndiversity {value:.4g} over {len(job.groups)} prompt(s) with >= 2 images: {what}"
    return text


def write_csv(path: Path, job: Job, scores: dict[str, list[float]]) -> None:
    """file,prompt,<rewards> at full precision; a temp file in the same directory, then os.replace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "x", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "prompt", *scores])
            for i, (file, prompt) in enumerate(zip(job.files, job.prompts)):
                w.writerow([file.name, prompt, *(repr(scores[n][i]) for n in scores)])
        if path.exists():
            raise UserError(f"--out {path}: appeared while scoring; choose a new path")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def score(**options) -> int:
    job = prepare(**options)
    scores, about = score_rewards(job)
    diversity = score_diversity(job) if job.diversity else None
    print(report(job, scores, about, diversity))
    if job.out is not None:
        write_csv(job.out, job, scores)
        print(f"wrote {job.out}")
    return 0
