"""Assemble the sidecar: storages, the media listener and the admin listener.

The media listener is aiohttp's low-level `web.Server` with one handler: media
routes are matched by prefix in `resolver.path`, so the Application/router layer
would only add per-request cost (about a fifth of the small-file throughput).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler

from proxy.config import Config, DiskStorageConfig, StorageConfig
from proxy.db import Database
from proxy.errors import DatabaseUnavailable, ProxyError
from proxy.log import log_event
from proxy.model import Storage
from proxy.registry import Registry
from proxy.signing import load_keys
from proxy.storage.disk import DiskStorage
from proxy.storage.s3 import S3Storage
from proxy.upstream import Upstream
from proxy.web.admin import AdminView, create_admin_app
from proxy.web.media import REQUEST_ID, TRACKED, MediaHandler
from proxy.web.memory import trim_after_bursts

log = logging.getLogger("proxy.server")


def build_storage(cfg: StorageConfig, config: Config) -> Storage:
    """Instantiate one configured storage (not yet started)."""
    if isinstance(cfg, DiskStorageConfig):
        return DiskStorage(cfg)
    return S3Storage(
        cfg,
        max_streams=config.limits.max_streams,
        first_byte_timeout_s=config.timeouts.upstream_first_byte or None,
    )


class Sidecar:
    """Storages and both listeners of one configuration: `start`, `reload`…, `stop`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.storages: dict[str, Storage] = {}
        self.upstreams: dict[str, Upstream] = {}
        self.registry = Registry(
            [*cfg.storages, *cfg.upstreams],
            max_streams=cfg.limits.max_streams,
            max_per_client=cfg.limits.max_streams_per_client,
        )
        self.draining = False
        self.media_port = 0
        self.admin_port = 0
        self._stack = contextlib.AsyncExitStack()
        self._media_runner: web.ServerRunner | None = None
        self._media_handler: MediaHandler | None = None
        self._view: AdminView | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.database: Database | None = None

    async def start(self) -> None:
        """Open every storage, then bind both listeners; on failure release what was opened."""
        cfg = self.cfg
        try:
            token = _admin_token(cfg)
            self.storages = await self._open_storages(cfg, {})
            for name, ucfg in cfg.upstreams.items():
                upstream = Upstream(ucfg)
                await upstream.start()
                self._stack.push_async_callback(upstream.close)
                self.upstreams[name] = upstream
            if cfg.database is not None:
                self.database = Database(cfg.database, dsn=_database_dsn(cfg))
                await self.database.start()  # a database that is down is not fatal: 503s
                self._stack.push_async_callback(self.database.close)
            self._media_handler = await self._new_handler(cfg, self.storages)
            media = MediaServer(
                self._dispatch,
                access_log_class=JsonAccessLogger,
                access_log=logging.getLogger("proxy.access") if cfg.logging.access_log else None,
                keepalive_timeout=cfg.server.keepalive_timeout,  # AppRunner defaults to 3630 s
                handler_cancellation=True,  # a vanished client cancels its handler at once
            )
            # Not on the exit stack: stop() drains it first, while /health says "draining".
            self._media_runner = web.ServerRunner(
                media, handle_signals=False, shutdown_timeout=cfg.server.shutdown_timeout
            )
            self.media_port = await self._listen(
                self._media_runner, cfg.server.host, cfg.server.port, backlog=1024
            )
            self._view = AdminView(
                self.registry,
                {**self.storages, **self.upstreams},
                token=token,
                is_draining=lambda: self.draining,
                database=self.database,
                lookups=lambda: self._media_handler.lookups if self._media_handler else {},
            )
            self.admin_port = await self._listen(
                web.AppRunner(create_admin_app(self._view), handle_signals=False, access_log=None),
                cfg.admin.host,
                cfg.admin.port,
                backlog=128,
            )
            trimmer = asyncio.create_task(trim_after_bursts(self.registry))
            self._stack.callback(trimmer.cancel)
        except BaseException:
            await self.stop()
            raise

    def _dispatch(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # One indirection, so that a reload reaches keep-alive connections too; a plain
        # call returning the handler's coroutine, not a coroutine of its own around it.
        assert self._media_handler is not None
        return self._media_handler(request)

    async def reload(self, cfg: Config) -> list[str]:
        """New requests use `cfg`; requests in flight finish on the old configuration.

        Storages whose settings did not change are kept (no new S3 client); the others
        are opened first (a failure leaves everything as it was) and the replaced ones are
        closed once the last request of the old configuration ended. Returns the changed
        keys that only a restart applies (listeners, admin, access log): kept as they were.
        """
        if self.draining or self._media_handler is None:
            raise ProxyError("not running")
        old_cfg, old_handler, old_storages = self.cfg, self._media_handler, self.storages
        storages = await self._open_storages(cfg, old_storages, old_cfg)
        try:
            handler = await self._new_handler(cfg, storages)
        except BaseException:
            for name, storage in storages.items():
                if old_storages.get(name) is not storage:
                    await storage.close()
            raise
        self.registry.reconfigure(
            [*cfg.storages, *cfg.upstreams],
            max_streams=cfg.limits.max_streams,
            max_per_client=cfg.limits.max_streams_per_client,
        )
        self._media_handler = handler
        self.storages = storages
        if self._view is not None:
            self._view.storages = {**storages, **self.upstreams}
        self.cfg = cfg
        retired = [s for name, s in old_storages.items() if storages.get(name) is not s]
        if retired:
            task = asyncio.create_task(self._retire(old_handler, retired))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return restart_only_changes(old_cfg, cfg)

    async def _new_handler(self, cfg: Config, storages: dict[str, Storage]) -> MediaHandler:
        """The media handler of `cfg`: signing keys loaded, lookup queries checked."""
        names = [n for route in cfg.routes for n in route.access.keys_env]
        keys = dict(zip(names, load_keys(names, os.environ), strict=True)) if names else {}
        if cfg.database is not None and self.database is None:
            raise ProxyError("database: added by a reload; restart to apply")
        unknown = {r.upstream for r in cfg.routes if r.upstream} - set(self.upstreams)
        if unknown:
            raise ProxyError(f"upstreams: {', '.join(sorted(unknown))} added by a reload; restart")
        handler = MediaHandler(
            cfg, storages, self.registry, db=self.database, keys=keys, upstreams=self.upstreams
        )
        for prefix, lookup in handler.lookups.items():
            try:
                problems = await lookup.check()
            except DatabaseUnavailable as exc:  # checked on first use instead
                log_event(log, "database.unavailable", logging.WARNING, route=prefix,
                          reason=str(exc))  # fmt: skip
                continue
            if problems:
                raise ProxyError(f"route {prefix}: lookup query: {'; '.join(problems)}")
        return handler

    async def _open_storages(
        self, cfg: Config, reusable: dict[str, Storage], old_cfg: Config | None = None
    ) -> dict[str, Storage]:
        """Storages of `cfg`, reusing unchanged ones; on failure close what was opened here."""
        opened: dict[str, Storage] = {}
        result: dict[str, Storage] = {}
        try:
            for name, scfg in cfg.storages.items():
                kept = reusable.get(name)
                if kept is not None and old_cfg is not None and _same_storage(name, old_cfg, cfg):
                    result[name] = kept
                    continue
                storage = build_storage(scfg, cfg)
                start = getattr(storage, "start", None)
                if start is not None:
                    await start()
                opened[name] = result[name] = storage
                log_event(log, "storage.ready", storage=name, kind=storage.kind)
        except BaseException:
            for storage in opened.values():
                await storage.close()
            raise
        return result

    async def _retire(self, handler: MediaHandler, storages: list[Storage]) -> None:
        """Close storages replaced by a reload once no request of the old handler uses them."""
        await handler.wait_idle()
        for storage in storages:
            await storage.close()
            log_event(log, "storage.closed", storage=storage.name, reason="reload")

    async def stop(self) -> None:
        """Drain (SPEC §6), then stop the admin listener and close the storages.

        /health answers 503 "draining" at once; the media listener stops accepting and
        closes idle keep-alive connections; streams may finish for `shutdown_timeout`;
        the rest are reset and counted as failed.
        """
        self.draining = True
        if self._media_runner is not None:
            runner, self._media_runner = self._media_runner, None
            cleanup = asyncio.create_task(runner.cleanup())
            done, _ = await asyncio.wait({cleanup}, timeout=self.cfg.server.shutdown_timeout)
            if not done and self._media_handler is not None:
                # aiohttp would wait as long again, then close gracefully (pitfalls P2).
                aborted = self._media_handler.abort_active("shutdown_timeout")
                log_event(log, "server.aborted_streams", logging.WARNING, count=aborted)
            await cleanup
        for task in list(self._retiring):  # every request has ended: close them now
            await task
        await self._stack.aclose()
        for storage in self.storages.values():
            await storage.close()
        self.storages = {}

    async def _listen(self, runner: web.BaseRunner, host: str, port: int, backlog: int) -> int:
        await runner.setup()
        if runner is not self._media_runner:
            self._stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, host, port, backlog=backlog)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        return int(sockets[0].getsockname()[1]) if sockets else port


