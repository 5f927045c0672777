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

from proxy.access import AccessPolicy
from proxy.conditional import decide, http_date
from proxy.config import Config, EffectiveTimeouts
from proxy.errors import (
    Forbidden,
    MethodNotAllowed,
    ObjectChanged,
    Overloaded,
    ProxyError,
    StorageTimeout,
)
from proxy.log import log_event
from proxy.mediatype import content_disposition, guess_type
from proxy.model import ByteRange, Opened, Storage, read_exactly
from proxy.ranges import content_range, lone_range, unsatisfied_content_range
from proxy.registry import (
    CLIENT_DISCONNECTED,
    COMPLETED,
    FAILED,
    TIMED_OUT,
    Registry,
    Tracked,
)
from proxy.resolver.lookup import LookupResolver, MediaRow, Querier, split_id
from proxy.resolver.path import PathResolver, Resolved
from proxy.upstream import Upstream
from proxy.web.byteranges import send_byteranges
from proxy.web.delivery import Delivery, gone
from proxy.web.forward import AccelRedirect, forward
from proxy.web.streaming import ResponseStream, reset_connection
from proxy.web.template import Template, Templates, plain_request
from proxy.web.wire import Sent, Whole

log = logging.getLogger("proxy.stream")
T = TypeVar("T")

ALLOW: Final = "GET, HEAD"
REQUEST_ID: Final = web.RequestKey("request_id", str)
TRACKED: Final = web.RequestKey("tracked", Tracked)
_SANE_REQUEST_ID: Final = re.compile(r"[!-~]{1,128}")
_JSON: Final = "application/json"
_CACHE_MAX: Final = 4096
# Requests that carry these are answered from metadata first (often a 304), never a GET.
_PRECONDITIONS: Final = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")


_ID_PREFIX: Final = secrets.token_hex(4)
_id_counter = itertools.count(1)


def request_id(request: web.BaseRequest) -> str:
    """Take a sane X-Request-ID from the request, else make one unique to this process."""
    given = request.headers.get("X-Request-ID")
    if given is not None and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def error_response(exc: ProxyError, rid: str, headers: Mapping[str, str] | None = None) -> Whole:
    """A small JSON body `{"error": code}`; never a traceback."""
    body = {"error": exc.code}
    if isinstance(exc, Forbidden):  # why, in one word: expired, bad_signature, not_owner…
        body["reason"] = exc.reason
    fields = {"Content-Type": _JSON, "X-Request-ID": rid}
    if headers:
        fields.update(headers)
    return Whole(exc.status, fields, orjson.dumps(body))


