"""Bad input refused up front, in one line naming the field or file (docs/errors.md, the second table):
non-finite floats, AdamW betas, seeds, run names of dots, YAML duplicates / alias bombs / size, the echo of a
bad value, FIFOs given as input files, prompts without line breaks. Each class has a valid control beside it.

No test here can hang on a FIFO: the checks only stat() a path, and the in-process tests run under an alarm
(a regression that opens the FIFO fails the test instead of blocking it).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import types
import typing
from io import BytesIO
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from rayjobs.config import load_config
from rayjobs.config.base import SEED_LIMIT, Strict
from rayjobs.config.data import MAX_PROMPT_CHARS
from rayjobs.config.load import ECHO_CHARS, MAX_FILE_BYTES, MAX_NODES
from rayjobs.data.prompts import load_prompts_source
from rayjobs.errors import UserError

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "errors.md"


def refused(overrides: list[str], path=None) -> str:
    """The one-line UserError text load_config raises."""
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    text = str(info.value)
    assert len(text.splitlines()) == 1, text
    return text


@pytest.fixture
def no_hang():
    """Fail (never block) if the code under test opens a FIFO: SIGALRM interrupts the blocking open()."""

    def timeout(signum, frame):
        raise TimeoutError("blocked: a FIFO was opened")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, 30)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


# ---- 1. non-finite floats -------------------------------------------------------------------------------

NONFINITE = [
    ("optim.lr=.inf", "config optim.lr: Input should be a finite number (got inf)"),
    ("objective.kl_coeff=.nan", "config objective.kl_coeff: Input should be a finite number (got nan)"),
    ("sampler.guidance=-.inf", "config sampler.guidance: Input should be a finite number (got -inf)"),
    ("trainable.lora_alpha=.inf", "config trainable.lora_alpha: Input should be a finite number (got inf)"),  # optional
    ("optim.betas=[0.9, .nan]", "config optim.betas.1: Input should be a finite number (got nan)"),  # tuple
    ("optim.phases=[{steps: 100, lr: {unet: .inf}}]", "config optim.phases.0.lr.unet: Input should be a finite number (got inf)"),
    ("ray.resources_per_worker={A100_80GB: .inf}", "config ray.resources_per_worker.A100_80GB: Input should be a finite number"),
    ("sweep={params: {optim.lr: {uniform: [0.1, .inf]}}}", "config sweep.params.optim.lr.uniform.1: Input should be a finite number"),
    ("sweep={params: {optim.lr: {grid: [1]}}, inference: {lora_scales: [.nan]}}",
     "config sweep.inference.lora_scales.0: Input should be a finite number"),  # list
]


@pytest.mark.parametrize("override, message", NONFINITE, ids=[o.split("=")[0] for o, _ in NONFINITE])
def test_nonfinite_floats_are_refused(override, message):
    assert refused([override]).startswith(message)


def test_finite_floats_pass():
    cfg = load_config(None, ["optim.lr=1e-4", "objective.kl_coeff=0.5", "sampler.guidance=7.5", "trainable.lora_alpha=8"])
    assert cfg.optim.lr == 1e-4 and cfg.sampler.guidance == 7.5


def _with_inf(annotation):
    """A value of ``annotation``'s shape with inf where a float goes (None: no float field)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is float:
        return math.inf
    if origin is typing.Annotated:
        return _with_inf(args[0])
    if origin in (typing.Union, types.UnionType):
        return next((v for v in map(_with_inf, args) if v is not None), None)
    if origin is list:
        inner = _with_inf(args[0])
        return None if inner is None else [inner]
    if origin is tuple:
        inner = [_with_inf(a) for a in args]
        return None if any(v is None for v in inner) else tuple(inner)
    if origin is dict:
        inner = _with_inf(args[1])
        return None if inner is None else {"unet": inner}
    return None


def _sections() -> list[type[BaseModel]]:
    todo, seen = [Strict], []
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen and sub.__module__.startswith("rayjobs.config"):
                seen.append(sub)
                todo.append(sub)
    return seen


# A valid instance of each section that has required fields (the others build from their defaults).
SAMPLES = {
    "Phase": {"steps": 1, "lr": {"unet": 1e-3}},
    "PlaceholderToken": {"token": "<x>"},
    "RewardTerm": {"name": "toy_appeal"},
    "ParamSpec": {"grid": [1]},
    "ASHAConfig": {"grace_period": 1},
    "SweepConfig": {"params": {"optim.lr": {"grid": [1e-3]}}},
}


