"""Small files' 200s kept per request path, answered again after one lstat.

The first 200 of a small file on a public disk route (or a lookup route) leaves a
template: its headers serialized once. A later GET or HEAD of the same raw path with no
Range and no precondition is answered from it in one synchronous step, when the file is
still the same inode, size and mtime, and on a lookup route the row is the same: on a
cached route, the cache still holds it (checked before anything else); on an uncached one
(`cache_ttl: 0`), the row this request's own query returned is equal to it (checked after
the query: `send_resolved`). Everything else goes the full way through the media handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple

from aiohttp import web

from proxy.errors import ProxyError
from proxy.model import ByteRange, ObjectMeta, Storage
from proxy.registry import COMPLETED, Registry, Tracked
from proxy.resolver.lookup import LookupResolver, MediaRow
from proxy.storage.disk import DiskStorage
from proxy.web.wire import Sent, fixed_fields, fixed_response

MAX_TEMPLATES: Final = 4096  # by raw path; cleared when full, like the handler's other caches

# The route's cache, the row's key in it and the row a template was made from.
RowCheck = tuple[LookupResolver, tuple[str, str | None], MediaRow]


class Template(NamedTuple):
    """One small file's 200 as it was sent, less the per-request headers."""

    storage: DiskStorage
    meta: ObjectMeta
    whole: ByteRange
    fixed: bytes  # every header but the per-request ones, Content-Length included
    content_type: str  # chooses the idle timeout while a client does not take the bytes
    row: RowCheck | None
    after_query: bool  # an uncached lookup's: only its own query's row may choose it


class Templates:
    """The templates of one media handler (one configuration)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._by_path: dict[str, Template] = {}

    def get(self, raw_path: str) -> Template | None:
        return self._by_path.get(raw_path)

    def remember(
        self,
        raw_path: str,
        storage: Storage,
        meta: ObjectMeta,
        headers: dict[str, str],
        row: RowCheck | None,
        *,
        after_query: bool = False,
    ) -> None:
        """Keep the headers of a small file's 200 (`headers` as sent, request id aside)."""
        if not isinstance(storage, DiskStorage) or not storage.plain_path(meta):
            return  # through a symlink: resolved again on every request
        fields = {name: value for name, value in headers.items() if name != "X-Request-ID"}
        try:
            fixed = fixed_fields(fields, meta.size)
        except ValueError:  # a header that cannot be written: the full path answers it, once
            return
        if len(self._by_path) >= MAX_TEMPLATES:
            self._by_path.clear()
        whole = ByteRange(0, meta.size - 1)
        self._by_path[raw_path] = Template(
            storage, meta, whole, fixed, headers["Content-Type"], row, after_query
        )

    def send(
        self,
        template: Template,
        request: web.BaseRequest,
        admit: Callable[[web.BaseRequest, str], Tracked],
    ) -> tuple[Sent, Tracked] | None:
        """Answer from `template` in one synchronous step, or None with nothing done.

        None (nothing counted) when the request has a Range or a precondition, the file or
        row changed, the connection is closing or admission would refuse: the full path
        then answers it. Otherwise the request is admitted (`admit`) and counted like any
        other; it stays active only while the client has not taken the bytes.
        """
        if template.after_query or not plain_request(request):
            return None
        body = self._checked_body(template, request)
        if body is None or not self._registry.has_room(client := request.remote or ""):
            return None
        row = template.row  # last: a hit is counted only for a request answered here
        if row is not None and not row[0].cache.holds(row[1], row[2]):
            return None  # the row expired or was loaded again: ask the database
        tracked = admit(request, client)  # cannot refuse: has_room said so, nothing awaited
        return self._write(template, request, tracked, body), tracked

    def send_resolved(
        self, template: Template, request: web.BaseRequest, tracked: Tracked, row: MediaRow
    ) -> Sent | None:
        """Answer an admitted request whose uncached lookup returned `row` from `template`,
        or None with nothing sent (a different row, a Range, a changed file…)."""
        if (
            not template.after_query
            or template.row is None
            or template.row[2] != row
            or not plain_request(request)
        ):
            return None
        body = self._checked_body(template, request)
        return None if body is None else self._write(template, request, tracked, body)

    def _checked_body(self, template: Template, request: web.BaseRequest) -> bytes | None:
        """The body to send (b"" for HEAD), or None: the file changed, or the connection."""
        storage, meta = template.storage, template.meta
        if not storage.unchanged(meta):
            del self._by_path[request.raw_path]
            return None
        transport = request.transport
        if transport is None or transport.is_closing():
            return None
        if request.method == "HEAD":
            return b""
        try:
            return storage.read_now(meta, template.whole)
        except ProxyError:  # replaced after the lstat, or a read error: the full path
            return None  # decides (and answers the error, if it persists)

    def _write(
        self, template: Template, request: web.BaseRequest, tracked: Tracked, body: bytes
    ) -> Sent:
        registry = self._registry
        registry.attach(tracked, template.storage.name, template.meta.key, None)
        registry.headers_sent(tracked)
        keep_alive = request.keep_alive
        assert request.transport is not None  # _checked_body saw it open, nothing awaited since
        request.transport.write(
            fixed_response(template.fixed, tracked.request_id, request.version, keep_alive, body)
        )
        tracked.bytes_sent = len(body)
        if not request.protocol.writing_paused:
            registry.finish(tracked, COMPLETED, 200)
        return Sent(200, keep_alive, len(body))


def plain_request(request: web.BaseRequest) -> bool:
    """GET or HEAD with no Range and no precondition: what a template can answer."""
    method, h = request.method, request.headers
    return (method == "GET" or method == "HEAD") and not (
        "Range" in h
        or "If-None-Match" in h
        or "If-Modified-Since" in h
        or "If-Match" in h
        or "If-Unmodified-Since" in h
    )
