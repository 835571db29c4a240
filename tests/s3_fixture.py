"""A local S3 for tests: a moto server on 127.0.0.1, reached through the usual AWS environment.

Import the fixtures into a test module or conftest.py (``from s3_fixture import s3_server, s3_bucket``).

``s3_server`` (session) starts the server on a free port and points every boto-based client of
this process and of its children (s3fs, Ray workers started afterwards) at it through
``AWS_ENDPOINT_URL``, with dummy credentials; the real AWS configuration files are hidden.
``FSSPEC_S3_ENDPOINT_URL`` would work too, but fsspec reads it only when it is imported.
``s3_bucket`` creates a fresh bucket per test and yields its URL, ``s3://<name>``.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
import s3fs
from moto.server import ThreadedMotoServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server that this process's S3 clients use."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        s3fs.S3FileSystem.clear_instance_cache()  # no client made before the environment was set
        try:
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new empty bucket on the moto server, as ``s3://<name>``."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"
