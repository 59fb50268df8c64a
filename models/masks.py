"""Inpainting masks: random rectangles and brush strokes for training, and thresholding.

Conventions (diffusers'): a mask is float ``[B, 1, H, W]`` in {0, 1} at pixel size, 1 (white) = the
region to repaint, 0 = keep; the masked image is ``pixels * (mask < 0.5)`` (pixels in [-1, 1]).

Every draw comes from the ``torch.Generator`` passed in (never the global RNG), on the CPU; move
the result where it is needed. The same (generator state, arguments) give the same masks.

Distributions (all sizes relative to the image, so they hold at any resolution):

  rectangles  1..3 axis-aligned rectangles (count uniform), each side a uniform fraction in
              [0.1, 0.75] of the image side (at least 1 px, at most side - 1 px), placed uniformly
              inside the image. diffusers' research train_dreambooth_inpaint.py draws one box of
              side uniform in [0, 1] of the image; ours is that box without its empty and full
              extremes, sometimes two or three of them.
  strokes     1..4 brush strokes (LaMa's irregular masks, used by SD inpainting training): each a
              polyline of 1..5 segments from a uniform start, each segment at a uniform angle with
              length uniform in [0.1, 0.4] of the shorter side (clipped to the image), one brush
              width per stroke uniform in [0.03, 0.1] of the shorter side (at least 1 px). A pixel is
              masked when its centre lies within half the width of a segment (round caps).
  mixed       per sample, rectangles or strokes with p = 0.5.

Never empty, never full: rectangles cannot be (at most 3 rectangles with both sides < the image
side never cover all 4 corners; each covers >= 1 px). Strokes, whose cover is not bounded by
construction, are clamped: an empty mask gets the pixel under its first stroke's start, a full one
loses the pixel at the corner farthest from it. That clamp also runs after rectangles (a no-op).
"""

from __future__ import annotations

import math

import torch

KINDS = ("rectangles", "strokes", "mixed")


def _uniform(shape, generator: torch.Generator, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _check_size(batch: int, height: int, width: int) -> None:
    if batch < 1 or height < 2 or width < 2:
        raise ValueError(f"masks need batch >= 1 and height, width >= 2 pixels, got {batch}x{height}x{width}")


def random_rectangles(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    count: tuple[int, int] = (1, 3),
    size: tuple[float, float] = (0.1, 0.75),
) -> torch.Tensor:
    """[B, 1, H, W] masks of ``count`` (inclusive range, at most 3) rectangles each, sides a uniform
    fraction ``size`` of the image side; see the module doc."""
    _check_size(batch, height, width)
    if not 1 <= count[0] <= count[1] <= 3:
        raise ValueError(f"count must be 1 <= low <= high <= 3 (more rectangles could fill the image), got {count}")
    most = count[1]
    n = torch.randint(count[0], count[1] + 1, (batch,), generator=generator)  # [B]
    frac = _uniform((batch, most, 2), generator, *size)  # [B, K, (h, w)]
    pos = torch.rand((batch, most, 2), generator=generator)  # [B, K, (top, left)] fraction of the free room
    sides = torch.tensor([height, width])
    extent = (frac * sides).round().long().clamp(torch.ones(2, dtype=torch.long), sides - 1)  # [B, K, 2] px
    start = (pos * (sides - extent + 1)).floor().long().clamp(min=0)
    start = torch.minimum(start, sides - extent)
    ys = torch.arange(height).view(1, 1, height, 1)
    xs = torch.arange(width).view(1, 1, 1, width)
    top, left = start[..., 0, None, None], start[..., 1, None, None]  # [B, K, 1, 1]
    h, w = extent[..., 0, None, None], extent[..., 1, None, None]
    boxes = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)  # [B, K, H, W]
    active = (torch.arange(most).view(1, most) < n.view(batch, 1)).view(batch, most, 1, 1)
    mask = (boxes & active).any(dim=1, keepdim=True).float()  # [B, 1, H, W]
    anchor = (start[:, 0].float() + 0.5).flip(-1)  # [B, (x, y)] a pixel of the first rectangle
    return _partial(mask, anchor)