def _float_fields():
    for cls in _sections():
        for name, field in cls.model_fields.items():
            value = _with_inf(field.annotation)
            if value is not None:
                yield pytest.param(cls, name, value, id=f"{cls.__name__}.{name}")


FLOAT_FIELDS = list(_float_fields())


def test_every_float_field_is_found():
    """The sweep below is not vacuous: it reaches the nested, optional, list, tuple and dict floats."""
    ids = {p.id for p in FLOAT_FIELDS}
    assert {"OptimConfig.lr", "OptimConfig.betas", "SamplerConfig.guidance", "ObjectiveConfig.kl_coeff", "Phase.lr",
            "RayConfig.resources_per_worker", "ParamSpec.uniform", "InferenceKnobs.lora_scales", "RewardTerm.weight"} <= ids  # fmt: skip
    assert len(ids) >= 30


@pytest.mark.parametrize("cls, name, value", FLOAT_FIELDS)
def test_every_float_field_refuses_inf(cls, name, value):
    """Every float field of every section (assignment is validated like loading): inf is refused, naming the field."""
    section = cls.model_validate(SAMPLES.get(cls.__name__, {}))
    with pytest.raises(ValidationError) as info:
        setattr(section, name, value)
    err = info.value.errors()[0]
    assert err["type"] == "finite_number" and err["loc"][0] == name, err


# ---- 2. AdamW betas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("betas, message", [
    ("[0.9, 1.5]", "config optim.betas.1: Input should be less than 1 (got 1.5)"),
    ("[1.0, 0.999]", "config optim.betas.0: Input should be less than 1 (got 1.0)"),
    ("[-0.1, 0.999]", "config optim.betas.0: Input should be greater than or equal to 0 (got -0.1)"),
])  # fmt: skip
def test_betas_outside_0_1_are_refused(betas, message):
    assert refused([f"optim.betas={betas}"]) == message


def test_betas_inside_pass():
    import torch

    betas = load_config(None, ["optim.betas=[0.0, 0.9999]"]).optim.betas
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)], betas=betas)  # what the worker does with them
    assert betas == (0.0, 0.9999)


# ---- 3. seeds -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.seed=-1", "config train.seed: Input should be greater than or equal to 0 (got -1)"),
    ("train.seed=4294967296", "config train.seed: Input should be less than 4294967296 (got 4294967296)"),
    ("train.seed=18446744073709551616", "config train.seed: Input should be less than 4294967296"),
    ("train.seed=1" + "0" * 5000, "config train.seed: "),  # past Python's 4300-digit int parsing
    ("data.eval_seeds=[0, 4294967296]", "config data.eval_seeds.1: Input should be less than 4294967296"),
    ("sweep={params: {optim.lr: {grid: [1]}}, seed: -3}", "config sweep.seed: Input should be greater than or equal to 0 (got -3)"),
], ids=["negative", "2**32", "2**64", "5000-digits", "eval-seed", "sweep-seed"])  # fmt: skip
def test_seeds_out_of_range_are_refused(override, message):
    text = refused([override])
    assert text.startswith(message) and len(text) < 400, text


def test_largest_seed_works_where_seeds_go():
    """SEED_LIMIT - 1 passes the config and every use of a seed: mix_seed, the class-image generators
    (seed * 1_000_003 + i), eval generators, numpy's RandomState (the sweep's search)."""
    import numpy as np
    import torch

    from rayjobs.data.batches import mix_seed

    top = SEED_LIMIT - 1
    cfg = load_config(None, [f"train.seed={top}", f"data.eval_seeds=[0, {top}]"])
    torch.Generator().manual_seed(mix_seed(cfg.train.seed, 7, 10**6, 3))
    torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 10**9)  # rayjobs/training/class_images.py
    torch.Generator().manual_seed(cfg.data.eval_seeds[-1])
    np.random.RandomState(top)
    assert mix_seed(top, 0, 0, 0) != mix_seed(top - 1, 0, 0, 0)  # distinct seeds, distinct streams


# ---- 4. run names of dots -------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["run.name=.", "run.name=..", "run.name=....",
                                      "sweep={params: {optim.lr: {grid: [1]}}, name: ..}"])  # fmt: skip
def test_dot_names_are_refused(override):
    field = override.split("=")[0].split(".")[0] + ".name"
    assert re.match(rf"config {field}: dots alone are no directory name .*\(got '\.+'\)$", refused([override]))


