"""The admin listener (SPEC §5): health, stats, active connections and Prometheus metrics.

It runs on its own port and is never subject to the media listener's admission limits,
so an operator can still look inside while the media side is saturated.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from proxy import allocator
from proxy.db import Database
from proxy.errors import ProxyError
from proxy.model import Source
from proxy.registry import OUTCOMES, Registry
from proxy.resolver.lookup import LookupResolver

PROBE_TIMEOUT_S: Final = 2.0
PROBE_CACHE_S: Final = 1.0  # /health may be polled often; storages are probed at most this often
_JSON: Final = "application/json"
_PUBLIC_PATHS: Final = frozenset({"/health"})  # liveness probes carry no token
DATABASE: Final = "(database)"  # among the probes; not a valid storage name, so no clash
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminView:
    """What the admin endpoints read: the registry, the storages, and the process state."""

    def __init__(
        self,
        registry: Registry,
        storages: Mapping[str, Source],
        *,
        token: str | None,
        is_draining: Callable[[], bool] = lambda: False,
        database: Database | None = None,
        lookups: Callable[[], Mapping[str, LookupResolver]] = dict,
    ) -> None:
        self.registry = registry
        self.storages = storages
        self.token = token
        self.is_draining = is_draining
        self.database = database
        self.lookups = lookups
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.allocator = allocator.in_use()  # fixed at start: it reads /proc/self/maps
        self._probed_at = -PROBE_CACHE_S
        self._probe_results: dict[str, dict[str, Any]] = {}
        self._probe_lock = asyncio.Lock()

    async def probe_storages(self, *, fresh: bool = False) -> dict[str, dict[str, Any]]:
        """Probe every storage concurrently (each bounded), reusing a result < 1 s old."""
        async with self._probe_lock:  # concurrent callers share one round of probes
            if fresh or time.monotonic() - self._probed_at >= PROBE_CACHE_S:
                targets = {n: (s.kind, s.probe) for n, s in self.storages.items()}
                if self.database is not None:
                    targets[DATABASE] = ("postgresql", self.database.probe)
                results = await asyncio.gather(*(self._probe(k, p) for k, p in targets.values()))
                self._probe_results = dict(zip(targets, results, strict=True))
                self._probed_at = time.monotonic()
            return self._probe_results

    async def _probe(self, kind: str, probe: Callable[[], Awaitable[None]]) -> dict[str, Any]:
        started = time.monotonic()
        result: dict[str, Any] = {"type": kind}
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await probe()
            result["status"] = "ok"
        except TimeoutError:
            result.update(status="critical", error="probe timed out")
        except ProxyError as exc:
            result.update(status="critical", error=str(exc))
        result["latency_ms"] = round((time.monotonic() - started) * 1000, 3)
        return result

    def stats(self) -> dict[str, Any]:
        """Every figure of SPEC §5 `/stats`, read in one synchronous step."""
        reg = self.registry
        storages = {}
        for name, storage in self.storages.items():
            figures = reg.storage_figures(name)
            figures["type"] = storage.kind
            figures["upstream_in_use"] = storage.in_use()
            figures["upstream_idle"] = storage.idle()
            figures.update(storage.figures())
            storages[name] = figures
        return {
            "connections": reg.connections(),
            "responses": dict(reg.responses),
            "bytes_sent": reg.bytes_sent(),
            "storages": storages,
            "latency_ms": {"first_byte": reg.first_byte.percentiles_ms()},
            "limits": {
                "max_streams": reg.max_streams,
                "max_streams_per_client": reg.max_per_client,
            },
            "process": self.process(),
            "oldest_active_s": reg.oldest_active_s(),
            **({"database": self.database_figures()} if self.database is not None else {}),
        }

    def database_figures(self) -> dict[str, Any]:
        """Pool, latency and error figures of the database, and each lookup route's cache."""
        assert self.database is not None
        figures = dict(self.database.figures())
        figures["cache"] = {prefix: r.cache.figures() for prefix, r in self.lookups().items()}
        return figures

    def process(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "rss_bytes": _rss_bytes(),
            "open_fds": _open_fds(),
            "draining": self.is_draining(),
            "allocator": self.allocator,
        }


