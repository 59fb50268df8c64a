"""Bad input: one line naming the field or file, exit status 2, no traceback, nothing written."""

from pathlib import Path

import pytest

from rayjobs.cli import main


def _run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(
    "override, words",
    [
        ("objective.kl_coef=0.1", ["objective.kl_coef", "unknown key"]),
        ("train.steps=abc", ["train.steps", "integer"]),
        ("objective.kl_coeff=-1", ["objective.kl_coeff", "greater than or equal to 0"]),
        ("sampler.truncation_steps=11", ["truncation_steps", "<= steps"]),
        ("train.steps=0", ["train.steps", "greater than or equal to 1"]),
        ("sampler.steps=0", ["sampler.steps"]),
        ("objective.preset=draft", None),  # valid: checked below with a bad one (the None rows all run that case)
        ("model.name_or_path=/nonexistent/sd15", ["model.name_or_path", "/nonexistent/sd15", "does not exist"]),
        ("reward.name=nope", ["reward", "unknown reward 'nope'", "colorfulness"]),
        # One change each (the old single case changed both the argument's name, for toy_appeal, and its value):
        ("reward.kwargs={color: [1, 0, 0]}", ["reward", "toy_appeal", "unexpected keyword argument 'color'"]),  # valid value, argument the reward lacks
        ("reward={name: target_color, kwargs: {color: [2, 0, 0]}}", ["reward", "color must be three numbers in [0, 1]"]),  # argument it has, bad value
        ("reward.name=pickscore", ["reward.kwargs.model", "yuvalkirstain/PickScore_v1", "draftray weights fetch pickscore"]),
        ("reward.name=hpsv2.1", ["reward.kwargs.checkpoint", "HPS_v2.1_compressed.pt", "draftray weights fetch hpsv2.1"]),
        ("reward.mean=3", ["reward", "mean/std"]),
        ("diversity={name: lpips, kwargs: {backbone: /no/alexnet.pth}}", ["diversity.kwargs.backbone", "/no/alexnet.pth"]),
        ("diversity={name: lpips, fallback: null}", ["diversity.kwargs.backbone", "draftray weights fetch lpips"]),
        ("noequals", ["override", "key=value"]),
    ],
)
def test_bad_config_values(tmp_path, capsys, override, words):
    if words is None:
        override, words = "objective.kl_coeff=0.5", None
        argv = ["train", "objective.preset=draft", override, f"run.output_dir={tmp_path}/runs"]
        words = ["objective", "draft"]
    else:
        argv = ["train", "train.seed=0", override, f"run.output_dir={tmp_path}/runs"]  # no CONFIG: all overrides
    rc, err = _run(capsys, argv)
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("draftray: error:"), err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "runs").exists()


def test_the_valid_controls_of_the_reward_argument_cases_pass(tmp_path):
    """Each reward-argument row above differs in one thing from one of these: the default reward without
    arguments, and target_color with a colour in range."""
    from rayjobs.cluster.preflight import preflight
    from rayjobs.config import load_config

    for overrides in ([], ["reward={name: target_color, kwargs: {color: [1, 0, 0]}}"]):
        preflight(load_config(None, [*overrides, f"run.output_dir={tmp_path}/runs"]))


