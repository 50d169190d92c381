"""Servers on 127.0.0.1 for a local cluster, tests and benchmarks: a free TCP port, an S3 server (moto).

free_port is also what orchestrator.train.launch picks a local Ray instance's dashboard port with.

    from cluster.loopback import free_port, moto_s3_server, create_bucket
    with moto_s3_server() as endpoint:            # "http://127.0.0.1:<port>", dummy AWS credentials set
        create_bucket(endpoint, "bench")
        s3fs.S3FileSystem(endpoint_url=endpoint).ls("bench")

moto is a dev dependency (pip install -e '.[dev]'): it is imported only when a server is started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

# What the S3 server's clients authenticate with: dummy values, so that real credentials from the
# environment or ~/.aws never reach the test server.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_SESSION_TOKEN": "testing-session-token",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MOTO_MISSING = "moto[server] is not installed; it is a dev dependency: pip install -e '.[dev]'"


def free_port(taken: set[int] | None = None, host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on ``host`` ("" = every interface) and not in ``taken`` (it is added
    there, so that several ports picked before any is bound differ). Nothing listens on it when returned."""
    taken = set() if taken is None else taken
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port
    raise OSError("could not find a free TCP port")


@contextlib.contextmanager
def _environ(values: dict[str, str | None]) -> Iterator[None]:
    """Set (None: unset) environment variables for the duration; restore the previous values after."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's ThreadedMotoServer on 127.0.0.1 (as s3fs's own tests run it); yields its endpoint URL.

    For the duration, the process environment carries dummy AWS credentials and region (AWS_PROFILE unset),
    which subprocesses inherit; clients still have to be pointed at the endpoint (endpoint_url,
    FSSPEC_S3_ENDPOINT_URL or AWS_ENDPOINT_URL), as a user points at their own store. The OS picks the port
    when the server binds (port 0), so two servers never race for one.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise ImportError(f"{MOTO_MISSING} ({e})") from e

    werkzeug_log = logging.getLogger("werkzeug")  # one INFO line per request otherwise
    saved_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)
    try:
        with _environ({**DUMMY_AWS_ENV, "AWS_PROFILE": None}):
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            try:
                host, port = server.get_host_and_port()
                yield f"http://{host}:{port}"
            finally:
                server.stop()
    finally:
        werkzeug_log.setLevel(saved_level)


def create_bucket(endpoint: str, name: str) -> str:
    """Create bucket ``name`` on the S3 server at ``endpoint``; returns the name."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
