"""Copy one byte range from a storage body to a prepared HTTP response.

Guarantees (SPEC §4): the next storage read waits for the client, and at most one
chunk is queued in user space for it; no progress for `idle_timeout_s`, or reaching
`deadline` (max_duration), raises TimeoutError; a body shorter than announced raises
StorageError. The caller aborts the connection on any error after headers
(streaming-pitfalls P1/P2): a response is complete or visibly cut, never short.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.errors import StorageError
from proxy.model import Body, FileBody
from proxy.registry import Tracked

# sendfile is issued in slices so that "no progress for idle seconds" stays observable;
# slices grow while the client keeps up and shrink when it is slow.
SENDFILE_MIN_SLICE: Final = 256 * 1024
SENDFILE_MAX_SLICE: Final = 16 * 1024 * 1024
SLOW_SLICE_S: Final = 1.0
# Copy path: reads shrink to this while the client is slower than the storage, so a
# client that stalls leaves a small chunk queued, not a full one (pitfalls P12).
MIN_CHUNK: Final = 16 * 1024

_no_sendfile_loops: set[type[asyncio.AbstractEventLoop]] = set()
_INT: Final = bytes(4)


def sendfile_supported(loop: asyncio.AbstractEventLoop) -> bool:
    """Tell whether `loop.sendfile` was not already found missing (uvloop, pitfalls P5)."""
    return type(loop) not in _no_sendfile_loops


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
    loop = asyncio.get_running_loop()
    if isinstance(body, FileBody) and sendfile_supported(loop):
        if await _sendfile(request, loop, body, tracked, idle_timeout_s, deadline):
            return
    await _copy(request, writer, body, length, tracked, chunk_size, idle_timeout_s, deadline)


def send_room(sock: socket.socket | None) -> int:
    """Bytes the socket's send buffer can take now (about half of SO_SNDBUF is payload)."""
    if sock is None:
        return 0
    try:
        queued: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _INT))[0]
        return max(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 - queued, 0)
    except (OSError, ValueError):  # a closed socket (-1), or not a TCP socket
        return 0


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
    chunk = floor  # grows while the client keeps up: one that never reads costs one small chunk
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
            elif chunk < chunk_size:
                chunk = min(chunk * 2, chunk_size)
            sent += n
            tracked.sent(n)


async def _sendfile(
    request: web.BaseRequest,
    loop: asyncio.AbstractEventLoop,
    body: FileBody,
    tracked: Tracked,
    idle_s: float,
    hard_deadline: float | None,
) -> bool:
    """Zero-copy the file range; False if this loop has no sendfile (nothing was sent)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    slice_len = SENDFILE_MIN_SLICE
    sock = transport.get_extra_info("socket")
    async with asyncio.timeout(None) as timer:
        while body.remaining > 0:
            timer.reschedule(_next_deadline(loop, idle_s, hard_deadline))
            # What the kernel takes at once needs no progress from the client: a slice that
            # big costs one sendfile instead of several (a 1 MiB range on a warm keep-alive
            # connection), while a client that stalls leaves no room and slices stay small.
            count = min(max(slice_len, send_room(sock)), body.remaining)
            started = loop.time()
            try:
                await loop.sendfile(transport, body.file, body.offset, count, fallback=True)
            except NotImplementedError:
                _no_sendfile_loops.add(type(loop))
                return False
            except RuntimeError:
                if transport.is_closing():  # asyncio's way of saying the peer is gone
                    raise ConnectionResetError("client went away") from None
                raise
            body.offset += count
            body.remaining -= count
            tracked.sent(count)
            if loop.time() - started < SLOW_SLICE_S / 4:
                slice_len = min(slice_len * 2, SENDFILE_MAX_SLICE)
            elif loop.time() - started > SLOW_SLICE_S:
                slice_len = max(slice_len // 2, SENDFILE_MIN_SLICE)
    return True