def random_strokes(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    strokes: tuple[int, int] = (1, 4),
    segments: tuple[int, int] = (1, 5),
    length: tuple[float, float] = (0.1, 0.4),
    brush: tuple[float, float] = (0.03, 0.1),
) -> torch.Tensor:
    """[B, 1, H, W] brush-stroke masks: ``strokes`` polylines of ``segments`` segments each (inclusive
    ranges), segment ``length`` and ``brush`` width as fractions of the shorter side; see the module doc."""
    _check_size(batch, height, width)
    if not (1 <= strokes[0] <= strokes[1] and 1 <= segments[0] <= segments[1]):
        raise ValueError(f"strokes and segments are inclusive ranges >= 1, got {strokes}, {segments}")
    short = min(height, width)
    S, K = strokes[1], segments[1]
    n_strokes = torch.randint(strokes[0], strokes[1] + 1, (batch,), generator=generator)  # [B]
    n_segments = torch.randint(segments[0], segments[1] + 1, (batch, S), generator=generator)  # [B, S]
    start = torch.rand((batch, S, 2), generator=generator) * torch.tensor([width, height])  # [B, S, (x, y)] px
    angle = _uniform((batch, S, K), generator, 0.0, 2 * math.pi)
    seg_len = _uniform((batch, S, K), generator, *length) * short  # px
    width_px = (_uniform((batch, S), generator, *brush) * short).clamp(min=1.0)  # [B, S] px
    steps = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1) * seg_len[..., None]  # [B, S, K, 2]
    limit = torch.tensor([width, height], dtype=torch.float32)
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1) + 0.5  # pixel centres
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width) + 0.5
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    for s in range(S):
        point = start[:, s]  # [B, 2]
        radius = (width_px[:, s] / 2).view(batch, 1, 1)
        for k in range(K):
            end = torch.minimum(torch.maximum(point + steps[:, s, k], torch.zeros(2)), limit)
            on = ((s < n_strokes) & (k < n_segments[:, s])).view(batch, 1, 1)  # [B, 1, 1]
            mask |= on & (_distance(xs, ys, point, end) <= radius)
            point = end
    return _partial(mask[:, None].float(), start[:, 0])


def _distance(xs: torch.Tensor, ys: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, H, W] distance from pixel centres (xs [1,1,W], ys [1,H,1]) to the segments a->b ([B, 2] each)."""
    ax, ay = a[:, 0].view(-1, 1, 1), a[:, 1].view(-1, 1, 1)
    dx, dy = (b[:, 0] - a[:, 0]).view(-1, 1, 1), (b[:, 1] - a[:, 1]).view(-1, 1, 1)
    t = (((xs - ax) * dx + (ys - ay) * dy) / (dx * dx + dy * dy).clamp(min=1e-12)).clamp(0, 1)
    return torch.hypot(xs - (ax + t * dx), ys - (ay + t * dy))


def _partial(mask: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Clamps each [1, H, W] mask to be neither empty nor full: an empty one gets the pixel under
    ``anchor`` ([B, (x, y)] px), a full one loses the pixel at the corner farthest from it."""
    _, _, height, width = mask.shape
    x = anchor[:, 0].floor().long().clamp(0, width - 1)
    y = anchor[:, 1].floor().long().clamp(0, height - 1)
    for i in range(mask.shape[0]):
        covered = mask[i].sum()
        if covered == 0:
            mask[i, 0, y[i], x[i]] = 1.0
        elif covered == height * width:
            mask[i, 0, 0 if y[i] >= height / 2 else height - 1, 0 if x[i] >= width / 2 else width - 1] = 0.0
    return mask


def random_masks(kind: str, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """[B, 1, H, W] masks of ``kind``: "rectangles", "strokes" or "mixed" (per sample one or the
    other, p = 0.5; both kinds are drawn for the whole batch, so the stream used is fixed)."""
    if kind == "rectangles":
        return random_rectangles(batch, height, width, generator)
    if kind == "strokes":
        return random_strokes(batch, height, width, generator)
    if kind == "mixed":
        pick = torch.rand((batch,), generator=generator) < 0.5  # [B] True: strokes
        rects = random_rectangles(batch, height, width, generator)
        strokes = random_strokes(batch, height, width, generator)
        return torch.where(pick.view(batch, 1, 1, 1), strokes, rects)
    raise ValueError(f"mask kind must be one of {', '.join(KINDS)}, got {kind!r}")


def binarize(mask: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, bool]:
    """(float mask in {0, 1}: 1 where ``mask >= threshold``, as diffusers' mask processor does;
    whether ``mask`` already held only 0 and 1). Shape and device are kept."""
    was_binary = bool(((mask == 0) | (mask == 1)).all())
    return (mask >= threshold).to(mask.dtype if mask.is_floating_point() else torch.float32), was_binary
