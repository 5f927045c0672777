"""Media ids through a real PostgreSQL (SPEC §7): resolution, variants, statuses, every
access mode, hostile ids, caching with single-flight, and a database that fails or vanishes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import yaml

from proxy.db import PREPARE_THRESHOLD
from proxy.signing import signed_url
from tests.conftest import FILES, REPO, S3Server, SidecarProcess, make_config
from tests.integration.httpclient import Reply, request
from tests.integration.sidecars import error_lines, running_sidecar, stats, wait_for_stats
from tests.pg import LOOKUP_QUERY, PgServer

KEY_NEW = "lookup-test-key-new-0123456789abcdef"
KEY_OLD = "lookup-test-key-old-0123456789abcdef"
DSN_ENV = "TEST_DATABASE_URL"
QUERY = LOOKUP_QUERY  # one query for every lookup route


# Takes 0.4 s for the id "slow" and 2 s for "too-slow" (past statement_timeout); any id
# resolves to the row of m-one.
_M_ONE = QUERY.replace("m.id = %(id)s", "m.id = 'm-one'").replace(
    "v.media_id = %(id)s", "v.media_id = 'm-one'"
)
SLEEPY = (
    "SELECT q.* FROM (SELECT pg_sleep(CASE %(id)s WHEN 'slow' THEN 0.4"
    " WHEN 'too-slow' THEN 2 ELSE 0 END)) AS z, LATERAL (" + _M_ONE + ") AS q"
)


def lookup_route(
    prefix: str, marker: str, access: dict[str, Any] | None = None, **lookup: Any
) -> dict[str, Any]:
    """A lookup route; `marker` (an SQL comment) makes its query text unique for counting."""
    route: dict[str, Any] = {
        "prefix": prefix,
        "lookup": {"query": f"/* {marker} */ {QUERY}", **lookup},
    }
    if access:
        route["access"] = access
    return route


@pytest.fixture(scope="module")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory,
    media_root: Path,
    s3_server: S3Server,
    pg_server: PgServer,
) -> Iterator[SidecarProcess]:
    config = make_config(
        media_root,
        s3_server.endpoint,
        database={
            "dsn_env": DSN_ENV,
            "pool_max": 4,
            "acquire_timeout": "1s",
            "statement_timeout": "500ms",
            "leak_threshold": "200ms",
        },
        logging={"level": "info", "format": "json"},
    )
    config["routes"] = [
        lookup_route("/api/media/", "public"),
        lookup_route(
            "/signed/", "signed", {"mode": "signed", "keys_env": ["TEST_KEY_NEW", "TEST_KEY_OLD"]}
        ),
        lookup_route(
            "/owned/",
            "owned",
            {"mode": "trusted_header", "trusted_proxies": ["127.0.0.1/32"]},
        ),
        lookup_route("/nocache/", "nocache", cache_ttl=0),
        lookup_route("/single/", "single-flight"),
        lookup_route("/short/", "short-ttl", cache_ttl="300ms", stale_if_error="60s"),
        {"prefix": "/sleepy/", "lookup": {"query": SLEEPY, "cache_ttl": 0}},
        *config["routes"],
    ]
    env = {DSN_ENV: pg_server.dsn, "TEST_KEY_NEW": KEY_NEW, "TEST_KEY_OLD": KEY_OLD}
    with running_sidecar(config, tmp_path_factory.mktemp("lookup"), env) as proc:
        yield proc
        assert not error_lines(proc), error_lines(proc)[:3]


def get(sidecar: SidecarProcess, path: str, headers: dict[str, str] | None = None) -> Reply:
    return request(sidecar.port, "GET", path, headers)


def error_of(reply: Reply) -> Any:
    return orjson.loads(reply.body)


# ---------------------------------------------------------------------------- resolution


def test_ids_resolve_to_the_storage_and_key_of_their_row(sidecar: SidecarProcess) -> None:
    hello = get(sidecar, "/api/media/m-hello")
    assert hello.status == 200 and hello.body == FILES["hello.txt"]
    assert hello.header("Content-Type") == "text/plain"  # the row's type wins
    assert hello.header("Content-Disposition") == (
        "inline; filename=\"hello.txt\"; filename*=UTF-8''hello.txt"
    )
    big = get(sidecar, "/api/media/m-big", {"Range": "bytes=100-199"})  # an S3 row
    assert big.status == 206 and big.body == FILES["big.bin"][100:200]
    assert get(sidecar, "/api/media/m-one").header("Content-Disposition") is None


def test_variants_resolve_to_their_own_key(sidecar: SidecarProcess) -> None:
    nested = get(sidecar, "/api/media/m-hello/nested")
    assert nested.status == 200 and nested.body == FILES["sub/dir/nested.bin"]
    assert get(sidecar, "/api/media/m-hello/missing").status == 404
    assert get(sidecar, "/api/media/m-hello/nested/deeper").status == 404


def test_statuses_that_may_not_be_served_are_not_ready(sidecar: SidecarProcess) -> None:
    reply = get(sidecar, "/api/media/m-pending")
    assert reply.status == 404 and error_of(reply) == {"error": "not_ready"}
    unknown = get(sidecar, "/api/media/no-such-id")
    assert unknown.status == 404 and error_of(unknown) == {"error": "not_found"}


@pytest.mark.parametrize(
    "raw_id",
    [
        quote("1' OR '1'='1"),
        quote("m-hello' --"),
        "%00",
        "m-hello%00",
        "x" * 10_000,
        quote("média-ünïcode-日本"),
        "%2e%2e",
        "..%2f..%2fetc%2fpasswd",
        quote("%(id)s"),
        "%ff%fe",
    ],
)
def test_hostile_ids_are_400_or_404_never_500(sidecar: SidecarProcess, raw_id: str) -> None:
    reply = get(sidecar, f"/api/media/{raw_id}")
    assert reply.status in (400, 404), (raw_id[:40], reply.status, reply.body[:200])
    assert set(error_of(reply)) == {"error"}


# ---------------------------------------------------------------------------- access


def test_signed_urls_open_private_rows_and_nothing_else(sidecar: SidecarProcess) -> None:
    path = "/signed/m-pic"
    assert get(sidecar, path).status == 403
    assert error_of(get(sidecar, path)) == {"error": "forbidden", "reason": "missing_signature"}
    url = signed_url(path, KEY_NEW.encode(), expires_in_s=60)
    reply = get(sidecar, url)
    assert reply.status == 200 and reply.body == FILES["pic.png"]
    assert reply.header(
        "Content-Disposition",
    ).startswith('inline; filename="holiday.png"')  # type: ignore[union-attr]
    assert get(sidecar, signed_url(path, KEY_OLD.encode(), expires_in_s=60)).status == 200

    expired = signed_url(path, KEY_NEW.encode(), expires_in_s=1, now=time.time() - 10)
    assert error_of(get(sidecar, expired)) == {"error": "forbidden", "reason": "expired"}
    forged = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
    assert error_of(get(sidecar, forged))["reason"] == "bad_signature"
    replayed = url.replace("/signed/m-pic", "/signed/m-pic/thumb")  # another path, same sig
    assert error_of(get(sidecar, replayed))["reason"] == "bad_signature"
    stranger = signed_url(path, b"someone-elses-key-0123456789abcdef", expires_in_s=60)
    assert error_of(get(sidecar, stranger))["reason"] == "bad_signature"


def test_rows_marked_public_need_no_signature(sidecar: SidecarProcess) -> None:
    assert get(sidecar, "/signed/m-hello").status == 200


def request_from(source_ip: str, port: int, path: str, headers: dict[str, str]) -> int:
    """Status of a GET sent from a given loopback address (127.0.0.2 is not a trusted hop)."""
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source_ip, 0))
        s.connect(("127.0.0.1", port))
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_trusted_header_is_honoured_only_from_trusted_hops(sidecar: SidecarProcess) -> None:
    owner = {"X-User-Id": "u-1"}
    assert request_from("127.0.0.1", sidecar.port, "/owned/m-pic", owner) == 200
    assert request_from("127.0.0.1", sidecar.port, "/owned/m-pic", {"X-User-Id": "u-2"}) == 403
    assert request_from("127.0.0.1", sidecar.port, "/owned/m-pic", {}) == 403
    # The same header from a peer that is not a trusted proxy is a spoof.
    assert request_from("127.0.0.2", sidecar.port, "/owned/m-pic", owner) == 403
    reply = get(sidecar, "/owned/m-pic", {"X-User-Id": "u-2"})
    assert error_of(reply) == {"error": "forbidden", "reason": "not_owner"}


# ---------------------------------------------------------------------------- caching


def test_concurrent_requests_for_one_uncached_id_cause_one_query(
    sidecar: SidecarProcess, pg_server: PgServer
) -> None:
    pg_server.reset_statements()

    async def burst() -> list[int]:
        async def one() -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(b"GET /single/m-one HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = await reader.read()
            writer.close()
            return int(data.split(b" ", 2)[1])

        return await asyncio.gather(*(one() for _ in range(100)))

    assert asyncio.run(burst()) == [200] * 100
    assert pg_server.statement_calls("%single-flight%") == 1
    cache = stats(sidecar)["database"]["cache"]["/single/"]
    assert cache["misses"] == 1 and cache["hits"] + cache["coalesced"] == 99


def test_cache_off_means_one_query_per_request(
    sidecar: SidecarProcess, pg_server: PgServer
) -> None:
    pg_server.reset_statements()
    for _ in range(5):
        assert get(sidecar, "/nocache/m-one").status == 200
    assert pg_server.statement_calls("%nocache%") == 5


def test_uncached_lookups_run_as_one_prepared_statement(
    sidecar: SidecarProcess, pg_server: PgServer
) -> None:
    """PostgreSQL plans the route's query once per session: EXECUTE, one per request."""
    pg_server.reset_statements()
    runs = PREPARE_THRESHOLD + 5
    for _ in range(runs):
        assert get(sidecar, "/nocache/m-one").status == 200
        assert get(sidecar, "/nocache/m-pic/thumb").status == 200
    assert pg_server.statement_calls("%nocache%") == 2 * runs
    # pg_stat_statements counts each EXECUTE under the PREPARE's text (and not the PREPARE);
    # the resolver runs the route's query as one text array column (row_query)
    executed = pg_server.statement_calls("PREPARE sidecar\\_% AS SELECT ARRAY[%/* nocache */%")
    assert executed >= 2 * runs - PREPARE_THRESHOLD
    assert stats(sidecar)["database"]["prepares"] >= 1


