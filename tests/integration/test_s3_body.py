"""S3Body against the real SeaweedFS: detach-on-stall, resume pinned by If-Match, no leaks.

A body whose reader pauses longer than `detach_after_s` must give its S3 connection back
and drop its buffers, then resume byte-exact; the gauges must always return to 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from proxy.config import S3StorageConfig, parse_config
from proxy.errors import ObjectChanged, StorageError, StorageTimeout
from proxy.model import ByteRange
from proxy.storage import s3 as s3_module
from proxy.storage.s3 import S3Storage
from proxy.storage.s3_body import FAST_AFTER, FAST_SOCKET_READ, READ_BUFSIZE, S3Body
from tests.conftest import BUCKET, FILES, S3_PREFIX, S3Server

pytestmark = pytest.mark.asyncio(loop_scope="session")

BIG = FILES["big.bin"]
CHUNK = 64 * 1024
DETACH_S = 0.05
PAUSE_S = DETACH_S * 4  # comfortably past the detach timer


@pytest_asyncio.fixture(loop_scope="session")
async def s3(sidecar_config: dict[str, Any]) -> AsyncIterator[S3Storage]:
    """The `uploads` storage of the test config, started in the session loop."""
    cfg = parse_config(sidecar_config, "<tests>").storages["uploads"]
    assert isinstance(cfg, S3StorageConfig)
    storage = S3Storage(cfg, max_streams=4, detach_after_s=DETACH_S)
    await storage.start()
    try:
        yield storage
    finally:
        await storage.close()


async def settle() -> None:
    """Let closed transports run connection_lost (one or two loop turns)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def read_all(body: S3Body, sizes: list[int], pause_every: int) -> bytes:
    """Read to the end with chunk sizes cycling through `sizes`, pausing every N reads."""
    parts: list[bytes] = []
    i = 0
    while chunk := await body.read(sizes[i % len(sizes)]):
        parts.append(chunk)
        i += 1
        if pause_every and i % pause_every == 0 and body.remaining:
            await asyncio.sleep(PAUSE_S)
    return b"".join(parts)


@pytest.mark.parametrize(
    "byte_range",
    [ByteRange(0, len(BIG) - 1), ByteRange(12_345, len(BIG) - 54_321)],
    ids=["whole", "middle"],
)
async def test_paused_reads_detach_and_resume_byte_exact(
    s3: S3Storage, byte_range: ByteRange
) -> None:
    meta = await s3.stat("big.bin")
    body = await s3.open(meta, byte_range)
    try:
        first = await body.read(CHUNK)
        assert s3.connections_in_use() == 1  # the gauge sees an attached body
        await asyncio.sleep(PAUSE_S)
        assert s3.connections_in_use() == 0
        assert (s3.detached_total, s3.detached_active) == (1, 1)
        # Odd chunk sizes so every resume starts at a different offset.
        rest = await read_all(body, [CHUNK, 10_007, 1, 150_001], pause_every=7)
    finally:
        body.close()
    await settle()
    assert first + rest == BIG[byte_range.start : byte_range.end + 1]
    assert s3.resumed_total >= 2
    assert s3.resumed_total == s3.detached_total  # every detach was resumed
    assert (s3.detached_active, s3.connections_in_use()) == (0, 0)


async def test_detach_frees_the_response(s3: S3Storage) -> None:
    meta = await s3.stat("big.bin")
    body = await s3.open(meta, ByteRange(0, len(BIG) - 1))
    try:
        await body.read(CHUNK)
        # Private access on purpose: the point is that nothing keeps the reader alive.
        response = weakref.ref(body._body.raw_stream)
        await asyncio.sleep(PAUSE_S)
        await settle()
        gc.collect()
        assert response() is None, "the detached body still holds the S3 response"
    finally:
        body.close()


async def test_reads_spaced_below_the_delay_never_detach(s3: S3Storage) -> None:
    meta = await s3.stat("big.bin")
    body = await s3.open(meta, ByteRange(0, len(BIG) - 1))
    try:
        for _ in range(12):  # 12 x DETACH_S / 3 spans 4 delays: a stale timer would fire
            await body.read(CHUNK)
            await asyncio.sleep(DETACH_S / 3)
        assert s3.detached_total == 0
        assert s3.connections_in_use() == 1
    finally:
        body.close()
    await settle()
    assert s3.connections_in_use() == 0


