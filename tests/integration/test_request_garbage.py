"""A finished request leaves no reference cycle: reference counting frees it at once.

Whatever the cycle collector has to find, it finds with the event loop stopped. While each
request held its registry entry and the entry held the request, about ten objects per
request (the request, its headers, URL and writer) waited for it: under load a young
collection every hundred requests, an older one (3-6 ms) every few hundred, and full ones
of 20 ms, in the p99 of every route and 10-15 % of the sidecar's CPU.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.db import PREPARE_THRESHOLD
from proxy.registry import Tracked
from tests import upstream_backend
from tests.conftest import FILES, start_sidecar_in_process
from tests.integration import rawhttp
from tests.integration.sidecars import running_backend
from tests.pg import LOOKUP_QUERY, PgServer

pytestmark = pytest.mark.integration

DSN_ENV = "TEST_GARBAGE_DATABASE_URL"
KEY_ENV = "TEST_GARBAGE_SIGNING_KEY"
HELLO = FILES["hello.txt"]
# (method, target, headers, status, body): every kind of answer the media handler gives.
REQUESTS: list[tuple[str, str, dict[str, str], int, bytes | None]] = [
    ("GET", "/media/hello.txt", {}, 200, HELLO),  # a small file: its template
    ("GET", "/media/hello.txt", {"Range": "bytes=5-9"}, 206, HELLO[5:10]),  # the full path
    ("HEAD", "/media/hello.txt", {}, 200, b""),
    ("GET", "/media/hello.txt", {"Range": "bytes=99999-"}, 416, None),
    ("GET", "/media/missing.bin", {}, 404, None),
    ("GET", "/media/%2e%2e/secret", {}, 400, None),  # refused before any storage
    ("GET", "/media/big.bin", {"Range": "bytes=0-99999"}, 206, FILES["big.bin"][:100_000]),
    ("GET", "/s3/hello.txt", {"Range": "bytes=0-9"}, 206, HELLO[:10]),  # S3
    ("GET", "/api/media/m-hello", {}, 200, HELLO),  # a cached lookup
    ("GET", "/api/media/m-unknown", {}, 404, None),  # negative caching
    ("GET", "/nocache/m-hello", {}, 200, HELLO),  # uncached: a query, then the template
    ("GET", "/nocache/m-hello/nested", {}, 200, FILES["sub/dir/nested.bin"]),  # a variant
    ("GET", "/nocache/m-pending", {}, 404, None),  # not ready
    ("GET", "/signed/m-pic?expires=4102444800&sig=forged", {}, 403, None),  # a private row
    ("GET", "/app/hello", {}, 200, upstream_backend.HELLO),  # forwarded to the backend
    ("GET", "/app/accel/hello.txt", {}, 200, HELLO),  # its X-Accel-Redirect, from disk
]


@contextmanager
def garbage_kept() -> Iterator[list[Any]]:
    """The collector off; what it then finds unreachable is kept in the list, not freed."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def serve_all(port: int) -> None:
    for method, target, headers, status, body in REQUESTS:
        resp = await rawhttp.request(port, target, method, headers)
        assert resp.status == status, (target, headers, resp.status, resp.body[:200])
        if body is not None:
            assert resp.body == body, target


async def check_nothing_left_to_the_collector(config: dict[str, Any]) -> None:
    """Serve REQUESTS with the collector off; fail if a request (or its Tracked) was left to it."""
    sidecar = await start_sidecar_in_process(config)
    try:
        # What lives on is made first: templates, pooled connections, prepared statements.
        for _ in range(PREPARE_THRESHOLD + 1):
            await serve_all(sidecar.media_port)
        with garbage_kept() as garbage:
            for _ in range(3):
                await serve_all(sidecar.media_port)
            gc.collect()
            cyclic = [type(o).__name__ for o in garbage if isinstance(o, web.BaseRequest | Tracked)]
        assert cyclic == [], f"{len(cyclic)} requests were left to the cycle collector"
        assert sidecar.registry.active == {}
    finally:
        await sidecar.stop()


async def test_finished_requests_are_freed_without_the_cycle_collector(
    sidecar_config: dict[str, Any],
    pg_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv(DSN_ENV, pg_server.dsn)
    monkeypatch.setenv(KEY_ENV, "garbage-test-key-0123456789abcdef")
    sidecar_config["database"] = {"dsn_env": DSN_ENV, "pool_max": 2}
    sidecar_config["routes"] = [
        {"prefix": "/api/media/", "lookup": {"query": f"/* garbage cached */ {LOOKUP_QUERY}"}},
        {
            "prefix": "/nocache/",
            "lookup": {"query": f"/* garbage */ {LOOKUP_QUERY}", "cache_ttl": 0},
        },
        {
            "prefix": "/signed/",
            "lookup": {"query": f"/* garbage signed */ {LOOKUP_QUERY}"},
            "access": {"mode": "signed", "keys_env": [KEY_ENV]},
        },
        {"prefix": "/app/", "upstream": "app"},
        {"prefix": "/protected/", "storage": "local", "internal": True},
        *sidecar_config["routes"],
    ]
    with running_backend(tmp_path) as backend:  # its own process: its requests are not ours
        sidecar_config["upstreams"] = {"app": {"url": backend.url}}
        await check_nothing_left_to_the_collector(sidecar_config)
