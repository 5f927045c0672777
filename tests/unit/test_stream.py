"""stream.pump: backpressure, exact lengths, idle timeout; send_now over a real socket."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import threading
import time
from typing import Any

import pytest

from proxy import turns
from proxy.errors import StorageError
from proxy.model import FileBody
from proxy.registry import Tracked
from proxy.stream import GROW_AFTER, SENDFILE_SLICE, SPLICE_MIN, pump, send_now


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
    """A response writer whose writes wait until the test opens the gate (a client not reading).

    `queued` plays the transport's write buffer: bytes the kernel did not take yet.
    """

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.written: list[bytes] = []
        self.queued = 0
        self.high_water: int | None = None
        self.drains = 0

    async def write(self, data: bytes) -> None:
        await self.gate.wait()
        self.written.append(data)

    async def drain(self) -> None:
        self.drains += 1
        self.queued = 0

    # the transport side
    def set_write_buffer_limits(self, high: int | None = None) -> None:
        self.high_water = high

    def get_write_buffer_size(self) -> int:
        return self.queued


class FakeRequest:
    def __init__(self, sink: GateSink) -> None:
        self.transport = sink


def tracked() -> Tracked:
    return Tracked(1, "GET", "/media/x", "127.0.0.1", "rid")


async def run_pump(
    body: Any,
    sink: Any,
    length: int,
    idle_s: float = 5.0,
    *,
    progress: Tracked | None = None,
    chunk_size: int = 4,
    deadline: float | None = None,
) -> None:
    await pump(
        FakeRequest(sink),  # type: ignore[arg-type]
        sink,
        body,
        length,
        progress or tracked(),
        chunk_size=chunk_size,
        idle_timeout_s=idle_s,
        deadline=deadline,
    )


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


async def test_progress_is_counted_on_the_tracked_request() -> None:
    sink, progress = GateSink(), tracked()
    sink.gate.set()
    await run_pump(ListBody([b"abcdefghij"]), sink, 10, progress=progress)
    assert progress.bytes_sent == 10
    assert sink.high_water == 0  # at most one chunk queued in user space (pitfalls P12)


async def test_max_duration_deadline_ends_a_stream_that_keeps_progressing() -> None:
    # Never idle for 0.15 s, but the hard deadline at 0.2 s cuts it.
    sink = GateSink()
    sink.gate.set()
    deadline = asyncio.get_running_loop().time() + 0.2
    with pytest.raises(TimeoutError):
        await run_pump(
            ListBody([b"abcd"] * 50, stall_s=0.05), sink, 200, idle_s=0.15, deadline=deadline
        )
    assert 8 <= len(b"".join(sink.written)) < 200


class SlowClientSink(GateSink):
    """A client slower than the storage: every write leaves bytes queued."""

    async def write(self, data: bytes) -> None:
        await super().write(data)
        self.queued = len(data)


async def test_reads_stay_small_until_grow_after_then_grow_while_the_client_keeps_up() -> None:
    chunk = 64 * 1024
    data = bytes(range(256)) * (GROW_AFTER // 256 + 2048)  # GROW_AFTER + 512 KiB
    fast = GateSink()
    fast.gate.set()
    await run_pump(ListBody([data]), fast, len(data), chunk_size=chunk)
    sizes = [len(c) for c in fast.written]
    small = GROW_AFTER // (16 * 1024)
    # Every client looks fast while kernel buffers fill: 16 KiB until GROW_AFTER was sent.
    assert set(sizes[:small]) == {16 * 1024}
    assert sizes[small : small + 3] == [16 * 1024, 32 * 1024, chunk]
    assert set(sizes[small + 2 : -1]) == {chunk} and fast.drains == 0  # the last is the rest
    assert b"".join(fast.written) == data

    slow = SlowClientSink()
    slow.gate.set()
    await run_pump(ListBody([data]), slow, len(data), chunk_size=chunk)
    assert {len(c) for c in slow.written} == {16 * 1024}  # never more than the floor
    assert slow.drains == len(slow.written)  # and every write waits for the kernel
    assert b"".join(slow.written) == data


class SocketTransport:
    """The parts of a transport send_now looks at."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def is_closing(self) -> bool:
        return self.sock.fileno() < 0


