"""Shared fixtures: an S3-compatible server on 127.0.0.1 (moto), as s3fs's own tests use."""

from __future__ import annotations

import uuid

import pytest

from cluster.loopback import create_bucket, moto_s3_server


@pytest.fixture(scope="session")
def s3_server():
    """moto's ThreadedMotoServer on 127.0.0.1 with dummy credentials (cluster.loopback); yields the endpoint URL.

    Only credentials/region are set here; tests point clients at the endpoint themselves (e.g. with
    FSSPEC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL, the way a user would).
    """
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the test S3 server; yields its name."""
    yield create_bucket(s3_server, f"test-{uuid.uuid4().hex[:12]}")