@pytest.mark.parametrize("name", [".hidden", "a..b", "run.1", "..x", "-_-"])
def test_names_with_more_than_dots_pass(name):
    assert load_config(None, [f"run.name={name}"]).run.name == name


# ---- 5. YAML: duplicate keys, alias bombs, size, echo of bad values --------------------------------------


@pytest.mark.parametrize("text, where", [
    ("run:\n  name: a\ntrain:\n  steps: 3\nrun:\n  output_dir: x\n", "line 5, column 1: key 'run' given twice, on line 1 and line 5"),
    ("train:\n  steps: 3\n  seed: 1\n  steps: 4\n", "line 4, column 3: key 'steps' given twice, on line 2 and line 4"),
    ("train: {steps: 3, steps: 4}\n", "line 1, column 19: key 'steps' given twice, on line 1"),
])  # fmt: skip
def test_duplicate_keys_are_refused(tmp_path, text, where):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    assert refused([], path) == f"config file {path}: not valid YAML ({where}; keep one); fix the file there"


def test_duplicate_key_in_override_is_refused():
    assert refused(["train={steps: 3, steps: 4}"]) == "override 'train={steps: 3, steps: 4}': key 'steps' given twice, on line 1; keep one"


def test_same_key_in_other_mappings_and_merge_keys_pass(tmp_path):
    from rayjobs.config.load import parse_yaml

    path = tmp_path / "ok.yaml"
    path.write_text("run: {name: a}\ntrain:\n  steps: 3\n  seed: 1\noptim:\n  lr: 0.5\nsampler: {steps: 3}\n"
                    "data:\n  eval_seeds: [1, 2]\n  prompts: [x]\n")  # fmt: skip
    cfg = load_config(path)
    assert cfg.train.steps == 3 and cfg.sampler.steps == 3 and cfg.optim.lr == 0.5
    # a merge key (<<) overridden by an explicit key is YAML's merge, not a duplicate
    assert parse_yaml("a: &d {steps: 3, seed: 1}\nb:\n  <<: *d\n  steps: 4\n")["b"] == {"steps": 4, "seed": 1}


