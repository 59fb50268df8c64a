"""The toy world (docs/toy-world.md): deterministic per seed, captions parse back, shapes render where the scene says."""

import math

import pytest
import torch

from rewards.toyworld import COLORS, SHAPES, Scene, ToyWorld, labels, parse_caption, render


def test_same_seed_same_batch_different_seed_differs():
    a_img, a_cap, _ = ToyWorld(seed=3).batch(16, index=5)
    b_img, b_cap, _ = ToyWorld(seed=3).batch(16, index=5)
    c_img, c_cap, _ = ToyWorld(seed=4).batch(16, index=5)
    d_img, _, _ = ToyWorld(seed=3).batch(16, index=6)
    assert torch.equal(a_img, b_img) and a_cap == b_cap
    assert not torch.equal(a_img, c_img) and a_cap != c_cap
    assert not torch.equal(a_img, d_img)


def test_batch_shape_and_range():
    images, captions, scenes = ToyWorld(seed=0, size=32).batch(8)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert len(captions) == len(scenes) == 8


def test_captions_parse_back_to_their_scene():
    _, captions, scenes = ToyWorld(seed=1).batch(200)
    for caption, s in zip(captions, scenes):
        parsed = parse_caption(caption)
        assert parsed["shape"] == s.shape and parsed["color"] == s.color
        assert parsed["size"] == (s.size if s.say_size else None)
        assert parsed["background"] == (s.background if s.say_background else None)
        assert s.color != s.background
    said = [s.say_size for s in scenes]
    assert 0 < sum(said) < len(said)  # both forms occur


def test_articles_and_grammar():
    scene = Scene("circle", "orange", "orange", "small", 0.5, 0.5, 0.2, say_size=False)
    assert scene.caption == "an orange circle on an orange background"
    assert parse_caption("A Small Red Star") == {"shape": "star", "color": "red", "size": "small", "background": None}


@pytest.mark.parametrize("bad", ["a red dog", "a teal circle", "red circle", "a red circle on a plaid background", ""])
def test_parse_rejects_outside_the_world(bad):
    with pytest.raises(ValueError, match="not a toy-world caption"):
        parse_caption(bad)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_drawn_at_its_centre_in_its_colour(shape):
    scene = Scene(shape, "red", "white", "large", cx=0.3, cy=0.6, radius=0.25)
    img = render([scene], size=32)[0]  # [3, 32, 32]
    red = torch.tensor(COLORS["red"]).view(3, 1)
    cover = 1 - ((img.flatten(1) - red).abs().sum(0) > 0.3).float().view(32, 32)  # 1 where red
    ys, xs = torch.nonzero(cover, as_tuple=True)
    cy, cx = (ys.float().mean() + 0.5) / 32, (xs.float().mean() + 0.5) / 32
    assert abs(float(cx) - 0.3) < 0.04  # every shape is left-right symmetric about cx
    assert abs(float(cy) - 0.6) < 0.1  # triangle/star centroids sit a little off the circumcentre
    assert 0.02 < float(cover.mean()) < math.pi * 0.25**2 + 0.02  # inside the circumscribed circle


def test_circle_area_matches_pi_r_squared():
    img = render([Scene("circle", "black", "white", "large", 0.5, 0.5, 0.3)], size=32)[0]
    area = 1 - float(img.mean())  # black on white: darkness = coverage
    assert area == pytest.approx(math.pi * 0.3**2, rel=0.03)


def test_appeal_prefers_large_centred_high_contrast():
    big = Scene("circle", "black", "white", "large", 0.5, 0.5, 0.35)
    small = Scene("circle", "black", "white", "small", 0.2, 0.2, 0.15)
    low = Scene("circle", "yellow", "white", "large", 0.5, 0.5, 0.35)
    assert big.appeal > small.appeal and big.appeal > low.appeal
    assert big.appeal == pytest.approx(0.35 / 0.38 + 1 + abs(0.299 * 0.06 + 0.587 * 0.06 + 0.114 * 0.06 - 0.97), abs=1e-6)


def test_labels_index_the_vocabulary():
    _, _, scenes = ToyWorld(seed=2).batch(6)
    y = labels(scenes)
    assert y["shape"].shape == (6,) and y["appeal"].dtype == torch.float32
    assert [SHAPES[i] for i in y["shape"].tolist()] == [s.shape for s in scenes]