def test_statement_timeout_on_a_prepared_lookup_is_a_fast_503(sidecar: SidecarProcess) -> None:
    for _ in range(PREPARE_THRESHOLD + 1):  # from now on the route EXECUTEs its statement
        assert get(sidecar, "/sleepy/fast").status == 200
    before = stats(sidecar)["database"]
    started = time.monotonic()
    reply = get(sidecar, "/sleepy/too-slow")
    assert reply.status == 503 and error_of(reply) == {"error": "database_timeout"}
    assert 0.4 < time.monotonic() - started < 1.5
    after = wait_for_stats(sidecar, lambda s: s["database"]["in_use"] == 0, 5, "pool idle")
    assert after["database"]["timeouts"] == before["timeouts"] + 1
    assert after["database"]["size"] >= 1, "a server-side cancel keeps the session"
    assert get(sidecar, "/sleepy/fast").status == 200


def test_stats_have_a_database_section(sidecar: SidecarProcess) -> None:
    get(sidecar, "/nocache/m-one")
    db = wait_for_stats(sidecar, lambda s: s["database"]["in_use"] == 0, 5, "database idle")[
        "database"
    ]
    for key in ("size", "free", "in_use", "waiting", "errors", "timeouts", "leaks"):
        assert key in db, key
    assert db["query_ms"]["p50"] > 0 and db["acquire_ms"]["p99"] >= db["acquire_ms"]["p50"]
    assert set(db["cache"]) == {
        "/api/media/",
        "/signed/",
        "/owned/",
        "/nocache/",
        "/single/",
        "/short/",
        "/sleepy/",
    }
    detail = request(sidecar.admin_port, "GET", "/health/detailed")
    body = orjson.loads(detail.body)
    assert detail.status == 200 and body["database"]["status"] == "ok"


# ---------------------------------------------------------------------------- failures


def test_database_down_is_503_fast_and_recovers_by_itself(
    sidecar: SidecarProcess, pg_server: PgServer
) -> None:
    assert get(sidecar, "/short/m-one").status == 200  # cached, expires in 300 ms
    assert get(sidecar, "/api/media/m-hello").status == 200  # cached for 30 s
    time.sleep(0.4)
    pg_server.stop()
    try:
        started = time.monotonic()
        down = get(sidecar, "/nocache/m-one")
        assert down.status == 503 and error_of(down)["error"].startswith("database")
        assert time.monotonic() - started < 1.5  # acquire_timeout 1 s, never a hang
        assert get(sidecar, "/api/media/m-hello").status == 200  # a fresh cache entry
        stale = get(sidecar, "/short/m-one")  # expired, but within stale_if_error
        assert stale.status == 200 and stale.body == FILES["one.bin"]
        assert stats(sidecar)["database"]["cache"]["/short/"]["stale_served"] >= 1
        # /health reuses a probe result for up to 1 s: it turns critical within that.
        deadline = time.monotonic() + 3
        while (health := request(sidecar.admin_port, "GET", "/health")).status == 200:
            assert time.monotonic() < deadline, "/health stayed ok with the database down"
            time.sleep(0.1)
        assert health.status == 503 and "database" in orjson.loads(health.body)["failed"]
    finally:
        pg_server.start()
    deadline = time.monotonic() + 10
    while get(sidecar, "/nocache/m-one").status != 200:
        assert time.monotonic() < deadline, "no recovery after the database came back"
        time.sleep(0.2)
    wait_for_stats(sidecar, lambda s: s["database"]["in_use"] == 0, 5, "pool idle")


