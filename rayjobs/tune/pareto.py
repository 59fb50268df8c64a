"""The product of a sweep: every evaluation point, the reward-diversity Pareto front, its grids and table.

A point is one evaluation of one trial (fixed eval prompts and seeds) at one checkpoint: the
trained weights at that step (kind "trained") or those weights with an inference-time knob
(kind "lora_scale" / "aig", rayjobs/tune/inference_points.py). Step 0 of every trial is the base model.

Outputs in the sweep directory, all rebuilt from trials.csv by ``draftray pareto SWEEP_DIR``
(except trials.csv itself, which `draftray sweep` writes from the trial directories):
    trials.csv     every point of every trial: status, error, swept values (config.<key>), kl_coeff, step, kind, knob,
                   reward (+ std and each component), KL, diversity, on_front, checkpoint, grid; a trial without
                   an evaluation (failed, interrupted, not started) is one row with its status and empty metrics
    pareto.csv     the non-dominated points (reward and diversity both maximised), same columns
    pareto.json    the same with the axis names and a command to reproduce each point
    pareto.png     every point, the front highlighted (rayjobs/tune/plot.py)
    front/         one sample grid per front point (same prompts and seeds: compare by eye)
    summary.md     each trial's final state, and the front with its reproduce commands

A trial's status (trial.json, the status column) is one of:
    done          it evaluated its last step
    stopped       the scheduler (ASHA) ended it early
    failed        Tune gave up on it after sweep.max_failures restarts (error: its first line)
    interrupted   it was training when the sweep was interrupted (Ctrl-C, SIGTERM); --resume continues it
    not_started   it never started (the sweep ended before its turn); --resume starts it
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
from collections import Counter
from pathlib import Path

import yaml

from rayjobs.runlog import INFERENCE_FILE, read_metrics, read_status

TRIALS = "trials"
FIXED = ["trial", "status", "error"]  # then the swept keys (config.<key>), kl_coeff, then POINT, components, TAIL
POINT = ["step", "kind", "knob", "reward", "reward_std", "kl", "diversity", "on_front"]
TAIL = ["checkpoint", "grid"]
TEXT = ("trial", "status", "error", "kind", "knob", "checkpoint", "grid")  # always present, "" when empty
DONE, STOPPED, FAILED, INTERRUPTED, NOT_STARTED = "done", "stopped", "failed", "interrupted", "not_started"
STATES = (DONE, STOPPED, FAILED, INTERRUPTED, NOT_STARTED)  # the order summary.md counts them in
UNFINISHED = (INTERRUPTED, NOT_STARTED)  # what `draftray sweep --resume` runs


def column(key: str) -> str:
    """The trials.csv column of a swept config key (prefixed: a key may be a section such as "reward")."""
    return f"config.{key}"


def get_dotted(cfg: dict, dotted: str):
    """cfg['a']['b'] for 'a.b'."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def collect_rows(trials_dir: Path, keys: list[str], reward: str, diversity: str) -> list[dict]:
    """One row per point of every trial under trials_dir; a trial with no evaluation gets one empty row
    (so a failed trial is listed with its error)."""
    from rayjobs.config import validate
    from rayjobs.tune.inference_points import checkpoints  # torch only when reading trial directories

    rows = []
    for run_dir in sorted(p for p in Path(trials_dir).glob("*") if (p / "config.yaml").exists()):
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        status = read_status(run_dir)
        kl = validate(cfg, where=f"{run_dir / 'config.yaml'}:").objective.weights.kl_coeff  # the preset's when not given
        head = {"trial": run_dir.name, **status, **{column(k): get_dotted(cfg, k) for k in keys}, "kl_coeff": kl}
        ckpts = {step: str(d) for step, d in checkpoints(run_dir)}
        records = [{"kind": "trained", "knob": "", **r} for r in read_metrics(run_dir)] + read_metrics(run_dir, INFERENCE_FILE)
        points = [r for r in records if reward in r and diversity in r]
        for r in points:
            parts = {f"reward/{k.removeprefix('eval/reward_')}": v for k, v in r.items()
                     if k.startswith("eval/reward_") and k not in ("eval/reward_mean", "eval/reward_std")}  # fmt: skip
            rows.append({
                **head, "step": r["step"], "kind": r["kind"], "knob": r["knob"], "reward": r[reward],
                "reward_std": r.get("eval/reward_std", math.nan), "kl": r.get("eval/kl", math.nan), "diversity": r[diversity],
                **parts, "checkpoint": ckpts.get(r["step"], ""), "grid": r.get("eval/grid", ""),
            })  # fmt: skip
        if not points:
            rows.append({**head, **{k: "" for k in TEXT if k not in head}})
    return rows


