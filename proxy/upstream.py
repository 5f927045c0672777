"""The existing backend behind `upstream` routes (SPEC §8): one bounded keep-alive pool.

The backend is reached like a storage: a response body is a `Body` the streaming engine
pumps with the same backpressure, timeouts and accounting, and the backend appears in
/stats among the storages (type "upstream").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Final
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from proxy.config import UpstreamConfig
from proxy.errors import (
    RequestTooLarge,
    StorageError,
    StorageTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
)

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def end_to_end(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Headers without hop-by-hop ones, including those the Connection header names."""
    named = {
        token.strip().lower()
        for value in _all(headers, "Connection")
        for token in value.split(",")
        if token.strip()
    }
    drop = HOP_BY_HOP | named
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    value = headers.get(name)
    return [value] if value is not None else []


def _cause(exc: BaseException, kind: type[RequestTooLarge]) -> RequestTooLarge | None:
    """The first `kind` in an exception's cause/context chain."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class UpstreamBody:
    """A backend response body read in pieces; `close` returns or drops the connection."""

    __slots__ = ("_name", "_resp", "remaining")

    def __init__(self, resp: aiohttp.ClientResponse, name: str) -> None:
        self._resp = resp
        self._name = name
        self.remaining = resp.content_length  # None: until EOF (chunked)

    async def read(self, n: int) -> bytes:
        try:
            data = await self._resp.content.read(n)
        except TimeoutError as exc:
            raise StorageTimeout("upstream body read timed out", storage=self._name) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise StorageError(f"upstream body failed: {exc}", storage=self._name) from exc
        return data

    def close(self) -> None:
        """Back to the pool when read to the end, else the connection is closed."""
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


class Upstream:
    """The backend of one `upstreams:` entry."""

    kind = "upstream"

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        self.max_body_size = cfg.max_body_size
        self._session: aiohttp.ClientSession | None = None
        self._connector: aiohttp.TCPConnector | None = None

    async def start(self) -> None:
        cfg = self.cfg
        self._connector = aiohttp.TCPConnector(
            limit=cfg.max_connections, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            # connect covers waiting for a pool slot too (pitfalls P7): bounded, never a hang
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=cfg.connect_timeout + cfg.response_timeout,
                sock_connect=cfg.connect_timeout,
            ),
            auto_decompress=False,  # bytes pass through as the backend encoded them
            # Only the client's headers go on: nothing of aiohttp's own making.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def send(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send one request; the response headers within response_timeout, or 502/504."""
        assert self._session is not None
        # One spelling per name: aiohttp keeps only the last of `X-A`, `x-a` (case-sensitive
        # bookkeeping), which would drop repeated headers sent in mixed case.
        headers = [(k.title(), v) for k, v in headers]
        try:
            async with asyncio.timeout(self.cfg.response_timeout):
                return await self._session.request(
                    method,
                    URL(self.base + target, encoded=True),  # the target exactly as sent
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    compress=None,
                    read_bufsize=64 * 1024,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                "backend sent no response headers in time", storage=self.name
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            too_large = _cause(exc, RequestTooLarge)  # raised by the body stream, wrapped
            if too_large is not None:
                raise too_large from None
            raise UpstreamUnavailable(f"backend unreachable: {exc}", storage=self.name) from exc

    def in_use(self) -> int:
        connector = self._connector
        return len(connector._acquired) if connector is not None else 0  # no public gauge

    def idle(self) -> int:
        connector = self._connector
        if connector is None:
            return 0
        return sum(len(conns) for conns in connector._conns.values())

    def figures(self) -> dict[str, int]:
        return {}

    async def probe(self) -> None:
        """A TCP connection to the backend opens."""
        parts = urlsplit(self.base)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            async with asyncio.timeout(self.cfg.connect_timeout):
                _, writer = await asyncio.open_connection(parts.hostname, port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"backend unreachable: {exc}", storage=self.name) from None
        writer.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
