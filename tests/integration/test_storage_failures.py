"""A failing storage gets a fast 502/504 with a small JSON body, never a hang (SPEC §3)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import (
    ACCESS_KEY,
    S3Server,
    free_port,
    port_accepts,
    start_sidecar,
    stop_process,
    wait_until,
)
from tests.integration.httpclient import request


@pytest.fixture(scope="module")
def stalling_endpoint() -> Iterator[int]:
    """A TCP server that accepts and never answers: a storage stalled before its first byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture(scope="module")
def broken(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server, stalling_endpoint: int
) -> Iterator[int]:
    workdir = tmp_path_factory.mktemp("broken")
    port, admin = free_port(), free_port()
    # Bound but never listening: connections are refused, and no other process can take
    # the port while the test runs (a merely "free" port could be reused by anyone).
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = closed.getsockname()[1]
    s3 = "type: s3, bucket: media, addressing_style: path, max_attempts: 1, connect_timeout: 1s"
    config = f"""
server: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
timeouts: {{upstream_first_byte: 1s}}
storages:
  badcreds: {{{s3}, endpoint_url: "{s3_server.endpoint}",
             access_key_id_env: GOOD_KEY, secret_access_key_env: WRONG_SECRET}}
  refused: {{{s3}, endpoint_url: "http://127.0.0.1:{refused}",
            access_key_id_env: GOOD_KEY, secret_access_key_env: WRONG_SECRET}}
  stalled: {{{s3}, endpoint_url: "http://127.0.0.1:{stalling_endpoint}",
            access_key_id_env: GOOD_KEY, secret_access_key_env: WRONG_SECRET}}
routes:
  - {{prefix: /badcreds/, storage: badcreds}}
  - {{prefix: /refused/, storage: refused}}
  - {{prefix: /stalled/, storage: stalled}}
"""
    env = {"GOOD_KEY": ACCESS_KEY, "WRONG_SECRET": "not-the-secret"}
    proc, log = start_sidecar(config, workdir, env)
    try:
        wait_until(lambda: proc.poll() is not None or port_accepts(admin), 30, "sidecar", log)
        assert proc.poll() is None, log.read_text()
        yield port
    finally:
        stop_process(proc)
        closed.close()


@pytest.mark.parametrize(
    ("prefix", "status", "code", "max_s"),
    [
        ("/badcreds/", 502, "storage_error", 3.0),  # the storage refused us (403)
        ("/refused/", 502, "storage_error", 0.9),  # refused at once: no retry, no backoff
        ("/stalled/", 504, "storage_timeout", 3.0),  # upstream_first_byte is 1 s
    ],
)
def test_storage_failure_is_fast_and_small(
    broken: int, prefix: str, status: int, code: str, max_s: float
) -> None:
    for method in ("GET", "HEAD"):
        started = time.monotonic()
        reply = request(broken, method, prefix + "hello.txt", {"Range": "bytes=0-9"})
        elapsed = time.monotonic() - started
        assert reply.status == status, reply
        assert elapsed < max_s, f"{prefix} took {elapsed:.2f} s"
        if method == "GET":
            assert json.loads(reply.body) == {"error": code}
            assert len(reply.body) < 100 and b"Traceback" not in reply.body
        assert reply.header("X-Request-ID")


def test_the_server_keeps_serving_after_failures(broken: int) -> None:
    # Failures are per request: the listener still answers (here: another 404 path).
    assert request(broken, "GET", "/nowhere/x").status == 404
