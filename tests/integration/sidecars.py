"""Start a real sidecar process on a config of the test's own, and read its admin API; start
the example backend of upstream routes (tests/upstream_backend.py) as a process."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.conftest import (
    ACCESS_KEY,
    ACCESS_KEY_ENV,
    REPO,
    SECRET_KEY,
    SECRET_KEY_ENV,
    SidecarProcess,
    free_port,
    log_tail,
    port_accepts,
    start_sidecar,
    stop_process,
    wait_until,
)
from tests.integration.httpclient import request


@contextlib.contextmanager
def running_sidecar(
    config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
) -> Iterator[SidecarProcess]:
    """`python -m proxy` on `config` (from conftest.make_config); stopped by PID afterwards."""
    env = {ACCESS_KEY_ENV: ACCESS_KEY, SECRET_KEY_ENV: SECRET_KEY, **(env or {})}
    port, admin_port = config["server"]["port"], config["admin"]["port"]
    proc, log = start_sidecar(yaml.safe_dump(config), workdir, env)
    try:
        for p in (admin_port, port):
            wait_until(lambda p=p: proc.poll() is not None or port_accepts(p), 30, "sidecar", log)
            if proc.poll() is not None:
                pytest.fail("sidecar exited at start:\n" + log_tail(log))
        yield SidecarProcess(proc=proc, port=port, admin_port=admin_port, log=log)
    finally:
        stop_process(proc)


@dataclass
class Backend:
    """The example backend process: its port and log."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def running_backend(workdir: Path, port: int | None = None) -> Iterator[Backend]:
    """`python -m tests.upstream_backend` on `port` (default: a free one); stopped by PID."""
    port = port or free_port()
    log = workdir / f"backend-{port}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.upstream_backend", "--port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: proc.poll() is not None or port_accepts(port), 30, "backend", log)
        if proc.poll() is not None:
            pytest.fail("backend exited at start:\n" + log_tail(log))
        yield Backend(proc=proc, port=port, log=log)
    finally:
        stop_process(proc)


def open_stream(port: int, path: str, rcvbuf: int = 8192) -> socket.socket:
    """Request `path` with a small receive buffer and wait for a 200's headers."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.settimeout(10)
    client.connect(("127.0.0.1", port))
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = client.recv(1024)
        assert chunk, "connection closed before the headers"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return client


def read_until_closed(client: socket.socket, timeout_s: float) -> tuple[int, str]:
    """Drain the socket; ('eof'|'reset'|'open', bytes) — 'open' if nothing ended it in time."""
    client.settimeout(timeout_s)
    got = 0
    try:
        while chunk := client.recv(65536):
            got += len(chunk)
    except ConnectionResetError:
        return got, "reset"
    except TimeoutError:
        return got, "open"
    return got, "eof"


def error_lines(sidecar: SidecarProcess) -> list[str]:
    """Log lines at level error (a crash, an asyncio callback failing): there must be none."""
    return [line for line in sidecar.log.read_text().splitlines() if '"level":"error"' in line]


def logged_events(
    sidecar: SidecarProcess, marker: str, event: str, count: int, timeout_s: float = 5
) -> list[dict[str, Any]]:
    """The log's events of lines containing `marker`, once `count` of them are named `event`.

    aiohttp writes the access line after the response's last byte, so a client can read the
    log before its own request's line is there."""

    def events() -> list[dict[str, Any]]:
        lines = sidecar.log.read_text().splitlines()
        return [orjson.loads(line) for line in lines if marker in line]

    wait_until(
        lambda: sum(e["event"] == event for e in events()) >= count,
        timeout_s,
        f"{count} {event} events with {marker!r}",
        sidecar.log,
    )
    return events()


def admin(sidecar: SidecarProcess, path: str, token: str | None = None) -> Any:
    """GET an admin endpoint and decode its JSON (fails the test on a non-200)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    reply = request(sidecar.admin_port, "GET", path, headers)
    assert reply.status == 200, (path, reply.status, reply.body[:500])
    return orjson.loads(reply.body)


def stats(sidecar: SidecarProcess, token: str | None = None) -> Any:
    return admin(sidecar, "/stats", token)


def invariant_holds(s: dict[str, Any]) -> bool:
    c = s["connections"]
    outcomes = ("completed", "failed", "client_disconnected", "timed_out", "rejected")
    return bool(c["total"] == c["active"] + sum(c[o] for o in outcomes))


def wait_for_stats(
    sidecar: SidecarProcess,
    predicate: Callable[[Any], bool],
    timeout_s: float,
    what: str,
    token: str | None = None,
) -> Any:
    """Poll /stats until `predicate` holds; fail with the last figures and the log's tail."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = stats(sidecar, token)
        assert invariant_holds(last), last["connections"]
        if predicate(last):
            return last
        time.sleep(0.05)
    pytest.fail(f"{what}: not after {timeout_s} s; last /stats: {last}\n{log_tail(sidecar.log)}")


def settled(s: Any) -> bool:
    """Nothing active, no S3/upstream connection or detached body held: traffic is over."""
    return bool(
        s["connections"]["active"] == 0
        and all(
            v["upstream_in_use"] == 0 and v.get("detached_active", 0) == 0
            for v in s["storages"].values()
        )
    )


def quiet(sidecar: SidecarProcess, timeout_s: float = 10) -> Any:
    """Wait until the sidecar has `settled`; return its figures."""
    return wait_for_stats(sidecar, settled, timeout_s, "quiet")
