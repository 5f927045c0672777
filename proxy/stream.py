"""Send one byte range from a storage body to a prepared HTTP response: sendfile(2) for
files, splice(2) for bodies that can hand their socket over (S3), else bounded copies.

Guarantees (SPEC §4): the next storage read waits for the client, and at most one
chunk is queued in user space for it; no progress for `idle_timeout_s`, or reaching
`deadline` (max_duration), raises TimeoutError; a body shorter than announced raises
StorageError. The caller aborts the connection on any error after headers
(streaming-pitfalls P1/P2): a response is complete or visibly cut, never short.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy import turns
from proxy.errors import StorageError
from proxy.model import Body, FileBody, SocketBody
from proxy.registry import Tracked

# Copy path: reads shrink to this while the client is slower than the storage, so a
# client that stalls leaves a small chunk queued, not a full one (pitfalls P12).
MIN_CHUNK: Final = 16 * 1024
# One sendfile call at most: the socket's free buffer bounds it anyway, this bounds how
# long a client draining as fast as the kernel fills could hold the loop.
SENDFILE_MAX: Final = 16 * 1024 * 1024
# One sendfile call while database replies are awaited (proxy.turns), then a turn of the
# loop: lookups on 1 MiB files saw their replies read later by several ms without it.
SENDFILE_SLICE: Final = 256 * 1024
# Chunks grow past MIN_CHUNK only after this much was sent: until then kernel buffers
# take everything (several MiB on a loopback or LAN connection), so every client looks
# fast, and bigger chunks for hundreds of starting streams were most of their peak
# (bench-slow, S3 N=200: 133-179 -> 74-89 KiB per stalled stream). storage/s3_body.py's
# FAST_AFTER holds S3 socket reads back for the same reason.
GROW_AFTER: Final = 4 * 1024 * 1024
# Bodies with less than this left are copied: a pipe and its syscalls cost more.
SPLICE_MIN: Final = 1024 * 1024
# The pipe between a storage socket and a client's: what a stalled client leaves in it
# (kernel memory), PIPE_START until the client took GROW_AFTER, like the copy chunks.
PIPE_START: Final = 64 * 1024
PIPE_SIZE: Final = 256 * 1024
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


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


def send_now(
    transport: asyncio.BaseTransport, fd: int, body: FileBody, limit: int = SENDFILE_MAX
) -> int:
    """sendfile what the socket `fd` takes at once, `limit` at most; 0 when it is full.

    The transport must queue nothing, so these bytes follow what it sent, in order.
    """
    if transport.is_closing():  # connection_lost already ran: the peer is gone
        raise ConnectionResetError("client went away")
    try:
        sent = os.sendfile(fd, body.fd, body.offset, min(body.remaining, limit))
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
    chunk = floor  # grows while a proven client keeps up; one that never reads costs 16 KiB
    splicer = _splicer(transport, body, length)
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
            if splicer is not None and length is not None and length - sent >= SPLICE_MIN:
                # The rest goes socket to socket through a pipe, never through user
                # space, until done or until the client stalls.
                pulled = await _splice(
                    loop, transport, writer, splicer, sent, tracked, timer, idle_s, hard_deadline
                )
                if pulled is None:
                    splicer = None  # the body could not hand its socket over: copy on
                else:
                    sent += pulled
                    chunk = floor  # the client stalled (or it is done): prove itself again


def _splicer(transport: asyncio.BaseTransport, body: Body, length: int | None) -> Any:
    """The body, if its socket could be spliced to this client's; else None."""
    if length is None or length < SPLICE_MIN or not hasattr(body, "handover"):
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    if transport.get_extra_info("socket") is None:
        return None
    return body