class MediaHandler:
    """Serve objects of the configured storages on the configured routes.

    Every request is admitted by the registry and ends with exactly one outcome:
    a whole response is delivered inside the handler (not by aiohttp afterwards), so
    that a client that leaves during the write is counted as such (SPEC §4).
    """

    def __init__(
        self,
        cfg: Config,
        storages: Mapping[str, Storage],
        registry: Registry,
        *,
        db: Querier | None = None,
        keys: Mapping[str, bytes] | None = None,
        upstreams: Mapping[str, Upstream] | None = None,
    ) -> None:
        self._cfg = cfg
        self._storages = storages
        self._upstreams = upstreams or {}
        self._registry = registry
        # Per route prefix: the lookup of id routes, the access rule of non-public routes.
        self.lookups: dict[str, LookupResolver] = {}
        self._access: dict[str, AccessPolicy] = {}
        for route in cfg.routes:
            if route.lookup is not None:
                assert db is not None, "lookup routes need the database (config check)"
                self.lookups[route.prefix] = LookupResolver(route, db, storages)
            if route.access.mode != "public":
                route_keys = [(keys or {})[name] for name in route.access.keys_env]
                self._access[route.prefix] = AccessPolicy(route.access, keys=route_keys, db=db)
        self.in_flight = 0  # requests in this handler: its storages retire at 0 (reload)
        self._idle: asyncio.Event | None = None
        self._resolver = PathResolver(cfg.routes)
        self._chunk = cfg.limits.chunk_size
        self._out = ResponseStream(registry, chunk_size=self._chunk)
        self._log_debug = log.isEnabledFor(logging.DEBUG)
        self._first_byte_s = cfg.timeouts.upstream_first_byte
        self._timeouts: dict[str, EffectiveTimeouts] = {}  # by content type, bounded below
        self._dates: dict[int, str] = {}  # Last-Modified strings, bounded below
        self._templates = Templates(registry)
        self._delivery = Delivery(registry, self._out, self._timeouts_for)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        template = self._templates.get(request.raw_path)
        if template is not None:
            if template.after_query:  # an uncached lookup's: its own query decides first
                return await self._handle_fully(request, template)
            answered = self._templates.send(template, request, self._admit)
            if answered is not None:
                sent, tracked = answered
                if tracked.outcome is not None:
                    return sent
                return await self._drain_template(request, tracked, template, sent)
        return await self._handle_fully(request)

    def _admit(self, request: web.BaseRequest, client: str) -> Tracked:
        """Register the request (or raise Overloaded, counted `rejected`)."""
        rid = request_id(request)
        try:
            tracked = self._registry.admit(request.method, request.raw_path, client, rid)
        except Overloaded:
            request[REQUEST_ID] = rid
            raise
        request[TRACKED] = tracked
        tracked.request = request
        if self._log_debug:  # per request: not even the call when debug is off
            log_event(log, "request.start", logging.DEBUG, conn=tracked.id, request_id=rid)
        return tracked

    async def _handle_fully(
        self, request: web.BaseRequest, after_query: Template | None = None
    ) -> web.StreamResponse:
        """Every request the templates do not answer: admission, resolution, the storage.

        `after_query`: the template of an uncached lookup's path (_serve_after_query).
        """
        try:
            tracked = self._admit(request, request.remote or "")
        except Overloaded as exc:
            rid = request[REQUEST_ID]
            log_event(log, "request.rejected", logging.WARNING, request_id=rid, reason=str(exc))
            rejection = error_response(exc, rid, {"Retry-After": str(exc.retry_after_s)})
            try:
                return await self._delivery.write(request, rejection)
            except (ConnectionError, TimeoutError):
                return Sent(rejection.status, False, 0)
        rid = tracked.request_id
        self.in_flight += 1
        try:
            resp = await self._handle(request, tracked, rid, after_query)
            if tracked.outcome is None:  # a whole response: hand it over here, then count it
                return await self._delivery.deliver(request, resp, tracked)
            if isinstance(resp, Whole):  # it ended already (cut, aborted): nothing more goes out
                return Sent(resp.status, False, 0)
            return resp
        except asyncio.CancelledError:
            self._cancelled(request, tracked)
            raise
        finally:
            self.in_flight -= 1
            if self._idle is not None and not self.in_flight:
                self._idle.set()
            if tracked.outcome is None:  # something escaped above
                self._out.end(tracked, FAILED, 500)

    def _cancelled(self, request: web.BaseRequest, tracked: Tracked) -> None:
        if tracked.aborted:  # abort_active(): reset only now, once sendfile let go
            if request.transport is not None:
                reset_connection(request.transport)
            self._out.end(tracked, FAILED)
        else:  # the connection was lost (handler_cancellation): the client went away
            self._out.end(tracked, CLIENT_DISCONNECTED)

    async def wait_idle(self) -> None:
        """Return once no request is in this handler (a reload replaced it)."""
        if self.in_flight:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def abort_active(self, reason: str) -> int:
        """Reset every active media connection (shutdown deadline, pitfalls P2); count them.

        Each handler is cancelled; it resets its connection and records `failed`.
        """
        victims = list(self._registry.active.values())
        for tracked in victims:
            tracked.aborted = reason
            log_event(log, "stream.aborted", logging.WARNING, conn=tracked.id,
                      request_id=tracked.request_id, key=tracked.key, reason=reason)  # fmt: skip
            if tracked.request is not None:
                tracked.request.task.cancel()  # not transport.abort() under a running sendfile
        return len(victims)

    async def _handle(
        self, request: web.BaseRequest, tracked: Tracked, rid: str, after_query: Template | None
    ) -> web.StreamResponse | Whole:
        try:
            if after_query is not None and plain_request(request):
                return await self._serve_after_query(request, tracked, after_query)
            resolved = self._resolver.resolve(request.raw_path)
            method, overrides = request.method, None
            if resolved.route.upstream is not None:
                upstream = self._upstreams[resolved.route.upstream]
                self._registry.attach(
                    tracked, upstream.name, resolved.key, request.headers.get("Range")
                )
                forwarded = await forward(request, upstream, tracked, self._out, self._timeouts_for)
                if not isinstance(forwarded, AccelRedirect):
                    return forwarded
                # nginx's contract: serve the internal location with the client's own Range
                # and conditionals, as a GET (or HEAD), keeping some backend headers.
                resolved = self._resolver.resolve(forwarded.target, internal=True)
                method = "HEAD" if method == "HEAD" else "GET"
                overrides = forwarded.overrides
            elif method not in ("GET", "HEAD"):
                raise MethodNotAllowed(method)
            try:
                return await self._serve(request, resolved, tracked, method, overrides)
            except ObjectChanged:  # replaced between stat and open: decide again, once
                return await self._serve(request, resolved, tracked, method, overrides)
        except ProxyError as exc:
            extra = {"Allow": ALLOW} if isinstance(exc, MethodNotAllowed) else None
            if exc.status >= 500:
                log_event(
                    log,
                    "request.failed",
                    logging.WARNING,
                    conn=tracked.id,
                    request_id=rid,
                    error=exc.code,
                    reason=str(exc),
                )
            return error_response(exc, rid, extra)
        except ConnectionError:  # the client left before headers went out: not our failure
            self._out.end(tracked, CLIENT_DISCONNECTED)
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)  # never sent; names the outcome for the access log
        except Exception:  # a bug: log it here, answer small JSON, never a traceback
            log.exception("request.crashed", extra={"conn": tracked.id, "request_id": rid})
            return error_response(ProxyError("internal error"), rid)

    async def _drain_template(
        self, request: web.BaseRequest, tracked: Tracked, template: Template, sent: Sent
    ) -> web.StreamResponse:
        """The client is not taking a template's bytes: wait for it, bounded by `idle`."""
        try:
            await self._delivery.drained(request, template.content_type)
        except asyncio.CancelledError:
            self._cancelled(request, tracked)
            raise
        except ConnectionError:
            self._out.end(tracked, CLIENT_DISCONNECTED)
            return gone(sent)
        except TimeoutError:
            if request.transport is not None:
                reset_connection(request.transport)
            self._out.end(tracked, TIMED_OUT)
            return gone(sent)
        self._registry.finish(tracked, COMPLETED, 200)
        return sent

    async def _serve_after_query(
        self, request: web.BaseRequest, tracked: Tracked, template: Template
    ) -> web.StreamResponse | Whole:
        """A GET or HEAD of an uncached lookup's path that has a template: the query, then
        the template if the row is the one it was made from (send_resolved); else the full
        way with that row, so still one query per request.

        The template knows its route and id, so the path is not resolved again: with the
        steps of _serve it skips, 8-9 us (5 %) of such a request's CPU.
        """
        assert template.row is not None  # after_query templates are lookups'
        resolver, (media_id, variant), _ = template.row
        row = await resolver.resolve(media_id, variant)
        sent = self._templates.send_resolved(template, request, tracked, row)
        if sent is not None:  # the same row as last time: its small file's 200
            if tracked.outcome is not None:
                return sent
            return await self._drain_template(request, tracked, template, sent)
        resolved = self._resolver.resolve(request.raw_path)
        try:
            return await self._serve(request, resolved, tracked, request.method, queried=row)
        except ObjectChanged:  # replaced between stat and open: decide again, once
            return await self._serve(request, resolved, tracked, request.method, queried=row)

    async def _serve(
        self,
        request: web.BaseRequest,
        resolved: Resolved,
        tracked: Tracked,
        method: str,
        overrides: list[tuple[str, str]] | None = None,
        *,
        queried: MediaRow | None = None,
    ) -> web.StreamResponse | Whole:
        """`queried`: the lookup's row when this request ran its query already."""
        route = resolved.route
        policy = self._access.get(route.prefix)
        row = queried
        if route.lookup is not None:  # /<prefix>/<id>[/<variant>] through the database
            media_id, variant = split_id(resolved.key)
            if row is None:
                row = await self.lookups[route.prefix].resolve(media_id, variant)
                if policy is None and method == request.method:
                    template = self._templates.get(request.raw_path)
                    if template is not None:
                        sent = self._templates.send_resolved(template, request, tracked, row)
                        if sent is not None:  # the same row as last time: its small file's 200
                            if tracked.outcome is not None:
                                return sent
                            return await self._drain_template(request, tracked, template, sent)
            storage_name, key = row.storage, row.key
        else:
            media_id, variant, storage_name, key = None, None, route.storage or "", resolved.key
        if policy is not None:
            await policy.check(
                raw_path=request.raw_path.split("?", 1)[0],
                query=request.query,
                headers=request.headers,
                peer=request.remote or "",
                row=row,
                media_id=media_id,
            )
        storage = self._storages[storage_name]
        self._registry.attach(tracked, storage_name, key, request.headers.get("Range"))
        row_type = row.content_type if row is not None else None
        opened = await self._open_unseen(storage, key, row_type, method, request.headers)
        try:
            if opened is not None:
                meta = opened.meta
            else:
                meta = await _timed(storage, storage.stat(key), self._first_byte_s)
            decision = decide(method, meta, request.headers)

            headers = {
                "ETag": meta.etag,
                "X-Request-ID": tracked.request_id,
                "Accept-Ranges": "bytes",
            }
            if meta.last_modified is not None:
                headers["Last-Modified"] = self._http_date(meta.last_modified)
            if route.cache_control:
                headers["Cache-Control"] = route.cache_control
            if row is not None and row.filename:
                headers["Content-Disposition"] = content_disposition(row.filename)
            forced_type = None
            for name, value in overrides or ():  # the backend's headers win (X-Accel-Redirect)
                if name == "Content-Type":
                    forced_type = value
                else:
                    headers[name] = value
            status = decision.status
            if status == 304:
                return Whole(304, headers)
            if status == 412:
                return _json(412, "precondition_failed", headers)
            if status == 416:
                headers["Content-Range"] = unsatisfied_content_range(meta.size)
                return _json(416, "range_not_satisfiable", headers)

            ctype = (
                forced_type
                or (row.content_type if row else None)
                or meta.content_type
                or guess_type(key)
            )
            headers["X-Content-Type-Options"] = "nosniff"
            ranges = decision.ranges if status == 206 else _whole(meta.size)
            timeouts = self._timeouts_for(ctype)
            first_byte_s = timeouts.upstream_first_byte
            if len(ranges) > 1:
                return await send_byteranges(
                    request,
                    self._out,
                    tracked,
                    ranges=ranges,
                    size=meta.size,
                    ctype=ctype,
                    headers=headers,
                    open_part=lambda r: _timed(storage, storage.open(meta, r), first_byte_s),
                    timeouts=timeouts,
                )
            if status == 206:
                headers["Content-Range"] = content_range(ranges[0], meta.size)
            headers["Content-Type"] = ctype
            length = ranges[0].length if ranges else 0
            if method == "HEAD" or length == 0:
                return Whole(status, headers, length=length)

            # The GET sent before any HEAD serves when it holds exactly the bytes decided on.
            ready = opened.body if opened is not None and opened.byte_range == ranges[0] else None
            if ready is None and opened is not None:
                opened.body.close()  # other bytes were decided on: free its connection first
            if length <= self._chunk:  # small: one read, one write carries headers and bytes
                if ready is not None:
                    data = await _timed(storage, read_exactly(ready, length), first_byte_s)
                else:
                    data = await _timed(storage, storage.read(meta, ranges[0]), first_byte_s)
                # Never for signed or internal (X-Accel) routes: each request decides.
                if status == 200 and policy is None and not route.internal:
                    if row is None:
                        self._templates.remember(request.raw_path, storage, meta, headers, None)
                    else:
                        resolver = self.lookups[route.prefix]
                        check = (resolver, (media_id or "", variant), row)
                        self._templates.remember(
                            request.raw_path,
                            storage,
                            meta,
                            headers,
                            check,
                            after_query=not resolver.cache.enabled,
                        )
                return Whole(status, headers, data)
            body = ready
            if body is None:
                body = await _timed(storage, storage.open(meta, ranges[0]), first_byte_s)
            try:
                resp = web.StreamResponse(status=status, headers=headers)
                resp.content_length = length
                writer = await self._out.start(request, resp, tracked, length)
                if await self._out.stream(request, resp, writer, body, length, tracked, timeouts):
                    await self._out.complete(request, resp, tracked)
                return resp
            finally:
                body.close()
        finally:
            if opened is not None:  # unless a response took it (closing twice is harmless)
                opened.body.close()

    async def _open_unseen(
        self,
        storage: Storage,
        key: str,
        row_type: str | None,
        method: str,
        headers: Mapping[str, str],
    ) -> Opened | None:
        """GET before any HEAD when the answer will most likely be that GET's bytes.

        Not for HEAD, preconditions (mostly 304s: a GET would be wasted) or anything but one
        byte range; those stat first.
        """
        if storage.inline_io or method != "GET" or any(h in headers for h in _PRECONDITIONS):
            return None
        range_field = headers.get("Range")
        spec = None if range_field is None else lone_range(range_field)
        if range_field is not None and spec is None:
            return None
        # The first-byte timeout of the type the response will most likely have.
        first_byte_s = self._timeouts_for(row_type or guess_type(key)).upstream_first_byte
        return await _timed(storage, storage.open_unseen(key, spec), first_byte_s)

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


def _whole(size: int) -> tuple[ByteRange, ...]:
    return (ByteRange(0, size - 1),) if size else ()


def _json(status: int, code: str, headers: dict[str, str]) -> Whole:
    headers["Content-Type"] = _JSON
    return Whole(status, headers, orjson.dumps({"error": code}))


async def _timed(storage: Storage, aw: Awaitable[T], timeout_s: float) -> T:
    """Await a storage call under the first-byte timeout; a timeout is a 504."""
    if storage.inline_io:  # nothing to interrupt, and the timer costs a heap push and pop
        return await aw
    try:
        async with asyncio.timeout(timeout_s or None):
            return await aw
    except TimeoutError:
        raise StorageTimeout("storage did not answer in time", storage=storage.name) from None
