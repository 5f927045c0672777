"""Byte-exact bodies through the real process on each event loop.

The semantics suite runs the app in-process on pytest's asyncio loop (sendfile path);
this runs the `python -m proxy` process once per loop, so uvloop's read/write copy path
is checked byte for byte too.
"""

from __future__ import annotations

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
