"""Byte-exact bodies through the real process on each event loop.

The semantics suite runs the app in-process on pytest's asyncio loop; this runs the
`python -m proxy` process once per loop. Disk bodies are sendfile'd on both loops: what
the socket takes at once, then more each time it has room; checked byte for byte.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import FILES, SidecarProcess
from tests.integration.httpclient import request
from tests.integration.rawhttp import parse_byteranges

BIG = FILES["big.bin"]


@pytest.mark.parametrize("prefix", ["/media/", "/s3/"])
def test_large_bodies_are_exact(sidecar: SidecarProcess, prefix: str) -> None:
    full = request(sidecar.port, "GET", prefix + "big.bin")
    assert (full.status, full.body) == (200, BIG)
    part = request(sidecar.port, "GET", prefix + "big.bin", {"Range": "bytes=100000-4000000"})
    assert (part.status, part.body) == (206, BIG[100_000:4_000_001])
    multi = request(
        sidecar.port, "GET", prefix + "big.bin", {"Range": "bytes=0-99999,2000000-3999999"}
    )
    parts = parse_byteranges(multi.header("Content-Type") or "", multi.body)
    assert [p.body for p in parts] == [BIG[:100_000], BIG[2_000_000:4_000_000]]


def test_a_slow_reader_gets_exact_bytes_across_the_seam(sidecar: SidecarProcess) -> None:
    """The socket fills at once, the rest waits for a client reading in small sips."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    client.settimeout(10)
    with client:
        client.connect(("127.0.0.1", sidecar.port))
        client.sendall(b"GET /media/big.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        time.sleep(0.3)  # let the first send fill every buffer on the way
        wire = bytearray()
        while chunk := client.recv(16384 if len(wire) < 1024 * 1024 else 256 * 1024):
            wire += chunk
            if len(wire) < 1024 * 1024:
                time.sleep(0.002)  # slow for the first MiB, then drain
    head, _, body = bytes(wire).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == BIG
