"""The admin listener (SPEC §5): health, stats, connections, metrics and the bearer token."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml

from tests.conftest import FILES, S3Server, SidecarProcess, free_port, make_config, start_sidecar
from tests.integration.httpclient import request
from tests.integration.sidecars import admin, invariant_holds, running_sidecar, wait_for_stats

TOKEN = "admin-token-for-tests-0123456789"
TOKEN_ENV = "TEST_ADMIN_TOKEN"


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, media_root: Path, s3_server: S3Server
) -> Iterator[SidecarProcess]:
    """A sidecar whose admin API (but /health) needs `Authorization: Bearer TOKEN`."""
    config = make_config(
        media_root,
        s3_server.endpoint,
        admin={"host": "127.0.0.1", "port": free_port(), "token_env": TOKEN_ENV},
        logging={"level": "info", "format": "json", "access_log": True},
    )
    with running_sidecar(config, tmp_path_factory.mktemp("admin"), {TOKEN_ENV: TOKEN}) as sidecar:
        yield sidecar


def get(sidecar: SidecarProcess, path: str, token: str | None = TOKEN) -> object:
    return admin(sidecar, path, token)


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Bearer {TOKEN}x", TOKEN, "Basic x"])
def test_admin_endpoints_need_the_token(guarded: SidecarProcess, auth: str | None) -> None:
    for path in ("/stats", "/stats/connections", "/metrics", "/health/detailed"):
        reply = request(guarded.admin_port, "GET", path, {"Authorization": auth} if auth else None)
        assert reply.status == 401, path
        assert orjson.loads(reply.body) == {"error": "unauthorized"}
        assert reply.header(
            "WWW-Authenticate",
        ).startswith("Bearer")  # type: ignore[union-attr]


def test_health_needs_no_token(guarded: SidecarProcess) -> None:
    reply = request(guarded.admin_port, "GET", "/health")
    assert (reply.status, orjson.loads(reply.body)) == (200, {"status": "ok"})


def test_unknown_admin_path_is_small_json(guarded: SidecarProcess) -> None:
    reply = request(guarded.admin_port, "GET", "/nope", {"Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 404 and orjson.loads(reply.body) == {"error": "not_found"}


def test_stats_counts_every_request_once(guarded: SidecarProcess) -> None:
    before = get(guarded, "/stats")
    assert isinstance(before, dict)
    port = guarded.port
    hello = FILES["hello.txt"]
    replies = [
        request(port, "GET", "/media/hello.txt"),
        request(port, "GET", "/media/hello.txt", {"Range": "bytes=0-9"}),
        request(port, "HEAD", "/s3/hello.txt"),
        request(port, "GET", "/s3/big.bin", {"Range": "bytes=-100000"}),
        request(port, "GET", "/media/no-such-file"),
        request(port, "DELETE", "/media/hello.txt"),
    ]
    assert [r.status for r in replies] == [200, 206, 200, 206, 404, 405]
    after = get(guarded, "/stats")
    assert isinstance(after, dict)
    delta = {k: after["connections"][k] - before["connections"][k] for k in after["connections"]}
    assert delta == {
        "active": 0,
        "total": 6,
        "completed": 6,
        "failed": 0,
        "client_disconnected": 0,
        "timed_out": 0,
        "rejected": 0,
    }
    assert invariant_holds(after)
    responses = {k: after["responses"][k] - before["responses"][k] for k in after["responses"]}
    assert responses == {"2xx": 4, "3xx": 0, "4xx": 2, "5xx": 0}
    body_bytes = len(hello) + 10 + 0 + 100_000 + len(replies[4].body) + len(replies[5].body)
    assert after["bytes_sent"] - before["bytes_sent"] == body_bytes
    s3 = after["storages"]["uploads"]
    assert s3["total"] - before["storages"]["uploads"]["total"] == 2
    assert s3["bytes_sent"] - before["storages"]["uploads"]["bytes_sent"] == 100_000
    assert s3["upstream_in_use"] == 0 and s3["type"] == "s3"
    assert after["storages"]["local"]["upstream_in_use"] == 0
    for window in (after["latency_ms"]["first_byte"], s3["first_byte_ms"]):
        assert 0 < window["p50"] <= window["p95"] <= window["p99"] < 5000
    proc = after["process"]
    assert proc["pid"] == guarded.proc.pid
    assert proc["rss_bytes"] > 10 << 20 and proc["open_fds"] > 3 and proc["uptime_s"] > 0
    assert after["oldest_active_s"] == 0


def test_connections_show_a_live_stream_then_forget_it(guarded: SidecarProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"GET /s3/big.bin HTTP/1.1\r\nHost: t\r\nX-Request-ID: watch-me\r\n\r\n")
        client.recv(1000)  # headers went out: the stream is live, and the client stops reading
        listing = get(guarded, "/stats/connections")
        assert isinstance(listing, dict)
        mine = [c for c in listing["connections"] if c["request_id"] == "watch-me"]
        assert len(mine) == 1, listing
        conn = mine[0]
        assert (conn["method"], conn["path"], conn["storage"], conn["key"]) == (
            "GET",
            "/s3/big.bin",
            "uploads",
            "big.bin",
        )
        assert conn["state"] == "streaming" and conn["client"] == "127.0.0.1"
        assert 0 < conn["bytes_sent"] < len(FILES["big.bin"])
        assert conn["age_s"] >= conn["idle_s"] >= 0
        live = get(guarded, "/stats")
        assert isinstance(live, dict)
        assert live["connections"]["active"] >= 1 and live["oldest_active_s"] > 0
        assert live["storages"]["uploads"]["upstream_in_use"] <= 1
    wait_for_stats(guarded, lambda s: s["connections"]["active"] == 0, 5, "stream gone", TOKEN)
    listing = get(guarded, "/stats/connections")
    assert listing == {"active": 0, "connections": []}


def test_metrics_match_stats(guarded: SidecarProcess) -> None:
    request(guarded.port, "GET", "/media/hello.txt")
    reply = request(guarded.admin_port, "GET", "/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 200 and reply.header(
        "Content-Type",
    ).startswith("text/plain")  # type: ignore[union-attr]
    text = reply.body.decode()
    samples = dict(re.findall(r"^(media_sidecar_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE))
    stats = get(guarded, "/stats")
    assert isinstance(stats, dict)
    completed = samples['media_sidecar_connections_total{outcome="completed"}']
    assert float(completed) == stats["connections"]["completed"]
    assert (
        float(samples['media_sidecar_storage_requests_total{storage="local"}'])
        == (stats["storages"]["local"]["total"])
    )
    assert 'media_sidecar_first_byte_seconds{quantile="0.99"}' in samples
    for line in text.splitlines():  # every metric is declared before its samples
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert f"# TYPE {name} " in text or f"# TYPE {name.rsplit('_total', 1)[0]}" in text


def test_health_detailed_probes_each_storage(guarded: SidecarProcess) -> None:
    detail = get(guarded, "/health/detailed")
    assert isinstance(detail, dict)
    assert detail["status"] == "ok"
    assert set(detail["storages"]) == {"local", "uploads"}
    for probe in detail["storages"].values():
        assert probe["status"] == "ok" and 0 <= probe["latency_ms"] < 2000


def test_unreachable_storage_makes_health_critical(
    tmp_path: Path, media_root: Path, s3_server: S3Server
) -> None:
    dead = socket.socket()  # bound, never listening: connections are refused at once
    dead.bind(("127.0.0.1", 0))
    try:
        endpoint = f"http://127.0.0.1:{dead.getsockname()[1]}"
        config = make_config(media_root, endpoint)
        config["storages"]["uploads"].update(connect_timeout="1s", max_attempts=1)
        with running_sidecar(config, tmp_path) as sidecar:
            reply = request(sidecar.admin_port, "GET", "/health")
            body = orjson.loads(reply.body)
            assert (reply.status, body) == (503, {"status": "critical", "failed": ["uploads"]})
            reply = request(sidecar.admin_port, "GET", "/health/detailed")
            detail = orjson.loads(reply.body)
            assert reply.status == 503 and detail["status"] == "critical"
            assert detail["storages"]["local"]["status"] == "ok"
            assert detail["storages"]["uploads"]["status"] == "critical"
            assert detail["storages"]["uploads"]["error"]
            # The media side still serves what it can.
            assert request(sidecar.port, "GET", "/media/one.bin").body == FILES["one.bin"]
    finally:
        dead.close()


def test_missing_token_variable_refuses_to_start(
    tmp_path: Path, media_root: Path, s3_server: S3Server
) -> None:
    config = make_config(
        media_root,
        s3_server.endpoint,
        admin={"host": "127.0.0.1", "port": free_port(), "token_env": "TEST_UNSET_TOKEN_VAR"},
    )
    os.environ.pop("TEST_UNSET_TOKEN_VAR", None)
    proc, log = start_sidecar(yaml.safe_dump(config), tmp_path)
    assert proc.wait(30) == 3
    assert "TEST_UNSET_TOKEN_VAR" in log.read_text()
