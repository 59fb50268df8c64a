"""Redaction of secrets in what draftray writes to disk or shows (docs/security.md).

Credentials (W&B / MLflow keys, cloud credentials, hub tokens, the Ray auth token) belong in the
environment or in IAM roles, never in a config. When one lands in a config value anyway, the copies
draftray writes (the run directory's config.yaml, a sweep's sweep.yaml) carry "***" instead:

* a value under a key that names a secret (``token``, ``hf_token``, ``api_key``, ``secret``,
  ``password``, ``credentials``, ...); textual inversion's ``tokens`` / ``init_token`` /
  ``token_lr`` / ``token_norm_target`` are not secrets and are kept;
* the password of a URL (``s3://KEY:SECRET@bucket`` -> ``s3://KEY:***@bucket``);
* any text equal to or containing the value of a secret environment variable (``SECRET_ENV`` and
  every variable whose name names a secret), and values shaped like hub tokens / AWS key ids.

Nothing here imports torch or Ray: the module is safe to import anywhere.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"

# The environment variables that hold credentials draftray or its libraries read.
SECRET_ENV = (
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "RAY_AUTH_TOKEN",
)

# Key words that name a secret (matched on the parts of a key split at _ - . and camelCase).
_SECRET_WORDS = {"token", "secret", "password", "passwd", "passphrase", "credential", "credentials", "apikey"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("auth", "key")}
# Keys of the config schema that contain "token" and are not secrets (textual inversion).
_NOT_SECRET = {"tokens", "init_token", "token_lr", "token_norm_target", "num_vectors"}
_TI_SECTION = "tokens"  # model.tokens: [{token: <cat-toy>, ...}]: the placeholder string, not a secret

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")
_TOKEN_SHAPES = re.compile(r"\b(?:hf_[A-Za-z0-9]{30,}|(?:AKIA|ASIA)[0-9A-Z]{16})\b")
_MIN_ENV_SECRET = 8  # shorter environment values are not searched for (too many false matches)


def _parts(key: str) -> list[str]:
    key = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [p for p in re.split(r"[_\-.\s]+", key.lower()) if p]


def is_secret_key(key: Any) -> bool:
    """True for a mapping key that names a secret (token, hf_token, api_key, awsSecretAccessKey, ...)."""
    if not isinstance(key, str) or key.lower() in _NOT_SECRET:
        return False
    parts = _parts(key)
    return bool(_SECRET_WORDS & set(parts)) or any(pair in _SECRET_PAIRS for pair in zip(parts, parts[1:]))


def env_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """Values of the secret environment variables that are set (longest first)."""
    environ = os.environ if environ is None else environ
    names = set(SECRET_ENV) | {k for k in environ if is_secret_key(k)}
    values = {environ[k] for k in names if len(environ.get(k, "")) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """A string with URL passwords, token-shaped values and environment secret values masked."""
    for value in env_secrets() if secrets is None else secrets:
        text = text.replace(value, MASK)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _TOKEN_SHAPES.sub(MASK, text)


def redact(obj: Any, _secrets: list[str] | None = None, _section: str | None = None) -> Any:
    """A copy of obj (dicts, lists, strings, scalars) with secrets replaced by "***"; obj is not changed."""
    secrets = env_secrets() if _secrets is None else _secrets
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            keep = _section == _TI_SECTION and k == "token"
            out[k] = MASK if is_secret_key(k) and not keep and v not in (None, "") else redact(v, secrets, k if isinstance(k, str) else None)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets, _section) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj
