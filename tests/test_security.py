"""Security guarantees of docs/security.md, each checked here (offline, CPU, no cluster).

1. No pickle of anything a user points at: a source scan (torch.load without weights_only=True,
   pickle / yaml.load / shell=True / os.system / eval ...) and a malicious .pt given as reward weights.
2. No shell strings: subprocesses take argument lists (the scan), the submitted entrypoint is shlex-quoted.
3. The dashboard / Jobs API is never public and token auth is on in every shipped cluster config.
4. Secrets stay out of run directories and job entrypoints.
"""

from __future__ import annotations

import ast
import inspect
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["models", "rewards", "rayjobs", "bench"]


# ---- 1 + 2: the source scan -----------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""  # a method of a computed value (model.requires_grad_(False).eval()): not a module function
    parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load", "dill.loads",
    "joblib.load", "cloudpickle.load", "cloudpickle.loads", "marshal.load", "marshal.loads", "pd.read_pickle",
    "pandas.read_pickle", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
    "os.system", "os.popen", "torch.hub.load", "eval", "exec",
}  # fmt: skip


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """'file:line: what' for each unsafe call in one module's source."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}"
        if name in UNSAFE_CALLS:
            found.append(f"{where}: {name}()")
        elif name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name.endswith("np.load") or name == "numpy.load":
            if _kw(node, "allow_pickle") is not None and not (isinstance(_kw(node, "allow_pickle"), ast.Constant) and _kw(node, "allow_pickle").value is False):
                found.append(f"{where}: np.load with allow_pickle")
        if name.startswith("subprocess.") or name.split(".")[-1] in {"Popen", "run", "call", "check_call", "check_output"}:
            shell = _kw(node, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                found.append(f"{where}: {name}(shell=...)")
        if _is_true(_kw(node, "trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True")
    return found


def test_source_tree_has_no_unsafe_calls():
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            found += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "unsafe calls (docs/security.md):\n" + "\n".join(found)


def test_scan_is_not_vacuous():
    bad = """