def test_bad_config_files(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    rc, err = _run(capsys, ["train", str(missing)])
    assert rc == 2 and str(missing) in err and "cannot read" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    rc, err = _run(capsys, ["train", str(broken)])
    assert rc == 2 and "not valid YAML" in err and len(err.splitlines()) == 1
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  stepz: 3\n")
    rc, err = _run(capsys, ["train", str(nested)])
    assert rc == 2 and "train.stepz" in err
    assert nested.read_text() == "train:\n  stepz: 3\n"  # input untouched


@pytest.mark.parametrize("content, words", [("\n  \n", "no prompts"), (None, "not found")])
def test_bad_prompts_file(tmp_path, capsys, content, words):
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_text(content)
    rc, err = _run(capsys, ["train", f"data.prompts_file={prompts}", f"run.output_dir={tmp_path}/runs"])
    assert rc == 2 and "data.prompts_file" in err and words in err and str(prompts) in err
    assert not (tmp_path / "runs").exists()


def test_unreadable_prompts_file_binary(tmp_path, capsys):
    prompts = tmp_path / "prompts.bin"
    prompts.write_bytes(b"\xff\xfe\x00\x81")
    rc, err = _run(capsys, ["train", f"data.prompts_file={prompts}", f"run.output_dir={tmp_path}/runs"])
    assert rc == 2 and "data.prompts_file" in err


def test_sample_bad_input(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run(capsys, ["sample", "--model", str(tmp_path / "nomodel"), "--prompt", "x", "--out", str(out)])
    assert rc == 2 and "--model" in err and "nomodel" in err
    rc, err = _run(capsys, ["sample", "--model", "tiny", "--lora", str(tmp_path), "--prompt", "x", "--out", str(out)])
    assert rc == 2 and "pytorch_lora_weights.safetensors" in err
    rc, err = _run(capsys, ["sample", "--model", "tiny", "--height", "30", "--prompt", "x", "--out", str(out)])
    assert rc == 2 and "--height" in err
    assert not out.exists()


def test_sample_writes_pngs_reproducibly(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    argv = ["sample", "--model", "tiny", "--prompt", "a red circle", "--steps", "3", "--num-images", "2", "--seed", "5"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000_seed5.png", "001_seed6.png"] and len(printed) == 4
    a, b = (np.asarray(Image.open(tmp_path / d / names[0])) for d in ("a", "b"))
    assert a.shape == (32, 32, 3) and (a == b).all()


def test_help(capsys):
    for cmd in (["--help"], ["train", "--help"], ["sample", "--help"], ["sweep", "--help"], ["pareto", "--help"],
                ["submit", "--help"], ["jobs", "--help"], ["jobs", "logs", "--help"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            main(cmd)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "key=value" in out and "--working-dir" in out and "http://127.0.0.1:8265" in out


def _subparser(name: str):
    from rayjobs.cli import _parser

    commands = next(a for a in _parser()._actions if a.dest == "command")
    return commands.choices[name]


def test_sample_options_are_the_request_fields_with_the_same_defaults():
    """The CLI and SampleRequest declare the defaults separately (the CLI does not import torch to build its parser):
    every `draftray sample` option must be a field with the CLI's default and choices, and the other way round."""
    import dataclasses

    from models.schedulers import SCHEDULERS as SCHEDULER_CLASSES
    from rayjobs.tools.sample import PROMPT_WEIGHTINGS, SCHEDULERS, SampleRequest

    options = {a.dest: a for a in _subparser("sample")._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(SampleRequest)}
    assert options.keys() == fields.keys()
    for name, option in options.items():
        if option.required:
            assert fields[name].default is dataclasses.MISSING, name
        else:
            assert fields[name].default == (tuple(option.default) if isinstance(option.default, list) else option.default), name
    assert tuple(options["scheduler"].choices) == SCHEDULERS and set(SCHEDULERS) == set(SCHEDULER_CLASSES)
    assert tuple(options["prompt_weighting"].choices) == PROMPT_WEIGHTINGS


def test_sample_request_from_python_is_checked_like_the_flags(tmp_path):
    import dataclasses

    from rayjobs.errors import UserError
    from rayjobs.tools.sample import SampleRequest, generate

    base = {"model": "tiny", "prompt": "x", "out": tmp_path / "out"}
    for extra, message in (({"scheduler": "dpm"}, "--scheduler must be one of"), ({"prompt_weighting": "Compel"}, "--prompt-weighting"),
                           ({"num_images": 0}, "--num-images must be >= 1, got 0"), ({"height": 30}, "--height")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            generate(SampleRequest(**base, **extra))
    assert not (tmp_path / "out").exists()
    request = SampleRequest(**base, embeddings=[tmp_path / "a", "b"])  # paths as the flags give them: strings
    assert request.out == str(tmp_path / "out") and request.embeddings == (str(tmp_path / "a"), "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.steps = 3  # type: ignore[misc]


def test_submit_and_jobs_parse_into_the_submission_and_job_calls(tmp_path, monkeypatch):
    """The parsers live in cli.py; rayjobs.cluster.submit gets explicit values (no Ray needed: the calls are stubbed)."""
    from rayjobs.cluster import submit

    for command, job_id in (("stpo", "run1"), ("stop", None)):  # refused before connecting: a typo must not stop a job
        with pytest.raises(ValueError, match="jobs: give one of list, status, logs, stop"):
            submit.jobs(command, job_id, address="http://127.0.0.1:9")
    calls = []
    monkeypatch.setattr(submit, "submit", lambda run, **kw: calls.append((run, kw)) or 0)
    monkeypatch.setattr(submit, "jobs", lambda *a, **kw: calls.append((a, kw)) or 0)
    assert main(["submit", "c.yaml", "a.b=1", "--sweep", "--working-dir", str(tmp_path), "--follow", "--address", "http://h:1"]) == 0
    assert main(["jobs", "logs", "run1", "--follow"]) == 0
    assert main(["jobs", "list"]) == 0
    assert calls == [
        (submit.Submission(config="c.yaml", overrides=("a.b=1",), sweep=True, working_dir=str(tmp_path)), {"address": "http://h:1", "follow_logs": True}),
        (("logs", "run1"), {"address": None, "follow_logs": True}),
        (("list", None), {"address": None, "follow_logs": False}),
    ]  # fmt: skip


def test_sweep_and_toy_bad_input(tmp_path, capsys):
    configs = Path(__file__).parents[1] / "configs"
    rc, err = _run(capsys, ["sweep", str(configs / "toy.yaml"), f"run.output_dir={tmp_path}/runs"])
    assert rc == 2 and "no sweep section" in err and len(err.splitlines()) == 1
    rc, err = _run(capsys, ["sweep", str(configs / "toy-kl-sweep.yaml"), "sweep.params={objective.kl_coeff: {grid: [-1]}}",
                            f"run.output_dir={tmp_path}/runs"])
    assert rc == 2 and "sweep.params.objective.kl_coeff" in err and len(err.splitlines()) == 1
    rc, err = _run(capsys, ["sweep", str(configs / "toy-kl-sweep.yaml"), "sweep.reward_metric=eval/reward_x", f"run.output_dir={tmp_path}/runs"])
    assert rc == 2 and "sweep.reward_metric: 'eval/reward_x' is never reported" in err and len(err.splitlines()) == 1
    rc, err = _run(capsys, ["sweep"])
    assert rc == 2 and "--resume SWEEP_DIR" in err
    for command in (["sweep", "--resume"], ["pareto"]):
        rc, err = _run(capsys, [*command, str(tmp_path)])
        assert rc == 2 and str(tmp_path) in err and "not a" in err and len(err.splitlines()) == 1
    rc, err = _run(capsys, ["sweep", str(configs / "toy-kl-sweep.yaml"), "--resume", str(tmp_path)])
    assert rc == 2 and "give only the sweep directory" in err
    taken = tmp_path / "runs" / "toy-kl-sweep" / "tune"
    taken.mkdir(parents=True)
    rc, err = _run(capsys, ["sweep", str(configs / "toy-kl-sweep.yaml"), f"run.output_dir={tmp_path}/runs"])
    assert rc == 2 and "already holds a sweep; `draftray sweep --resume" in err
    assert [p.name for p in taken.parent.iterdir()] == ["tune"]  # nothing written next to it
    taken.rmdir(), taken.parent.rmdir(), taken.parent.parent.rmdir()
    rc, err = _run(capsys, ["toy", "check", "--model", str(tmp_path / "nope")])
    assert rc == 2 and "does not exist" in err
    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"x")
    rc, err = _run(capsys, ["toy", "reward", "--out", str(existing)])
    assert rc == 2 and "already exists" in err and existing.read_bytes() == b"x"
    assert not (tmp_path / "runs").exists()


def test_sample_numeric_fields_are_the_int_and_float_flags():
    """_check's integer and finite-float checks cover every numeric `draftray sample` option: the type=int options
    are INT_FIELDS and the type=float ones FLOAT_FIELDS (tests/test_bad_input.py sends nan/inf to each float flag)."""
    from rayjobs.tools.sample import FLOAT_FIELDS, INT_FIELDS

    options = [a for a in _subparser("sample")._actions if a.dest != "help"]
    assert tuple(a.dest for a in options if a.type is int) == INT_FIELDS == ("seed", "steps", "height", "width", "num_images")
    assert tuple(a.dest for a in options if a.type is float) == FLOAT_FIELDS == (
        "guidance", "lora_scale", "refiner_start", "image_guidance", "strength")  # fmt: skip


@pytest.mark.parametrize("extra, message", [
    ({"seed": 1.5}, "--seed must be an integer, got 1.5"),
    ({"seed": True}, "--seed must be an integer, got True"),
    ({"steps": "3"}, "--steps must be an integer, got '3'"),
    ({"num_images": 2.0}, "--num-images must be an integer, got 2.0"),
    ({"guidance": "7.5"}, "--guidance must be a number, got '7.5'"),
    ({"guidance": float("nan")}, "--guidance must be a finite number, got nan"),
    ({"lora_scale": 10**400}, "--lora-scale must be a finite number, got 1" + "0" * 17 + "..." + "0" * 19),
    ({"seed": -(10**5000)}, "--seed must be in 0 <= seed < 2**32 (4294967296), got an integer of 16610 bits"),
    ({"height": 10**5000}, "--height must be at most 16384 pixels, got an integer of 16610 bits"),
], ids=["seed-float", "seed-bool", "steps-str", "num-images-float", "guidance-str", "guidance-nan", "lora-scale-huge-int",
        "seed-5000-digits", "height-5000-digits"])  # fmt: skip
def test_sample_request_numbers_from_python_are_checked(tmp_path, extra, message):
    """A Python caller's SampleRequest has not been through argparse: wrong types and values past what argparse
    parses (ints over 4300 digits) get the same one line, its value echoed in a few characters."""
    from rayjobs.errors import UserError
    from rayjobs.tools.sample import SampleRequest, generate

    with pytest.raises(UserError) as info:
        generate(SampleRequest(model="tiny", prompt="x", out=tmp_path / "out", **extra))
    assert str(info.value) == message
    assert not (tmp_path / "out").exists()


def test_sample_request_numbers_in_range_pass(tmp_path):
    """The controls, checked without sampling: the range's ends, numpy scalars, negative and zero scales."""
    import numpy as np

    from rayjobs.tools.sample import MAX_SIDE, SampleRequest, _check

    for extra in ({"seed": 2**32 - 1}, {"seed": 2**32 - 3, "num_images": 3}, {"height": MAX_SIDE, "width": 8},
                  {"seed": np.int64(7), "steps": np.int32(2), "guidance": np.float32(2.5)},
                  {"guidance": -1.0, "lora_scale": 0, "image_guidance": 0.0, "refiner_start": 0.5}):  # fmt: skip
        _check(SampleRequest(model="tiny", prompt="x", out=str(tmp_path / "out"), **extra))
    assert not (tmp_path / "out").exists()
