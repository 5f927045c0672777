"""Command line: `media-sidecar --config PATH [--check-config]` serves (exit 0, 2 config,
3 start-up); `media-sidecar sign PATH --expires 1h` prints a signed URL path."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from proxy import allocator
from proxy.config import Config, load_config, parse_duration
from proxy.errors import ConfigError, ProxyError
from proxy.log import log_event, setup_logging
from proxy.signing import load_keys, signed_url

if TYPE_CHECKING:  # imported by serve(): the allocator's re-execution comes before it
    from proxy.web.app import Sidecar

EXIT_OK: Final = 0
EXIT_CONFIG: Final = 2
EXIT_STARTUP: Final = 3  # as uvicorn's STARTUP_FAILURE
DEFAULT_CONFIG: Final = "config/sidecar.yaml"
log = logging.getLogger("proxy.server")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="media-sidecar", description="Serve media bytes from disk and S3."
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("SIDECAR_CONFIG") or DEFAULT_CONFIG,
        help="YAML file (default: $SIDECAR_CONFIG, then config/sidecar.yaml)",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the file and exit (0 valid, 2 not)"
    )
    commands = parser.add_subparsers(dest="command", metavar="{sign}")
    sign = commands.add_parser(
        "sign", help="print a signed URL path for a route with access mode 'signed'"
    )
    sign.add_argument("path", help="request path as clients send it, e.g. /api/media/42")
    sign.add_argument("--expires", default="1h", help="lifetime: 30s, 15m, 1h … (default 1h)")
    sign.add_argument("--ip", help="client address to bind, for routes with bind_ip")
    sign.add_argument(
        "--config",
        dest="sign_config",
        help="YAML file (default: the global --config)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `media-sidecar` and `python -m proxy`."""
    args = parse_args(argv)
    if args.command == "sign":
        args.config = args.sign_config or args.config
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "sign":
        return sign_command(cfg, args.path, args.expires, args.ip)
    if args.check_config:
        print(f"{args.config}: ok")
        return EXIT_OK
    setup_logging(cfg.logging.level, cfg.logging.format)
    try:
        env = allocator.environment_to_execute(
            cfg.server.allocator, os.environ, running=allocator.in_use()
        )
    except allocator.AllocatorError as exc:
        log_event(log, "server.start_failed", logging.ERROR, reason=str(exc))
        return EXIT_STARTUP
    if env is not None and argv is None and sys.executable:  # the program, not main([...])
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, sys.orig_argv, env)  # same PID; never returns
        except OSError as exc:  # go on as we are: the allocator is not worth a failed start
            log_event(log, "server.allocator_failed", logging.WARNING, reason=str(exc))
    raise_fd_limit()
    if cfg.server.event_loop == "uvloop":
        import uvloop

        return uvloop.run(serve(cfg))
    return asyncio.run(serve(cfg))


def raise_fd_limit() -> int:
    """Lift the soft limit on open descriptors to the hard one; return the soft limit.

    A stream holds up to six (client, file or S3 socket, and a pipe plus two duplicates
    while spliced): the usual soft limit of 1024 would fail near 200 streams, far below
    `limits.max_streams`. nginx does the same with `worker_rlimit_nofile`.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # a sandbox may refuse: keep the soft limit
            pass
    return soft


async def serve(cfg: Config) -> int:
    """Start both listeners, wait for SIGTERM/SIGINT, then drain and stop."""
    from proxy import heap
    from proxy.web.app import Sidecar

    sidecar = Sidecar(cfg)
    try:
        await sidecar.start()
    except (ProxyError, OSError) as exc:
        log_event(log, "server.start_failed", logging.ERROR, reason=str(exc))
        return EXIT_STARTUP
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        sidecar.draining = True  # /health says so before any other callback runs
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = asyncio.create_task(reload(sidecar))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    frozen = heap.freeze_startup_objects()  # no await since start(): no request yet
    log_event(
        log,
        "server.listening",
        media=f"{cfg.server.host}:{sidecar.media_port}",
        admin=f"{cfg.admin.host}:{sidecar.admin_port}",
        event_loop=cfg.server.event_loop,
        allocator=allocator.in_use(),
        config=cfg.source,
        pid=os.getpid(),
        fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        gc_frozen=frozen,
    )
    await stop.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    for task in list(reloads):
        await task
    log_event(log, "server.draining", shutdown_timeout_s=sidecar.cfg.server.shutdown_timeout)
    await sidecar.stop()
    log_event(log, "server.stopped", **sidecar.registry.connections())
    return EXIT_OK


async def reload(sidecar: Sidecar) -> None:
    """SIGHUP (SPEC §6): re-read the file; apply it if valid, else keep the running one."""
    source = sidecar.cfg.source
    try:
        cfg = load_config(source)
    except ConfigError as exc:
        log_event(log, "config.reload_failed", logging.ERROR, config=source,
                  problems=exc.lines())  # fmt: skip
        return
    try:
        needs_restart = await sidecar.reload(cfg)
    except (ProxyError, OSError) as exc:  # e.g. a new storage that cannot start
        log_event(log, "config.reload_failed", logging.ERROR, config=source, problems=[str(exc)])
        return
    setup_logging(cfg.logging.level, cfg.logging.format)
    log_event(log, "config.reloaded", config=source, needs_restart=needs_restart)


def sign_command(cfg: Config, path: str, expires: str, ip: str | None) -> int:
    """Print `path?expires=…&sig=…`, signed with the first key of the route `path` matches."""
    try:
        lifetime = parse_duration(expires)
    except ValueError as exc:
        print(f"--expires: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    route = next((r for r in cfg.routes if path.split("?", 1)[0].startswith(r.prefix)), None)
    if route is None or route.access.mode != "signed":
        print(f"{path}: no route with access mode 'signed' serves it", file=sys.stderr)
        return EXIT_CONFIG
    if route.access.bind_ip and not ip:
        print(f"route {route.prefix} binds the client address: give --ip", file=sys.stderr)
        return EXIT_CONFIG
    try:
        key = load_keys(route.access.keys_env[:1], os.environ)[0]
        bound_ip = ip if route.access.bind_ip else None
        print(signed_url(path, key, expires_in_s=lifetime, client_ip=bound_ip))
    except (ProxyError, ValueError) as exc:  # no key, short key, bad path, lifetime, --ip
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK
