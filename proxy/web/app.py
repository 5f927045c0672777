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

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.config import Config, DiskStorageConfig, StorageConfig
from proxy.errors import ProxyError
from proxy.log import log_event
from proxy.model import Storage
from proxy.registry import Registry
from proxy.storage.disk import DiskStorage
from proxy.storage.s3 import S3Storage
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
    """Storages and both listeners of one configuration; `start` then `stop`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.storages: dict[str, Storage] = {}
        self.registry = Registry(
            list(cfg.storages),
            max_streams=cfg.limits.max_streams,
            max_per_client=cfg.limits.max_streams_per_client,
        )
        self.draining = False
        self.media_port = 0
        self.admin_port = 0
        self._stack = contextlib.AsyncExitStack()
        self._media_runner: web.ServerRunner | None = None
        self._media_handler: MediaHandler | None = None

    async def start(self) -> None:
        """Open every storage, then bind both listeners; on failure release what was opened."""
        cfg = self.cfg
        try:
            token = _admin_token(cfg)
            for name, scfg in cfg.storages.items():
                storage = build_storage(scfg, cfg)
                start = getattr(storage, "start", None)
                if start is not None:
                    await start()
                self._stack.push_async_callback(storage.close)
                self.storages[name] = storage
                log_event(log, "storage.ready", storage=name, kind=storage.kind)
            self._media_handler = MediaHandler(cfg, self.storages, self.registry)
            media = web.Server(
                self._media_handler,
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
            view = AdminView(
                self.registry, self.storages, token=token, is_draining=lambda: self.draining
            )
            self.admin_port = await self._listen(
                web.AppRunner(create_admin_app(view), handle_signals=False, access_log=None),
                cfg.admin.host,
                cfg.admin.port,
                backlog=128,
            )
            trimmer = asyncio.create_task(trim_after_bursts(self.registry))
            self._stack.callback(trimmer.cancel)
        except BaseException:
            await self.stop()
            raise

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
        await self._stack.aclose()
        self.storages.clear()

    async def _listen(self, runner: web.BaseRunner, host: str, port: int, backlog: int) -> int:
        await runner.setup()
        if runner is not self._media_runner:
            self._stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, host, port, backlog=backlog)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        return int(sockets[0].getsockname()[1]) if sockets else port


def _admin_token(cfg: Config) -> str | None:
    """The admin bearer token from `admin.token_env`; a named but empty variable is an error."""
    if cfg.admin.token_env is None:
        return None
    token = os.environ.get(cfg.admin.token_env, "")
    if not token:
        raise ProxyError(f"admin.token_env: environment variable {cfg.admin.token_env} is not set")
    return token


class JsonAccessLogger(AbstractAccessLogger):
    """One `http.request` event per request, with its request id (SPEC §6)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        tracked = request.get(TRACKED)
        log_event(
            self.logger,
            "http.request",
            request_id=request.get(REQUEST_ID),
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
