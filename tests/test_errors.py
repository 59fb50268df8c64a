"""docs/errors.md, one test per row: bad input is one line naming the field or file, exit status 2,
no traceback, nothing written (no run directory, no --out), the input files untouched.

Every row id here is a row of docs/errors.md (test_every_row_is_documented checks both ways).
"""

import io
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rayjobs.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from toydata import write_toy_images  # noqa: E402

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "errors.md"


def _png(seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every bad input file, made once (the tests only read them)."""
    root = tmp_path_factory.mktemp("inputs")
    w = SimpleNamespace(root=root)

    def f(name, data):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    w.broken_yaml = f("broken.yaml", "train:\n  steps: 3\n  x: [1, 2\nsampler:\n  steps: 4\n")
    w.list_yaml = f("list.yaml", "- train\n- sampler\n")
    w.cycle_a = f("cycle/a.yaml", "extends: b.yaml\n")
    f("cycle/b.yaml", "extends: a.yaml\n")
    w.extends_missing = f("extends.yaml", "extends: nowhere.yaml\n")
    w.empty_prompts = f("empty.txt", "\n   \n")
    w.latin1_prompts = f("latin1.txt", "a caf\xe9 at night\n".encode("latin-1"))
    w.long_prompts = f("long.txt", "a red circle\n" + " ".join(["a very red circle"] * 30) + "\n" + " ".join(["blue"] * 90) + "\n")
    (root / "prompt_dir").mkdir()
    w.prompt_dir = root / "prompt_dir"
    w.jsonl_prompts = f("prompts.jsonl", '{"text": "a red circle"}\n')
    (root / "empty_data").mkdir()
    w.empty_data = root / "empty_data"
    w.truncated_data = root / "truncated_data"
    write_toy_images(w.truncated_data, 2)
    (w.truncated_data / "001.png").write_bytes((w.truncated_data / "001.png").read_bytes()[:60])
    w.text_png_data = root / "text_png_data"
    write_toy_images(w.text_png_data, 2)
    (w.text_png_data / "001.png").write_bytes(b"hello, I am text")
    w.nocaption_data = root / "nocaption_data"
    write_toy_images(w.nocaption_data, 2)
    (w.nocaption_data / "001.txt").unlink()
    w.no_unet = root / "no_unet"
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (w.no_unet / sub).mkdir(parents=True)
    (root / "not_a_vae").mkdir()
    w.not_a_vae = root / "not_a_vae"
    (root / "lora_empty").mkdir()
    w.lora_empty = root / "lora_empty"
    (root / "lora_bad").mkdir()
    save_file({"foo.bar": torch.zeros(3, 3)}, str(root / "lora_bad" / "pytorch_lora_weights.safetensors"))
    w.lora_bad = root / "lora_bad"
    w.emb_shape = root / "emb_shape.safetensors"
    save_file({"<x>": torch.zeros(7)}, str(w.emb_shape))
    w.emb_garbage = f("emb_garbage.safetensors", b"not a safetensors file")
    w.image = f("image.png", _png())
    w.score_images = root / "score_images"
    w.score_images.mkdir()
    for i in range(2):
        (w.score_images / f"{i}.png").write_bytes(_png(i))
    w.score_prompts = f("score_prompts.txt", "a\nb\n")
    w.score_truncated = root / "score_truncated"
    w.score_truncated.mkdir()
    (w.score_truncated / "0.png").write_bytes(_png()[:60])
    (w.score_truncated / "1.png").write_bytes(_png(1))  # as many images as score_prompts: only the truncation is wrong
    return w


def snapshot(root: Path) -> dict:
    """{relative path: (bytes, mtime_ns)} of every file under root."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def train(*overrides):
    def argv(w, out):
        given = overrides[0](w) if callable(overrides[0]) else list(overrides)
        return ["train", "train.seed=0", *given, f"run.output_dir={out}"]

    return argv


def train_file(path_of, *overrides):
    return lambda w, out: ["train", str(path_of(w)), *overrides, f"run.output_dir={out}"]


def finetune(source_of):
    return lambda w, out: ["train", "objective.preset=finetune", f"data.source={source_of(w)}", f"run.output_dir={out}"]


def sample(*flags):
    def argv(w, out):
        args = [str(a(w)) if callable(a) else a for a in flags]
        return ["sample", "--model", "tiny", "--prompt", "x", "--steps", "1", *args, "--out", str(out)]

    return argv


def score(**changes):
    def argv(w, out):
        opts = {"--reward": "toy_appeal", "--images": w.score_images, "--prompts": w.score_prompts}
        opts.update({k: (v(w) if callable(v) else v) for k, v in changes.items()})
        return ["score", *[str(x) for kv in opts.items() for x in kv]]

    return argv


def held_elsewhere(w, out):
    """run.name=held is held by a live driver (this test process, as the lock file on the shared ray.storage_path says;
    docs/reliability.md, "One run per run name"): refused before the local run directory exists."""
    import json

    from rayjobs.runlock import LOCK_FILE, holder_record

    held = out.parent / "store" / "held"
    held.mkdir(parents=True)
    (held / LOCK_FILE).write_text(json.dumps(holder_record("held")))
    return ["train", "run.name=held", f"run.output_dir={out}", f"ray.storage_path={held.parent}"]


# id -> (argv(world, out), words the one line must contain). `out` must never be created.
ROWS = {
    # --- configs
    "unknown-key": (train("objective.kl_coef=0.1"), ["objective.kl_coef", "unknown key", "did you mean kl_coeff?"]),
    "unknown-section": (train("objectiv.kl_coeff=0.1"), ["objectiv", "unknown key", "did you mean objective?"]),
    "unknown-key-file": (lambda w, out: ["train", str(w.root / "stepz.yaml"), f"run.output_dir={out}"], ["train.stepz", "did you mean steps?"]),
    "wrong-type": (train("train.steps=abc"), ["train.steps", "integer", "'abc'"]),
    "negative-kl": (train("objective.kl_coeff=-1"), ["objective.kl_coeff", "greater than or equal to 0"]),
    "zero-batch-size": (train("train.batch_size=0"), ["train.batch_size", "greater than or equal to 1"]),
    "k-greater-than-t": (train("sampler.truncation_steps=20", "sampler.steps=10"), ["sampler", "truncation_steps (K=20)", "<= steps (T=10)"]),
    "lora-rank-zero": (train("trainable.lora_rank=0"), ["trainable.lora_rank", "greater than or equal to 1"]),
    "draft-with-kl": (train("objective.preset=draft", "objective.kl_coeff=0.5"), ["objective", "preset 'draft' means kl_coeff 0"]),
    "bad-run-name": (train("run.name=my run"), ["run.name", "should match pattern"]),
    "override-no-equals": (train("noequals"), ["override 'noequals'", "key=value"]),
    "override-into-value": (train("train=5", "train.steps=3"), ["train.steps", "train is not a section"]),
    "yaml-syntax": (train_file(lambda w: w.broken_yaml), ["broken.yaml", "not valid YAML", "line 4, column 8"]),
    "yaml-not-mapping": (train_file(lambda w: w.list_yaml), ["list.yaml", "top level must be a mapping"]),
    "extends-cycle": (train_file(lambda w: w.cycle_a), ["a.yaml", "'extends' forms a cycle"]),
    "extends-missing": (train_file(lambda w: w.extends_missing), ["nowhere.yaml", "cannot read"]),
    "config-missing": (train_file(lambda w: w.root / "missing.yaml"), ["missing.yaml", "cannot read"]),
    "unknown-reward": (train("reward.name=nope"), ["reward", "unknown reward 'nope'"]),
    "missing-reward-weights": (train("reward.name=pickscore"), ["reward.kwargs.model", "draftray weights fetch pickscore"]),
    # --- files
    "prompts-missing": (train(lambda w: [f"data.prompts_file={w.root / 'nope.txt'}"]), ["data.prompts_file", "nope.txt", "not found"]),
    "prompts-empty": (train(lambda w: [f"data.prompts_file={w.empty_prompts}"]), ["data.prompts_file", "empty.txt", "no prompts"]),
    "prompts-folder": (train(lambda w: [f"data.prompts_file={w.prompt_dir}"]), ["data.prompts_file", "prompt_dir", "without .tar shards"]),
    "prompts-not-utf8": (train(lambda w: [f"data.prompts_file={w.latin1_prompts}"]), ["data.prompts_file", "latin1.txt", "save it as UTF-8"]),
    "prompts-jsonl-key": (train(lambda w: [f"data.prompts_file={w.jsonl_prompts}"]), ["data.prompts_file", "prompts.jsonl", "line 1", "'prompt'"]),
    "data-source-unset": (train("objective.preset=finetune"), ["data.source", "needs an image dataset"]),
    "data-source-missing": (finetune(lambda w: w.root / "nodata"), ["data.source", "nodata", "not found"]),
    "data-empty-folder": (finetune(lambda w: w.empty_data), ["data.source", "empty_data", "no images found"]),
    "data-truncated-image": (finetune(lambda w: w.truncated_data), ["data.source", "001.png", "cannot decode image", "data.skip_bad"]),
    "data-not-an-image": (finetune(lambda w: w.text_png_data), ["data.source", "001.png", "cannot decode image"]),
    "data-no-caption": (finetune(lambda w: w.nocaption_data), ["data.source", "001.png", "no caption file 001.txt"]),
    "model-missing": (train("model.name_or_path=/nonexistent/sd15"), ["model.name_or_path", "/nonexistent/sd15", "does not exist"]),
    "model-no-unet": (train(lambda w: [f"model.name_or_path={w.no_unet}"]), ["model.name_or_path", "no_unet", "lacks unet/"]),
    "model-vae-not-vae": (train(lambda w: [f"model.vae={w.not_a_vae}"]), ["model.vae", "not_a_vae", "not a VAE directory"]),
    # --- draftray sample
    "sample-steps": (sample("--steps", "0"), ["--steps", ">= 1"]),
    "sample-height": (sample("--height", "30"), ["--height", "multiple of 8"]),
    "sample-model-missing": (lambda w, out: ["sample", "--model", str(w.root / "nomodel"), "--prompt", "x", "--out", str(out)], ["--model", "nomodel"]),
    "sample-lora-no-file": (sample("--lora", lambda w: w.lora_empty), ["--lora", "lora_empty", "no pytorch_lora_weights.safetensors"]),
    "sample-lora-wrong-file": (sample("--lora", lambda w: w.lora_bad), ["--lora", "lora_bad", "does not fit this model"]),
    "sample-embeddings-shape": (sample("--embeddings", lambda w: w.emb_shape), ["--embeddings", "emb_shape.safetensors", "incorrect shape"]),
    "sample-embeddings-garbage": (sample("--embeddings", lambda w: w.emb_garbage), ["--embeddings", "emb_garbage.safetensors", "not a readable .safetensors"]),
    "sample-mask-missing": (sample("--image", lambda w: w.image, "--mask", lambda w: w.root / "nomask.png"), ["--mask", "nomask.png", "no such file"]),
    "sample-mask-no-image": (sample("--mask", lambda w: w.image), ["--mask", "--image"]),
    # --- draftray score
    "score-unknown-reward": (score(**{"--reward": "nope"}), ["--reward", "unknown reward 'nope'"]),
    "score-images-missing": (score(**{"--images": lambda w: w.root / "noimages"}), ["--images", "noimages"]),
    "score-truncated-image": (score(**{"--images": lambda w: w.score_truncated}), ["0.png", "cannot read"]),
    "score-prompt-count": (score(**{"--prompts": lambda w: w.long_prompts}), ["long.txt", "3 prompts for 2 images"]),
    # --- storage (no network here: the bucket cannot be resolved; a missing bucket fails at the same call)
    "storage-unreachable": (train("ray.storage_path=s3://draftray-no-such-bucket-7f3a/runs"),
                            ["ray.storage_path", "cannot write to s3://draftray-no-such-bucket-7f3a/runs", "check that the bucket exists"]),
    # --- one driver per run name (rayjobs/runlock.py; tests/test_run_lock.py has the real processes)
    "run-in-use": (held_elsewhere, ["run.name held: in use by pid", "wait for that run to end, or choose another run.name"]),
}
SPECIAL = ["prompts-too-long", "too-many-workers", "resume-other-model", "yaml-syntax-process", "storage-read-only", "storage-full"]


def _main(argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        return exc.code


@pytest.fixture(scope="module", autouse=True)
def _stepz(world):
    (world.root / "stepz.yaml").write_text("train:\n  stepz: 3\n")


def assert_one_line(err: str, words) -> None:
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("draftray: error: "), err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input(row, world, tmp_path, capsys):
    argv_of, words = ROWS[row]
    out = tmp_path / "runs"
    before = snapshot(world.root)
    rc = _main(argv_of(world, out))
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert_one_line(captured.err.strip(), words)
    assert not out.exists()
    assert snapshot(world.root) == before


def test_yaml_syntax_process(world, tmp_path):
    """The real process: stderr is the one line, no traceback, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "rayjobs.cli", "train", str(world.broken_yaml), f"run.output_dir={tmp_path}/runs"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line(proc.stderr.strip(), ["broken.yaml", "line 4, column 8"])
    assert not (tmp_path / "runs").exists()


def test_prompts_too_long(world, tmp_path, capsys):
    """Not an error: one warning line saying how many prompts the tokenizer will cut."""
    from rayjobs.cluster.preflight import preflight
    from rayjobs.config import load_config

    preflight(load_config(None, ["model.name_or_path=tiny", f"data.prompts_file={world.long_prompts}", f"run.output_dir={tmp_path}/runs"]))
    err = capsys.readouterr().err.strip()
    assert err.startswith("draftray: warning: 2 of 3 prompts") and "77 tokens" in err and len(err.splitlines()) == 1, err
    preflight(load_config(None, [f"data.prompts_file={world.score_prompts}"]))  # short prompts, the toy model: silent
    assert capsys.readouterr().err == ""


def test_too_many_workers(tmp_path, capsys, monkeypatch):
    """A local Ray never grows: a run larger than it is refused instead of waiting forever (no Ray started here)."""
    import ray

    import rayjobs.cluster.driver as train_mod

    monkeypatch.setattr(train_mod, "connect", lambda cfg, verbose=False: True)
    monkeypatch.setattr(train_mod, "cluster_nodes", lambda: 1)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # nothing was started: fit must not stop another test's Ray
    for extra, words in ((["ray.num_workers=64"], ["ray.cpus_per_worker", "needs 64 CPUs", "has 2"]),
                         (["ray.use_gpu=true"], ["ray.num_workers", "needs 1 GPUs", "has 0"])):  # fmt: skip
        rc = _main(["train", *extra, f"run.output_dir={tmp_path}/runs"])
        assert rc == 2
        assert_one_line(capsys.readouterr().err.strip(), words)
    assert not (tmp_path / "runs").exists()


def test_resume_other_model(tmp_path, capsys):
    """A run trained on 'tiny' (1 step, in-process), resumed with run.name on 'toy': refused before Ray, run untouched."""
    from rayjobs.cluster.driver import prepare_run_dir, run_dir_for
    from rayjobs.cluster.preflight import preflight
    from rayjobs.config import load_config
    from rayjobs.training.loop import LocalContext, train_loop

    fast = ["sampler.steps=2", "sampler.truncation_steps=1", "data.eval_prompts=[a red circle]", "data.eval_seeds=[0,1]",
            "train.batch_size=1", "train.steps=1", "train.eval_every=0", "run.name=r1", f"run.output_dir={tmp_path}/runs"]  # fmt: skip
    cfg = preflight(load_config(None, fast + ["model.name_or_path=tiny"]))
    run_dir = run_dir_for(cfg)
    prepare_run_dir(cfg, run_dir)
    train_loop(cfg, run_dir, LocalContext(run_dir))
    assert list((run_dir / "checkpoints").iterdir())
    capsys.readouterr()
    before = snapshot(run_dir)
    rc = _main(["train", *fast, "model.name_or_path=toy"])
    assert rc == 2
    assert_one_line(capsys.readouterr().err.strip(), ["run.name r1", "model.name_or_path 'tiny', not 'toy'", "new run.name"])
    assert snapshot(run_dir) == before


def test_storage_read_only(tmpfs, capsys):
    """run.output_dir on a read-only filesystem (a real read-only tmpfs mount): refused up front."""
    ro = tmpfs("ro", readonly=True)
    rc = _main(["train", f"run.output_dir={ro / 'runs'}", "run.name=r"])
    assert rc == 2
    assert_one_line(capsys.readouterr().err.strip(), [f"run.output_dir: cannot write to {ro / 'runs'}", "Read-only file system",
                                                      "free space or choose another path"])  # fmt: skip


def test_storage_full(tmpfs, tmp_path, capsys):
    """ray.storage_path on a full filesystem (a real tmpfs, filled): refused before the run directory exists."""
    from faults import fill

    full = tmpfs("full", "2m")
    fill(full)
    rc = _main(["train", f"run.output_dir={tmp_path / 'runs'}", "run.name=r", f"ray.storage_path={full / 'store'}"])
    assert rc == 2
    assert_one_line(capsys.readouterr().err.strip(), [f"ray.storage_path: cannot write to {full / 'store'}", "No space left on device"])
    assert not (tmp_path / "runs").exists() and [p.name for p in full.iterdir()] == ["ballast"]  # nothing written


def test_every_row_is_documented():
    """docs/errors.md's rows are exactly these tests' ids."""
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(encoding="utf-8"), flags=re.M)
    assert len(documented) == len(set(documented))
    assert sorted(documented) == sorted(list(ROWS) + SPECIAL)
    assert len(documented) >= 30
