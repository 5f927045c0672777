"""Copy one byte range from a storage body to a prepared HTTP response.

Guarantees (SPEC §4): the next storage read waits for the client, and at most one
chunk is queued in user space for it; no progress for `idle_timeout_s`, or reaching
`deadline` (max_duration), raises TimeoutError; a body shorter than announced raises
StorageError. The caller aborts the connection on any error after headers
(streaming-pitfalls P1/P2): a response is complete or visibly cut, never short.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.errors import StorageError
from proxy.model import Body, FileBody
from proxy.registry import Tracked

# Copy path: reads shrink to this while the client is slower than the storage, so a
# client that stalls leaves a small chunk queued, not a full one (pitfalls P12).
MIN_CHUNK: Final = 16 * 1024
# One sendfile call at most: the socket's free buffer bounds it anyway, this bounds how
# long a client draining as fast as the kernel fills could hold the loop.
SENDFILE_MAX: Final = 16 * 1024 * 1024
# Chunks grow past MIN_CHUNK only after this much was sent: until then kernel buffers
# take everything (several MiB on a loopback or LAN connection), so every client looks
# fast, and bigger chunks for hundreds of starting streams were most of their peak
# (bench-slow, S3 N=200: 133-179 -> 74-89 KiB per stalled stream). storage/s3.py's
# FAST_AFTER holds S3 socket reads back for the same reason.
GROW_AFTER: Final = 4 * 1024 * 1024


async def pump(
    request: web.BaseRequest,
    writer: AbstractStreamWriter,
    body: Body,
    length: int | None,
    tracked: Tracked,
    *,
    chunk_size: int,
    idle_timeout_s: float,
    deadline: float | None = None,
) -> None:
    """Send exactly `length` bytes of `body` (closed by the caller), or all of it if None.

    `writer` is what `StreamResponse.prepare` returned; `deadline` is an absolute
    `loop.time()` (max_duration) or None; progress is counted on `tracked`.
    """
    if length is not None and length <= 0:
        return
    if isinstance(body, FileBody):
        if await _sendfile(request, writer, body, tracked, idle_timeout_s, deadline):
            return
    await _copy(request, writer, body, length, tracked, chunk_size, idle_timeout_s, deadline)


def send_now(transport: asyncio.BaseTransport, fd: int, body: FileBody) -> int:
    """sendfile what the socket `fd` takes at once (non-blocking); 0 when it is full.

    The transport must queue nothing, so these bytes follow what it sent, in order.
    """
    if transport.is_closing():  # connection_lost already ran: the peer is gone
        raise ConnectionResetError("client went away")
    try:
        sent = os.sendfile(fd, body.fd, body.offset, min(body.remaining, SENDFILE_MAX))
    except BlockingIOError:
        return 0
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ConnectionResetError("client went away") from exc
    body.offset += sent
    body.remaining -= sent
    return sent


def _next_deadline(
    loop: asyncio.AbstractEventLoop, idle_s: float, hard: float | None
) -> float | None:
    soft = loop.time() + idle_s if idle_s else None
    if hard is None or (soft is not None and soft < hard):
        return soft
    return hard


async def _copy(
    request: web.BaseRequest,
    writer: AbstractStreamWriter,
    body: Body,
    length: int | None,
    tracked: Tracked,
    chunk_size: int,
    idle_s: float,
    hard_deadline: float | None,
) -> None:
    loop = asyncio.get_running_loop()
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    # High-water 0: every drain() waits until the kernel took the whole chunk, so at most
    # one chunk is queued here whatever the client does (pitfalls P12).
    transport.set_write_buffer_limits(high=0)
    sent = 0
    floor = min(MIN_CHUNK, chunk_size)
    chunk = (
        floor  # grows while a proven client keeps up: one that never reads costs one small chunk
    )
    async with asyncio.timeout(None) as timer:
        while length is None or sent < length:
            timer.reschedule(_next_deadline(loop, idle_s, hard_deadline))
            data = await body.read(chunk if length is None else min(chunk, length - sent))
            if not data:
                if length is None:  # a body of unknown length (chunked upstream) ended
                    return
                raise StorageError(f"body ended after {sent} of {length} bytes")
            n = len(data)
            await writer.write(data)
            del data  # the transport keeps what it could not send: do not hold it twice
            # A queued remainder means the client is slower than the storage: read less.
            if transport.get_write_buffer_size():
                chunk = max(chunk // 2, floor)
                await writer.drain()
            elif chunk < chunk_size and sent >= GROW_AFTER:
                chunk = min(chunk * 2, chunk_size)
            sent += n
            tracked.sent(n)


async def _sendfile(
    request: web.BaseRequest,
    writer: AbstractStreamWriter,
    body: FileBody,
    tracked: Tracked,
    idle_s: float,
    hard_deadline: float | None,
) -> bool:
    """Zero-copy the file range on either loop; False (nothing sent) if it cannot.

    Not `loop.sendfile`: uvloop has none (pitfalls P5), and asyncio's costs a future, a
    pause and resume of reading and a writer callback per call. Here a warm 1 MiB range
    is one syscall, and a full socket one wait for writability on a duplicate of its
    descriptor (the loops refuse add_writer on a transport's own).
    """
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return False  # TLS carries records: the copy path writes through the transport
    transport_any: Any = transport
    if transport_any.get_write_buffer_size():  # the headers first, whole
        transport_any.set_write_buffer_limits(high=0)
        await writer.drain()
    loop = asyncio.get_running_loop()
    fd = os.dup(sock.fileno())
    try:
        async with asyncio.timeout(_next_deadline(loop, idle_s, hard_deadline)) as timer:
            while body.remaining > 0:
                before = body.remaining
                sent = send_now(transport, fd, body)
                if sent:
                    tracked.sent(sent)
                    timer.reschedule(_next_deadline(loop, idle_s, hard_deadline))
                if sent == 0 or sent < min(before, SENDFILE_MAX):  # the socket is full
                    await _writable(loop, fd)
    finally:
        os.close(fd)
    return True


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until the socket has room (or an error, which the next send reports)."""
    ready = loop.create_future()
    loop.add_writer(fd, _set_ready, ready)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def _set_ready(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