def create_admin_app(view: AdminView) -> web.Application:
    """The admin routes; every one but /health needs the bearer token when one is set."""

    async def health(request: web.Request) -> web.Response:
        if view.is_draining():
            return _json({"status": "draining"}, 503)
        probes = await view.probe_storages()
        failed = sorted(name.strip("()") for name, p in probes.items() if p["status"] != "ok")
        if failed:
            return _json({"status": "critical", "failed": failed}, 503)
        return _json({"status": "ok"})

    async def health_detailed(request: web.Request) -> web.Response:
        probes = dict(await view.probe_storages(fresh=True))
        ok = all(p["status"] == "ok" for p in probes.values())
        status = "draining" if view.is_draining() else "ok" if ok else "critical"
        body: dict[str, Any] = {"status": status}
        if DATABASE in probes:
            body["database"] = probes.pop(DATABASE)
        body["storages"] = probes
        return _json(body, 200 if status == "ok" else 503)

    async def stats(request: web.Request) -> web.Response:
        return _json(view.stats())

    async def connections(request: web.Request) -> web.Response:
        active = view.registry.describe_active()
        return _json({"active": len(active), "connections": active})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            text=prometheus_text(view.stats()), content_type="text/plain", charset="utf-8"
        )

    app = web.Application(middlewares=[_bearer_auth(view.token)])
    app.router.add_get("/health", health)
    app.router.add_get("/health/detailed", health_detailed)
    app.router.add_get("/stats", stats)
    app.router.add_get("/stats/connections", connections)
    app.router.add_get("/metrics", metrics)
    return app


def _bearer_auth(token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path not in _PUBLIC_PATHS:
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):  # constant time
                resp = _json({"error": "unauthorized"}, 401)
                resp.headers["WWW-Authenticate"] = 'Bearer realm="media-sidecar admin"'
                return resp
        try:
            return await handler(request)
        except web.HTTPException as exc:  # 404/405 as small JSON, like the media side
            return _json({"error": exc.reason.lower().replace(" ", "_")}, exc.status)

    return check


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=_JSON)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except OSError:
        return 0


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def prometheus_text(stats: Mapping[str, Any]) -> str:
    """The /stats figures in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP media_sidecar_{name} {help_text}")
        lines.append(f"# TYPE media_sidecar_{name} {kind}")
        lines.extend(f"media_sidecar_{name}{labels} {value}" for labels, value in samples)

    conns = stats["connections"]
    metric("connections_active", "gauge", "Media requests in flight.", [("", conns["active"])])
    metric(
        "connections_total",
        "counter",
        "Media requests by outcome.",
        [(f'{{outcome="{o}"}}', conns[o]) for o in OUTCOMES],
    )
    metric(
        "responses_total",
        "counter",
        "Responses by status class.",
        [(f'{{class="{c}"}}', n) for c, n in stats["responses"].items()],
    )
    metric("bytes_sent_total", "counter", "Body bytes sent.", [("", stats["bytes_sent"])])
    quantiles = stats["latency_ms"]["first_byte"]
    metric(
        "first_byte_seconds",
        "summary",
        "Time to the response headers (recent window).",
        [
            (f'{{quantile="{q}"}}', quantiles[p] / 1000)
            for q, p in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))
        ],
    )
    per_storage = stats["storages"].items()
    for field, kind, help_text in (
        ("active", "gauge", "Requests in flight per storage."),
        ("total", "counter", "Requests per storage."),
        ("failed", "counter", "Failed requests per storage."),
        ("timed_out", "counter", "Timed out requests per storage."),
        ("bytes_sent", "counter", "Body bytes sent per storage."),
        ("upstream_in_use", "gauge", "S3 connections or files held open now."),
    ):
        name = f"storage_{field}" + ("_total" if kind == "counter" and field != "total" else "")
        if field == "total":
            name = "storage_requests_total"
        metric(
            name,
            kind,
            help_text,
            [(f'{{storage="{s}"}}', figures[field]) for s, figures in per_storage],
        )
    proc = stats["process"]
    metric("process_resident_memory_bytes", "gauge", "RSS.", [("", proc["rss_bytes"])])
    metric("process_open_fds", "gauge", "Open file descriptors.", [("", proc["open_fds"])])
    metric("process_uptime_seconds", "gauge", "Seconds since start.", [("", proc["uptime_s"])])
    metric(
        "oldest_active_seconds",
        "gauge",
        "Age of the oldest request in flight.",
        [("", stats["oldest_active_s"])],
    )
    return "\n".join(lines) + "\n"
