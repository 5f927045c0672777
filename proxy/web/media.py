"""GET/HEAD on media routes: resolve → stat → conditional.decide → stream.pump."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
from collections.abc import Awaitable, Mapping
from typing import Final, TypeVar

import orjson
from aiohttp import web

from proxy.conditional import Decision, decide, http_date
from proxy.config import Config, EffectiveTimeouts
from proxy.errors import (
    MethodNotAllowed,
    ObjectChanged,
    ProxyError,
    StorageTimeout,
)
from proxy.log import log_event
from proxy.mediatype import guess_type
from proxy.model import Body, ByteRange, ObjectMeta, Storage
from proxy.ranges import content_range, unsatisfied_content_range
from proxy.resolver.path import PathResolver, Resolved
from proxy.stream import pump

log = logging.getLogger("proxy.stream")
T = TypeVar("T")

ALLOW: Final = "GET, HEAD"
REQUEST_ID: Final = web.RequestKey("request_id", str)
_SANE_REQUEST_ID: Final = re.compile(r"[!-~]{1,128}")
_JSON: Final = "application/json"
_CACHE_MAX: Final = 4096


_ID_PREFIX: Final = secrets.token_hex(4)
_id_counter = itertools.count(1)


def request_id(request: web.BaseRequest) -> str:
    """Take a sane X-Request-ID from the request, else make one unique to this process."""
    given = request.headers.get("X-Request-ID")
    if given is not None and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def error_response(
    exc: ProxyError, rid: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A small JSON body `{"error": code}`; never a traceback."""
    resp = web.Response(
        status=exc.status, body=orjson.dumps({"error": exc.code}), content_type=_JSON
    )
    resp.headers["X-Request-ID"] = rid
    if headers:
        resp.headers.update(headers)
    return resp


class MediaHandler:
    """Serve objects of the configured storages on the configured routes."""

    def __init__(self, cfg: Config, storages: Mapping[str, Storage]) -> None:
        self._cfg = cfg
        self._storages = storages
        self._resolver = PathResolver(cfg.routes)
        self._chunk = cfg.limits.chunk_size
        self._first_byte_s = cfg.timeouts.upstream_first_byte
        self._timeouts: dict[str, EffectiveTimeouts] = {}  # by content type, bounded below
        self._dates: dict[int, str] = {}  # Last-Modified strings, bounded below

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        rid = request_id(request)
        request[REQUEST_ID] = rid
        try:
            if request.method not in ("GET", "HEAD"):
                raise MethodNotAllowed(request.method)
            resolved = self._resolver.resolve(request.raw_path)
            try:
                return await self._serve(request, resolved, rid)
            except ObjectChanged:  # replaced between stat and open: decide again, once
                return await self._serve(request, resolved, rid)
        except ProxyError as exc:
            extra = {"Allow": ALLOW} if isinstance(exc, MethodNotAllowed) else None
            if exc.status >= 500:
                log_event(
                    log,
                    "request.failed",
                    logging.WARNING,
                    request_id=rid,
                    error=exc.code,
                    reason=str(exc),
                )
            return error_response(exc, rid, extra)
        except ConnectionError:  # the client left before headers went out: not our failure
            log_event(log, "stream.client_disconnected", request_id=rid, stage="headers")
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)  # never sent; names the outcome for the access log
        except Exception:  # a bug: log it here, answer small JSON, never a traceback
            log.exception("request.crashed", extra={"request_id": rid})
            return error_response(ProxyError("internal error"), rid)

    async def _serve(
        self, request: web.BaseRequest, resolved: Resolved, rid: str
    ) -> web.StreamResponse:
        route = resolved.route
        storage = self._storages[route.storage]
        meta = await _timed(storage, storage.stat(resolved.key), self._first_byte_s)
        decision = decide(request.method, meta, request.headers)

        headers = {"ETag": meta.etag, "X-Request-ID": rid, "Accept-Ranges": "bytes"}
        if meta.last_modified is not None:
            headers["Last-Modified"] = self._http_date(meta.last_modified)
        if route.cache_control:
            headers["Cache-Control"] = route.cache_control
        status = decision.status
        if status == 304:
            return web.Response(status=304, headers=headers)
        if status == 412:
            return _json(412, "precondition_failed", headers)
        if status == 416:
            headers["Content-Range"] = unsatisfied_content_range(meta.size)
            return _json(416, "range_not_satisfiable", headers)

        ctype = meta.content_type or guess_type(resolved.key)
        headers["X-Content-Type-Options"] = "nosniff"
        ranges = decision.ranges if status == 206 else _whole(meta.size)
        timeouts = self._timeouts_for(ctype)
        if len(ranges) > 1:
            return await self._multipart(request, storage, meta, decision, ctype, headers, timeouts)
        if status == 206:
            headers["Content-Range"] = content_range(ranges[0], meta.size)
        headers["Content-Type"] = ctype
        length = ranges[0].length if ranges else 0
        if request.method == "HEAD" or length == 0:
            headers["Content-Length"] = str(length)
            return web.Response(status=status, headers=headers)

        if length <= self._chunk:  # small: one read, one write carries headers and bytes
            first_byte_s = timeouts.upstream_first_byte
            data = await _timed(storage, storage.read(meta, ranges[0]), first_byte_s)
            return web.Response(status=status, headers=headers, body=data)
        first_byte_s = timeouts.upstream_first_byte
        body = await _timed(storage, storage.open(meta, ranges[0]), first_byte_s)
        try:
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = length
            await resp.prepare(request)  # inside the handler, under our timeouts (P4)
            await _stream(request, resp, body, length, self._chunk, timeouts.idle)
            return resp
        finally:
            body.close()

    def _http_date(self, epoch_s: int) -> str:
        text = self._dates.get(epoch_s)
        if text is None:
            if len(self._dates) >= _CACHE_MAX:
                self._dates.clear()
            text = self._dates[epoch_s] = http_date(epoch_s)
        return text

    def _timeouts_for(self, content_type: str) -> EffectiveTimeouts:
        found = self._timeouts.get(content_type)
        if found is None:
            if len(self._timeouts) >= _CACHE_MAX:
                self._timeouts.clear()
            found = self._cfg.timeouts.for_content_type(content_type)
            self._timeouts[content_type] = found
        return found

    async def _multipart(
        self,
        request: web.BaseRequest,
        storage: Storage,
        meta: ObjectMeta,
        decision: Decision,
        ctype: str,
        headers: dict[str, str],
        timeouts: EffectiveTimeouts,
    ) -> web.StreamResponse:
        """RFC 9110 §14.6 multipart/byteranges (GET only), one storage read per part."""
        boundary = secrets.token_hex(16)
        heads = [
            f"--{boundary}\r\nContent-Type: {ctype}\r\n"
            f"Content-Range: {content_range(r, meta.size)}\r\n\r\n".encode("latin-1")
            for r in decision.ranges
        ]
        tail = f"--{boundary}--\r\n".encode("latin-1")
        total = sum(len(h) + r.length + 2 for h, r in zip(heads, decision.ranges, strict=True))
        headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
        resp = web.StreamResponse(status=206, headers=headers)
        resp.content_length = total + len(tail)
        first_byte_s = timeouts.upstream_first_byte
        # The first part is opened before the headers go out, so its failure is still a 5xx.
        body: Body | None = await _timed(
            storage, storage.open(meta, decision.ranges[0]), first_byte_s
        )
        try:
            await resp.prepare(request)
            for head, r in zip(heads, decision.ranges, strict=True):
                if body is None:
                    body = await _timed(storage, storage.open(meta, r), first_byte_s)
                await resp.write(head)
                if not await _stream(request, resp, body, r.length, self._chunk, timeouts.idle):
                    return resp
                await resp.write(b"\r\n")
                body.close()
                body = None
            await resp.write(tail)
            return resp
        except (ProxyError, TimeoutError, ConnectionError):
            _abort(request, resp)  # after headers: cut, never finish short (P1)
            return resp
        finally:
            if body is not None:
                body.close()


