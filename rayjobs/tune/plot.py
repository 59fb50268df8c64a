"""pareto.png: every point of a sweep, reward (x) against diversity (y), the front highlighted.

Colour = kl_coeff (log scale when it spans two decades or more; the first swept key when kl_coeff
is the same in every trial), marker = kind: circles trained (size grows with the step, a line
through each trial's steps), squares LoRA-scaled, triangles annealed guidance.
"""

from __future__ import annotations

import math
from pathlib import Path

KIND_MARKERS = {"trained": "o", "lora_scale": "s", "aig": "^"}
KIND_LABELS = {"trained": "trained (by step)", "lora_scale": "LoRA scale (inference)", "aig": "annealed guidance (inference)"}


def _colour_key(rows: list[dict], keys: list[str]) -> str:
    if len({r.get("kl_coeff") for r in rows}) > 1 or not keys:
        return "kl_coeff"
    return f"config.{keys[0]}"  # its trials.csv column (rayjobs/tune/pareto.py: column)


def _norm(values: list[float]):
    from matplotlib.colors import Normalize, SymLogNorm

    if not values:
        return None
    positive = [v for v in values if v > 0]
    if positive and max(values) / min(positive) >= 100:  # kl_coeff / lr spanning decades (0 stays linear)
        return SymLogNorm(linthresh=min(positive), vmin=min(values), vmax=max(values))
    return Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1)


def plot_front(rows: list[dict], keys: list[str], path: Path, reward_name: str, diversity_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if _ok(r.get("reward")) and _ok(r.get("diversity"))]
    key = _colour_key(pts, keys)
    norm = _norm(sorted({r[key] for r in pts if isinstance(r.get(key), (int, float))}))
    cmap = plt.get_cmap("viridis")

    def colour(r):
        v = r.get(key)
        return cmap(norm(v)) if norm is not None and isinstance(v, (int, float)) else "tab:blue"

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for trial in sorted({r["trial"] for r in pts}):
        mine = [r for r in pts if r["trial"] == trial]
        trained = sorted((r for r in mine if r["kind"] == "trained"), key=lambda r: r["step"])
        last = max((r["step"] for r in trained), default=1) or 1
        if trained:
            ax.plot([r["reward"] for r in trained], [r["diversity"] for r in trained], "-", color=colour(trained[0]), alpha=0.5, lw=1)
            ax.annotate(f"{key.split('.')[-1]}={_fmt(trained[0].get(key))}", (trained[-1]["reward"], trained[-1]["diversity"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        for kind, marker in KIND_MARKERS.items():
            some = [r for r in mine if r["kind"] == kind]
            sizes = [12 + 30 * r["step"] / last for r in some] if kind == "trained" else 30
            ax.scatter([r["reward"] for r in some], [r["diversity"] for r in some], color=[colour(r) for r in some], marker=marker, s=sizes, zorder=3)
    for kind, marker in KIND_MARKERS.items():
        if any(r["kind"] == kind for r in pts):
            ax.scatter([], [], color="grey", marker=marker, label=KIND_LABELS[kind])
    front = sorted((r for r in pts if r.get("on_front")), key=lambda r: r["reward"])
    ax.plot([r["reward"] for r in front], [r["diversity"] for r in front], "k--", lw=1, label="Pareto front")
    ax.scatter([r["reward"] for r in front], [r["diversity"] for r in front], facecolors="none", edgecolors="k", s=90, zorder=4)
    base = [r for r in pts if r["step"] == 0]
    if base:
        ax.scatter([base[0]["reward"]], [base[0]["diversity"]], marker="*", s=200, color="red", zorder=5, label="base model (step 0)")
    if norm is not None:
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=key)
    ax.set_xlabel(f"{reward_name} (higher = more reward)")
    ax.set_ylabel(f"{diversity_name} (higher = more diverse)")
    ax.set_title("Reward vs diversity: each line is one trial over training steps", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
