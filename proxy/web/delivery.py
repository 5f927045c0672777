"""Whole responses delivered inside the handler: one write, a bounded drain, one outcome.

A whole response is handed to the transport here rather than by aiohttp afterwards, so
that a client that leaves during the write is counted as such (SPEC §4).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import orjson
from aiohttp import web

from proxy.config import EffectiveTimeouts
from proxy.log import log_event
from proxy.registry import CLIENT_DISCONNECTED, COMPLETED, FAILED, TIMED_OUT, Registry, Tracked
from proxy.web.streaming import ResponseStream, reset_connection
from proxy.web.wire import Sent, Whole, serialize

log = logging.getLogger("proxy.stream")

_INTERNAL_ERROR: Final = Whole(
    500, {"Content-Type": "application/json"}, orjson.dumps({"error": "internal_error"})
)


class Delivery:
    """Write whole responses now and record how each ended, once."""

    def __init__(
        self,
        registry: Registry,
        out: ResponseStream,
        timeouts_for: Callable[[str], EffectiveTimeouts],
    ) -> None:
        self._registry = registry
        self._out = out
        self._timeouts_for = timeouts_for

    async def deliver(
        self, request: web.BaseRequest, resp: web.StreamResponse | Whole, tracked: Tracked
    ) -> web.StreamResponse:
        """Write a whole response now and record its outcome (5xx: failed or timed out)."""
        status = resp.status
        if status < 300:
            self._registry.headers_sent(tracked)
        try:
            if isinstance(resp, Whole):
                sent: web.StreamResponse = await self.write(request, resp)
                status = sent.status  # a 500 if its headers could not be written
                tracked.bytes_sent = sent.body_length
            else:  # a backend's bodiless answer (HEAD, 204, 304) keeps aiohttp's writer
                sent = resp
                await resp.prepare(request)
                await resp.write_eof()
        except ConnectionError:
            if status < 500:  # a server-side failure stays the reason it ended
                self._out.end(tracked, CLIENT_DISCONNECTED)
                return gone(resp)
        except TimeoutError:  # the client stopped reading a response it asked for
            if request.transport is not None:
                reset_connection(request.transport)
            self._out.end(tracked, TIMED_OUT)
            return gone(resp)
        outcome = COMPLETED if status < 500 else TIMED_OUT if status == 504 else FAILED
        self._registry.finish(tracked, outcome, status)
        return sent if status == resp.status else gone(resp)

    async def write(self, request: web.BaseRequest, whole: Whole) -> Sent:
        """Hand a whole response to the transport in one write; wait (idle-bounded) only
        when the client is not reading and the transport's buffer is over its high water."""
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        keep_alive, head_only = request.keep_alive, request.method == "HEAD"
        try:
            data = serialize(whole, request.version, keep_alive, head_only)
        except ValueError as exc:  # e.g. a newline in a database column: never split headers
            log_event(log, "request.failed", logging.WARNING, request_id=whole.headers.get(
                "X-Request-ID"), error="bad_header", reason=str(exc))  # fmt: skip
            transport.write(serialize(_INTERNAL_ERROR, request.version, False, head_only))
            return Sent(500, False, 0)
        transport.write(data)
        await self.drained(request, whole.headers.get("Content-Type", ""))
        return Sent(whole.status, keep_alive, 0 if head_only else len(whole.body))

    async def drained(self, request: web.BaseRequest, content_type: str) -> None:
        """Wait until the transport's buffer is under its high water; TimeoutError after
        `idle` (of the content type's class) without that."""
        if request.protocol.writing_paused:
            async with asyncio.timeout(self._timeouts_for(content_type).idle or None):
                await request.writer.drain()


def gone(resp: web.StreamResponse | Whole) -> web.StreamResponse:
    """What aiohttp gets for a response that ended without being (wholly) sent."""
    if isinstance(resp, Whole):
        return Sent(resp.status, False, 0)
    resp.force_close()
    return resp