def _bomb(levels: int = 9) -> str:
    """'Billion laughs': each level lists the previous one 9 times (9**levels strings, ~400 bytes)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\ndata:\n  prompts: *l{levels - 1}\n"


@pytest.mark.parametrize("text", [_bomb(), "x: &a [1, *a]\n"], ids=["billion-laughs", "self-alias"])
def test_alias_bombs_are_refused(tmp_path, no_hang, text):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert len(text) < 1000
    assert refused([], path) == (f"config file {path}: its aliases (*name) expand to more than {MAX_NODES:,} values (or into "
                                 "themselves); write the values out instead")  # fmt: skip


def test_alias_bomb_in_override_is_refused(no_hang):
    flow = "{" + ", ".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)) + "}"
    text = refused(["train.x={l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol], y: " + flow + "}"])
    assert text.startswith("override ") and "expand to more than" in text and len(text) < 400


def test_small_aliases_pass(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("data:\n  eval_prompts: &p [a red star, a blue circle]\n  prompts: *p\n")
    cfg = load_config(path)
    assert cfg.data.prompts == cfg.data.eval_prompts == ["a red star", "a blue circle"]


def test_deep_nesting_is_refused(tmp_path, no_hang):
    path = tmp_path / "deep.yaml"
    path.write_text("train:\n  x: " + "[" * 3000 + "]" * 3000 + "\n")
    assert refused([], path) == f"config file {path}: nested too deeply; fix the file"


def test_file_over_1_mib_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    assert refused([], path).startswith(f"config file {path}: larger than 1 MiB; ")
    path.write_text("# padding\n" * (MAX_FILE_BYTES // 10 - 2) + "train: {steps: 3}\n")  # just under: read
    assert load_config(path).train.steps == 3


@pytest.mark.parametrize("override, field", [
    ("train.steps=" + "x" * 100_000, "train.steps"),
    ("data.eval_seeds=[" + ", ".join(["1"] * 20_000) + ", x]", "data.eval_seeds.20000"),
    ("train.steps=[" + ", ".join(["abc"] * 20_000) + "]", "train.steps"),
    ("train.seed=1" + "0" * 4000, "train.seed"),  # a long int: reprlib elides its digits
    ("trainable.tokens=[{token: a" + "b" * 10_000 + "}, {token: a" + "b" * 10_000 + "}]", "trainable"),
    ("x" * 50_000 + "=1", "x"),  # the unknown key itself
])  # fmt: skip
def test_echo_of_a_bad_value_is_capped(override, field):
    text = refused([override])
    assert text.startswith(f"config {field}") and len(text) < 1000, len(text)
    got = re.search(r"\(got (.*)\)$", text)
    assert got is None or len(got.group(1)) <= ECHO_CHARS + 1


def test_short_bad_value_is_echoed_whole():
    assert refused(["train.steps=abc"]).endswith("(got 'abc')")


def test_billion_laughs_below_the_limit_echoes_little(tmp_path):
    """A bomb of 9**5 items (under MAX_NODES) in an int field: validation fails, the message stays short."""
    path = tmp_path / "b.yaml"
    path.write_text(_bomb(5).replace("data:\n  prompts:", "train:\n  steps:"))
    text = refused([], path)
    assert text.startswith("config train.steps: Input should be a valid integer") and len(text) < 400


# ---- 6. FIFOs and other special files; prompts without line breaks ---------------------------------------


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "prompts.txt"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("field", ["data.prompts_file", "data.source", "data.instruction_templates", "data.class_dir"])
def test_fifo_config_paths_are_refused(fifo, no_hang, field):
    extra = ["data.class_prompt=a dog"] if field == "data.class_dir" else []
    text = refused([f"{field}={fifo}", *extra])
    assert text == f"config {field}: a FIFO (named pipe), not a regular file or folder: reading it could wait forever; give a file or folder (got '{fifo}')"


def test_fifo_eval_image_is_refused(fifo, no_hang):
    assert refused([f"data.eval_images=[{fifo}]"]).startswith("config data.eval_images.0: a FIFO (named pipe)")


def test_fifo_readers_refuse_without_opening(fifo, no_hang):
    """The readers themselves (called without the config's check, e.g. by other commands)."""
    from rayjobs.data.batches import load_templates

    with pytest.raises(UserError, match=rf"^data.prompts_file {re.escape(str(fifo))}: a FIFO \(named pipe\), not a regular file"):
        load_prompts_source(fifo)
    with pytest.raises(UserError, match=rf"^data.instruction_templates {re.escape(str(fifo))}: a FIFO \(named pipe\), not a regular file"):
        load_templates(str(fifo))


def test_fifo_config_file_is_refused(tmp_path, no_hang):
    path = tmp_path / "config.yaml"
    os.mkfifo(path)
    assert refused([], path) == f"config file {path}: not a regular file (a FIFO, device or socket); give a YAML file"


def test_regular_files_pass(tmp_path):
    from rayjobs.data.batches import load_templates

    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "t.yaml").write_text("make it red: [turn it red]\n")
    cfg = load_config(None, [f"data.prompts_file={tmp_path / 'p.txt'}", f"data.instruction_templates={tmp_path / 't.yaml'}",
                             f"data.source={tmp_path}"])  # fmt: skip
    assert load_prompts_source(cfg.data.prompts_file) == ["a red circle"]
    assert load_templates(cfg.data.instruction_templates) == {"make it red": ["turn it red"]}


def _tar(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, BytesIO(data))
    return path


LONG = "a red circle " * 100_000  # 1.3 MB on one line