def unstarted_row(index: int, params: dict | None, keys: list[str], kl_coeff) -> dict:
    """The trials.csv row of a trial of the space that never started: named #<its place in the space> (it has
    no run directory, nor a name from Tune yet), its swept values (empty when drawn only at its start:
    ``params`` None), no metrics."""
    values = {column(k): params[k] for k in keys} if params is not None else {}
    return {"trial": f"#{index}", "status": NOT_STARTED, **values, "kl_coeff": kl_coeff, **{k: "" for k in TEXT if k not in ("trial", "status")}}


def resume_command(out: Path) -> str:
    """The command that continues the sweep in ``out`` (quoted for a POSIX shell)."""
    return f"draftray sweep --resume {shlex.quote(str(out))}"


def fields_of(rows: list[dict], keys: list[str]) -> list[str]:
    parts = sorted({k for r in rows for k in r if k.startswith("reward/")})
    return [*FIXED, *map(column, keys), "kl_coeff", *POINT, *parts, *TAIL]


def write_csv(rows: list[dict], fields: list[str], path: Path) -> None:
    def cell(v):
        return v if isinstance(v, str) else json.dumps(v)  # numbers, bools and lists read back exactly

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: cell(r[k]) for k in fields if k in r} for r in rows)


def read_csv(path: Path) -> list[dict]:
    """Rows of trials.csv (or pareto.csv) with their values typed back: text columns as text ("0.5" is a
    knob label), other cells as written (numbers, bools, lists), empty ones absent."""

    def value(s: str):
        try:
            return json.loads(s)
        except ValueError:
            return s

    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v if k in TEXT else value(v) for k, v in r.items() if v != "" or k in TEXT} for r in csv.DictReader(f)]


def pareto_mask(values: list[tuple[float, float]]) -> list[bool]:
    """True where no other point is >= in both coordinates and > in one (both maximised)."""
    mask = []
    for i, (r, d) in enumerate(values):
        dominated = any(r2 >= r and d2 >= d and (r2 > r or d2 > d) for j, (r2, d2) in enumerate(values) if j != i)
        mask.append(not dominated)
    return mask


def mark_front(rows: list[dict]) -> list[dict]:
    """Sets on_front on every row (rows without finite reward and diversity are never on it); returns the front."""
    scored = [r for r in rows if _finite(r.get("reward")) and _finite(r.get("diversity"))]
    for r in rows:
        r["on_front"] = False
    for r, on in zip(scored, pareto_mask([(r["reward"], r["diversity"]) for r in scored])):
        r["on_front"] = on
    return sorted((r for r in rows if r["on_front"]), key=lambda r: (-r["reward"], r["trial"], r["step"]))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def diversity_key(cfg) -> str:
    """The front's diversity axis: sweep.diversity_metric, else the config's diversity metric."""
    return cfg.sweep.diversity_metric or f"eval/diversity_{cfg.diversity.name}"


def build_outputs(out: Path, cfg, unstarted: list[dict] = ()) -> list[dict]:
    """After the trials: trials.csv from the trial directories and the ``unstarted`` rows (unstarted_row), so
    it lists every trial of the space, then every other output; returns the front."""
    keys = list(cfg.sweep.params)
    rows = collect_rows(out / TRIALS, keys, cfg.sweep.reward_metric, diversity_key(cfg)) + list(unstarted)
    mark_front(rows)
    write_csv(rows, fields_of(rows, keys), out / "trials.csv")
    return write_front(out, rows, keys, cfg.sweep.reward_metric, diversity_key(cfg))


def rebuild(sweep_dir: str | Path) -> Path:
    """`draftray pareto SWEEP_DIR`: every output again from trials.csv and sweep.yaml."""
    from rayjobs.config import load_config
    from rayjobs.errors import UserError

    out = Path(sweep_dir).resolve()
    if not (out / "trials.csv").is_file() or not (out / "sweep.yaml").is_file():
        raise UserError(f"{sweep_dir}: not a finished sweep directory (needs trials.csv and sweep.yaml from `draftray sweep`)")
    cfg = load_config(out / "sweep.yaml")
    rows = read_csv(out / "trials.csv")
    write_front(out, rows, list(cfg.sweep.params), cfg.sweep.reward_metric, diversity_key(cfg))
    return out