def test_send_now_sends_what_the_kernel_takes_and_nothing_more(tmp_path: Any) -> None:
    """One syscall for what fits; 0 once full; offsets advance; bytes arrive in order."""
    data = os.urandom(8 * 1024 * 1024)
    path = tmp_path / "big"
    path.write_bytes(data)
    body = FileBody(os.open(path, os.O_RDONLY), 1000, len(data) - 1000)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client not reading yet
        client.connect(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            conn.setblocking(False)
            transport = SocketTransport(conn)
            first = send_now(transport, conn.fileno(), body)
            assert 0 < first < len(data) - 1000  # the socket took some, not 8 MiB
            assert (body.offset, body.remaining) == (1000 + first, len(data) - 1000 - first)
            assert send_now(transport, conn.fileno(), body) == 0  # full: nothing waits here
            client.settimeout(5)
            got = b""
            while len(got) < first:
                got += client.recv(1 << 20)
            assert got == data[1000 : 1000 + first]
        with pytest.raises(ConnectionResetError):  # the transport is closed
            send_now(transport, -1, body)
    body.close()


def test_send_now_reports_a_reset_peer_as_a_disconnect(tmp_path: Any) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(1 << 20))
    body = FileBody(os.open(path, os.O_RDONLY), 0, 1 << 20)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with conn:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # RST
            time.sleep(0.05)
            conn.setblocking(False)
            with pytest.raises(ConnectionResetError):
                for _ in range(3):  # the first send may still be accepted before the RST lands
                    send_now(SocketTransport(conn), conn.fileno(), body)
    body.close()


class SocketSink(GateSink):
    """A writer whose transport has a real socket, so pump would sendfile or splice."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.gate.set()
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def is_closing(self) -> bool:
        return False


class HandoverBody(ListBody):
    """A body that could hand its socket over; counts how often it was asked."""

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__(chunks)
        self.handovers = 0

    def handover(self) -> None:
        self.handovers += 1
        raise AssertionError("handover before the descriptors were secured")


def _emfile(*_: Any) -> Any:
    raise OSError(errno.EMFILE, "Too many open files")


async def test_out_of_descriptors_falls_back_to_copying_a_socket_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(SPLICE_MIN + 12345)
    monkeypatch.setattr(os, "pipe2", _emfile)
    with socket.socket() as sock:
        sink = SocketSink(sock)
        body = HandoverBody([data])
        await run_pump(body, sink, len(data), chunk_size=64 * 1024)
    assert body.handovers == 0  # never handed over: its bytes stay where they are
    assert b"".join(sink.written) == data


async def test_out_of_descriptors_falls_back_to_copying_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    body = FileBody(os.open(path, os.O_RDONLY), 0, len(data))
    monkeypatch.setattr(os, "dup", _emfile)
    with socket.socket() as sock:
        sink = SocketSink(sock)
        await run_pump(body, sink, len(data), chunk_size=64 * 1024)
    body.close()
    assert b"".join(sink.written) == data  # pread and write, nothing sent twice or lost


class ReadingClient:
    """A connected socket pair whose client end a thread reads to the end as fast as it can."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(self.server.getsockname())
        self.conn, _ = self.server.accept()
        self.conn.setblocking(False)
        self.received = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while chunk := self.client.recv(1 << 20):
            self.received += chunk

    def finish(self) -> bytes:
        self.conn.close()
        self.thread.join(5)
        self.client.close()
        self.server.close()
        return bytes(self.received)


async def _send_file_while(awaited: int, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """pump a 1 MiB + 5 file by sendfile with `awaited` database replies pending; returns
    (bytes received, each sendfile's count, calls made before each turn of a ticker task)."""
    data = os.urandom(1024 * 1024 + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    body = FileBody(os.open(path, os.O_RDONLY), 0, len(data))
    counts: list[int] = []
    real_sendfile = os.sendfile

    def spy(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        counts.append(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", spy)
    monkeypatch.setattr(turns, "awaited", awaited)
    seen: list[int] = []  # what the ticker saw each time the loop gave it a turn

    async def ticker() -> None:
        while True:
            seen.append(len(counts))
            await asyncio.sleep(0)

    peer = ReadingClient()
    tick = asyncio.create_task(ticker())
    try:
        await run_pump(body, SocketSink(peer.conn), len(data), chunk_size=64 * 1024)
    finally:
        tick.cancel()
        body.close()
    assert peer.finish() == data  # every byte once, in order, whatever the slicing
    return counts, seen


async def test_bodies_go_out_in_slices_while_a_database_reply_is_awaited(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply waits for one slice of a warm file, not all of it (proxy.turns)."""
    counts, seen = await _send_file_while(1, tmp_path, monkeypatch)
    assert len(counts) >= 5 and max(counts) <= SENDFILE_SLICE  # 1 MiB + 5: five slices or more
    assert set(range(1, 5)) <= set(seen)  # other tasks ran between the first five slices


async def test_bodies_go_out_whole_when_no_reply_is_awaited(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts, _ = await _send_file_while(0, tmp_path, monkeypatch)
    assert counts[0] == 1024 * 1024 + 5  # one call asks for all of it: no slicing cost
