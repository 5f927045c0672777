"""Small files' 200s kept per request path, answered again after one lstat.

The first 200 of a small file on a public disk route (or a cached lookup route) leaves a
template: its headers serialized once. A later GET or HEAD of the same raw path with no
Range and no precondition is answered from it in one synchronous step, when the file is
still the same inode, size and mtime (and, on a lookup route, the cache still holds the
same row). Everything else goes the full way through the media handler.
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
            storage, meta, whole, fixed, headers["Content-Type"], row
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
        method, h = request.method, request.headers
        if (method != "GET" and method != "HEAD") or (
            "Range" in h
            or "If-None-Match" in h
            or "If-Modified-Since" in h
            or "If-Match" in h
            or "If-Unmodified-Since" in h
        ):
            return None
        storage, meta = template.storage, template.meta
        if not storage.unchanged(meta):
            del self._by_path[request.raw_path]
            return None
        transport, client, registry = request.transport, request.remote or "", self._registry
        if transport is None or transport.is_closing() or not registry.has_room(client):
            return None
        body = b""
        if method == "GET":
            try:
                body = storage.read_now(meta, template.whole)
            except ProxyError:  # replaced after the lstat, or a read error: the full path
                return None  # decides (and answers the error, if it persists)
        row = template.row
        if row is not None and not row[0].cache.holds(row[1], row[2]):
            return None  # the row expired or was loaded again: ask the database
        tracked = admit(request, client)  # cannot refuse: has_room said so, nothing awaited
        registry.attach(tracked, storage.name, meta.key, None)
        registry.headers_sent(tracked)
        keep_alive = request.keep_alive
        transport.write(
            fixed_response(template.fixed, tracked.request_id, request.version, keep_alive, body)
        )
        tracked.bytes_sent = len(body)
        if not request.protocol.writing_paused:
            registry.finish(tracked, COMPLETED, 200)
        return Sent(200, keep_alive, len(body)), tracked
