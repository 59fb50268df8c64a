"""`draftray score` and `draftray weights`: tiny random reward weights in the real layouts, no downloads."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from models.tokenizer import clip_tokenizer_dir
from rayjobs.cli import main

PROMPTS = ["a red circle", "a red circle", "a large blue square on a white background", "a small green triangle"]
SIZES = {"a.png": 32, "b.png": 32, "c.png": 32, "d.PNG": 64}  # sorted by name: a, b, c, d


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from rewards import builders

    d = tmp_path_factory.mktemp("weights")
    clip = builders.save_hf_clip(d / "clip", clip_tokenizer_dir())
    arch = builders.register_tiny_open_clip(d / "open_clip")
    hps = builders.save_open_clip(d / "hps.pt", arch)
    head = builders.save_aesthetic_head(d / "head.pth", dim=16)
    return SimpleNamespace(clip=str(clip), arch=arch, hps=str(hps), head=str(head))


@pytest.fixture
def data(tmp_path):
    """tmp/images/{a,b,c}.png 32 px and d.PNG 64 px (random pixels), tmp/prompts.txt, tmp/out/ (empty)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / name, format="PNG")
    (images / "notes.txt").write_text("not an image")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    (tmp_path / "out").mkdir()
    return SimpleNamespace(images=images, prompts=prompts, out=tmp_path / "out", csv=tmp_path / "out" / "scores.csv")


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err.strip()


def _pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def _direct(name, kwargs, images_dir, prompts):
    """The reward called directly, one image at a time."""
    reward = rewards.build_reward(name, **kwargs)
    files = sorted(SIZES)
    with torch.no_grad():
        return [float(reward(_pixels(images_dir / f)[None], [p])[0]) for f, p in zip(files, prompts)]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _pref_sets(w):
    return ["--set", f"pickscore.model={w.clip}", "--set", f"pickscore.processor={w.clip}",
            "--set", f"hpsv2.checkpoint={w.hps}", "--set", f"hpsv2.arch={w.arch}"]  # fmt: skip


def test_score_preference_rewards(capsys, weights, data):
    argv = ["score", "--reward", "pickscore,hpsv2", "--images", data.images, "--prompts", data.prompts,
            *_pref_sets(weights), "--batch-size", 2, "--device", "cpu", "--out", data.csv]  # fmt: skip
    rc, out, err = _run(capsys, argv)
    assert rc == 0, err
    assert "HPS v2.0" in out and "v2.0 and v2.1 scores are not comparable" in out
    lines = out.splitlines()
    assert lines[0].split() == ["file", "prompt", "pickscore", "hpsv2"]
    assert [line.split()[0] for line in lines[1:5]] == sorted(SIZES)
    assert "notes.txt" not in out and "mean" in out and "std" in out
    rows = _read_csv(data.csv)
    assert rows[0] == ["file", "prompt", "pickscore", "hpsv2"]
    assert [r[:2] for r in rows[1:]] == [[f, p] for f, p in zip(sorted(SIZES), PROMPTS)]
    got = torch.tensor([[float(x) for x in r[2:]] for r in rows[1:]])
    want_pick = _direct("pickscore", {"model": weights.clip, "processor": weights.clip}, data.images, PROMPTS)
    want_hps = _direct("hpsv2", {"checkpoint": weights.hps, "arch": weights.arch}, data.images, PROMPTS)
    torch.testing.assert_close(got, torch.tensor([want_pick, want_hps]).T, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in data.out.iterdir()) == ["scores.csv"]  # no temp file left


def test_score_describes_each_reward(capsys, weights, data):
    """hpsv2.1 (a name with a dot) takes --set hpsv2.1.KEY; clipscore names its backbone; lpips its backbone too."""
    argv = ["score", "--reward", "hpsv2.1,clipscore,aesthetic", "--images", data.images, "--prompts", data.prompts,
            "--set", f"hpsv2.1.checkpoint={weights.hps}", "--set", f"hpsv2.1.arch={weights.arch}",
            "--set", f"clipscore.model={weights.clip}", "--set", f"aesthetic.clip={weights.clip}",
            "--set", f"aesthetic.head={weights.head}", "--diversity", "lpips", "--set", "lpips.backbone=random"]  # fmt: skip
    rc, out, err = _run(capsys, argv)
    assert rc == 0, err
    assert "HPS v2.1; v2.0 and v2.1 scores are not comparable" in out
    assert f"backbone: transformers {weights.clip}" in out
    assert "diversity" in out and "lpips (alex, random backbone" in out


