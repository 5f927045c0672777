"""A streamed response from headers to its one outcome (SPEC §4): start, pump, complete
or abort; and the lifecycle log lines (`stream.start`, `stream.end`, …) of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.config import EffectiveTimeouts
from proxy.errors import ProxyError
from proxy.log import log_event
from proxy.model import Body
from proxy.registry import (
    CLIENT_DISCONNECTED,
    COMPLETED,
    FAILED,
    TIMED_OUT,
    Registry,
    Tracked,
)
from proxy.stream import pump

log = logging.getLogger("proxy.stream")
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class ResponseStream:
    """Send streamed responses and record how each ended, once."""

    def __init__(self, registry: Registry, *, chunk_size: int) -> None:
        self._registry = registry
        self._chunk = chunk_size

    async def start(
        self, request: web.BaseRequest, resp: web.StreamResponse, tracked: Tracked, length: int
    ) -> AbstractStreamWriter:
        """Send the headers of a streamed response (inside the handler, pitfalls P4)."""
        self._registry.headers_sent(tracked)
        log_event(
            log,
            "stream.start",
            conn=tracked.id,
            request_id=tracked.request_id,
            key=tracked.key,
            range=tracked.range,
            status=resp.status,
            length=length,
            first_byte_ms=round((tracked.first_byte_s or 0.0) * 1000, 3),
        )
        writer = await resp.prepare(request)
        if writer is None:  # only when the connection is already gone
            raise ConnectionResetError("client went away")
        return writer

    async def complete(
        self, request: web.BaseRequest, resp: web.StreamResponse, tracked: Tracked
    ) -> None:
        try:
            await resp.write_eof()
        except ConnectionError:
            abort(request, resp)
            self.end(tracked, CLIENT_DISCONNECTED)
            return
        # A backend's 5xx passed through is a failure too (SPEC §4: completed is below 500).
        self.end(tracked, COMPLETED if resp.status < 500 else FAILED, resp.status)

    def end(self, tracked: Tracked, outcome: str, status: int | None = None) -> None:
        if self._registry.finish(tracked, outcome, status):
            if outcome == CLIENT_DISCONNECTED:
                log_end(tracked, "stream.client_disconnected")
            elif outcome == TIMED_OUT:
                log_end(tracked, "stream.timed_out", logging.WARNING)
            log_end(
                tracked, "stream.end", logging.INFO if outcome == COMPLETED else logging.WARNING
            )

    async def stream(
        self,
        request: web.BaseRequest,
        resp: web.StreamResponse,
        writer: AbstractStreamWriter,
        body: Body,
        length: int | None,
        tracked: Tracked,
        timeouts: EffectiveTimeouts,
    ) -> bool:
        """Pump one range; on failure after headers abort the connection (pitfalls P1, P2)."""
        deadline = None
        if timeouts.max_duration:
            loop = asyncio.get_running_loop()
            left = tracked.started + timeouts.max_duration - time.monotonic()
            deadline = loop.time() + left
        try:
            await pump(
                request,
                writer,
                body,
                length,
                tracked,
                chunk_size=self._chunk,
                idle_timeout_s=timeouts.idle,
                deadline=deadline,
            )
            return True
        except ConnectionError:
            abort(request, resp)
            self.end(tracked, CLIENT_DISCONNECTED)
        except TimeoutError:  # idle, max_duration, or the storage's own read timeout
            abort(request, resp, reset=True)
            self.end(tracked, TIMED_OUT)
        except (ProxyError, OSError) as exc:  # storage failure mid-body (sendfile can raise EIO)
            abort(request, resp)
            log_event(
                log,
                "stream.failed",
                logging.WARNING,
                conn=tracked.id,
                request_id=tracked.request_id,
                error=getattr(exc, "code", "storage_error"),
                reason=str(exc),
            )
            self.end(tracked, FAILED)
        return False


def abort(request: web.BaseRequest, resp: web.StreamResponse, *, reset: bool = False) -> None:
    """Close at once, never finish the response (pitfalls P1, P2).

    `reset` (timeouts) sends an RST and drops what the kernel still queues for a client
    that stopped reading, like nginx's `reset_timedout_connection`; otherwise the client
    gets the bytes already sent, then EOF short of Content-Length, and can resume.
    """
    resp.force_close()
    transport = request.transport
    if transport is not None:
        if reset:
            reset_connection(transport)
        else:
            transport.abort()


def reset_connection(transport: asyncio.Transport) -> None:
    """Abort with an RST: the kernel drops what it still queues for the client."""
    with contextlib.suppress(AttributeError, OSError):
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def log_end(tracked: Tracked, event: str, level: int = logging.INFO) -> None:
    """One lifecycle line (stream.end, stream.client_disconnected, stream.timed_out)."""
    log_event(
        log,
        event,
        level,
        conn=tracked.id,
        request_id=tracked.request_id,
        key=tracked.key,
        outcome=tracked.outcome,
        status=tracked.status,
        bytes=tracked.bytes_sent,
        duration_ms=round((time.monotonic() - tracked.started) * 1000, 3),
    )
