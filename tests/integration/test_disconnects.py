"""Clients that vanish at any moment are an outcome, never a crash or a traceback."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from tests.conftest import SidecarProcess
from tests.integration.httpclient import request


def vanish(port: int, target: bytes, read_bytes: int) -> None:
    """Send a request, read a little (or nothing), then reset the connection (RST)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        got = 0
        while got < read_bytes:
            chunk = s.recv(min(65536, read_bytes - got))
            if not chunk:
                break
            got += len(chunk)


@pytest.mark.parametrize(
    "target", [b"/media/big.bin", b"/s3/big.bin", b"/media/hello.txt", b"/s3/hello.txt"]
)
def test_vanishing_clients_are_not_errors(sidecar: SidecarProcess, target: bytes) -> None:
    for read_bytes in (0, 0, 0, 1, 100, 5000, 70_000, 1_000_000):
        vanish(sidecar.port, target, read_bytes)
    time.sleep(0.5)
    # The server is unharmed and logged no crash for any of them.
    reply = request(sidecar.port, "GET", target.decode(), {"Range": "bytes=0-9"})
    assert reply.status == 206
    log = sidecar.log.read_text(errors="replace")
    for marker in ("request.crashed", "Traceback", "Error handling request", "Unhandled"):
        assert marker not in log, f"{marker!r} in the sidecar log:\n{log[-3000:]}"