def test_score_toy_reward_and_diversity(capsys, data):
    rc, out, err = _run(capsys, ["score", "--reward", "toy_appeal", "--diversity", "toy_lpips", "--images", data.images,
                                 "--prompts", data.prompts])  # fmt: skip
    assert rc == 0, err
    line = next(line for line in out.splitlines() if line.startswith("diversity"))
    metric = rewards.build_diversity("toy_lpips")
    want = metric([torch.stack([_pixels(data.images / "a.png"), _pixels(data.images / "b.png")])])
    assert float(line.split()[1]) == pytest.approx(want, rel=1e-3)
    assert "over 1 prompt(s)" in line
    summary = next(line for line in out.splitlines() if line.startswith("toy_appeal "))  # table rows start with files
    assert float(summary.split()[1]) == pytest.approx(np.mean(_direct("toy_appeal", {}, data.images, PROMPTS)), rel=1e-3)


def test_score_jsonl_prompts(capsys, data):
    jsonl = data.prompts.with_suffix(".jsonl")
    entries = [{"file_name": "d.PNG", "prompt": "a small green triangle"}, {"file": "b.png", "text": "two"},
               {"file_name": "a.png", "caption": "one"}, {"file_name": "c.png", "prompt": "three"}]  # fmt: skip
    jsonl.write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
    rc, out, err = _run(capsys, ["score", "--reward", "colorfulness", "--images", data.images, "--prompts", jsonl, "--out", data.csv])
    assert rc == 0, err
    rows = _read_csv(data.csv)
    assert [r[:2] for r in rows[1:]] == [["a.png", "one"], ["b.png", "two"], ["c.png", "three"], ["d.PNG", "a small green triangle"]]


def _write(path, text):
    path.write_text(text)
    return path


def _jsonl(data, lines):
    return _write(data.prompts.with_suffix(".jsonl"), "\n".join(lines) + "\n")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])
    return path


