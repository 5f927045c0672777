"""The copy loop of stream.pump: backpressure, exact lengths, idle timeout (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.errors import StorageError
from proxy.stream import pump


class ListBody:
    """A storage body that hands out prepared chunks and counts its reads."""

    def __init__(self, chunks: list[bytes], stall_s: float = 0.0) -> None:
        self.chunks = list(chunks)
        self.reads = 0
        self.stall_s = stall_s
        self.closed = False

    async def read(self, n: int) -> bytes:
        self.reads += 1
        if self.stall_s:
            await asyncio.sleep(self.stall_s)
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > n:
            chunk, rest = chunk[:n], chunk[n:]
            self.chunks.insert(0, rest)
        return chunk

    def close(self) -> None:
        self.closed = True


class GateSink:
    """A response whose writes wait until the test opens the gate (a client not reading)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.written: list[bytes] = []

    async def write(self, data: bytes) -> None:
        await self.gate.wait()
        self.written.append(data)


async def run_pump(body: Any, sink: Any, length: int, idle_s: float = 5.0) -> None:
    await pump(None, sink, body, length, chunk_size=4, idle_timeout_s=idle_s)  # type: ignore[arg-type]


async def test_next_read_waits_for_the_client() -> None:
    body, sink = ListBody([b"abcdefghijklmnop"]), GateSink()
    task = asyncio.create_task(run_pump(body, sink, 16))
    await asyncio.sleep(0.05)
    assert body.reads == 1  # one chunk in flight while the client does not read
    sink.gate.set()
    await task
    assert b"".join(sink.written) == b"abcdefghijklmnop"
    assert [len(c) for c in sink.written] == [4, 4, 4, 4]  # never more than chunk_size


async def test_sends_exactly_length_even_if_body_has_more() -> None:
    sink = GateSink()
    sink.gate.set()
    await run_pump(ListBody([b"0123456789"]), sink, 6)
    assert b"".join(sink.written) == b"012345"


async def test_short_body_is_an_error_not_a_short_response() -> None:
    sink = GateSink()
    sink.gate.set()
    with pytest.raises(StorageError):
        await run_pump(ListBody([b"0123"]), sink, 10)
    assert b"".join(sink.written) == b"0123"


async def test_client_that_never_reads_times_out() -> None:
    body, sink = ListBody([b"abcdefgh"]), GateSink()
    with pytest.raises(TimeoutError):
        await run_pump(body, sink, 8, idle_s=0.1)


async def test_stalled_storage_times_out() -> None:
    sink = GateSink()
    sink.gate.set()
    with pytest.raises(TimeoutError):
        await run_pump(ListBody([b"abcd"], stall_s=1.0), sink, 4, idle_s=0.1)


async def test_idle_timer_restarts_on_progress() -> None:
    # 5 chunks of 60 ms each take 300 ms in all: longer than idle, yet never idle.
    sink = GateSink()
    sink.gate.set()
    await run_pump(ListBody([b"abcd"] * 5, stall_s=0.06), sink, 20, idle_s=0.15)
    assert len(b"".join(sink.written)) == 20