@pytest.mark.parametrize("name, content, at", [
    ("one_line.txt", f"a red circle\n\n{LONG}\n", "line 3"),
    ("prompts.jsonl", json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": LONG}) + "\n", "line 2"),
    ("shard.tar", {"000.txt": "ok", "001.txt": LONG}, "member 001"),
])  # fmt: skip
def test_prompts_over_the_cap_are_refused(tmp_path, name, content, at):
    path = _tar(tmp_path / name, content) if isinstance(content, dict) else tmp_path / name
    if not isinstance(content, dict):
        path.write_text(content)
    with pytest.raises(UserError) as info:
        load_prompts_source(path)
    n = len(LONG.strip())
    assert str(info.value) == (f"data.prompts_file {path}: {at}: a prompt of {n:,} characters, over the {MAX_PROMPT_CHARS:,} allowed "
                               "(the text encoder reads 77 tokens); missing line breaks? one prompt per line")  # fmt: skip


def test_inline_prompt_over_the_cap_is_refused():
    text = refused(["data.prompts=[ok, " + "a" * (MAX_PROMPT_CHARS + 1) + "]"])
    assert text.startswith("config data.prompts.1: String should have at most 10000 characters (got 'aaa") and len(text) < 400


def test_prompt_at_the_cap_passes(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("x" * MAX_PROMPT_CHARS + "\n")
    assert load_prompts_source(path) == ["x" * MAX_PROMPT_CHARS]
    assert load_config(None, ["data.prompts=[" + "y" * MAX_PROMPT_CHARS + "]"]).data.prompts[0] == "y" * MAX_PROMPT_CHARS


def test_preflight_refuses_a_one_line_prompt_file_fast(tmp_path, capsys):
    """The up-front token-length warning never tokenizes a megabyte prompt: the reader refuses it first."""
    import time

    from rayjobs.cluster.preflight import preflight

    path = tmp_path / "one_line.txt"
    path.write_text("red " * 2_500_000)  # 10 MB, no line break
    cfg = load_config(None, [f"data.prompts_file={path}", "model.name_or_path=tiny", f"run.output_dir={tmp_path}/runs"])
    start = time.monotonic()
    with pytest.raises(UserError, match=r"line 1: a prompt of 9,999,999 characters"):
        preflight(cfg)
    assert time.monotonic() - start < 30 and not (tmp_path / "runs").exists()


# ---- the CLI: exit 2, one stderr line, nothing written ---------------------------------------------------


def _cli_cases(tmp: Path) -> dict:
    (tmp / "nonfinite.yaml").write_text("optim:\n  lr: .inf\n")
    (tmp / "dup.yaml").write_text("run:\n  name: a\nrun:\n  name: b\n")
    (tmp / "bomb.yaml").write_text(_bomb())
    os.mkfifo(tmp / "fifo.txt")
    (tmp / "ok.yaml").write_text("train:\n  steps: 3\n")
    return {
        "nonfinite": ([str(tmp / "nonfinite.yaml")], "config optim.lr: Input should be a finite number (got inf)"),
        "duplicate-key": ([str(tmp / "dup.yaml")], "key 'run' given twice, on line 1 and line 3"),
        "alias-bomb": ([str(tmp / "bomb.yaml")], "bomb.yaml: its aliases (*name) expand to more than"),
        "dots-name": ([str(tmp / "ok.yaml"), "run.name=.."], "config run.name: dots alone are no directory name"),
        "fifo": ([str(tmp / "ok.yaml"), f"data.prompts_file={tmp / 'fifo.txt'}"], "config data.prompts_file: a FIFO (named pipe)"),
    }


@pytest.mark.parametrize("case", ["nonfinite", "duplicate-key", "alias-bomb", "dots-name", "fifo"])
def test_cli_exit_2_one_line_nothing_written(tmp_path, case):
    args, words = _cli_cases(tmp_path)[case]
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "rayjobs.cli", "train", *args, f"run.output_dir={out}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=180, check=False)  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, err)
    assert len(err.splitlines()) == 1 and err.startswith("draftray: error: ") and "Traceback" not in err, err
    assert words in err, err
    assert not out.exists()


# ---- 7. draftray sample: seeds and other integers in range, finite floats, embeddings as safetensors --------
#
# In-process `draftray sample` on the tiny model (no Ray): exit 2, one stderr line naming the flag, no --out
# directory, the input files untouched. Most are refused before the model loads; --steps past the model's
# timesteps right after (the scheduler says how many), still before anything is written.


def _sample_argv(out: Path, *flags: str) -> list[str]:
    return ["sample", "--model", "tiny", "--prompt", "x", "--steps", "1", *flags, "--out", str(out)]


def _files(root: Path) -> dict:
    """{path: bytes, or the file type of a special file}: a snapshot that never opens a FIFO."""
    import stat

    out = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        out[path.as_posix()] = path.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
    return out


def sample_refused(tmp_path: Path, capsys, flags: list[str], words: list[str]) -> str:
    from rayjobs.cli import main

    out = tmp_path / "out"
    before = _files(tmp_path)
    rc = main(_sample_argv(out, *flags))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("draftray: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() and _files(tmp_path) == before
    return err


@pytest.mark.parametrize("flags, words", [
    (["--seed", "-1"], ["--seed must be in 0 <= seed < 2**32 (4294967296), got -1"]),
    (["--seed", "4294967296"], ["--seed must be in 0 <= seed < 2**32", "got 4294967296"]),
    (["--seed", str(2**64)], ["--seed must be in 0 <= seed < 2**32", "got 18446744073709551616"]),  # torch's own limit
    (["--seed", str(10**30)], ["--seed must be in 0 <= seed < 2**32", "got 1000000000000000000000000000000"]),
    (["--seed", "4294967295", "--num-images", "2"], ["--seed 4294967295 with --num-images 2", "the last seed, 4294967296, is not below 2**32"]),
    (["--num-images", str(10**30)], ["--seed 0 with --num-images 1000000000000000000000000000000"]),
], ids=["negative", "2**32", "2**64", "10**30", "last-image", "num-images-10**30"])  # fmt: skip
def test_sample_seed_out_of_range_is_refused(tmp_path, capsys, flags, words):
    sample_refused(tmp_path, capsys, flags, words)


def test_sample_largest_seed_works(tmp_path, capsys):
    """The control: 2**32 - 1, the last seed of the range, samples (one step of the tiny model)."""
    from rayjobs.cli import main

    assert main(_sample_argv(tmp_path / "out", "--seed", str(SEED_LIMIT - 1))) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"000_seed{SEED_LIMIT - 1}.png"]


@pytest.mark.parametrize("flags, words", [
    (["--steps", "1001"], ["--steps must be <= 1000 (--model's scheduler has num_train_timesteps 1000), got 1001"]),  # DDIM raised
    (["--steps", "1001", "--scheduler", "euler"], ["--steps must be <= 1000"]),  # Euler repeated timesteps
    (["--steps", str(10**30)], ["--steps must be <= 1000", "got 1000000000000000000000000000000"]),
    (["--steps", "-3"], ["--steps must be >= 1, got -3"]),
    (["--width", "16392"], ["--width must be at most 16384 pixels, got 16392"]),  # the old code ran out of memory
    (["--height", str(8 * 10**20)], ["--height must be at most 16384 pixels, got 800000000000000000000"]),
    (["--height", "-8"], ["--height must be a positive multiple of 8, got -8"]),
    (["--num-images", "-1"], ["--num-images must be >= 1, got -1"]),
], ids=["steps-1001", "steps-1001-euler", "steps-10**30", "steps-negative", "width-16392", "height-huge", "height-negative",
        "num-images-negative"])  # fmt: skip
def test_sample_integer_out_of_range_is_refused(tmp_path, capsys, flags, words):
    sample_refused(tmp_path, capsys, flags, words)


SAMPLE_FLOATS = ["--guidance", "--lora-scale", "--refiner-start", "--image-guidance", "--strength"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", SAMPLE_FLOATS)
def test_sample_nonfinite_float_is_refused(tmp_path, capsys, flag, value):
    """Every float flag of `draftray sample` (tests/test_cli.py checks the list is all of them); a NaN guidance
    scale used to sample an unguided image without a word."""
    sample_refused(tmp_path, capsys, [f"{flag}={value}"], [f"{flag} must be a finite number, got {value}"])  # = : '-inf' is no option


class _Evil:
    """Unpickling this makes a directory: the proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def embedding_files(tmp_path):
    import pickle

    import torch
    from safetensors.torch import save_file

    root = tmp_path / "emb"
    root.mkdir()
    marker = tmp_path / "PWNED"
    (root / "pickle.bin").write_bytes(pickle.dumps({"<x>": _Evil(marker)}))
    torch.save({"<x>": torch.zeros(1, 32)}, root / "tensors.bin")  # tensors only, but a pickle all the same
    save_file({"<x>": torch.zeros(1, 32)}, str(root / "good.safetensors"))
    good = (root / "good.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(good[:-16])
    (root / "empty_dir").mkdir()
    (root / "several").mkdir()
    for k in range(2):
        save_file({f"<t{k}>": torch.zeros(1, 32)}, str(root / "several" / f"learned_embeds_{k}.safetensors"))
    os.mkfifo(root / "fifo.safetensors")
    save_file({"<a>": torch.zeros(1, 32), "<b>": torch.zeros(1, 32)}, str(root / "two.safetensors"))
    (root / "safetensors.bin").write_bytes(good)  # safetensors under another name: accepted
    return types.SimpleNamespace(root=root, marker=marker)


@pytest.mark.parametrize("name, words", [
    ("pickle.bin", ["--embeddings", "pickle.bin: not a readable .safetensors file (", "safetensors expected"]),
    ("tensors.bin", ["--embeddings", "tensors.bin: not a readable .safetensors file", "safetensors expected"]),
    ("cut.safetensors", ["--embeddings", "cut.safetensors: not a readable .safetensors file", "safetensors expected"]),
    ("fifo.safetensors", ["--embeddings", "fifo.safetensors: a FIFO (named pipe), not a file to read", "safetensors expected"]),
    ("two.safetensors", ["--embeddings", "two.safetensors: 2 tensors (<a>, <b>); an SD 1.x embedding file holds one"]),
])  # fmt: skip
def test_sample_embeddings_not_safetensors_is_refused(tmp_path, capsys, no_hang, embedding_files, name, words):
    sample_refused(tmp_path, capsys, ["--embeddings", str(embedding_files.root / name)], words)
    assert not embedding_files.marker.exists(), "the pickle ran"


@pytest.mark.parametrize("name, words", [
    ("missing.safetensors", ["--embeddings", "missing.safetensors: no such file or directory; safetensors expected"]),
    ("empty_dir", ["--embeddings", "empty_dir: no learned_embeds.safetensors in this directory; safetensors expected"]),
    ("several", ["several: no learned_embeds.safetensors in this directory",
                 "several placeholders: give each file, --embeddings", "learned_embeds_0.safetensors"]),
])  # fmt: skip
def test_sample_embeddings_without_the_file_are_refused(tmp_path, capsys, embedding_files, name, words):
    sample_refused(tmp_path, capsys, ["--embeddings", str(embedding_files.root / name)], words)


def test_sample_embeddings_safetensors_pass(embedding_files):
    """The controls: a safetensors file (under any name) and a directory holding learned_embeds.safetensors."""
    from rayjobs.tools.sample import embeddings_file

    (embedding_files.root / "dir").mkdir()
    (embedding_files.root / "dir" / "learned_embeds.safetensors").write_bytes((embedding_files.root / "good.safetensors").read_bytes())
    for name in ("good.safetensors", "safetensors.bin"):
        assert embeddings_file(str(embedding_files.root / name)) == embedding_files.root / name
    assert embeddings_file(str(embedding_files.root / "dir")) == embedding_files.root / "dir" / "learned_embeds.safetensors"


# ---- 8. special files INSIDE a data.source folder -----------------------------------------------------------
#
# The config refuses a FIFO given as data.source itself (section 6); a FIFO, device or socket inside the folder is
# stat()ed, never opened: a bad item (one line naming it, or skipped with data.skip_bad) or, in the layout's own
# files, an error. Everything runs under no_hang: a regression that opens one fails instead of blocking.


def _special_source(tmp_path: Path, where: str) -> tuple[Path, str]:
    """A captioned toy folder of 3 images with one special file at ``where``; returns (folder, its name)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from toydata import write_toy_images

    data = tmp_path / "data"
    write_toy_images(data, 3)
    target = {"image": "001.png", "caption": "001.txt", "nested": "sub/x.png", "metadata": "metadata.jsonl",
              "parquet": "extra.parquet", "jsonl-image": "pipe.png", "device": "001.png", "mask": "001.mask.png"}[where]  # fmt: skip
    path = data / target
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    if where == "device":
        os.symlink("/dev/zero", path)  # never ends: read_bytes() would fill the memory
    else:
        os.mkfifo(path)
    if where == "nested":
        (data / "sub" / "x.txt").write_text("a red circle")
    if where == "mask":  # the other items' masks (data.mask_kind: dataset): the left half repainted
        from PIL import Image

        for k in (0, 2):
            Image.frombytes("L", (32, 32), (b"\xff" * 16 + b"\x00" * 16) * 32).save(data / f"{k:03d}.mask.png")
    if where == "jsonl-image":  # a metadata.jsonl row naming the FIFO
        (data / "metadata.jsonl").write_text('{"file_name": "000.png", "text": "a"}\n{"file_name": "pipe.png", "text": "b"}\n')
    return data, target


SPECIAL_IN_SOURCE = [
    ("image", "001.png: a FIFO (named pipe), not a regular file: reading it could wait forever; remove it or replace it with the image, "
              "or set data.skip_bad: true"),
    ("caption", "001.png: caption file 001.txt is a FIFO (named pipe), not a regular file"),  # used to block in read_text
    ("nested", "sub/x.png: a FIFO (named pipe), not a regular file"),
    ("jsonl-image", "pipe.png: a FIFO (named pipe), not a regular file"),  # used to block in read_bytes
    ("device", "001.png: a character device, not a regular file"),
    ("mask", "001.mask.png: a FIFO (named pipe), not a regular file"),  # used to be "no mask file"
    ("metadata", "metadata.jsonl: a FIFO (named pipe), not a regular file: reading it could wait forever; remove it or replace it with the file"),
    ("parquet", "extra.parquet: a FIFO (named pipe), not a regular file"),
]  # fmt: skip


@pytest.mark.parametrize("where, words", SPECIAL_IN_SOURCE, ids=[w for w, _ in SPECIAL_IN_SOURCE])
def test_special_file_inside_data_source_is_refused(tmp_path, no_hang, where, words):
    from rayjobs.data.load import check_records, load_records

    data, _ = _special_source(tmp_path, where)
    with pytest.raises(UserError) as info:
        check_records(load_records(data, masks=where == "mask"))
    text = str(info.value)
    assert text.startswith(f"data.source {data}/") and words in text and len(text.splitlines()) == 1, text


@pytest.mark.parametrize("where", ["image", "caption", "jsonl-image"])
def test_special_file_inside_data_source_is_skipped_with_skip_bad(tmp_path, no_hang, where):
    from rayjobs.data.load import check_records, load_records

    data, target = _special_source(tmp_path, where)
    good, skipped = check_records(load_records(data), skip_bad=True)
    assert len(good) == (1 if where == "jsonl-image" else 2)
    assert [name.rsplit("/", 1)[-1] for name, _ in skipped] == [target.replace(".txt", ".png")], skipped
    assert "a FIFO (named pipe), not a regular file: reading it could wait forever" in skipped[0][1], skipped  # not no_hang's alarm


def test_special_file_inside_data_source_stops_preflight(tmp_path, no_hang):
    """Up front: the run's preflight (before any worker, nothing written) refuses it in one line."""
    from rayjobs.cluster.preflight import preflight

    data, _ = _special_source(tmp_path, "caption")
    cfg = load_config(None, ["objective.preset=finetune", f"data.source={data}", "model.name_or_path=tiny", f"run.output_dir={tmp_path}/runs"])
    with pytest.raises(UserError, match=r"^data.source .*/001.png: caption file 001.txt is a FIFO \(named pipe\)"):
        preflight(cfg)
    assert not (tmp_path / "runs").exists()


def test_symlinks_in_data_source_keep_their_behaviour(tmp_path, no_hang):
    """A symlink to an image outside the folder is read as before; a symlinked folder is not descended into
    (pathlib's rglob); dangling links and a link loop are passed over; a link to a FIFO is refused like one."""
    from rayjobs.data.load import check_records, load_records

    sys.path.insert(0, str(Path(__file__).parent))
    from toydata import write_toy_images

    data, outside = tmp_path / "data", tmp_path / "outside"
    write_toy_images(data, 2)
    write_toy_images(outside, 1)
    os.symlink(outside / "000.png", data / "ext.png")
    (data / "ext.txt").write_text("a red circle")
    os.symlink(outside, data / "linked")
    os.symlink(tmp_path / "nowhere.png", data / "dangling.png")
    os.symlink(data / "loop.png", data / "loop.png")
    good, skipped = check_records(load_records(data))
    assert [r.key for r in good] == ["000.png", "001.png", "ext.png"] and skipped == []
    os.mkfifo(outside / "pipe.png")
    os.symlink(outside / "pipe.png", data / "pipe.png")
    (data / "pipe.txt").write_text("a red circle")
    with pytest.raises(UserError, match=r"pipe.png: a FIFO \(named pipe\), not a regular file"):
        check_records(load_records(data))


# ---- docs/errors.md lists these cases ----------------------------------------------------------------------

CASES = ["nonfinite-float", "betas-out-of-range", "seed-out-of-range", "run-name-dots", "yaml-duplicate-key", "yaml-alias-bomb",
         "yaml-too-deep", "config-too-large", "config-not-regular", "long-value-echo", "input-file-fifo", "prompt-too-long",
         "prompt-too-long-inline", "sample-seed-out-of-range", "sample-int-out-of-range", "sample-nonfinite-float",
         "sample-embeddings-not-safetensors", "sample-embeddings-no-file", "data-source-special-file"]  # fmt: skip


def test_every_case_is_documented():
    """docs/errors.md's second table has exactly these rows (its first table is tests/test_errors.py's)."""
    rows = re.findall(r"^\| `test_bad_input\.py::([a-z0-9-]+)` \|", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert sorted(rows) == sorted(CASES)
