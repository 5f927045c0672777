"""Map a raw request path to (route, key) by prefix, confining the key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from proxy.config import RouteConfig
from proxy.errors import BadRequest, NotFound

MAX_KEY_LENGTH: Final = 1024  # S3's own limit on key length


@dataclass(frozen=True, slots=True)
class Resolved:
    """A request path resolved to a route and the storage key it names."""

    route: RouteConfig
    key: str


class PathResolver:
    """First matching prefix wins (SPEC §2, `routes`)."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self._routes = tuple(routes)

    def resolve(self, raw_path: str, *, internal: bool = False) -> Resolved:
        """Resolve a raw (still percent-encoded) request target; raise NotFound or BadRequest.

        Routes marked `internal` exist only for X-Accel-Redirect (`internal=True`); to a
        client they are 404, and so is an internal redirect to a public route.
        """
        path = raw_path.split("?", 1)[0]
        for route in self._routes:
            if path.startswith(route.prefix):
                if route.internal != internal:
                    raise NotFound("internal route" if route.internal else "not internal")
                if route.upstream is not None:  # the backend sees the path as sent
                    return Resolved(route, path)
                return Resolved(route, confine_key(path[len(route.prefix) :]))
        raise NotFound("no route")


def confine_key(raw_key: str) -> str:
    """Percent-decode once and refuse any key that could name something outside its root."""
    try:
        key = unquote(raw_key, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("key is not UTF-8") from None
    return check_key(key)


def check_key(key: str) -> str:
    """Refuse a decoded key that could name something outside its root (a database row's
    key is plain text, not a URL: it is checked as it is, never decoded)."""
    if not key:
        raise NotFound("empty key")
    if len(key) > MAX_KEY_LENGTH:
        raise BadRequest("key too long")
    if key[0] == "/":
        raise BadRequest("absolute key")
    if not key.isprintable():  # NUL, other control and format characters
        raise BadRequest("control character in key")
    if "\\" in key:  # a path separator to some storages (SeaweedFS, Windows shares)
        raise BadRequest("backslash in key")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise BadRequest("empty, '.' or '..' segment in key")
    return key