def test_pool_exhaustion_answers_every_request_within_acquire_timeout(
    tmp_path: Path, media_root: Path, s3_server: S3Server, pg_server: PgServer
) -> None:
    config = make_config(
        media_root,
        s3_server.endpoint,
        database={"dsn_env": DSN_ENV, "pool_min": 0, "pool_max": 2, "acquire_timeout": "1s"},
        limits={"max_streams": 1000},
    )
    # 20 ms per query whatever the id (the sleep runs before the lookup it wraps).
    slow = f"SELECT q.* FROM (SELECT pg_sleep(0.02)) AS z, LATERAL ({QUERY}) AS q"
    config["routes"] = [{"prefix": "/slow/", "lookup": {"query": slow, "cache_ttl": 0}}]
    with running_sidecar(config, tmp_path, {DSN_ENV: pg_server.dsn}) as proc:

        async def one(i: int) -> tuple[int, float]:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
            writer.write(
                f"GET /slow/id-{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
            )
            data = await reader.read()
            writer.close()
            return int(data.split(b" ", 2)[1]), time.monotonic() - started

        async def storm() -> list[tuple[int, float]]:
            return await asyncio.gather(*(one(i) for i in range(200)))

        results = asyncio.run(storm())
        statuses = {status for status, _ in results}
        assert statuses <= {404, 503} and 404 in statuses, statuses
        assert all(elapsed < 1.0 + 1.0 for status, elapsed in results if status == 503)
        after = wait_for_stats(
            proc,
            lambda s: s["database"]["in_use"] == 0 and s["connections"]["active"] == 0,
            5,
            "idle",
        )
        assert after["database"]["size"] <= 2
        print("DEBUG", statuses, after["database"])
        assert after["database"]["acquire_timeouts"] >= 1


def test_statement_timeout_is_a_fast_503_and_the_pool_survives(sidecar: SidecarProcess) -> None:
    before = stats(sidecar)["database"]
    started = time.monotonic()
    reply = get(sidecar, "/sleepy/too-slow")
    elapsed = time.monotonic() - started
    assert reply.status == 503 and error_of(reply) == {"error": "database_timeout"}
    assert 0.4 < elapsed < 1.5, elapsed  # statement_timeout 500 ms, enforced by the server
    after = wait_for_stats(sidecar, lambda s: s["database"]["in_use"] == 0, 5, "pool idle")
    assert after["database"]["timeouts"] == before["timeouts"] + 1
    assert get(sidecar, "/sleepy/fast").status == 200  # the pool still works


def test_a_connection_held_past_leak_threshold_is_listed(sidecar: SidecarProcess) -> None:
    async def slow_request_and_watch() -> tuple[int, list[Any]]:
        async def slow() -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(b"GET /sleepy/slow HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = await reader.read()
            writer.close()
            return int(data.split(b" ", 2)[1])

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)  # past leak_threshold (200 ms), before the 0.4 s query ends
        leaks = await asyncio.to_thread(lambda: stats(sidecar)["database"]["leaks"])
        return await task, leaks

    status, leaks = asyncio.run(slow_request_and_watch())
    assert status == 200
    assert [leak["label"] for leak in leaks] == ["/sleepy/"], leaks
    assert 0.2 < leaks[0]["age_s"] < 1.0
    assert wait_for_stats(sidecar, lambda s: not s["database"]["leaks"], 5, "no leak")


def test_a_query_without_the_required_columns_refuses_to_start(
    tmp_path: Path, media_root: Path, s3_server: S3Server, pg_server: PgServer
) -> None:
    config = make_config(media_root, s3_server.endpoint, database={"dsn_env": DSN_ENV})
    del config["storages"]["uploads"]
    config["routes"] = [
        {"prefix": "/bad/", "lookup": {"query": "SELECT storage, key AS path, owner FROM "
                                       "(SELECT 'local' AS storage, 'k' AS key, 'x' AS owner) t "
                                       "WHERE %(id)s IS NOT NULL"}},
    ]  # fmt: skip
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(tmp_path / "sidecar.yaml")],
        cwd=REPO,
        env=dict(os.environ, **{DSN_ENV: pg_server.dsn}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "route /bad/" in done.stderr and "missing column 'key'" in done.stderr
    assert "unknown column 'path'" in done.stderr and "unknown column 'owner'" in done.stderr
