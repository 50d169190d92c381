"""cluster.loopback: the one free-port function and the one moto S3 server of tests, benchmarks and the cluster."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from cluster.loopback import DUMMY_AWS_ENV, create_bucket, free_port, moto_s3_server


def test_free_port_is_bindable_and_distinct_from_taken():
    taken: set[int] = set()
    ports = [free_port(taken) for _ in range(5)]
    assert len(set(ports)) == 5 and taken == set(ports)
    for host in ("127.0.0.1", ""):
        with socket.socket() as s:
            s.bind((host, free_port(host=host)))  # nothing listens on it: binding succeeds


def test_moto_server_serves_s3_on_loopback_with_dummy_credentials(monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a-real-looking-key")
    monkeypatch.setenv("AWS_PROFILE", "someone")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    with moto_s3_server() as endpoint:
        assert endpoint.startswith("http://127.0.0.1:")
        assert {k: os.environ.get(k) for k in DUMMY_AWS_ENV} == DUMMY_AWS_ENV
        assert "AWS_PROFILE" not in os.environ  # a profile's real keys never reach the test server
        create_bucket(endpoint, "bucket-a")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.put_object(Bucket="bucket-a", Key="k", Body=b"v")
        assert s3.get_object(Bucket="bucket-a", Key="k")["Body"].read() == b"v"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "a-real-looking-key" and os.environ["AWS_PROFILE"] == "someone"
    assert "AWS_SESSION_TOKEN" not in os.environ
    with pytest.raises(ConnectionRefusedError):  # the server is gone
        socket.create_connection(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])), timeout=5).close()


def test_moto_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "moto.server", None)  # import moto.server -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[dev\]'"), moto_s3_server():
        pass
