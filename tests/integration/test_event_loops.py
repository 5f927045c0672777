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
from tests.integration.sidecars import quiet, stats

BIG = FILES["big.bin"]


@pytest.mark.parametrize("prefix", ["/media/", "/s3/"])
def test_large_bodies_are_exact(sidecar: SidecarProcess, prefix: str) -> None:
    before = stats(sidecar)["storages"]["uploads"]
    full = request(sidecar.port, "GET", prefix + "big.bin")
    assert (full.status, full.body) == (200, BIG)
    part = request(sidecar.port, "GET", prefix + "big.bin", {"Range": "bytes=100000-4000000"})
    assert (part.status, part.body) == (206, BIG[100_000:4_000_001])
    multi = request(
        sidecar.port, "GET", prefix + "big.bin", {"Range": "bytes=0-99999,2000000-3999999"}
    )
    parts = parse_byteranges(multi.header("Content-Type") or "", multi.body)
    assert [p.body for p in parts] == [BIG[:100_000], BIG[2_000_000:4_000_000]]
    s3 = quiet(sidecar)["storages"]["uploads"]
    if prefix == "/s3/":  # bodies over SPLICE_MIN went socket to socket, on either loop
        assert s3["handovers_total"] - before["handovers_total"] == 3
        assert s3["spliced_bytes_total"] - before["spliced_bytes_total"] > 3 * 1024 * 1024
    assert (s3["upstream_in_use"], s3["detached_active"]) == (0, 0)


@pytest.mark.parametrize("prefix", ["/media/", "/s3/"])
def test_a_slow_reader_gets_exact_bytes_across_the_seam(
    sidecar: SidecarProcess, prefix: str
) -> None:
    """The socket fills at once, the rest waits for a client reading in small sips.

    On S3 the spliced body lets go of its connection while the client stalls, and
    resumes with a ranged GET: the seam between the pipe's bytes and the new GET's.
    """
    before = stats(sidecar)["storages"]["uploads"]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    client.settimeout(10)
    with client:
        client.connect(("127.0.0.1", sidecar.port))
        client.sendall(
            f"GET {prefix}big.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
        )
        time.sleep(0.3)  # let the first send fill every buffer on the way
        wire = bytearray()
        while chunk := client.recv(16384 if len(wire) < 1024 * 1024 else 256 * 1024):
            wire += chunk
            if len(wire) < 1024 * 1024:
                time.sleep(0.002)  # slow for the first MiB, then drain
    head, _, body = bytes(wire).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == BIG
    s3 = quiet(sidecar)["storages"]["uploads"]
    if prefix == "/s3/":
        assert s3["detached_total"] > before["detached_total"]  # let go during the stall
        assert s3["resumed_total"] > before["resumed_total"]
    assert (s3["upstream_in_use"], s3["detached_active"]) == (0, 0)


def _read_response(client: socket.socket) -> tuple[bytes, bytes]:
    """One response off a keep-alive connection: (head, body of Content-Length bytes)."""
    wire = b""
    while b"\r\n\r\n" not in wire:
        chunk = client.recv(65536)
        assert chunk, "closed before the headers"
        wire += chunk
    head, _, body = wire.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = client.recv(1 << 20)
        assert chunk, "closed before the end of the body"
        body += chunk
    assert len(body) == length, "bytes past Content-Length: the next response would be spliced"
    return head, body


def test_a_spliced_response_leaves_the_connection_ready_for_the_next(
    sidecar: SidecarProcess,
) -> None:
    """Keep-alive after a spliced body: the next response starts exactly where it ended."""
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as client:
        client.sendall(b"GET /s3/big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        head, body = _read_response(client)
        assert head.startswith(b"HTTP/1.1 200") and body == BIG
        client.sendall(b"GET /s3/big.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=7-1500006\r\n\r\n")
        head, body = _read_response(client)
        assert head.startswith(b"HTTP/1.1 206") and body == BIG[7:1_500_007]
        client.sendall(b"GET /media/big.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=-1000\r\n\r\n")
        head, body = _read_response(client)
        assert head.startswith(b"HTTP/1.1 206") and body == BIG[-1000:]
    s3 = quiet(sidecar)["storages"]["uploads"]
    assert (s3["upstream_in_use"], s3["detached_active"]) == (0, 0)
