"""What crosses an upstream route (SPEC §8): the request as the backend should see it, the
response headers the client gets, nginx's X-Accel-Redirect contract, and the forwarding
itself: the backend's answer streamed to the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Final, NamedTuple

from aiohttp import web

from proxy.config import EffectiveTimeouts
from proxy.errors import NotFound, RequestTooLarge
from proxy.registry import Tracked
from proxy.upstream import Upstream, UpstreamBody, end_to_end
from proxy.web.streaming import ResponseStream

VIA: Final = "1.1 media-sidecar"
BODY_CHUNK: Final = 64 * 1024
# Headers of the backend's answer that still apply to the object served instead of its body
# (the set nginx keeps on an X-Accel-Redirect).
ACCEL_KEPT: Final = (
    "Content-Type",
    "Content-Disposition",
    "Cache-Control",
    "Expires",
    "Set-Cookie",
)
_LENGTH_HEADERS: Final = frozenset({"content-length"})


class AccelRedirect(NamedTuple):
    """The backend asked the sidecar to serve `target` instead of its own body."""

    target: str  # a raw path naming an internal route
    overrides: list[tuple[str, str]]  # ACCEL_KEPT headers the backend set


def request_headers(request: web.BaseRequest, request_id: str) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones, plus X-Forwarded-*, X-Request-ID, Via."""
    headers = [
        (k, v)
        for k, v in end_to_end(request.headers)
        if k.lower() not in ("x-forwarded-for", "x-request-id", "via")
    ]
    peer = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For")
    headers.append(("X-Forwarded-For", f"{forwarded}, {peer}" if forwarded else peer))
    # Behind nginx these are already set (TLS ends there): keep them, else describe our hop.
    if "X-Forwarded-Proto" not in request.headers:
        headers.append(("X-Forwarded-Proto", request.scheme))
    if "X-Forwarded-Host" not in request.headers and request.host:
        headers.append(("X-Forwarded-Host", request.host))
    headers.append(("X-Request-ID", request_id))
    via = request.headers.get("Via")
    headers.append(("Via", f"{via}, {VIA}" if via else VIA))
    return headers


def request_body(request: web.BaseRequest, limit: int) -> AsyncIterator[bytes] | None:
    """The request body as a stream, refused (413) beyond `limit` bytes; None without one."""
    if not request.body_exists:
        return None
    declared = request.content_length
    if declared is not None and declared > limit:
        raise RequestTooLarge(f"request body of {declared} bytes over {limit}")

    async def chunks() -> AsyncIterator[bytes]:
        total = 0
        async for chunk in request.content.iter_chunked(BODY_CHUNK):
            total += len(chunk)
            if total > limit:  # chunked bodies are counted as they arrive
                raise RequestTooLarge(f"request body over {limit} bytes")
            yield chunk

    return chunks()


def response_headers(backend: Mapping[str, str], request_id: str) -> list[tuple[str, str]]:
    """The backend's headers for the client: no hop-by-hop, our length, Via, X-Request-ID."""
    headers = [(k, v) for k, v in end_to_end(backend) if k.lower() not in _LENGTH_HEADERS]
    names = {k.lower() for k, _ in headers}
    via = backend.get("Via")
    headers = [(k, v) for k, v in headers if k.lower() != "via"]
    headers.append(("Via", f"{via}, {VIA}" if via else VIA))
    if "x-request-id" not in names:
        headers.append(("X-Request-ID", request_id))
    return headers


def accel_redirect(backend: Mapping[str, str]) -> AccelRedirect | None:
    """nginx's X-Accel-Redirect: a path to serve instead of the backend's body, or None."""
    target = backend.get("X-Accel-Redirect")
    if target is None:
        return None
    target = target.strip()
    if not target.startswith("/") or target.startswith("//"):
        raise NotFound("X-Accel-Redirect must name a local path")
    getall = getattr(backend, "getall", None)
    overrides: list[tuple[str, str]] = []
    for name in ACCEL_KEPT:
        values = getall(name, []) if getall else [v for k, v in backend.items() if k == name]
        overrides += [(name, str(value)) for value in values]
    return AccelRedirect(target, overrides)


async def forward(
    request: web.BaseRequest,
    upstream: Upstream,
    tracked: Tracked,
    out: ResponseStream,
    timeouts_for: Callable[[str], EffectiveTimeouts],
) -> web.StreamResponse | AccelRedirect:
    """Forward to the backend; stream its answer, or return its X-Accel-Redirect."""
    backend = await upstream.send(
        request.method,
        request.raw_path,
        request_headers(request, tracked.request_id),
        request_body(request, upstream.max_body_size),
    )
    source = UpstreamBody(backend, upstream.name)
    try:
        redirect = accel_redirect(backend.headers)
        if redirect is not None:
            return redirect  # the backend's body is dropped by close() below
        headers = response_headers(backend.headers, tracked.request_id)
        status = backend.status
        if request.method == "HEAD" or status in (204, 304) or status < 200:
            resp = web.Response(status=status, reason=backend.reason, headers=headers)
            declared = backend.headers.get("Content-Length")
            if declared is not None and request.method == "HEAD":
                resp.headers["Content-Length"] = declared
            return resp
        streamed = web.StreamResponse(status=status, reason=backend.reason, headers=headers)
        length = backend.content_length
        if length is not None:
            streamed.content_length = length
        else:
            streamed.enable_chunked_encoding()
        writer = await out.start(request, streamed, tracked, length or 0)
        timeouts = timeouts_for(backend.headers.get("Content-Type", ""))
        if await out.stream(request, streamed, writer, source, length, tracked, timeouts):
            await out.complete(request, streamed, tracked)
        return streamed
    finally:
        source.close()