import torch, pickle, yaml, os, subprocess
torch.load(p)
torch.load(p, weights_only=False)
pickle.loads(b)
yaml.load(s)
yaml.unsafe_load(s)
subprocess.run(cmd, shell=True)
os.system("ls")
os.popen("ls")
eval(x)
exec(x)
"""
    good = "import torch, yaml, subprocess\ntorch.load(p, weights_only=True)\nyaml.safe_load(s)\nsubprocess.run(['ls'])\nm.eval()\n"
    assert len(unsafe_calls(bad)) == 10
    assert unsafe_calls(good) == []


def test_submitted_entrypoint_is_quoted():
    """The entrypoint is one shell string on the cluster: every user-given part is shlex-quoted."""
    import shlex

    from rayjobs.cluster import submit

    args = SimpleNamespace(config=str(ROOT / "configs" / "tiny.yaml"), overrides=["data.eval_prompts=[a b; touch /tmp/x]"],
                           sweep=False, working_dir=str(ROOT))  # fmt: skip
    _, entrypoint, _ = submit.plan(args)
    assert "data.eval_prompts=[a b; touch /tmp/x]" in shlex.split(entrypoint)


# ---- 1: a malicious checkpoint is refused ---------------------------------------------------


class _Evil:
    """Unpickling it would create the marker file (what a real attack does with os.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_files(directory: Path, marker: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {"zip": directory / "evil.pt", "legacy": directory / "evil_legacy.pth", "pickle": directory / "evil_raw.pth"}
    torch.save({"state_dict": _Evil(marker)}, files["zip"])
    torch.save({"state_dict": _Evil(marker)}, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle"].write_bytes(pickle.dumps(_Evil(marker)))
    assert not marker.exists()
    return files


@pytest.fixture(scope="module")
def reward_weights(tmp_path_factory):
    from models.tokenizer import clip_tokenizer_dir
    from rewards.builders import register_tiny_open_clip, save_hf_clip

    root = tmp_path_factory.mktemp("sec-weights")
    return {"hf": save_hf_clip(root / "hf", clip_tokenizer_dir()), "arch": register_tiny_open_clip(root / "open_clip")}


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("reward", ["aesthetic", "hpsv2"])
def test_malicious_weights_file_is_refused_and_never_run(reward, kind, reward_weights, tmp_path):
    from rewards import MissingWeightsError, build_reward

    marker = tmp_path / "PWNED"
    evil = _evil_files(tmp_path / "w", marker)[kind]
    kwargs = {"aesthetic": dict(clip=str(reward_weights["hf"]), head=str(evil)),
              "hpsv2": dict(checkpoint=str(evil), arch=reward_weights["arch"])}[reward]  # fmt: skip
    with pytest.raises(MissingWeightsError) as err:
        build_reward(reward, **kwargs)
    assert str(evil) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists(), "the pickle's code ran"


def test_load_state_dict_file_refuses_arbitrary_objects(tmp_path):
    from rewards import MissingWeightsError
    from rewards.sources import load_state_dict_file

    marker = tmp_path / "PWNED"
    for path in _evil_files(tmp_path / "w", marker).values():
        with pytest.raises(MissingWeightsError):
            load_state_dict_file(path, "reward.kwargs.head", "aesthetic predictor head")
    assert not marker.exists()


def test_project_checkpoints_load_tensors_only():
    """optimizer.pt / rng_rank*.pt of the project's own checkpoints: weights_only=True on every load."""
    from rayjobs.training import checkpoint

    assert unsafe_calls(inspect.getsource(checkpoint), "rayjobs/training/checkpoint.py") == []
    assert "weights_only=True" in inspect.getsource(checkpoint)


# ---- 3: the dashboard and the Jobs API ------------------------------------------------------

LAUNCHERS = [ROOT / "cluster.yaml", ROOT / "deploy" / "gcp.yaml"]
KUBERAY = ROOT / "deploy" / "kuberay-rayjob.yaml"
SHIPPED_TEXT = [ROOT / "cluster.yaml", ROOT / "Dockerfile", ROOT / "Makefile", ROOT / "README.md",
                *sorted((ROOT / "deploy").iterdir()), *sorted((ROOT / "docs").rglob("*.md"))]  # fmt: skip
PRIVATE = re.compile(r"^(127\.\d+\.\d+\.\d+|localhost|10\.\d+\.\d+\.\d+|192\.168\.\d+\.\d+|172\.(1[6-9]|2\d|3[01])\.\d+\.\d+|\$\{?\w+\}?)$")


def _private(host: str) -> bool:
    return bool(PRIVATE.match(host.strip("'\"")))


def test_private_pattern():
    assert _private("127.0.0.1") and _private("10.0.3.4") and _private("localhost")
    assert not _private("0.0.0.0") and not _private("::") and not _private("3.4.5.6")


def test_no_shipped_file_opens_the_dashboard_to_the_world():
    bad = []
    for path in SHIPPED_TEXT:
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for host in re.findall(r"dashboard[-_]host[\"']?\s*[=: ]\s*[\"']?([A-Za-z0-9.:${}_]*[A-Za-z0-9}])", line):
                if not _private(host):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: dashboard host {host}")
            if path.suffix != ".md" and re.search(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: token auth turned off")
            if re.search(r"^\s*EXPOSE\b.*\b(8265|6379|10001)\b", line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: Ray port exposed")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launchers_start_every_node_with_token_auth_and_a_loopback_dashboard(path):
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    for start in (head, workers):
        assert "RAY_AUTH_MODE=token" in start
        assert "0.0.0.0" not in start
    assert re.findall(r"--dashboard-host[= ](\S+)", head) == ["127.0.0.1"]


def test_kuberay_has_token_auth_and_no_public_service():
    job = yaml.safe_load(KUBERAY.read_text(encoding="utf-8"))
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "0.0.0.0" not in head["rayStartParams"].get("dashboard-host", "")
    for group in [head, *cluster["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", "token") == "token"
            assert "RAY_AUTH_TOKEN" not in env or env["RAY_AUTH_TOKEN"] is None  # from a Secret, never inline


# ---- 4: secrets -----------------------------------------------------------------------------

SENTINELS = {
    "WANDB_API_KEY": "wandb-sentinel-0123456789abcdef",
    "MLFLOW_TRACKING_TOKEN": "mlflow-sentinel-0123456789",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-sentinel-0123456789",
    "AWS_SESSION_TOKEN": "aws-session-sentinel-0123456789",
    "GOOGLE_APPLICATION_CREDENTIALS": "/secret/sentinel/gcp-creds.json",
    "HF_TOKEN": "hf_sentinelSENTINELsentinelSENTINEL0123",
    "RAY_AUTH_TOKEN": "ray-auth-sentinel-0123456789abcdef",
}
CONFIG_SECRETS = ["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01", "URLPASSWORDSENTINEL"]
PLAIN_SECRET = "plainSECRETsentinel"  # no token shape: only its key (`token`, `api_key`) marks it as a secret


def test_redact_masks_secret_keys_urls_and_env_values(monkeypatch):
    from rayjobs.redaction import MASK, redact

    monkeypatch.setenv("WANDB_API_KEY", SENTINELS["WANDB_API_KEY"])
    data = {
        "reward": {"kwargs": {"token": "abc", "hf_token": "x", "api_key": "y", "awsSecretAccessKey": "z", "head": "org/repo:f.pth"}},
        "ray": {"storage_path": "s3://AKIDEXAMPLE:URLPASSWORDSENTINEL@bucket/runs", "address": "http://127.0.0.1:8265"},
        "tracking": {"note": f"key {SENTINELS['WANDB_API_KEY']} here", "empty_token": None},
        "model": {"tokens": [{"token": "<cat-toy>", "init_token": "toy", "num_vectors": 2}], "token_norm_target": 0.4},
        "train": {"token_lr": 5e-4, "schedule": [{"steps": 1, "lr": {"tokens": 1e-3}}]},
    }
    out = redact(data)
    assert out["reward"]["kwargs"] == {"token": MASK, "hf_token": MASK, "api_key": MASK, "awsSecretAccessKey": MASK, "head": "org/repo:f.pth"}
    assert out["ray"] == {"storage_path": f"s3://AKIDEXAMPLE:{MASK}@bucket/runs", "address": "http://127.0.0.1:8265"}
    assert out["tracking"] == {"note": f"key {MASK} here", "empty_token": None}
    assert out["model"] == data["model"] and out["train"] == data["train"]  # textual inversion is not a secret
    assert data["reward"]["kwargs"]["token"] == "abc"  # the input is not changed


def _secret_config(*more: str):
    from rayjobs.config import load_config

    # Each secret is caught by one rule only (key name, token shape, URL password), so each rule is tested.
    return load_config(ROOT / "configs" / "tiny.yaml", [f"reward.kwargs.api_key={PLAIN_SECRET}", f"reward.kwargs.comment={CONFIG_SECRETS[0]}",
                       f"ray.storage_path=s3://AKIDEXAMPLE:{CONFIG_SECRETS[1]}@bucket/runs", *more])  # fmt: skip


def test_run_directory_holds_no_secrets(tmp_path, monkeypatch):
    """What prepare_run_dir writes (config.yaml, via rayjobs.config.to_yaml) carries no secret."""
    from rayjobs.cluster.driver import prepare_run_dir

    for k, v in SENTINELS.items():
        monkeypatch.setenv(k, v)
    cfg = _secret_config(f"reward.kwargs.note=pasted-{SENTINELS['WANDB_API_KEY']}")  # an env secret in a plain value
    run_dir = tmp_path / "run"
    prepare_run_dir(cfg, run_dir)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_bytes().decode("utf-8", "replace")
        for secret in [*SENTINELS.values(), *CONFIG_SECRETS, PLAIN_SECRET]:
            assert secret not in text, f"{path.relative_to(run_dir)} holds a secret"
    assert "***" in (run_dir / "config.yaml").read_text(encoding="utf-8")


def test_submit_keeps_env_secrets_out_of_the_job(monkeypatch):
    from rayjobs.cluster import submit

    for k, v in SENTINELS.items():
        monkeypatch.setenv(k, v)
    args = SimpleNamespace(config=str(ROOT / "configs" / "tiny.yaml"), overrides=["train.steps=2"], sweep=False, working_dir=str(ROOT))
    name, entrypoint, env = submit.plan(args)
    sent = repr((name, entrypoint, env))
    assert not [k for k, v in SENTINELS.items() if v in sent]
    assert "env_vars" not in env["runtime_env"]
    assert {".env", "*.pem", ".aws"} <= set(env["runtime_env"]["excludes"])


# One detector per case: a plain value under a key that names a secret, a hub-token-shaped value under a
# key that does not, a URL password. (A token-shaped value under `token` would pass if either alone worked.)
CREDENTIAL_OVERRIDES = {
    "secret-key": f"reward.kwargs.token={PLAIN_SECRET}",
    "token-shape": f"reward.kwargs.note={CONFIG_SECRETS[0]}",
    "url-password": f"ray.storage_path=s3://AKIDEXAMPLE:{CONFIG_SECRETS[1]}@bucket/runs",
}


@pytest.mark.parametrize("override", list(CREDENTIAL_OVERRIDES.values()), ids=list(CREDENTIAL_OVERRIDES))
def test_submit_refuses_a_credential_in_an_override(override):
    from rayjobs.cluster import submit
    from rayjobs.errors import UserError

    args = SimpleNamespace(config=str(ROOT / "configs" / "tiny.yaml"), overrides=[override], sweep=False, working_dir=str(ROOT))
    with pytest.raises(UserError, match="credential") as err:
        submit.plan(args)
    assert not any(s in str(err.value) for s in [*CONFIG_SECRETS, PLAIN_SECRET])


@pytest.mark.parametrize("override", [f"reward.kwargs.note={PLAIN_SECRET}", "reward.kwargs.note=plain-words",
                                      "ray.storage_path=s3://bucket/runs"], ids=["neutral-key", "plain-value", "no-password"])  # fmt: skip
def test_submit_passes_the_controls_of_the_credential_cases(override):
    """Each refused override above differs from one of these in one thing: the key, the value, the password."""
    from rayjobs.cluster import submit

    submit.refuse_secret_overrides([override])