BAD = {
    # case: (data -> {flag: value} replacing the defaults, or a list of extra args; words the one-line error must hold)
    "no_dir": (lambda d: {"--images": d.images / "nope"}, ["--images", "nope", "no such directory"]),
    "empty_dir": (lambda d: {"--images": d.out}, ["--images", "no *.png"]),
    "truncated": (lambda d: {"--images": _truncate(d.images / "b.png").parent}, ["b.png", "cannot read", "truncated"]),
    "not_an_image": (lambda d: {"--images": _write(d.images / "c.png", "hello").parent}, ["c.png", "cannot read"]),
    "count": (lambda d: {"--prompts": _write(d.prompts, "one\ntwo\nthree\n")}, ["prompts.txt", "3 prompts for 4 images"]),
    "no_prompts_file": (lambda d: {"--prompts": d.out / "missing.txt"}, ["missing.txt", "cannot read"]),
    "jsonl_missing": (lambda d: {"--prompts": _jsonl(d, [json.dumps({"file_name": f, "prompt": "x"}) for f in ("a.png", "b.png", "d.PNG")])},
                      ["prompts.jsonl", "no entry for c.png"]),  # fmt: skip
    "jsonl_bad_line": (lambda d: {"--prompts": _jsonl(d, ['{"file_name": "a.png", "prompt": "x"}', "{not json"])},
                       ["prompts.jsonl:2", "not valid JSON"]),  # fmt: skip
    "jsonl_field": (lambda d: {"--prompts": _jsonl(d, ['{"file_name": "a.png", "prmpt": "x"}'])}, ["prompts.jsonl:1", "'prompt'"]),
    "jsonl_unknown_file": (lambda d: {"--prompts": _jsonl(d, ['{"file_name": "zzz.png", "prompt": "x"}'])}, ["prompts.jsonl:1", "'zzz.png'"]),
    "jsonl_twice": (lambda d: {"--prompts": _jsonl(d, ['{"file_name": "a.png", "prompt": "x"}'] * 2)}, ["prompts.jsonl:2", "second entry"]),
    "unknown_reward": (lambda d: {"--reward": "toy_appeal,nope"}, ["--reward", "unknown reward 'nope'", "pickscore"]),
    "unknown_metric": (lambda d: {"--diversity": "nope"}, ["--diversity", "unknown diversity 'nope'", "lpips"]),
    "bad_setting": (lambda d: ["--set", "toy_appeal.bogus=1"], ["--set toy_appeal", "bogus"]),
    "bad_setting_value": (lambda d: {"--reward": "target_color", "--set": "target_color.color=[2, 0, 0]"}, ["--set target_color", "color"]),
    "set_other_name": (lambda d: ["--set", "pickscore.model=/x"], ["--set pickscore.model=/x", "toy_appeal"]),
    "set_no_equals": (lambda d: ["--set", "toy_appeal.weights"], ["--set toy_appeal.weights", "NAME.KEY=VALUE"]),
    "missing_weights": (lambda d: {"--reward": "pickscore", "--set": "pickscore.model=/nonexistent/PickScore_v1"},
                        ["--set pickscore.model", "/nonexistent/PickScore_v1", "draftray weights fetch pickscore"]),  # fmt: skip
    "metric_weights": (lambda d: {"--diversity": "lpips", "--set": "lpips.backbone=/nonexistent/alex.pth"},
                       ["--set lpips.backbone", "/nonexistent/alex.pth"]),  # fmt: skip
    "hps_version": (lambda d: {"--reward": "hpsv2", "--set": "hpsv2.version=v3"}, ["--set hpsv2", "version"]),
    "no_pairs": (lambda d: {"--diversity": "toy_lpips", "--prompts": _write(d.prompts, "a\nb\nc\nd\n")}, ["--diversity toy_lpips", ">= 2 images"]),
    "pair_sizes": (lambda d: {"--diversity": "toy_lpips", "--prompts": _write(d.prompts, "x\ny\nz\nx\n")}, ["--diversity", "differ in size", "d.PNG"]),
    "out_exists": (lambda d: {"--out": _write(d.csv, "keep")}, ["--out", "scores.csv", "already exists", "new path"]),
    "out_parent": (lambda d: {"--out": d.out / "sub" / "s.csv"}, ["--out", "does not exist"]),
    "out_suffix": (lambda d: {"--out": d.out / "s.txt"}, ["--out", ".csv"]),
    "batch_size": (lambda d: {"--batch-size": 0}, ["--batch-size"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_score_bad_input(capsys, data, case):
    change, words = BAD[case]
    opts = {"--reward": "toy_appeal", "--images": data.images, "--prompts": data.prompts, "--out": data.csv}
    changed = change(data)
    extra = changed if isinstance(changed, list) else []
    opts.update(changed if isinstance(changed, dict) else {})
    before = {p.name: p.read_bytes() for p in data.out.iterdir()}
    rc, out, err = _run(capsys, ["score", *[x for kv in opts.items() for x in kv], *extra])
    assert rc == 2, (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("draftray: error:"), err
    for w in words:
        assert w in err, (w, err)
    assert out == ""
    assert {p.name: p.read_bytes() for p in data.out.iterdir()} == before  # nothing written, nothing changed


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No weights anywhere: empty Hugging Face and torch hub caches."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))


def test_weights_list(capsys, empty_caches):
    rc, out, err = _run(capsys, ["weights", "list"])
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert ["pickscore", "model", rewards.preference.PICKSCORE_MODEL, "missing"] in rows
    assert {r[0] for r in rows} == {"pickscore", "hpsv2", "hpsv2.1", "clipscore", "aesthetic", "lpips"}
    assert all(r[-1] == "missing" for r in rows)


def test_weights_list_found(capsys, empty_caches, tmp_path):
    from rewards.sources import url_cache_path

    path = url_cache_path(rewards.diversity.BACKBONE_URLS["alex"])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    rc, out, _ = _run(capsys, ["weights", "list"])
    assert rc == 0 and f"found: {path}" in out


def test_weights_fetch_unknown(capsys):
    rc, out, err = _run(capsys, ["weights", "fetch", "bogus"])
    assert rc == 2 and len(err.splitlines()) == 1 and "bogus" in err and "pickscore" in err and "lpips" in err
    rc, _, err = _run(capsys, ["weights", "fetch", "toy_appeal"])  # registered, but ships its weights
    assert rc == 2 and "toy_appeal" in err


def test_weights_fetch_offline(capsys, monkeypatch):
    import rewards.sources

    def no_network(src):
        raise OSError("Cannot reach https://huggingface.co: offline mode is enabled\nsecond line")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(rewards.sources, "fetch", no_network)
    rc, out, err = _run(capsys, ["weights", "fetch", "pickscore"])
    assert rc == 2 and out == ""
    assert err == f"draftray: error: weights fetch pickscore: cannot download {rewards.preference.PICKSCORE_MODEL} (Cannot reach https://huggingface.co: offline mode is enabled)"


def test_weights_fetch_prints_paths(capsys, monkeypatch, tmp_path):
    import rewards.sources

    monkeypatch.setattr(rewards.sources, "fetch", lambda src: tmp_path / src.key)
    rc, out, err = _run(capsys, ["weights", "fetch", "aesthetic", "lpips"])
    assert rc == 0, err
    assert out.splitlines() == [f"aesthetic clip: {tmp_path / 'clip'}", f"aesthetic head: {tmp_path / 'head'}", f"lpips backbone: {tmp_path / 'backbone'}"]
