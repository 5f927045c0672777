"""Copy one byte range from a storage body to a prepared HTTP response.

Guarantees: the next storage read waits for the client (one chunk in flight); no
progress for `idle_timeout_s` raises TimeoutError; a body shorter than announced
raises StorageError. The caller aborts the connection on any error after headers
(streaming-pitfalls P1/P2): a response is complete or visibly cut, never short.
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from proxy.errors import StorageError
from proxy.model import Body, FileBody

# sendfile is issued in slices so that "no progress for idle seconds" stays observable;
# slices grow while the client keeps up and shrink when it is slow.
SENDFILE_MIN_SLICE: Final = 256 * 1024
SENDFILE_MAX_SLICE: Final = 16 * 1024 * 1024
SLOW_SLICE_S: Final = 1.0

_no_sendfile_loops: set[type[asyncio.AbstractEventLoop]] = set()


def sendfile_supported(loop: asyncio.AbstractEventLoop) -> bool:
    """Tell whether `loop.sendfile` was not already found missing (uvloop, pitfalls P5)."""
    return type(loop) not in _no_sendfile_loops


async def pump(
    request: web.BaseRequest,
    resp: web.StreamResponse,
    body: Body,
    length: int,
    *,
    chunk_size: int,
    idle_timeout_s: float,
) -> None:
    """Send exactly `length` bytes of `body`; the body is closed by the caller."""
    if length <= 0:
        return
    loop = asyncio.get_running_loop()
    if isinstance(body, FileBody) and sendfile_supported(loop):
        if await _sendfile(request, loop, body, idle_timeout_s):
            return
    await _copy(resp, body, length, chunk_size, idle_timeout_s)


async def _copy(
    resp: web.StreamResponse, body: Body, length: int, chunk_size: int, idle_timeout_s: float
) -> None:
    loop = asyncio.get_running_loop()
    sent = 0
    async with asyncio.timeout(None) as deadline:
        while sent < length:
            if idle_timeout_s:
                deadline.reschedule(loop.time() + idle_timeout_s)
            chunk = await body.read(min(chunk_size, length - sent))
            if not chunk:
                raise StorageError(f"body ended after {sent} of {length} bytes")
            await resp.write(chunk)  # waits while the transport is above its high-water mark
            sent += len(chunk)


async def _sendfile(
    request: web.BaseRequest,
    loop: asyncio.AbstractEventLoop,
    body: FileBody,
    idle_timeout_s: float,
) -> bool:
    """Zero-copy the file range; False if this loop has no sendfile (nothing was sent)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    slice_len = SENDFILE_MIN_SLICE
    async with asyncio.timeout(None) as deadline:
        while body.remaining > 0:
            if idle_timeout_s:
                deadline.reschedule(loop.time() + idle_timeout_s)
            count = min(slice_len, body.remaining)
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
            if loop.time() - started < SLOW_SLICE_S / 4:
                slice_len = min(slice_len * 2, SENDFILE_MAX_SLICE)
            elif loop.time() - started > SLOW_SLICE_S:
                slice_len = max(slice_len // 2, SENDFILE_MIN_SLICE)
    return True