async def test_no_detach_without_an_etag(s3: S3Storage) -> None:
    meta = (await s3.stat("big.bin"))._replace(etag='""')  # a resume could not be pinned
    body = await s3.open(meta, ByteRange(0, len(BIG) - 1))
    try:
        first = await body.read(CHUNK)
        await asyncio.sleep(PAUSE_S)
        assert (s3.detached_total, s3.connections_in_use()) == (0, 1)
        rest = await read_all(body, [CHUNK], pause_every=0)
    finally:
        body.close()
    assert first + rest == BIG


async def test_resume_after_overwrite_raises_storage_error(
    s3: S3Storage, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"mutable/{uuid.uuid4().hex}.bin"
    old, new = BIG[: 1 << 20], BIG[1 << 20 : 2 << 20]  # same length: only If-Match can tell

    def put(data: bytes) -> None:
        s3_server.client.put_object(Bucket=BUCKET, Key=S3_PREFIX + key, Body=data)

    calls: list[tuple[str, dict[str, str]]] = []
    request = s3._object  # every GET and HEAD, presigned or through botocore

    async def recording(op: str, key: str, headers: dict[str, str]) -> Any:
        calls.append((op, dict(headers)))
        return await request(op, key, headers)

    await asyncio.to_thread(put, old)
    try:
        meta = await s3.stat(key)
        body = await s3.open(meta, ByteRange(0, len(old) - 1))
        try:
            first = await body.read(CHUNK)  # up to CHUNK bytes: whatever has arrived
            assert first and old.startswith(first)
            await asyncio.sleep(PAUSE_S)
            assert s3.detached_active == 1
            await asyncio.to_thread(put, new)
            monkeypatch.setattr(s3, "_object", recording)
            presigned = s3.figures()["presigned_total"]
            with pytest.raises(StorageError) as caught:
                await body.read(CHUNK)
            # Not ObjectChanged ("retry once"): headers are out, the stream must be cut.
            assert not isinstance(caught.value, ObjectChanged | StorageTimeout)
            assert s3.resumed_total == 0
            [(op, resume)] = calls
            assert op == "get_object"
            assert resume["If-Match"] == meta.etag
            assert resume["Range"] == f"bytes={len(first)}-{len(old) - 1}"
            assert s3.figures()["presigned_total"] == presigned + 1, "S3's 412, answered presigned"
        finally:
            body.close()
    finally:
        await asyncio.to_thread(s3_server.client.delete_object, Bucket=BUCKET, Key=S3_PREFIX + key)
    await settle()
    assert (s3.detached_active, s3.connections_in_use()) == (0, 0)


async def test_resume_checks_the_etag_when_if_match_is_ignored(
    s3: S3Storage, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"mutable/{uuid.uuid4().hex}.bin"
    old, new = BIG[: 1 << 20], BIG[1 << 20 : 2 << 20]

    def put(data: bytes) -> None:
        s3_server.client.put_object(Bucket=BUCKET, Key=S3_PREFIX + key, Body=data)

    request = s3._object

    async def ignoring_if_match(op: str, key: str, headers: dict[str, str]) -> Any:
        # as some S3 servers do
        return await request(op, key, {k: v for k, v in headers.items() if k != "If-Match"})

    await asyncio.to_thread(put, old)
    try:
        meta = await s3.stat(key)
        body = await s3.open(meta, ByteRange(0, len(old) - 1))
        try:
            assert await body.read(CHUNK)
            await asyncio.sleep(PAUSE_S)
            await asyncio.to_thread(put, new)
            monkeypatch.setattr(s3, "_object", ignoring_if_match)
            with pytest.raises(StorageError) as caught:
                await body.read(CHUNK)
            assert not isinstance(caught.value, ObjectChanged | StorageTimeout)
        finally:
            body.close()
    finally:
        await asyncio.to_thread(s3_server.client.delete_object, Bucket=BUCKET, Key=S3_PREFIX + key)
    await settle()
    assert (s3.detached_active, s3.connections_in_use()) == (0, 0)


async def test_close_while_detached_is_idempotent(s3: S3Storage) -> None:
    meta = await s3.stat("big.bin")
    body = await s3.open(meta, ByteRange(0, len(BIG) - 1))
    await body.read(CHUNK)
    await asyncio.sleep(PAUSE_S)
    assert s3.detached_active == 1
    body.close()
    body.close()
    assert s3.detached_active == 0
    with pytest.raises(StorageError):
        await body.read(CHUNK)  # never re-opens a closed body
    await settle()
    assert s3.connections_in_use() == 0


async def test_close_while_attached_is_idempotent(s3: S3Storage) -> None:
    meta = await s3.stat("big.bin")
    body = await s3.open(meta, ByteRange(0, len(BIG) - 1))
    await body.read(CHUNK)
    body.close()
    body.close()
    await asyncio.sleep(PAUSE_S)  # a timer left armed would count a detach
    await settle()
    assert (s3.detached_total, s3.detached_active, s3.connections_in_use()) == (0, 0, 0)


async def test_resume_is_bounded_by_the_first_byte_timeout(s3: S3Storage) -> None:
    meta = await s3.stat("big.bin")
    body = await s3.open(meta, ByteRange(0, len(BIG) - 1))
    try:
        await body.read(CHUNK)
        await asyncio.sleep(PAUSE_S)
        s3.first_byte_timeout_s = 1e-4  # no GET answers this fast
        with pytest.raises(StorageTimeout):
            await body.read(CHUNK)
    finally:
        body.close()
    await settle()
    assert (s3.detached_active, s3.connections_in_use()) == (0, 0)  # the cancelled GET too


async def test_small_buffer_and_whole_read(s3: S3Storage) -> None:
    meta = await s3.stat("big.bin")
    body = await s3.open(meta, ByteRange(0, len(BIG) - 1))
    try:
        # Private access on purpose: guards the session override against aiobotocore drift.
        low, _ = body._body.raw_stream.content.get_read_buffer_limits()
        assert low == READ_BUFSIZE
    finally:
        body.close()
    await settle()
    idle = s3.idle()
    assert await s3.read(meta, ByteRange(100, 100 + CHUNK - 1)) == BIG[100 : 100 + CHUNK]
    assert s3.connections_in_use() == 0
    assert s3.idle() == max(idle, 1)  # read to its end: the connection went back to the pool


@contextlib.asynccontextmanager
async def storage_with(config: dict[str, Any], **kwargs: Any) -> AsyncIterator[S3Storage]:
    """A second `uploads` storage with its own settings (detach delay, resume gate)."""
    cfg = parse_config(config, "<tests>").storages["uploads"]
    assert isinstance(cfg, S3StorageConfig)
    storage = S3Storage(cfg, max_streams=4, **kwargs)
    await storage.start()
    try:
        yield storage
    finally:
        await storage.close()


async def test_attached_body_buffers_little_while_the_reader_pauses(s3: S3Storage) -> None:
    # Never detach: this is what an attached stream holds while its client is slow.
    s3.detach_after_s = 0.0
    meta = await s3.stat("big.bin")
    body = await s3.open(meta, ByteRange(0, len(BIG) - 1))
    try:
        first = await body.read(CHUNK)  # a fast start raises aiohttp's marks to CHUNK..2*CHUNK
        # Private access on purpose: the buffers are the point of this test.
        response = body._body.raw_stream
        selector = isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop)
        if selector:  # full-size reads, but every client looks fast at first: not yet big
            assert response.connection.transport.max_size == CHUNK
            assert s3.uncapped_total == 0
        else:  # uvloop: no per-read knob, and /stats says so
            assert s3.uncapped_total == 1
        parts = [first]
        while sum(map(len, parts)) < FAST_AFTER:  # proven fast: big socket reads again
            parts.append(await body.read(CHUNK))
        if selector:
            assert response.connection.transport.max_size == FAST_SOCKET_READ
        # The client slowed down: small reads drain the old fill (up to 2 x CHUNK buffered
        # plus one 256 KiB recv).
        for _ in range(40):
            parts.append(await body.read(READ_BUFSIZE))
            await asyncio.sleep(0.01)
        if selector:  # small reads: socket reads no bigger than them
            assert response.connection.transport.max_size == READ_BUFSIZE
        await asyncio.sleep(0.2)  # S3 is much faster than that: the reader fills up
        buffered = response.content._size
        # Paused above 2 x READ_BUFSIZE; the recv that crossed the mark adds at most one cap.
        limit = 2 * READ_BUFSIZE + READ_BUFSIZE
        assert 0 < buffered <= limit, f"{buffered} bytes buffered for a paused reader"
        parts.append(await read_all(body, [CHUNK], pause_every=0))
    finally:
        body.close()
    assert b"".join(parts) == BIG
    assert s3.detached_total == 0


async def test_each_resume_doubles_the_detach_delay_up_to_the_cap(
    sidecar_config: dict[str, Any],
) -> None:
    base = 0.1  # margins of 50 ms at least around every delay below
    async with storage_with(sidecar_config, detach_after_s=base) as s3:
        s3.detach_max_s = 4 * base
        meta = await s3.stat("big.bin")
        body = await s3.open(meta, ByteRange(0, len(BIG) - 1))
        try:
            parts, seen = [], []
            for pause in (1.5 * base, 1.5 * base, 3 * base, 3 * base, 6 * base, 6 * base):
                parts.append(await body.read(CHUNK))
                await asyncio.sleep(pause)
                seen.append(s3.detached_total)
            # 0.1 detaches; resumed at 0.2: 0.15 stays; 0.2 < 0.3 detaches; resumed at 0.4:
            # 0.3 stays; 0.4 < 0.6 detaches; resumed, still 0.4 (the cap): detaches again.
            assert seen == [1, 1, 2, 2, 3, 4]
            assert s3.resumed_total == 3
            parts.append(await read_all(body, [CHUNK], pause_every=0))
        finally:
            body.close()
        assert b"".join(parts) == BIG
        await settle()
        assert (s3.detached_active, s3.connections_in_use()) == (0, 0)


async def test_resumes_wait_for_the_gate_within_the_first_byte_timeout(
    sidecar_config: dict[str, Any],
) -> None:
    async with storage_with(sidecar_config, detach_after_s=DETACH_S, max_resuming=1) as s3:
        meta = await s3.stat("big.bin")
        bodies = [await s3.open(meta, ByteRange(0, len(BIG) - 1)) for _ in range(2)]
        try:
            firsts = [await body.read(CHUNK) for body in bodies]
            await asyncio.sleep(PAUSE_S)
            assert s3.detached_active == 2
            gate = s3.resume_gate  # hold the only resume slot
            await gate.acquire()
            try:
                waiting = asyncio.create_task(bodies[0].read(CHUNK))
                await asyncio.sleep(0.1)
                assert not waiting.done()  # no GET while the slot is taken
                assert (s3.resume_queued_total, s3.connections_in_use()) == (1, 0)
                s3.first_byte_timeout_s = 0.1  # the wait counts against the timeout
                with pytest.raises(StorageTimeout):
                    await bodies[1].read(CHUNK)
                assert (s3.resume_queued_total, s3.resume_timed_out_total) == (2, 1)
            finally:
                gate.release()
            second = await waiting
            assert firsts[0] + second == BIG[: len(firsts[0]) + len(second)]
            assert s3.resumed_total == 1
        finally:
            for body in bodies:
                body.close()
        await settle()
        assert (s3.detached_active, s3.connections_in_use()) == (0, 0)


async def test_released_bodies_trim_the_heap_once_per_delay(
    s3: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[int] = []
    monkeypatch.setattr(s3_module, "_malloc_trim", trims.append)
    monkeypatch.setattr(s3_module, "TRIM_AFTER_S", 0.1)
    meta = await s3.stat("big.bin")
    bodies = [await s3.open(meta, ByteRange(0, len(BIG) - 1)) for _ in range(3)]
    try:
        for body in bodies:
            await body.read(CHUNK)
        bodies[0].close()  # released while attached
        await asyncio.sleep(PAUSE_S)  # the two others detach within the same delay
        assert s3.detached_total == 2
        assert trims == [0]  # one trim for the three releases, malloc_trim(0)
        assert s3.figures()["trims_total"] == 1
        await bodies[1].read(CHUNK)  # resumed, then detached again: a new trim later
        await asyncio.sleep(PAUSE_S + 0.1)
        assert trims == [0, 0]
    finally:
        for body in bodies:
            body.close()
    await asyncio.sleep(0.2)
    assert len(trims) == 2  # closing a detached body frees nothing: no trim for it
    figures = s3.figures()
    assert {
        "uncapped_total",
        "resume_queued_total",
        "resume_timed_out_total",
        "trims_total",
    } <= figures.keys()


async def pull(fd: int, n: int) -> bytes:
    """Read exactly `n` bytes off a handed-over (non-blocking) socket descriptor."""
    loop = asyncio.get_running_loop()
    parts: list[bytes] = []
    while n > 0:
        try:
            chunk = os.read(fd, min(n, 1 << 20))
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_reader(fd, ready.set_result, None)
            try:
                await asyncio.wait_for(ready, 5)
            finally:
                loop.remove_reader(fd)
            continue
        assert chunk, "the S3 socket ended early"
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


async def handed_over(s3: S3Storage, byte_range: ByteRange) -> tuple[S3Body, bytes, int, bytes]:
    """Open `byte_range` of big.bin, read one chunk, hand the socket over: (body, first
    chunk, descriptor, bytes aiohttp had buffered)."""
    body = await s3.open(await s3.stat("big.bin"), byte_range)
    try:
        first = await body.read(CHUNK)
        handed = body.handover()
        assert handed is not None
    except BaseException:
        body.close()
        raise
    return body, first, *handed


async def test_handover_gives_exactly_the_rest_on_the_socket(s3: S3Storage) -> None:
    byte_range = ByteRange(1000, len(BIG) - 2000)
    body, first, fd, buffered = await handed_over(s3, byte_range)
    try:
        try:
            assert body.handover() is None  # once
            with pytest.raises(StorageError):  # aiohttp no longer reads this body
                await body.read(CHUNK)
            assert body.remaining == byte_range.length - len(first) - len(buffered)
            rest = await pull(fd, body.remaining)
            body.spliced(len(rest))
        finally:
            os.close(fd)
        assert body.remaining == 0 and await body.read(CHUNK) == b""
        assert (s3.handovers_total, s3.spliced_bytes_total) == (1, len(rest))
    finally:
        body.close()
    await settle()
    assert first + buffered + rest == BIG[byte_range.start : byte_range.end + 1]
    assert s3.connections_in_use() == 0  # a handed-over connection is closed, never reused
    assert s3.idle() == 0


async def test_let_go_after_handover_resumes_byte_exact(s3: S3Storage) -> None:
    body, first, fd, buffered = await handed_over(s3, ByteRange(0, len(BIG) - 1))
    try:
        try:
            middle = await pull(fd, 100_003)
            body.spliced(len(middle))
            body.let_go()  # the client stalled: the connection goes, the bytes read stay ours
        finally:
            os.close(fd)
        await settle()
        assert (s3.connections_in_use(), s3.detached_active) == (0, 1)
        rest = await read_all(body, [CHUNK], pause_every=0)  # resumes where the socket was
    finally:
        body.close()
    await settle()
    assert first + buffered + middle + rest == BIG
    assert (s3.resumed_total, s3.detached_active, s3.connections_in_use()) == (1, 0, 0)


async def test_no_handover_once_the_whole_body_was_read(s3: S3Storage) -> None:
    meta = await s3.stat("big.bin")
    body = await s3.open(meta, ByteRange(0, 99))
    try:
        for _ in range(50):  # aiohttp reads a 100-byte body with its headers
            if body._body.raw_stream.content.is_eof():
                break
            await asyncio.sleep(0.01)
        assert body.handover() is None
        assert await body.read(CHUNK) == BIG[:100]  # and the body still reads normally
    finally:
        body.close()
