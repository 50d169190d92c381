"""Dataset URLs through fsspec: storage options, S3 retry policy, atomic writes, reachability checks.

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

import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, BinaryIO

import fsspec

from .cli import InputError
from .redaction import redact_url, scrub

_ENDPOINT_ENV = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(InputError, OSError):
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
    """(filesystem, path) for a URL; an S3 client gets READ_RETRIES unless the options or env set retries."""
    opts = dict(storage_options or {}) if resolved else resolve_storage_options(url, storage_options)
    if protocol_of(url) == "s3":
        opts["config_kwargs"] = _with_retries(opts.get("config_kwargs"), READ_RETRIES)
    fs, path = fsspec.core.url_to_fs(str(url), **opts)
    return fs, path


# --------------------------------------------------------------------------------------------- retries
# Retries are the S3 client's own, configured here once: botocore retries every request on connection
# errors, timeouts, throttling and 5xx (mode "standard": exponential backoff with jitter), and s3fs re-issues
# a ranged read whose body broke off mid-stream (its own S3FileSystem.retries, 5), so a shard being streamed
# survives a connection reset without a re-open of ours. Local files have no transient errors worth retrying.
READ_RETRIES = {"mode": "standard", "total_max_attempts": 5}  # the first try included
PROBE_RETRIES = {"mode": "standard", "total_max_attempts": 3}  # check_dataset_reachable: fail within seconds
_RETRY_ENV = ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")  # botocore's own settings win over our defaults


def _with_retries(config_kwargs: Mapping[str, Any] | None, retries: Mapping[str, Any]) -> dict[str, Any]:
    """botocore Config kwargs with ``retries`` added unless the options or the environment set them."""
    ck = dict(config_kwargs or {})
    if "retries" not in ck and not any(os.environ.get(n) for n in _RETRY_ENV):
        ck["retries"] = dict(retries)
    return ck


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


def is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts, throttling, 5xx (an unreachable store). Not: missing, denied."""
    if isinstance(exc, _PERMANENT):
        return False
    name = type(exc).__name__
    if any(s in name for s in ("Timeout", "Connection", "Throttl", "SlowDown", "ServiceUnavailable")):
        return True
    return isinstance(exc, OSError | TimeoutError | ConnectionError)


def open_url(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None, **kw):
    """Open a URL with fsspec. Returns an open file object."""
    fs, path = get_fs(url, storage_options)
    return fs.open(path, mode, **kw)


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    fs, path = get_fs(url, storage_options)
    return fs.cat_file(path)


def join_url(root: str, *parts: str) -> str:
    root = str(root).rstrip("/")
    return "/".join([root, *[p.strip("/") for p in parts]])


# --------------------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_write(
    url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *, mode: int | None = None
) -> Iterator[BinaryIO]:
    """A binary file to write ``url`` through; the file appears whole when the block ends, or not at all.

    Local paths (and file:// URLs): a temporary file next to the target, flushed to disk and renamed over
    it (a rename is atomic on POSIX). ``mode`` sets its permission bits (e.g. 0o600 for a token; the umask
    applies, as with os.open); without it, the default 0o666 & ~umask.
    Any other fsspec URL: spooled to a local temporary file and uploaded once with ``fs.put_file`` when the
    block ends. An object store publishes an object only when its upload completes (a single PUT; s3fs
    aborts a large file's multipart upload on failure). ``mode`` does not apply there.
    If the block raises, nothing is written and the temporary file is removed.
    The caller creates the target's directory when the filesystem has directories.
    """
    url = os.fspath(url)
    if protocol_of(url) in ("file", "local"):
        path = fsspec.core.url_to_fs(url)[1]
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    fs, path = get_fs(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="atomic-write-") as spool:
        local = os.path.join(spool, "upload")
        with open(local, "wb") as f:
            yield f
        fs.put_file(local, path)


# ---------------------------------------------------------------------------------------- reachability
def _quick_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = resolve_storage_options(url, storage_options)
    if protocol_of(url) == "s3":
        ck = dict(opts.get("config_kwargs") or {})
        ck.setdefault("connect_timeout", 2)
        ck.setdefault("read_timeout", 3)
        opts["config_kwargs"] = _with_retries(ck, PROBE_RETRIES)
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
        fs, path = get_fs(target, opts, resolved=True)
    except Exception as exc:  # bad URL, missing backend
        raise StorageError(
            f"cannot use dataset URL {redact_url(target)}: {type(exc).__name__}: {scrub(str(exc), opts)}"
        ) from None
    try:
        found = fs.exists(path)  # retried by the client (PROBE_RETRIES)
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


def check_writable_target(url: str, storage_options: Mapping[str, Any] | None = None, *, what: str = "target") -> None:
    """Fail fast (seconds) if ``url`` cannot be written, without writing or creating anything.

    A local path must be a directory or creatable as one (its nearest existing parent a writable directory);
    an s3:// URL must reach its endpoint and name an existing bucket; any other URL needs an installed fsspec
    backend. ``what`` names the setting in the message (e.g. ``run.storage_path``). Raises StorageError
    (DatasetNotFoundError for a missing bucket, StorageUnreachableError for an endpoint that does not answer).
    """
    url = os.fspath(url)
    protocol = protocol_of(url)
    if protocol in ("file", "local"):
        path = os.path.abspath(fsspec.core.url_to_fs(url)[1])
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            where = "is a regular file" if existing == path else f"is under the regular file {existing}"
            raise StorageError(f"{what} {url!r} cannot be used: {where}; expected a directory or a path to create one")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{what} {url!r} cannot be used: {existing} is not writable by this user")
        return
    opts = _quick_options(url, storage_options)
    endpoint = opts.get("endpoint_url")
    where = f" (endpoint {redact_url(endpoint)})" if endpoint else ""
    try:
        fs, path = get_fs(url, opts, resolved=True)
    except Exception as exc:  # unknown protocol, backend not installed, bad URL
        raise StorageError(
            f"{what} {redact_url(url)} cannot be used: {type(exc).__name__}: {scrub(str(exc), opts)}; "
            "expected a local path, s3://bucket/prefix or another installed fsspec URL"
        ) from None
    if protocol != "s3":
        return
    bucket, _, key = path.partition("/")
    try:
        # exists() on a bare bucket swallows connection errors (False); on a key they raise
        fs.exists(f"{bucket}/{key or '.reachability-probe'}")
        found = fs.exists(bucket)
    except Exception as exc:
        cls = StorageUnreachableError if is_transient(exc) else StorageError
        raise cls(
            f"{what} {redact_url(url)}: cannot reach storage{where}: {type(exc).__name__}: {scrub(str(exc), opts)}"
        ) from None
    if not found:
        raise DatasetNotFoundError(f"{what} {redact_url(url)}: bucket {bucket!r} does not exist or is not accessible{where}")
