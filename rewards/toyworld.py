"""The toy world: coloured shapes on plain backgrounds, with captions, generated from a seed.

Small enough to pretrain a Stable-Diffusion-architecture model and a reward
model on a 2-core CPU, rich enough for reward hacking and mode
collapse to show: a caption fixes the shape and colour (and sometimes size and
background), while position, and whatever the caption leaves out, vary.

    scene   = Scene(shape, color, background, size, cx, cy, radius)
    caption = "a large red circle on a blue background"   (size / background may be omitted)
    images  = render(scenes, size) -> [B, 3, S, S] in [0, 1]

Everything is a pure function of the seed: ``ToyWorld(seed).batch(n, index)``
returns the same images and captions on every machine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "star")
# Named colours (RGB in [0, 1]); a shape is never drawn on a background of its own colour.
COLORS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.58, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
    "black": (0.06, 0.06, 0.06),
}
COLOR_NAMES = tuple(COLORS)
SIZES = {"small": (0.14, 0.22), "large": (0.27, 0.38)}  # radius range, fraction of the image side
SIZE_NAMES = tuple(SIZES)
COLOR_JITTER = 0.04  # per-channel uniform jitter of every drawn colour (no two reds are identical)
SUPERSAMPLE = 4  # shapes are rasterised at 4x and averaged down: anti-aliased edges

_CAPTION = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<color>[a-z]+) (?P<shape>[a-z]+)(?: on an? (?P<bg>[a-z]+) background)?$"
)


@dataclass(frozen=True)
class Scene:
    """One image of the world. cx, cy, radius are fractions of the image side."""

    shape: str
    color: str
    background: str
    size: str
    cx: float
    cy: float
    radius: float
    say_size: bool = True
    say_background: bool = True

    @property
    def caption(self) -> str:
        size = f"{self.size} " if self.say_size else ""
        bg = f" on {'an' if self.background[0] in 'aeiou' else 'a'} {self.background} background" if self.say_background else ""
        words = f"{size}{self.color} {self.shape}"
        article = "an" if words[0] in "aeiou" else "a"
        return f"{article} {words}{bg}"

    @property
    def appeal(self) -> float:
        """The hand-made 'preference' the toy reward model learns: large, centred, high-contrast shapes.

        appeal = radius / 0.38 + (1 - distance of the centre from the image centre / 0.5) + |luma(shape) - luma(bg)|,
        about 0.5 (small, off-centre, low contrast) to 3 (large, centred, black on white).
        """
        centred = 1.0 - math.hypot(self.cx - 0.5, self.cy - 0.5) / 0.5
        return self.radius / 0.38 + centred + abs(_luma(COLORS[self.color]) - _luma(COLORS[self.background]))


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def parse_caption(text: str) -> dict[str, str | None]:
    """'a small red circle on a blue background' -> {shape, color, size, background}; missing parts are None.

    Raises ValueError for text outside the world's grammar or vocabulary.
    """
    m = _CAPTION.match(text.strip().lower())
    if m is None or m["shape"] not in SHAPES or m["color"] not in COLORS or (m["bg"] and m["bg"] not in COLORS):
        raise ValueError(f"not a toy-world caption: {text!r} (expected e.g. 'a small red circle on a blue background')")
    return {"shape": m["shape"], "color": m["color"], "size": m["size"], "background": m["bg"]}


def random_scene(rng: np.random.Generator, p_say_size: float = 0.5, p_say_background: float = 0.7) -> Scene:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    others = [c for c in COLOR_NAMES if c != color]
    background = others[rng.integers(len(others))]
    size = SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi))
    cx, cy = (float(v) for v in rng.uniform(radius, 1.0 - radius, size=2))  # the shape stays inside the image
    return Scene(shape, color, background, size, cx, cy, radius, bool(rng.random() < p_say_size), bool(rng.random() < p_say_background))


def _star_radius(theta: torch.Tensor, inner: float = 0.45) -> torch.Tensor:
    """Boundary radius of an upright five-pointed star at angle theta (outer radius 1)."""
    sector = 2 * math.pi / 5
    # Angle measured from the nearest point (points at -90 degrees + k * 72 degrees: upright).
    phase = torch.remainder(theta + math.pi / 2, sector) / sector  # [.., ] in [0, 1)
    tri = 1.0 - (2 * phase - 1).abs()  # 0 at a point, 1 halfway between points
    return 1.0 - (1.0 - inner) * tri


def _mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Inside-test on a grid of offsets from the centre (image-side units, y down) -> bool grid."""
    if shape == "circle":
        return dx.pow(2) + dy.pow(2) <= r * r
    if shape == "square":
        half = r * 0.85  # same visual area class as the circle
        return (dx.abs() <= half) & (dy.abs() <= half)
    if shape == "triangle":
        # Upright equilateral triangle inscribed in the circle of radius r: apex up (y down).
        y_base = r * 0.5
        slope = math.sqrt(3)
        return (dy <= y_base) & (dy >= -r + slope * dx.abs() * 1.0)
    if shape == "star":
        rho = (dx.pow(2) + dy.pow(2)).sqrt()
        return rho <= r * _star_radius(torch.atan2(dy, dx))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scenes: list[Scene], size: int = 32, seed: int = 0) -> torch.Tensor:
    """Scenes -> images [B, 3, size, size] in [0, 1]; colour jitter drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    n = size * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n  # [n] pixel centres in [0, 1]
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [n, n] each
    out = []
    for s in scenes:
        jitter = rng.uniform(-COLOR_JITTER, COLOR_JITTER, size=(2, 3))
        fg = (torch.tensor(COLORS[s.color]) + torch.tensor(jitter[0], dtype=torch.float32)).clamp(0, 1)
        bg = (torch.tensor(COLORS[s.background]) + torch.tensor(jitter[1], dtype=torch.float32)).clamp(0, 1)
        inside = _mask(s.shape, xx - s.cx, yy - s.cy, s.radius).float()  # [n, n]
        cover = F.avg_pool2d(inside[None, None], SUPERSAMPLE)[0]  # [1, size, size] anti-aliased coverage
        out.append(cover * fg.view(3, 1, 1) + (1 - cover) * bg.view(3, 1, 1))  # [3, size, size]
    return torch.stack(out)  # [B, 3, size, size]


class ToyWorld:
    """A deterministic stream of (images, captions, scenes): batch ``index`` is a pure function of (seed, index)."""

    def __init__(self, seed: int = 0, size: int = 32, p_say_size: float = 0.5, p_say_background: float = 0.7):
        self.seed, self.size = seed, size
        self.p_say_size, self.p_say_background = p_say_size, p_say_background

    def scenes(self, n: int, index: int = 0) -> list[Scene]:
        rng = np.random.default_rng([self.seed, index, 0])
        return [random_scene(rng, self.p_say_size, self.p_say_background) for _ in range(n)]

    def batch(self, n: int, index: int = 0) -> tuple[torch.Tensor, list[str], list[Scene]]:
        scenes = self.scenes(n, index)
        images = render(scenes, self.size, seed=int(np.random.SeedSequence([self.seed, index, 1]).generate_state(1)[0]))
        return images, [s.caption for s in scenes], scenes


def labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class indices and targets per scene: shape, color, background, size [B] long; appeal [B] float."""
    return {
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
        "color": torch.tensor([COLOR_NAMES.index(s.color) for s in scenes]),
        "background": torch.tensor([COLOR_NAMES.index(s.background) for s in scenes]),
        "size": torch.tensor([SIZE_NAMES.index(s.size) for s in scenes]),
        "appeal": torch.tensor([s.appeal for s in scenes], dtype=torch.float32),
    }