def write_front(out: Path, rows: list[dict], keys: list[str], reward_name: str, diversity_name: str) -> list[dict]:
    from rayjobs.tune.plot import plot_front

    front = mark_front(rows)
    fields = fields_of(rows, keys)
    write_csv(front, fields, out / "pareto.csv")
    for i, r in enumerate(front):
        r["reproduce"] = reproduce(out, r)
        r["front_grid"] = _copy_grid(out, i, r)
    doc = {"reward_metric": reward_name, "diversity_metric": diversity_name, "swept": keys,
           "points": [{k: r[k] for k in [*fields, "reproduce", "front_grid"] if k in r} for r in front]}  # fmt: skip
    (out / "pareto.json").write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    plot_front(rows, keys, out / "pareto.png", reward_name, diversity_name)
    print(write_summary(rows, front, keys, out / "summary.md"))
    return front


def _copy_grid(out: Path, i: int, r: dict) -> str:
    """front/<rank>_<trial>_step<step>[_<kind>_<knob>].png: the point's eval grid, ranked by reward."""
    src = Path(r.get("grid", ""))
    if not r.get("grid") or not src.is_file():
        return ""
    (out / "front").mkdir(exist_ok=True)
    knob = "" if r["kind"] == "trained" else f"_{r['kind']}_{r['knob']}"
    dest = out / "front" / f"{i:02d}_{r['trial']}_step{r['step']}{knob}.png"
    shutil.copyfile(src, dest)
    return str(dest.relative_to(out))


def reproduce(out: Path, r: dict) -> str:
    """The command that trains this point again (the LR schedule is constant after warmup, and seeds
    depend only on (seed, rank, step), so train.steps=<step> reaches the same weights)."""
    if r["step"] == 0:
        return "the base model (no training): step 0 of every trial"
    config = out / TRIALS / r["trial"] / "config.yaml"
    cmd = f"draftray train {config} run.name={r['trial']}-step{r['step']} train.steps={r['step']}"
    if r["kind"] == "lora_scale":
        cmd += f"; then sample with LoRA scale {r['knob']} (models/inference.py: lora_scale)"
    elif r["kind"] == "aig":
        cmd += f"; then sample with annealed guidance {r['knob']} (models/inference.py: aig_weights)"
    return cmd


def write_summary(rows: list[dict], front: list[dict], keys: list[str], path: Path) -> str:
    """Markdown: how many trials are in each state (and the command that finishes an interrupted sweep), each
    trial's final trained point (or its state alone: failed, interrupted, not started), then the front with
    reproduce commands."""
    last: dict[str, dict] = {}
    for r in rows:
        if r["kind"] in ("trained", "") and (r["trial"] not in last or r.get("step", -1) > last[r["trial"]].get("step", -1)):
            last[r["trial"]] = r
    head = f"| trial | status | {' | '.join(keys)} | step | kind | reward | diversity | KL |"
    rule = "|" + "---|" * (len(keys) + 7)

    def row(r: dict) -> str:
        kind = r.get("kind", "")
        kind = kind if kind in ("trained", "") else f"{kind} {r['knob']}"
        vals = [r["trial"], r["status"], *(_fmt(r.get(column(k), "")) for k in keys), str(r.get("step", "")), kind,
                *(_fmt(r.get(k, "")) for k in ("reward", "diversity", "kl"))]  # fmt: skip
        return "| " + " | ".join(vals) + " |"

    errors = [f"- {r['trial']}: {r['error']}" for r in last.values() if r.get("error")]
    commands = [f"{i}. reward {_fmt(r['reward'])}, diversity {_fmt(r['diversity'])}: `{r['reproduce']}`" for i, r in enumerate(front)]
    text = "\n".join(
        [*_states(list(last.values()), Path(path).parent),
         "## Final point of each trial", "", head, rule, *map(row, last.values()), "", *([*errors, ""] if errors else []),
         "## Pareto front (reward and diversity both maximised; highest reward first)", "", head, rule, *map(row, front), "",
         "### Reproduce each front point (grids in front/)", "", *commands, ""]  # fmt: skip
    )
    Path(path).write_text(text, encoding="utf-8")
    return text


def _states(trials: list[dict], out: Path) -> list[str]:
    """The summary's first lines: the count of trials in each state; for an interrupted sweep, how to finish it."""
    counts = Counter(r["status"] for r in trials)
    order = [*STATES, *sorted(set(counts) - set(STATES))]  # e.g. "running": a summary rebuilt while trials ran
    lines = [f"Trials: {', '.join(f'{counts[s]} {s}' for s in order if counts[s])} ({len(trials)} in all).", ""]
    if any(counts[s] for s in UNFINISHED):
        lines += [f"The sweep was interrupted: `{resume_command(out)}` finishes the interrupted and not-started trials.", ""]
    return lines


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
