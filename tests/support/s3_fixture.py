"""A local S3 for tests: a moto server on 127.0.0.1, reached through the usual AWS environment.

Import the fixtures into a test module or conftest.py (``from s3_fixture import s3_server, s3_bucket``).

``s3_server`` (session) starts the server on a free port and points every boto-based client of
this process and of its children (s3fs, Ray workers started afterwards) at it through
``AWS_ENDPOINT_URL``, with dummy credentials; the real AWS configuration files are hidden.
``FSSPEC_S3_ENDPOINT_URL`` would work too, but fsspec reads it only when it is imported.
``s3_bucket`` creates a fresh bucket per test and yields its URL, ``s3://<name>``.

Clients do not talk to moto directly but through ``FaultProxy``, a small HTTP proxy on 127.0.0.1
that forwards every request unchanged until a test arms it (``s3_faults``): then it answers the
next requests with S3's transient errors (503 SlowDown, 500 InternalError, a dropped connection)
or denies access under a prefix (403 AccessDenied), as a real object store does on a bad night.
moto itself has no fault injection.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import s3fs
from moto.server import ThreadedMotoServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ERRORS = {  # fault kind: HTTP status, S3 error code
    "slowdown": (503, "SlowDown"),
    "internal": (500, "InternalError"),
    "denied": (403, "AccessDenied"),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    """Forwards HTTP requests to ``upstream`` (host, port), failing some on demand.

    ``fail_next(kinds)`` makes the next ``len(kinds)`` requests fail, one kind each (``slowdown``,
    ``internal``, ``reset``: the connection is closed without an answer; ``lost_reply``: the request
    reaches moto, and then the connection is closed, so that the client never learns that its write
    happened). ``outage(seconds)`` closes every connection without an answer for that long: the
    store is unreachable. ``deny(prefix)`` answers 403 AccessDenied to every request whose path starts with
    ``/prefix``. ``failed`` counts the requests failed so far; ``requests`` lists (method, path) of
    every request forwarded to moto.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.pending: deque[str] = deque()
        self.denied: set[str] = set()
        self.down_until = 0.0  # time.monotonic() until which every request is dropped
        self.failed = 0
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail_next(self, kinds: list[str]) -> None:
        with self.lock:
            self.pending.extend(kinds)

    def outage(self, seconds: float) -> None:
        with self.lock:
            self.down_until = time.monotonic() + seconds

    def deny(self, prefix: str) -> None:
        self.denied.add("/" + prefix.strip("/"))

    def reset(self) -> None:
        with self.lock:
            self.pending.clear()
            self.denied.clear()
            self.down_until = 0.0

    def stop(self) -> None:
        self.server.shutdown()

    def _fault(self, path: str) -> str | None:
        with self.lock:
            if any(path.startswith(prefix) for prefix in self.denied):
                return "denied"
            if time.monotonic() < self.down_until:
                self.failed += 1
                return "reset"
            if self.pending:
                self.failed += 1
                return self.pending.popleft()
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                fault = proxy._fault(self.path)
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None and fault != "lost_reply":
                    status, code = ERRORS[fault]
                    payload = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                               f"<Message>injected {code}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                proxy.requests.append((self.command, self.path))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    if fault == "lost_reply":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.send_response(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler


@pytest.fixture(scope="session")
def s3_proxy() -> Iterator[FaultProxy]:
    """A moto S3 server behind a ``FaultProxy``, and this process's S3 clients pointed at the proxy."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = FaultProxy(("127.0.0.1", port))
    endpoint = proxy.endpoint
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        # botocore retries a failed request itself (legacy mode: 5 attempts, up to ~15 s of backoff);
        # two attempts keep fault-injection tests fast and leave the rest to msif_ray.store.storage's retries.
        env.setenv("AWS_MAX_ATTEMPTS", "2")
        s3fs.S3FileSystem.clear_instance_cache()  # no client made before the environment was set
        try:
            yield proxy
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            proxy.stop()
            server.stop()


@pytest.fixture(scope="session")
def s3_server(s3_proxy: FaultProxy) -> str:
    """The endpoint URL (the fault proxy's, passing everything through) that this process's S3 clients use."""
    return s3_proxy.endpoint


@pytest.fixture
def s3_faults(s3_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The fault proxy, disarmed again after the test."""
    s3_proxy.reset()
    yield s3_proxy
    s3_proxy.reset()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new empty bucket on the moto server, as ``s3://<name>``."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"
