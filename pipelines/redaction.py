"""Keeping secrets out of log lines, exception messages and MLflow params/tags/artifacts: one set of patterns.

- `is_secret_key(name)`: a config key, storage option, param/tag name or environment variable that names a
  secret (`data.s3.key`, `aws_secret_access_key`, `MLFLOW_TRACKING_PASSWORD`; not `model.tokens_mlp_dim`).
- `redact(value)`: strings have secrets masked (URL passwords, AWS keys, `password=...`, the value of any secret
  environment variable); dicts lose their secret-named keys; lists and tuples are mapped.
- `redact_url(url)`: credentials embedded in a URL masked.
- `redacted_options(options)`: storage options safe to print (secret values masked, keys kept).
- `scrub(text, options)`: `redact(text)`, plus the secret values given in the storage options.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "****"

_SECRET_SUBSTRINGS = ("secret", "password", "passwd", "credential", "apikey", "privatekey", "accesskey")
# Whole words of a key (split on anything not a letter/digit): "aws_access_key_id" has "key", "tokens_mlp_dim"
# has "tokens" (not a secret).
_SECRET_WORDS = {"key", "keys", "token", "pwd", "pass", "sas", "auth", "bearer", "cookie"}
# Names that contain a secret word but hold none: the shell's working directories (PWD=/home/me/project
# would otherwise mask every path under it).
_NOT_SECRETS = {"pwd", "oldpwd"}
_AWS_ACCESS_KEY_RE = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b")
_AWS_SECRET_RE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_URL_CREDENTIALS_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_KEY_VALUE_RE = re.compile(
    r"(?i)\b(?P<k>[\w.-]*(?:secret|password|passwd|token|api[_-]?key|access[_-]?key|credential)[\w.-]*)"
    r"(?P<sep>\s*[=:]\s*)(?P<q>['\"]?)(?P<v>[^\s'\",;&]+)"
)
# A secret named in the storage options is masked from 4 characters; one found in the environment by its
# variable's name from 8 (shorter values there are settings, e.g. RAY_AUTH_MODE=token).
_MIN_OPTION_SECRET, _MIN_ENV_SECRET = 4, 8


def is_secret_key(name: str) -> bool:
    """True when a key names a secret. `model.tokens_mlp_dim` is not one; `data.s3.key` is."""
    low = str(name).lower()
    if low in _NOT_SECRETS:
        return False
    if any(s in low.replace("_", "").replace("-", "") for s in _SECRET_SUBSTRINGS):
        return True
    return any(w in _SECRET_WORDS for w in re.split(r"[^a-z0-9]+", low))


def _environ_items() -> list[tuple[str, str]]:
    """A snapshot of os.environ. Another thread may set or delete a variable while it is read (MLflow's telemetry
    does), which raises KeyError/RuntimeError mid-iteration: read again."""
    for _ in range(20):
        try:
            return list(os.environ.items())
        except (KeyError, RuntimeError):
            continue
    return list(os.environ.items())


def _secret_values(options: Mapping[str, Any] | None = None) -> list[str]:
    """Values to mask wherever they appear: secret-named storage options and environment variables."""
    vals = [v for k, v in _environ_items() if len(v) >= _MIN_ENV_SECRET and is_secret_key(k)]

    def walk(m: Mapping[str, Any]) -> None:
        for k, v in m.items():
            if isinstance(v, Mapping):
                walk(v)
            elif isinstance(v, str) and len(v) >= _MIN_OPTION_SECRET and is_secret_key(k):
                vals.append(v)

    walk(options or {})
    return sorted(set(vals), key=len, reverse=True)


def _looks_like_aws_secret(s: str) -> bool:
    # 40 chars of base64 alphabet with mixed case and a digit; excludes git SHAs (lowercase hex).
    return any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s)


def redact_url(url: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:****@host`; `scheme://token@host` -> `scheme://****@host`."""

    def mask(m: re.Match) -> str:
        user, sep, _ = m["userinfo"].partition(":")
        return f"{m['scheme']}{user}:{MASK}@" if sep else f"{m['scheme']}{MASK}@"

    return _URL_CREDENTIALS_RE.sub(mask, str(url))


def _redact_text(s: str, options: Mapping[str, Any] | None = None) -> str:
    for secret in _secret_values(options):
        s = s.replace(secret, MASK)
    s = redact_url(s)
    s = _AWS_ACCESS_KEY_RE.sub(MASK, s)
    s = _AWS_SECRET_RE.sub(lambda m: MASK if _looks_like_aws_secret(m.group(0)) else m.group(0), s)
    return _KEY_VALUE_RE.sub(lambda m: f"{m['k']}{m['sep']}{m['q']}{MASK}", s)


def redact(value: Any) -> Any:
    """Mask secrets inside a value: strings are scrubbed; dicts lose secret-named keys; lists are mapped."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items() if not is_secret_key(str(k))}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return _redact_text(value) if isinstance(value, str) else value


def scrub(text: Any, storage_options: Mapping[str, Any] | None = None) -> str:
    """`text` with secrets masked, including the secret values given in `storage_options`."""
    return _redact_text(str(text), storage_options)


def redacted_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy safe to log: secret-named values replaced by MASK, the rest scrubbed."""
    out: dict[str, Any] = {}
    for k, v in (storage_options or {}).items():
        if is_secret_key(k):
            out[k] = MASK
        elif isinstance(v, Mapping):
            out[k] = redacted_options(v)
        else:
            out[k] = redact(v)
    return out


def filter_secrets(items: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """(items without secret-named keys and with masked string values, names of the dropped keys)."""
    kept, dropped = {}, []
    for k, v in items.items():
        if is_secret_key(str(k)):
            dropped.append(str(k))
        else:
            kept[k] = redact(v) if isinstance(v, str) else v
    return kept, dropped
