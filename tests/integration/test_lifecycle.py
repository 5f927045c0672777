"""Stream lifecycle on a real process (SPEC §4): outcomes, forced cleanup, admission control.

Each scenario checks what an operator would see in /stats afterwards: the outcome counted
once, `active` back to 0, S3 connections and open files back to their baseline.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import FILES, S3Server, SidecarProcess, free_port, make_config
from tests.integration.httpclient import request
from tests.integration.sidecars import (
    error_lines,
    logged_events,
    open_stream,
    quiet,
    read_until_closed,
    running_sidecar,
    stats,
    wait_for_stats,
)

IDLE_S = 1.0
BIG = len(FILES["big.bin"])


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def sidecar(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    media_root: Path,
    s3_server: S3Server,
) -> Iterator[SidecarProcess]:
    """A sidecar with a short idle timeout and room for three streams, on each event loop."""
    config = make_config(
        media_root,
        s3_server.endpoint,
        server={"host": "127.0.0.1", "port": free_port(), "event_loop": request.param},
        limits={"max_streams": 3},
        timeouts={"idle": f"{IDLE_S}s", "upstream_first_byte": "5s"},
        logging={"level": "info", "format": "json"},
    )
    with running_sidecar(config, tmp_path_factory.mktemp(f"life-{request.param}")) as proc:
        request_warmup(proc)
        yield proc
        assert not error_lines(proc), error_lines(proc)[:3]


def request_warmup(sidecar: SidecarProcess) -> None:
    """One S3 and one disk request, so the pools and caches exist before baselines."""
    request(sidecar.port, "GET", "/s3/one.bin")
    request(sidecar.port, "GET", "/media/one.bin")


@pytest.mark.parametrize("path", ["/media/big.bin", "/s3/big.bin"])
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_client_gone_mid_body_releases_everything(
    sidecar: SidecarProcess, path: str, how: str
) -> None:
    base = quiet(sidecar)
    client = open_stream(sidecar.port, path)
    client.recv(30_000)
    wait_for_stats(sidecar, lambda s: s["connections"]["active"] == 1, 5, "the stream is active")
    if how == "rst":  # abortive close
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:  # orderly: FIN first (the kernel resets later only because bytes keep coming)
        client.shutdown(socket.SHUT_WR)
    client.close()
    gone_at = time.monotonic()
    after = wait_for_stats(
        sidecar,
        lambda s: (
            s["connections"]["client_disconnected"]
            == base["connections"]["client_disconnected"] + 1
        ),
        IDLE_S * 0.9,  # detected by the disconnect, not by the idle timeout
        "client_disconnected counted",
    )
    assert time.monotonic() - gone_at < 1.0
    after = quiet(sidecar)
    for outcome in ("completed", "failed", "timed_out", "rejected"):
        assert after["connections"][outcome] == base["connections"][outcome], outcome
    assert after["process"]["open_fds"] <= base["process"]["open_fds"]
    sent = after["storages"]["uploads" if path.startswith("/s3/") else "local"]["bytes_sent"]
    assert sent > 0


@pytest.mark.parametrize("path", ["/media/big.bin", "/s3/big.bin"])
def test_client_that_stops_reading_is_timed_out_and_aborted(
    sidecar: SidecarProcess, path: str
) -> None:
    base = quiet(sidecar)
    client = open_stream(sidecar.port, path, rcvbuf=4096)
    started = time.monotonic()
    try:
        after = wait_for_stats(
            sidecar,
            lambda s: s["connections"]["timed_out"] == base["connections"]["timed_out"] + 1,
            IDLE_S + 5,
            "timed_out counted",
        )
        assert time.monotonic() - started >= IDLE_S * 0.9
        # Aborted, not left ESTABLISHED behind a full buffer: what was queued, then the end.
        got, end = read_until_closed(client, 5)
        assert end == "reset" and got < BIG  # RST: nothing left queued for it
    finally:
        client.close()
    after = quiet(sidecar)
    assert after["connections"]["client_disconnected"] == base["connections"]["client_disconnected"]
    assert after["process"]["open_fds"] <= base["process"]["open_fds"]
    log = sidecar.log.read_text()
    assert '"event":"stream.timed_out"' in log


def test_over_capacity_gets_503_while_admin_answers(sidecar: SidecarProcess) -> None:
    base = quiet(sidecar)
    held = [
        open_stream(sidecar.port, p) for p in ("/media/big.bin", "/s3/big.bin", "/media/big.bin")
    ]
    try:
        live = stats(sidecar)  # the admin listener answers while media is saturated
        assert live["connections"]["active"] == 3
        reply = request(sidecar.port, "GET", "/media/one.bin")
        assert reply.status == 503
        assert reply.header("Retry-After") == "1"
        assert orjson.loads(reply.body) == {"error": "over_capacity"}
        assert reply.header("X-Request-ID")
        after = stats(sidecar)
        assert after["connections"]["rejected"] == base["connections"]["rejected"] + 1
        assert after["responses"]["5xx"] == base["responses"]["5xx"] + 1
    finally:
        for client in held:
            client.close()
    quiet(sidecar)
    assert request(sidecar.port, "GET", "/media/one.bin").status == 200  # slots came back


def test_lifecycle_events_are_logged_with_ids(sidecar: SidecarProcess) -> None:
    reply = request(sidecar.port, "GET", "/media/big.bin", {"X-Request-ID": "life-log-1"})
    assert reply.body == FILES["big.bin"]
    quiet(sidecar)
    events = logged_events(sidecar, "life-log-1", "http.request", 1)
    by_name = {e["event"]: e for e in events}
    assert {"stream.start", "stream.end", "http.request"} <= set(by_name)
    end = by_name["stream.end"]
    assert end["outcome"] == "completed" and end["bytes"] == BIG and end["duration_ms"] > 0
    assert by_name["stream.start"]["conn"] == end["conn"] == by_name["http.request"]["conn"]
    assert all({"ts", "level"} <= set(e) for e in events)


def test_max_duration_by_content_type_cuts_a_progressing_stream(
    tmp_path: Path, media_root: Path, s3_server: S3Server
) -> None:
    config = make_config(
        media_root,
        s3_server.endpoint,
        timeouts={
            "idle": "10s",
            "by_type": {"application/octet-stream": {"max_duration": "1500ms"}},
        },
    )
    with running_sidecar(config, tmp_path) as sidecar:
        client = open_stream(sidecar.port, "/media/big.bin", rcvbuf=16384)
        started = time.monotonic()
        got, end = 0, "open"
        client.settimeout(0.5)
        try:
            while time.monotonic() - started < 6:  # a slow reader: never idle for long
                try:
                    chunk = client.recv(16384)
                except ConnectionResetError:
                    end = "reset"
                    break
                if not chunk:
                    end = "eof"
                    break
                got += len(chunk)
                time.sleep(0.05)
        finally:
            client.close()
        elapsed = time.monotonic() - started
        assert end == "reset" and got < BIG  # RST: nothing left queued for it
        assert 1.3 < elapsed < 4, elapsed
        after = quiet(sidecar)
        assert after["connections"]["timed_out"] == 1
        # Another type on the same server keeps its unlimited duration.
        assert request(sidecar.port, "GET", "/media/hello.txt").body == FILES["hello.txt"]