async def _splice(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.BaseTransport,
    writer: AbstractStreamWriter,
    body: SocketBody,
    sent: int,
    tracked: Tracked,
    timer: asyncio.Timeout,
    idle_s: float,
    hard_deadline: float | None,
) -> int | None:
    """Move the body's bytes socket → pipe → client socket; bytes delivered, None if refused.

    Returns when the body is done, or after the client stalled longer than the body's
    `stall_s`: the body then lets go of its connection (its `read` fetches the rest
    anew) and the pipe's bytes are delivered first: at most PIPE_START until `sent` plus
    what this call delivered reaches GROW_AFTER, PIPE_SIZE after that.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    pipe_r = pipe_w = client = upstream = -1
    try:  # descriptors first: without them (EMFILE) the body is copied, nothing lost
        client = os.dup(sock.fileno())
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        handed = body.handover()
    except OSError:
        handed = None
    if handed is None:
        for fd in (pipe_r, pipe_w, client):
            if fd >= 0:
                os.close(fd)
        return None
    upstream, buffered = handed
    del handed  # the tuple would keep `buffered` alive for the whole splice
    delivered = 0
    try:
        with contextlib.suppress(OSError):  # a smaller pipe only costs more syscalls
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        if buffered:  # what aiohttp had read already goes first, through the transport
            await writer.write(buffered)
            await writer.drain()  # high-water 0: the transport queues nothing after this
            delivered += len(buffered)
            tracked.sent(len(buffered))
            timer.reschedule(_next_deadline(loop, idle_s, hard_deadline))
            del buffered
        attached = True
        in_pipe = 0
        cap = PIPE_SIZE if sent >= GROW_AFTER else PIPE_START
        progressed = False
        while (attached and body.remaining > 0) or in_pipe:
            moved = False
            if cap < PIPE_SIZE and sent + delivered >= GROW_AFTER:
                cap = PIPE_SIZE
            if attached and body.remaining > 0 and in_pipe < cap:
                n = _splice_from_storage(upstream, pipe_w, min(body.remaining, cap - in_pipe))
                if n:
                    body.spliced(n)
                    in_pipe += n
                    moved = True
            if in_pipe:
                m = _splice_to_client(transport, pipe_r, client, in_pipe)
                if m:
                    in_pipe -= m
                    delivered += m
                    tracked.sent(m)
                    moved = progressed = True
            if moved:
                continue
            # Only an await lets the timer fire: move the idle deadline once per wait,
            # not once per splice (a reschedule is a heap push and a cancel).
            if progressed:
                timer.reschedule(_next_deadline(loop, idle_s, hard_deadline))
                progressed = False
            if not in_pipe:  # the pipe is empty and S3 had nothing yet
                await _ready(loop, upstream, write=False)
            elif attached and body.remaining > 0 and body.stall_s:
                if not await _ready(loop, client, write=True, within=body.stall_s):
                    body.let_go()  # a stalled client holds no S3 connection (P12)
                    attached = False
                    os.close(upstream)  # our duplicate kept the socket open
                    upstream = -1
            else:
                await _ready(loop, client, write=True)
        if progressed:
            timer.reschedule(_next_deadline(loop, idle_s, hard_deadline))
    finally:
        for fd in (pipe_r, pipe_w, client, upstream):
            if fd >= 0:
                os.close(fd)
    return delivered


def _splice_from_storage(upstream: int, pipe_w: int, n: int) -> int:
    try:
        got = os.splice(upstream, pipe_w, n, flags=_SPLICE_FLAGS)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise StorageError(f"storage connection failed: {exc.strerror}") from exc
    if got == 0:
        raise StorageError("storage body ended early")
    return got


def _splice_to_client(transport: asyncio.BaseTransport, pipe_r: int, client: int, n: int) -> int:
    if transport.is_closing():
        raise ConnectionResetError("client went away")
    try:
        return os.splice(pipe_r, client, n, flags=_SPLICE_FLAGS)
    except BlockingIOError:
        return 0
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ConnectionResetError("client went away") from exc


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
    try:
        fd = os.dup(sock.fileno())
    except OSError:  # out of descriptors (EMFILE): the copy path needs none
        return False
    try:
        async with asyncio.timeout(_next_deadline(loop, idle_s, hard_deadline)) as timer:
            while body.remaining > 0:
                before = body.remaining
                limit = SENDFILE_SLICE if turns.awaited else SENDFILE_MAX
                sent = send_now(transport, fd, body, limit)
                if sent:
                    tracked.sent(sent)
                    timer.reschedule(_next_deadline(loop, idle_s, hard_deadline))
                if sent == 0 or sent < min(before, limit):  # the socket is full
                    await _ready(loop, fd, write=True)
                elif limit == SENDFILE_SLICE and body.remaining:
                    await asyncio.sleep(0)  # a turn of the loop: awaited replies are read
    finally:
        os.close(fd)
    return True


async def _ready(
    loop: asyncio.AbstractEventLoop, fd: int, *, write: bool, within: float | None = None
) -> bool:
    """Wait until `fd` is writable (or readable); False if `within` seconds passed first.

    An error or hang-up counts as ready: the next syscall reports it.
    """
    ready: asyncio.Future[bool] = loop.create_future()
    if write:
        loop.add_writer(fd, _set_ready, ready, True)
    else:
        loop.add_reader(fd, _set_ready, ready, True)
    expire = loop.call_later(within, _set_ready, ready, False) if within else None
    try:
        return await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
        if expire is not None:
            expire.cancel()


def _set_ready(ready: asyncio.Future[bool], value: bool) -> None:
    if not ready.done():
        ready.set_result(value)
