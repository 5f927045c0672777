"""RFC 9110 §14.6 multipart/byteranges: a 206 of several ranges, one body per part."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from proxy.config import EffectiveTimeouts
from proxy.errors import ProxyError
from proxy.model import Body, ByteRange
from proxy.ranges import content_range
from proxy.registry import CLIENT_DISCONNECTED, FAILED, TIMED_OUT, Tracked
from proxy.web.streaming import ResponseStream, abort


async def send_byteranges(
    request: web.BaseRequest,
    out: ResponseStream,
    tracked: Tracked,
    *,
    ranges: Sequence[ByteRange],
    size: int,
    ctype: str,
    headers: dict[str, str],
    open_part: Callable[[ByteRange], Awaitable[Body]],
    timeouts: EffectiveTimeouts,
) -> web.StreamResponse:
    """Send `ranges` of an object of `size` bytes (GET only), one `open_part` per part."""
    boundary = secrets.token_hex(16)
    heads = [
        f"--{boundary}\r\nContent-Type: {ctype}\r\n"
        f"Content-Range: {content_range(r, size)}\r\n\r\n".encode("latin-1")
        for r in ranges
    ]
    tail = f"--{boundary}--\r\n".encode("latin-1")
    total = sum(len(h) + r.length + 2 for h, r in zip(heads, ranges, strict=True))
    headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
    resp = web.StreamResponse(status=206, headers=headers)
    resp.content_length = total + len(tail)
    # The first part is opened before the headers go out, so its failure is still a 5xx.
    body: Body | None = await open_part(ranges[0])
    try:
        writer = await out.start(request, resp, tracked, total + len(tail))
        for head, r in zip(heads, ranges, strict=True):
            if body is None:
                body = await open_part(r)
            await writer.write(head)
            if not await out.stream(request, resp, writer, body, r.length, tracked, timeouts):
                return resp
            await writer.write(b"\r\n")
            body.close()
            body = None
        await writer.write(tail)
        await out.complete(request, resp, tracked)
        return resp
    except ConnectionError:
        abort(request, resp)
        out.end(tracked, CLIENT_DISCONNECTED)
        return resp
    except (ProxyError, TimeoutError) as exc:  # a later part failed: cut, never short (P1)
        timed_out = isinstance(exc, TimeoutError)
        abort(request, resp, reset=timed_out)
        out.end(tracked, TIMED_OUT if timed_out else FAILED)
        return resp
    finally:
        if body is not None:
            body.close()
