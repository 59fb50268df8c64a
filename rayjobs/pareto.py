"""The reward-diversity Pareto front of a sweep: points, front, table, plot.

A point is one evaluation of one trial (fixed eval prompts and seeds), so a trial
contributes its whole reward/diversity curve over training steps. Step 0 of every
trial is the base model (no update yet): the same point for all trials.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml

from rayjobs.runlog import INFERENCE_FILE, read_metrics


def get_dotted(cfg: dict, dotted: str):
    """cfg['a']['b'] for 'a.b'."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def collect_points(trials_dir: Path, keys: list[str], reward: str, diversity: str) -> list[dict]:
    """Every evaluation row of every trial under trials_dir (kind "trained"), and its inference-time points
    (kind "lora_scale" / "aig", rayjobs/knobs.py), with the trial's swept values; front marked."""
    points = []
    for run_dir in sorted(p for p in Path(trials_dir).glob("*") if (p / "config.yaml").exists()):
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        params = {k: get_dotted(cfg, k) for k in keys}
        rows = [{"kind": "trained", "knob": "", **r} for r in read_metrics(run_dir)]
        rows += read_metrics(run_dir, INFERENCE_FILE)
        for row in rows:
            if reward in row and diversity in row:
                points.append(
                    {"trial": run_dir.name, **params, "step": row["step"], "kind": row["kind"], "knob": row["knob"],
                     "reward": row[reward], "diversity": row[diversity], "kl": row.get("eval/kl", math.nan),
                     "grid": row.get("eval/grid", "")}
                )  # fmt: skip
    for p, on in zip(points, pareto_mask([(p["reward"], p["diversity"]) for p in points])):
        p["on_front"] = on
    return points


def pareto_mask(values: list[tuple[float, float]]) -> list[bool]:
    """True where no other point is >= in both coordinates and > in one (both maximised)."""
    mask = []
    for i, (r, d) in enumerate(values):
        dominated = any(r2 >= r and d2 >= d and (r2 > r or d2 > d) for j, (r2, d2) in enumerate(values) if j != i)
        mask.append(not dominated)
    return mask


def write_points(points: list[dict], keys: list[str], path: Path) -> None:
    fields = ["trial", *keys, "step", "kind", "knob", "reward", "diversity", "kl", "on_front", "grid"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)


def write_summary(points: list[dict], keys: list[str], path: Path) -> str:
    """Markdown: the final evaluation of every trial, then the front (highest reward first)."""
    last: dict[str, dict] = {}
    for p in (p for p in points if p["kind"] == "trained"):
        if p["trial"] not in last or p["step"] > last[p["trial"]]["step"]:
            last[p["trial"]] = p
    head = f"| {' | '.join(keys)} | step | kind | reward | diversity | KL | on front |"
    rule = "|" + "---|" * (len(keys) + 6)

    def row(p: dict) -> str:
        kind = p["kind"] if p["kind"] == "trained" else f"{p['kind']} {p['knob']}"
        vals = [_fmt(p[k]) for k in keys] + [str(p["step"]), kind, f"{p['reward']:.4g}", f"{p['diversity']:.4g}", f"{p['kl']:.3g}", "yes" if p["on_front"] else ""]
        return "| " + " | ".join(vals) + " |"

    finals = sorted(last.values(), key=lambda p: tuple(_sortable(p[k]) for k in keys))
    front = sorted((p for p in points if p["on_front"]), key=lambda p: -p["reward"])
    text = "\n".join(
        ["## Final evaluation of each trial", "", head, rule, *map(row, finals), "",
         "## Pareto front (every evaluation, reward and diversity both maximised)", "", head, rule, *map(row, front), ""]
    )
    Path(path).write_text(text, encoding="utf-8")
    return text


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _sortable(v):
    return (0, v) if isinstance(v, (int, float)) else (1, str(v))


KIND_MARKERS = {"lora_scale": "s", "aig": "^"}  # trained points are circles
KIND_LABELS = {"lora_scale": "LoRA scale (inference)", "aig": "annealed guidance (inference)"}


def plot_front(points: list[dict], keys: list[str], path: Path, reward_name: str, diversity_name: str) -> None:
    """Reward (x) vs diversity (y); one line per trial through its evaluations, coloured by the first key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize, SymLogNorm

    key = keys[0]
    values = sorted({p[key] for p in points if isinstance(p[key], (int, float))})
    norm = None
    if values:
        positive = [v for v in values if v > 0]
        wide = positive and max(values) / min(positive) >= 100  # log colours for kl/lr spanning decades
        norm = SymLogNorm(linthresh=min(positive), vmin=min(values), vmax=max(values)) if wide else Normalize(min(values), max(values) or 1)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for trial in sorted({p["trial"] for p in points}):
        pts = sorted((p for p in points if p["trial"] == trial and p["kind"] == "trained"), key=lambda p: p["step"])
        if not pts:
            continue
        v = pts[0][key]
        color = cmap(norm(v)) if norm is not None and isinstance(v, (int, float)) else None
        ax.plot([p["reward"] for p in pts], [p["diversity"] for p in pts], "-", color=color, alpha=0.5, lw=1)
        ax.scatter([p["reward"] for p in pts], [p["diversity"] for p in pts], color=color, s=[12 + 30 * p["step"] / max(1, pts[-1]["step"]) for p in pts], zorder=3)
        ax.annotate(f"{key.split('.')[-1]}={_fmt(v)}", (pts[-1]["reward"], pts[-1]["diversity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for kind, marker in KIND_MARKERS.items():  # inference-time points of this trial's final weights
            extra = [p for p in points if p["trial"] == trial and p["kind"] == kind]
            if extra:
                ax.scatter([p["reward"] for p in extra], [p["diversity"] for p in extra], color=color, marker=marker, s=30, zorder=3)
    for kind, marker in KIND_MARKERS.items():
        if any(p["kind"] == kind for p in points):
            ax.scatter([], [], color="grey", marker=marker, label=KIND_LABELS[kind])
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["reward"])
    ax.plot([p["reward"] for p in front], [p["diversity"] for p in front], "k--", lw=1, label="Pareto front")
    ax.scatter([p["reward"] for p in front], [p["diversity"] for p in front], facecolors="none", edgecolors="k", s=80, zorder=4)
    base = [p for p in points if p["step"] == 0]
    if base:
        ax.scatter([base[0]["reward"]], [base[0]["diversity"]], marker="*", s=200, color="red", zorder=5, label="base model (step 0)")
    if norm is not None:
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=key)
    ax.set_xlabel(f"{reward_name} (higher = more reward)")
    ax.set_ylabel(f"{diversity_name} (higher = more diverse)")
    ax.set_title("Reward vs diversity: each line is one trial over training steps (marker size = step)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
