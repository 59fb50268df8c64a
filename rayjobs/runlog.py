"""What a run writes for people to read: metrics.jsonl, TensorBoard events, sample grids.

Written by rank 0 only, into the run directory.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

METRICS_FILE = "metrics.jsonl"
INFERENCE_FILE = "inference.jsonl"  # inference-time points of a sweep trial (rayjobs/tune/inference_points.py)
STOP_FILE = "STOPPED"  # written by rank 0 when training stops itself (non-finite loss)
STOP_REQUEST = "STOP_REQUESTED"  # written by a sweep trial Tune stops: the loop ends at its next step
PLACEMENT_GROUPS = ".placement_groups"  # Ray Train worker groups of this run, one placement-group id (hex) per line


def image_grid(images_per_prompt: list[torch.Tensor], min_cell: int = 128) -> np.ndarray:
    """Rows = prompts, columns = seeds. list of [N, 3, H, W] in [0,1] -> uint8 [rows*H*s, N*W*s, 3].

    Small images are enlarged by an integer factor s (nearest neighbour) so a cell is >= min_cell px.
    """
    import torch

    rows = [torch.cat(list(imgs), dim=2) for imgs in images_per_prompt]  # each [3, H, N*W]
    grid = torch.cat(rows, dim=1)  # [3, rows*H, N*W]
    scale = max(1, min_cell // images_per_prompt[0].shape[-2])
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # [3, rows*H*s, N*W*s]
    return (grid.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)


def save_grid(images_per_prompt: list[torch.Tensor], path: Path) -> np.ndarray:
    """image_grid written as a PNG at path; returns the pixels [H, W, 3] uint8."""
    from PIL import Image

    pixels = image_grid(images_per_prompt)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


class RunLog:
    """Appends metrics to metrics.jsonl and TensorBoard; saves sample grids as PNG."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def grid(self, step: int, images_per_prompt: list[torch.Tensor], kind: str = "samples") -> Path:
        """samples/step_<N>.png (kind "samples": the eval grid) or samples/<kind>_step_<N>.png; TensorBoard tag kind."""
        name = f"step_{step:06d}.png" if kind == "samples" else f"{kind}_step_{step:06d}.png"
        path = self.run_dir / "samples" / name
        pixels = save_grid(images_per_prompt, path)
        self.tb.add_image(kind, pixels, step, dataformats="HWC")
        return path

    def compare(self, first: int, last: int) -> Path | None:
        """samples/base_vs_final.png: the step-`first` grid (base model) left, the step-`last` grid right.

        Same prompts (rows) and seeds (columns) on both sides, so every cell pairs with its twin.
        """
        a, b = (self.run_dir / "samples" / f"step_{s:06d}.png" for s in (first, last))
        if not (a.exists() and b.exists()) or first == last:
            return None
        from PIL import Image

        left, right = np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB"))
        gap = np.full((left.shape[0], 16, 3), 255, dtype=np.uint8)  # white separator, 16 px
        path = self.run_dir / "samples" / "base_vs_final.png"
        Image.fromarray(np.concatenate([left, gap, right], axis=1)).save(path)  # [H, W_l + 16 + W_r, 3]
        return path

    def close(self) -> None:
        self.tb.close()


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


def new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """The complete JSON lines of a growing metrics.jsonl after byte ``offset``, and the new offset."""
    if not path.exists():
        return [], offset
    records = []
    with open(path, encoding="utf-8") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith("\n"):
                break  # the writer is mid-line: read it next time
            offset += len(line.encode("utf-8"))
            records.append(json.loads(line))
    return records, offset


class Watcher:
    """A daemon thread that calls ``poll()`` every ``interval`` s inside a ``with`` block, and once more at its end."""

    interval = 0.25

    def __init__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        self.begin()
        while True:
            stopping = self._stop.is_set()
            self.poll()
            if stopping:
                break
            self._stop.wait(self.interval)
        self.end()

    def begin(self) -> None: ...

    def poll(self) -> None: ...

    def end(self) -> None: ...


def read_metrics(run_dir: Path, name: str = METRICS_FILE) -> list[dict]:
    """The records of a run's JSON-lines file (metrics.jsonl, or inference.jsonl of rayjobs/tune/inference_points.py)."""
    path = Path(run_dir) / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


STATUS_FILE = "trial.json"  # a sweep trial's state: {"status": running|done|failed|stopped, "error": first line}


def write_status(run_dir: Path, status: str, error: str = "") -> None:
    """Atomically (a temp file, then os.replace): the sweep driver and its tests read it while trials run."""
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"status": status, "error": error}) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_status(run_dir: Path) -> dict:
    """{"status", "error"} of a sweep trial; a run without the file (a plain `draftray train` run) reads as done."""
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"status": "done", "error": ""}