def _whole(size: int) -> tuple[ByteRange, ...]:
    return (ByteRange(0, size - 1),) if size else ()


def _json(status: int, code: str, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=status, headers=headers, body=orjson.dumps({"error": code}), content_type=_JSON
    )


async def _timed(storage: Storage, aw: Awaitable[T], timeout_s: float) -> T:
    """Await a storage call under the first-byte timeout; a timeout is a 504."""
    if storage.inline_io:  # nothing to interrupt, and the timer costs a heap push and pop
        return await aw
    try:
        async with asyncio.timeout(timeout_s or None):
            return await aw
    except TimeoutError:
        raise StorageTimeout("storage did not answer in time", storage=storage.name) from None


async def _stream(
    request: web.BaseRequest,
    resp: web.StreamResponse,
    body: Body,
    length: int,
    chunk: int,
    idle_s: float,
) -> bool:
    """Pump one range; on failure after headers abort the connection (pitfalls P1, P2)."""
    try:
        await pump(request, resp, body, length, chunk_size=chunk, idle_timeout_s=idle_s)
        return True
    except ConnectionError:
        _abort(request, resp)
        log_event(log, "stream.client_disconnected", request_id=request[REQUEST_ID])
    except TimeoutError:
        _abort(request, resp)
        log_event(log, "stream.timed_out", logging.WARNING, request_id=request[REQUEST_ID])
    except (ProxyError, OSError) as exc:  # storage failure mid-body (sendfile can raise EIO)
        _abort(request, resp)
        log_event(
            log,
            "stream.failed",
            logging.WARNING,
            request_id=request[REQUEST_ID],
            error=getattr(exc, "code", "storage_error"),
            reason=str(exc),
        )
    return False


def _abort(request: web.BaseRequest, resp: web.StreamResponse) -> None:
    resp.force_close()
    if request.transport is not None:
        request.transport.abort()
