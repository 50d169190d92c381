"""Opening dataset URLs through fsspec: storage options, bounded retries, reachability checks.

Storage options come from (in order of precedence) the explicit ``storage_options`` mapping (the config)
and the standard environment:

- endpoint: ``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``
- profile: ``AWS_PROFILE``
- anonymous access: ``AWS_NO_SIGN_REQUEST=yes|true|1``

Keys and secrets are taken by s3fs/botocore from the usual credential chain; they may also be passed in
``storage_options`` (``key``/``secret``/``token``) but are never written into an exception, a repr or a
log line: every message built here is scrubbed of secret values and of credentials embedded in URLs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec

from .redaction import redact_url, scrub

log = logging.getLogger(__name__)

T = TypeVar("T")

_ENDPOINT_ENV = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(OSError):
    """A dataset location could not be used; the message says which URL and why (never secrets)."""


class DatasetNotFoundError(StorageError, FileNotFoundError):
    """The bucket, prefix, manifest or shard does not exist."""


class StorageUnreachableError(StorageError, ConnectionError):
    """The storage endpoint did not answer within the bounded retries."""


def protocol_of(url: str) -> str:
    p = fsspec.utils.get_protocol(str(url))
    return "s3" if p in ("s3", "s3a") else p


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def resolve_storage_options(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Storage options for ``url``: the config's mapping, completed from the standard environment.

    Config keys accepted for s3: ``endpoint_url``, ``anon``, ``profile``, plus anything s3fs takes.
    """
    opts = dict(storage_options or {})
    if protocol_of(url) != "s3":
        return opts
    endpoint = opts.pop("endpoint_url", None)
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    endpoint = endpoint or client_kwargs.get("endpoint_url")
    if not endpoint:
        for name in _ENDPOINT_ENV:
            if os.environ.get(name):
                endpoint = os.environ[name]
                break
    if endpoint:
        opts["endpoint_url"] = endpoint
        client_kwargs.pop("endpoint_url", None)
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if "profile" not in opts and os.environ.get("AWS_PROFILE") and not opts.get("key"):
        opts["profile"] = os.environ["AWS_PROFILE"]
    if "anon" not in opts and _truthy(os.environ.get("AWS_NO_SIGN_REQUEST")):
        opts["anon"] = True
    return opts


def get_fs(url: str, storage_options: Mapping[str, Any] | None = None, *, resolved: bool = False):
    """(filesystem, path) for a URL."""
    opts = dict(storage_options or {}) if resolved else resolve_storage_options(url, storage_options)
    fs, path = fsspec.core.url_to_fs(str(url), **opts)
    return fs, path


# --------------------------------------------------------------------------------------------- retries
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: connection problems, timeouts, throttling, 5xx. Not: missing, denied."""
    if isinstance(exc, _PERMANENT):
        return False
    name = type(exc).__name__
    if any(s in name for s in ("Timeout", "Connection", "Throttl", "SlowDown", "ServiceUnavailable")):
        return True
    return isinstance(exc, OSError | TimeoutError | ConnectionError)


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 4,
    base_delay: float = 0.2,
    max_delay: float = 2.0,
    storage_options: Mapping[str, Any] | None = None,
) -> T:
    """Call ``fn`` with bounded exponential backoff on transient errors (total sleep <= ~3.4 s by default)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or i == attempts - 1:
                raise
            delay = min(max_delay, base_delay * (2**i))
            log.warning(
                "transient storage error on %s (%s: %s); retry %d/%d in %.1fs",
                redact_url(what),
                type(exc).__name__,
                scrub(str(exc), storage_options),
                i + 1,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def open_url(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None, **kw):
    """Open a URL with fsspec (retrying transient errors on open). Returns an open file object."""
    opts = resolve_storage_options(url, storage_options)

    def _open():
        fs, path = fsspec.core.url_to_fs(str(url), **opts)
        return fs.open(path, mode, **kw)

    return with_retries(_open, what=url, storage_options=opts)


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    opts = resolve_storage_options(url, storage_options)

    def _read():
        fs, path = fsspec.core.url_to_fs(str(url), **opts)
        return fs.cat_file(path)

    return with_retries(_read, what=url, storage_options=opts)


def join_url(root: str, *parts: str) -> str:
    root = str(root).rstrip("/")
    return "/".join([root, *[p.strip("/") for p in parts]])


# ---------------------------------------------------------------------------------------- reachability
def _quick_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = resolve_storage_options(url, storage_options)
    if protocol_of(url) == "s3":
        ck = dict(opts.get("config_kwargs") or {})
        ck.setdefault("connect_timeout", 2)
        ck.setdefault("read_timeout", 3)
        ck.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
        opts["config_kwargs"] = ck
        # a fresh instance: don't inherit a cached client with long timeouts
        opts["skip_instance_cache"] = True
    return opts


def check_dataset_reachable(
    url: str, storage_options: Mapping[str, Any] | None = None, *, want_file: str | None = None
) -> None:
    """Fail fast (seconds) with a clear, secret-free message if ``url`` cannot be read.

    ``url`` is a dataset root, a manifest URL or a shard URL. With ``want_file`` (e.g. ``manifest.json``)
    that file under ``url`` must exist. Raises DatasetNotFoundError (missing bucket/prefix/file) or
    StorageUnreachableError (endpoint down, DNS, timeouts).
    """
    opts = _quick_options(url, storage_options)
    endpoint = opts.get("endpoint_url")
    where = f" (endpoint {redact_url(endpoint)})" if endpoint else ""
    target = join_url(url, want_file) if want_file else str(url)
    try:
        fs, path = fsspec.core.url_to_fs(str(target), **opts)
    except Exception as exc:  # bad URL, missing backend
        raise StorageError(
            f"cannot use dataset URL {redact_url(target)}: {type(exc).__name__}: {scrub(str(exc), opts)}"
        ) from None

    def probe() -> bool:
        return fs.exists(path)

    try:
        found = with_retries(probe, what=target, attempts=2, base_delay=0.2, storage_options=opts)
    except Exception as exc:
        cls = StorageUnreachableError if is_transient(exc) else StorageError
        raise cls(
            f"cannot reach storage for {redact_url(target)}{where}: {type(exc).__name__}: "
            f"{scrub(str(exc), opts)}. Check the endpoint URL (FSSPEC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL "
            "or storage_options.endpoint_url), network access and credentials."
        ) from None
    if found:
        return
    if protocol_of(target) == "s3":
        bucket = path.split("/", 1)[0]
        try:
            bucket_ok = fs.exists(bucket)
        except Exception:
            bucket_ok = True  # can't tell (e.g. no ListBucket permission); report the path
        if not bucket_ok:
            raise DatasetNotFoundError(
                f"bucket {bucket!r} does not exist or is not accessible{where}; "
                f"wanted {redact_url(target)}"
            )
    raise DatasetNotFoundError(f"not found: {redact_url(target)}{where}")