def _same_storage(name: str, old: Config, new: Config) -> bool:
    """A storage survives a reload when nothing it was built from changed."""
    scfg = new.storages.get(name)
    if old.storages.get(name) != scfg:
        return False
    return isinstance(scfg, DiskStorageConfig) or (
        old.limits.max_streams == new.limits.max_streams  # sizes the S3 pool
        and old.timeouts.upstream_first_byte == new.timeouts.upstream_first_byte
    )


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Changed keys a running process cannot apply: the listeners, admin, the access log."""
    changed = [
        f"server.{key}"
        for key in ("host", "port", "event_loop", "allocator", "keepalive_timeout")
        if getattr(old.server, key) != getattr(new.server, key)
    ]
    if old.admin != new.admin:
        changed.append("admin")
    if old.database != new.database:
        changed.append("database")
    if old.upstreams != new.upstreams:
        changed.append("upstreams")
    if old.logging.access_log != new.logging.access_log:
        changed.append("logging.access_log")
    return changed


def _database_dsn(cfg: Config) -> str:
    """The DSN from `database.dsn`, or the variable `database.dsn_env` names."""
    assert cfg.database is not None
    if cfg.database.dsn is not None:
        return cfg.database.dsn
    var = cfg.database.dsn_env or ""
    dsn = os.environ.get(var, "")
    if not dsn:
        raise ProxyError(f"database.dsn_env: environment variable {var} is not set")
    return dsn


def _admin_token(cfg: Config) -> str | None:
    """The admin bearer token from `admin.token_env`; a named but empty variable is an error."""
    if cfg.admin.token_env is None:
        return None
    token = os.environ.get(cfg.admin.token_env, "")
    if not token:
        raise ProxyError(f"admin.token_env: environment variable {cfg.admin.token_env} is not set")
    return token


class MediaServer(web.Server):
    """aiohttp's low-level server, answering requests it cannot parse in small JSON."""

    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class _JsonErrorRequestHandler(RequestHandler):
    """A request line or header aiohttp refuses (too long, malformed) is the client's
    mistake: a 4xx `{"error": ...}` and a warning without traceback, never text/plain."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        log_event(log, "request.malformed", logging.WARNING, status=status,
                  reason=(message or str(exc or ""))[:200], client=request.remote)  # fmt: skip
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        code = _PARSE_ERRORS.get(status, "bad_request")
        resp = web.Response(
            status=status, body=orjson.dumps({"error": code}), content_type="application/json"
        )
        resp.force_close()
        return resp


_PARSE_ERRORS = {400: "bad_request", 413: "request_too_large", 431: "headers_too_large"}


class JsonAccessLogger(AbstractAccessLogger):
    """One `http.request` event per request, with its request id (SPEC §6)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        tracked = request.get(TRACKED)
        log_event(
            self.logger,
            "http.request",
            request_id=tracked.request_id if tracked else request.get(REQUEST_ID),
            conn=tracked.id if tracked else None,
            outcome=tracked.outcome if tracked else None,
            method=request.method,
            path=request.path,
            status=response.status,
            bytes=tracked.bytes_sent if tracked else response.body_length,
            duration_ms=round(time * 1000, 3),
            client=request.remote,
            range=request.headers.get("Range"),
        )
