"""proxy.db.Database against a real PostgreSQL: rows, hostile values, timeouts, outages.

Every test ends with the pool's gauges back at rest (nothing in use, nobody waiting) and
checks what the server saw (pg_stat_activity), not only what the pool says about itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop

from proxy import turns
from proxy.config import DatabaseConfig
from proxy.db import PREPARE_THRESHOLD, Database, QueryRejected
from proxy.db.pool import WATCH_S
from proxy.errors import BadRequest, DatabaseTimeout, DatabaseUnavailable
from tests.pg import PgServer

pytestmark = pytest.mark.integration

MARGIN_S = 0.3  # scheduling slack on top of a configured bound
LOOKUP = (
    "SELECT m.storage, m.key, m.content_type, m.visibility, m.owner_id, m.status, m.filename"
    " FROM media m WHERE m.id = %(id)s"
)
VARIANT_LOOKUP = (
    "SELECT coalesce(v.storage, m.storage) AS storage, coalesce(v.key, m.key) AS key,"
    " coalesce(v.content_type, m.content_type) AS content_type, m.status"
    " FROM media m LEFT JOIN variants v ON v.media_id = m.id AND v.variant = %(variant)s"
    " WHERE m.id = %(id)s AND (%(variant)s IS NULL OR v.variant IS NOT NULL)"
)
_app_names = itertools.count()

MakeDb = Callable[..., Awaitable[tuple[Database, str]]]


def at_rest(db: Database) -> None:
    """Nothing in use, nobody waiting or connecting, no leak reported."""
    figures = db.figures()
    assert (figures["in_use"], figures["waiting"], figures["connecting"]) == (0, 0, 0), figures
    assert figures["leaks"] == [], figures
    assert turns.awaited == 0, "a reply still counted as awaited: bodies would stay sliced"


def media_rows(pg: PgServer) -> list[tuple[object, ...]]:
    """Every row of the media table: other modules' fixtures add their own, so tests
    compare before and after rather than count."""
    return sorted(pg.admin("SELECT * FROM media"))


def sessions(pg: PgServer, app: str) -> list[tuple[str, str]]:
    """(state, query) of the server sessions one Database opened."""
    rows = pg.admin("SELECT state, query FROM pg_stat_activity WHERE application_name = %s", (app,))
    return [(str(state), str(query)) for state, query in rows]


async def eventually(check: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    """Poll `check` (server-side state lags the client by a moment)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.fixture
async def make_db(pg_server: PgServer) -> AsyncIterator[MakeDb]:
    """Start Databases on the test server (own application_name each); close them after."""
    made: list[Database] = []

    async def make(**overrides: Any) -> tuple[Database, str]:
        app = f"test-db-{next(_app_names)}"
        settings: dict[str, Any] = {
            "pool_min": 1,
            "pool_max": 4,
            "acquire_timeout": 1.0,
            "statement_timeout": 1.0,
            "connect_timeout": 0.5,
            "leak_threshold": 30.0,
        }
        settings.update(overrides)
        db = Database(DatabaseConfig(**settings), dsn=f"{pg_server.dsn} application_name={app}")
        made.append(db)
        await db.start()
        return db, app

    yield make
    for db in made:
        await db.close(grace_s=1.0)


async def test_fetch_one_returns_named_columns(make_db: MakeDb, pg_server: PgServer) -> None:
    db, app = await make_db()
    row = await db.fetch_one(LOOKUP, {"id": "m-pic"}, label="/m/")
    assert row == {
        "storage": "uploads",
        "key": "pic.png",
        "content_type": "image/png",
        "visibility": "private",
        "owner_id": "u-1",
        "status": "ready",
        "filename": "holiday.png",
    }
    variant = await db.fetch_one(VARIANT_LOOKUP, {"id": "m-pic", "variant": "thumb"}, label="/m/")
    assert variant == {
        "storage": "local",
        "key": "pic.png",
        "content_type": "image/png",
        "status": "ready",
    }
    assert (
        await db.fetch_one(VARIANT_LOOKUP, {"id": "m-pic", "variant": "nope"}, label="/m/") is None
    )
    assert await db.fetch_one(LOOKUP, {"id": "no-such-id"}, label="/m/") is None
    figures = db.figures()
    assert figures["queries"] == 4 and figures["errors"] == 0
    assert figures["size"] == 1, "sequential queries must reuse the one pooled connection"
    at_rest(db)
    # The statement_timeout is set by the server for our sessions (pitfalls P9).
    assert await db.fetch_one("SHOW statement_timeout", {}, label="t") == {
        "statement_timeout": "1s"
    }
    assert len(sessions(pg_server, app)) == 1


@pytest.mark.parametrize(
    "hostile",
    [
        "1' OR '1'='1",
        "m-hello' --",
        "'; DROP TABLE media; --",
        "m-hello\\",
        "%(id)s",
        "m-%",
        "\u00e9\u4e2d\U0001f600",
        "x" * 10_000,
    ],
)
async def test_hostile_values_are_data_not_sql(
    make_db: MakeDb, pg_server: PgServer, hostile: str
) -> None:
    db, _ = await make_db()
    rows = media_rows(pg_server)
    assert await db.fetch_one(LOOKUP, {"id": hostile}, label="/m/") is None
    echoed = await db.fetch_one("SELECT %(v)s::text AS v", {"v": hostile}, label="/m/")
    assert echoed == {"v": hostile}, "the value must arrive byte for byte"
    assert media_rows(pg_server) == rows
    at_rest(db)


@pytest.mark.parametrize("bad", ["m-hello\x00", "\x00", "m-\udcff"])
async def test_unstorable_text_is_a_bad_request(make_db: MakeDb, bad: str) -> None:
    """NUL and lone surrogates cannot be PostgreSQL text: 400, and the pool is unharmed."""
    db, _ = await make_db()
    with pytest.raises(BadRequest):
        await db.fetch_one(LOOKUP, {"id": bad}, label="/m/")
    assert db.figures()["errors"] == 0, "a client's bad value is not a database error"
    assert await db.fetch_one(LOOKUP, {"id": "m-one"}, label="/m/") is not None
    at_rest(db)


async def test_value_the_query_cannot_take_is_a_bad_request(make_db: MakeDb) -> None:
    db, _ = await make_db()
    with pytest.raises(BadRequest):
        await db.fetch_one("SELECT %(id)s::int AS n", {"id": "12abc"}, label="/m/")
    assert await db.fetch_one("SELECT %(id)s::int AS n", {"id": "12"}, label="/m/") == {"n": 12}
    at_rest(db)


async def test_statement_timeout_is_a_database_timeout(
    make_db: MakeDb, pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    db, app = await make_db(statement_timeout=0.3)
    pid = await db.fetch_one("SELECT pg_backend_pid() AS pid", {}, label="/m/")
    started = time.monotonic()
    with pytest.raises(DatabaseTimeout):
        await db.fetch_one("SELECT pg_sleep(5)", {}, label="/slow/")
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed <= 0.3 + MARGIN_S, elapsed
    figures = db.figures()
    assert figures["timeouts"] == 1 and figures["size"] == 1, figures
    # The server cancelled only the statement: the same session serves the next query.
    assert await db.fetch_one("SELECT pg_backend_pid() AS pid", {}, label="/m/") == pid
    assert [state for state, _ in sessions(pg_server, app)] == ["idle"]
    at_rest(db)
    assert not caplog.records, "a timeout is counted and answered, not logged as an error"


async def test_real_cancellation_is_not_a_timeout(make_db: MakeDb) -> None:
    """A client that leaves cancels the task: CancelledError propagates, nothing stays held."""
    db, _ = await make_db(statement_timeout=5.0)
    task = asyncio.create_task(db.fetch_one("SELECT pg_sleep(3)", {}, label="/slow/"))
    assert await eventually(lambda: db.figures()["in_use"] == 1)
    await asyncio.sleep(0.1)  # inside the query
    assert turns.awaited == 1  # its reply is awaited: streams take turns meanwhile
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert db.figures()["timeouts"] == 0
    at_rest(db)
    assert await db.fetch_one("SELECT 1 AS one", {}, label="/m/") == {"one": 1}


async def test_pool_exhaustion_is_bounded(make_db: MakeDb, pg_server: PgServer) -> None:
    """pool_max 2, 50 slow queries at once: each ends in time, never more than 2 sessions."""
    acquire_s, sleep_s = 0.5, 0.2
    db, app = await make_db(pool_max=2, acquire_timeout=acquire_s, statement_timeout=2.0)
    peak = 0

    async def one() -> tuple[str, float]:
        nonlocal peak
        started = time.monotonic()
        try:
            await db.fetch_one(f"SELECT pg_sleep({sleep_s})", {}, label="/slow/")
            outcome = "ok"
        except DatabaseUnavailable:
            outcome = "unavailable"
        peak = max(peak, int(str(db.figures()["size"])))
        return outcome, time.monotonic() - started

    async def watch() -> int:
        most = 0
        while True:
            most = max(most, len(sessions(pg_server, app)))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(one() for _ in range(50)))
    watcher.cancel()
    ok = [t for outcome, t in results if outcome == "ok"]
    failed = [t for outcome, t in results if outcome == "unavailable"]
    # Both connections stay busy for the whole window: 2 x (acquire_s / sleep_s) at least.
    assert len(ok) >= 4 and failed, (len(ok), len(failed))
    assert max(ok) <= acquire_s + sleep_s + MARGIN_S, max(ok)
    assert max(failed) <= acquire_s + MARGIN_S, max(failed)
    assert min(failed) >= acquire_s - 0.05, "gave up before acquire_timeout"
    figures = db.figures()
    assert peak <= 2 and figures["size"] == 2, (peak, figures)
    assert figures["acquire_timeouts"] == len(failed)
    assert len(sessions(pg_server, app)) == 2
    at_rest(db)


async def test_waiter_cancelled_while_waiting_for_a_slot(make_db: MakeDb) -> None:
    db, _ = await make_db(pool_max=1, acquire_timeout=3.0, statement_timeout=3.0)
    holder = asyncio.create_task(db.fetch_one("SELECT pg_sleep(0.5)", {}, label="/slow/"))
    assert await eventually(lambda: db.figures()["in_use"] == 1)
    waiter = asyncio.create_task(db.fetch_one("SELECT 1 AS one", {}, label="/m/"))
    assert await eventually(lambda: db.figures()["waiting"] == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert db.figures()["waiting"] == 0
    started = time.monotonic()
    patient = await db.fetch_one("SELECT 1 AS one", {}, label="/m/")  # waits for the holder
    assert patient == {"one": 1} and time.monotonic() - started < 0.5 + MARGIN_S
    await holder
    at_rest(db)


async def test_transaction_left_open_does_not_leak(make_db: MakeDb, pg_server: PgServer) -> None:
    """A query that leaves a transaction open: the connection is closed, not pooled."""
    db, app = await make_db()
    assert await db.fetch_one("BEGIN; SELECT 1 AS one", {}, label="/tx/") == {"one": 1}
    at_rest(db)
    assert db.figures()["size"] == 0
    assert await eventually(lambda: sessions(pg_server, app) == [])
    assert await db.fetch_one("SELECT 1 AS one", {}, label="/m/") == {"one": 1}
    assert [state for state, _ in sessions(pg_server, app)] == ["idle"]


async def test_server_stopped_then_started(make_db: MakeDb, pg_server: PgServer) -> None:
    """Outage: 503 fast for every caller; back: the same Database serves again by itself."""
    db, _ = await make_db(pool_min=2, acquire_timeout=1.0)
    assert await db.fetch_one(LOOKUP, {"id": "m-one"}, label="/m/") is not None
    pg_server.stop()
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(db.fetch_one(LOOKUP, {"id": "m-one"}, label="/m/") for _ in range(20)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(o, DatabaseUnavailable) for o in outcomes), outcomes
        assert elapsed < 0.5, f"refused connections must fail fast, took {elapsed:.2f} s"
        with pytest.raises(DatabaseUnavailable):
            await db.probe()
        at_rest(db)
    finally:
        pg_server.start()
    assert await db.fetch_one(LOOKUP, {"id": "m-one"}, label="/m/") is not None
    await db.probe()
    at_rest(db)


async def test_sessions_killed_under_the_pool(make_db: MakeDb, pg_server: PgServer) -> None:
    """Pooled sessions terminated server-side (failover, restart): the next query still works."""
    db, app = await make_db(pool_min=3)
    assert len(sessions(pg_server, app)) == 3
    pg_server.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s", (app,))  # fmt: skip
    for _ in range(3):
        assert await db.fetch_one("SELECT 1 AS one", {}, label="/m/") == {"one": 1}
    at_rest(db)


async def test_start_while_down_then_recovers(make_db: MakeDb, pg_server: PgServer) -> None:
    pg_server.stop()
    try:
        started = time.monotonic()
        db, _ = await make_db(pool_min=2)
        assert time.monotonic() - started < 0.5 + MARGIN_S
        assert db.figures()["size"] == 0
        with pytest.raises(DatabaseUnavailable):
            await db.fetch_one("SELECT 1 AS one", {}, label="/m/")
    finally:
        pg_server.start()
    assert await db.fetch_one("SELECT 1 AS one", {}, label="/m/") == {"one": 1}
    at_rest(db)


async def test_frozen_server_is_bounded(make_db: MakeDb, pg_server: PgServer) -> None:
    """A server that accepts but never answers: client guard on queries, connect_timeout."""
    db, _ = await make_db(
        pool_min=1, pool_max=2, acquire_timeout=2.0, connect_timeout=0.3, statement_timeout=0.3
    )
    pg_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseTimeout):  # the pooled session sent the query: no answer
            await db.fetch_one("SELECT 1 AS one", {}, label="/m/")
        assert time.monotonic() - started <= 0.3 + 0.5 + MARGIN_S
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):  # new connections: the handshake never ends
            await db.fetch_one("SELECT 1 AS one", {}, label="/m/")
        assert time.monotonic() - started <= 0.3 + MARGIN_S, "connect_timeout, not acquire"
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await db.probe()
        assert time.monotonic() - started <= 2.0 + MARGIN_S
        at_rest(db)
    finally:
        pg_server.thaw()
    assert await db.fetch_one("SELECT 1 AS one", {}, label="/m/") == {"one": 1}
    at_rest(db)


async def test_watchdog_guards_every_round_trip_of_a_lease(
    make_db: MakeDb, pg_server: PgServer
) -> None:
    """The watchdog is armed by the lease and ticks while any session is leased, queries
    waiting or not: a round trip that starts after idle ticks on one lease (EXECUTE right
    after PREPARE) is still abandoned past its guard. At rest it stops."""
    db, _ = await make_db(pool_min=1, statement_timeout=0.3)
    pool = db._pool
    conn = pool.take_free("/m/", time.monotonic())
    assert conn is not None
    broken = False
    try:
        await asyncio.sleep(WATCH_S * 3)  # ticks with no query waiting
        pg_server.freeze()
        started = time.monotonic()
        async with asyncio.timeout(5):  # a hang fails here, not the whole run
            with pytest.raises(TimeoutError):
                await conn.roundtrip("SELECT 1", None)
        assert time.monotonic() - started <= 0.3 + 0.5 + WATCH_S + MARGIN_S
        broken = True
    finally:
        pg_server.thaw()
        pool.release(conn, broken=broken)
    await asyncio.sleep(WATCH_S * 3)
    assert pool._watchdog is None, "idle: no timer left ticking"
    assert await db.fetch_value("SELECT 41 + 1", {}, label="/m/") == 42
    at_rest(db)


async def test_fetch_value_is_the_first_column_of_the_first_row(make_db: MakeDb) -> None:
    db, _ = await make_db()
    assert await db.fetch_value(LOOKUP, {"id": "m-pic"}, label="/m/") == "uploads"
    assert await db.fetch_value(LOOKUP, {"id": "no-such-id"}, label="/m/") is None
    assert await db.fetch_value("SELECT NULL::text, 1", {}, label="/m/") is None
    assert db.figures()["queries"] == 3
    at_rest(db)


async def test_leak_report_names_the_route(make_db: MakeDb) -> None:
    db, _ = await make_db(leak_threshold=0.2, statement_timeout=3.0)
    task = asyncio.create_task(db.fetch_one("SELECT pg_sleep(0.8)", {}, label="/slow/"))
    await asyncio.sleep(0.45)
    leaks = db.figures()["leaks"]
    assert isinstance(leaks, list) and len(leaks) == 1, leaks
    assert leaks[0]["label"] == "/slow/" and 0.2 < leaks[0]["age_s"] < 0.8, leaks
    await task
    at_rest(db)


async def test_figures_shape(make_db: MakeDb) -> None:
    db, _ = await make_db()
    await db.fetch_one("SELECT 1 AS one", {}, label="/m/")
    figures = db.figures()
    for name in ("acquire_ms", "query_ms"):
        window = figures[name]
        assert isinstance(window, dict) and set(window) == {"p50", "p95", "p99"}
    assert {"size", "max", "free", "in_use", "waiting", "errors", "timeouts", "leaks"} <= set(
        figures
    )


async def test_columns_plans_without_running(make_db: MakeDb, pg_server: PgServer) -> None:
    db, _ = await make_db()
    params = {"id": "", "variant": None}
    assert await db.columns(LOOKUP, params) == [
        "storage", "key", "content_type", "visibility", "owner_id", "status", "filename",
    ]  # fmt: skip
    for tail in (" ; \n", "\n-- trailing comment"):
        assert await db.columns(VARIANT_LOOKUP + tail, params) == [
            "storage", "key", "content_type", "status",
        ]  # fmt: skip
    casting = "SELECT storage, key FROM media WHERE length(id) = %(id)s::int"
    assert await db.columns(casting, params) == ["storage", "key"]  # '' would not cast
    started = time.monotonic()
    assert await db.columns("SELECT pg_sleep(5) AS slept, id FROM media", {}) == ["slept", "id"]
    assert time.monotonic() - started < 0.5, "the query must not run"
    with pytest.raises(QueryRejected):
        await db.columns("SELECT nope FROM media WHERE id = %(id)s", params)
    with pytest.raises(QueryRejected):
        await db.columns("SELECT * FROM no_such_table", params)
    with pytest.raises(QueryRejected):  # a placeholder the route does not provide
        await db.columns("SELECT id FROM media WHERE owner_id = %(user)s", params)
    at_rest(db)


async def test_close_is_bounded(make_db: MakeDb, pg_server: PgServer) -> None:
    db, app = await make_db(statement_timeout=10.0)
    held = asyncio.create_task(db.fetch_one("SELECT pg_sleep(5)", {}, label="/slow/"))
    assert await eventually(lambda: db.figures()["in_use"] == 1)
    started = time.monotonic()
    await db.close(grace_s=0.3)
    assert time.monotonic() - started < 0.3 + MARGIN_S
    with pytest.raises(DatabaseUnavailable):
        await held
    at_rest(db)
    assert db.figures()["size"] == 0
    with pytest.raises(DatabaseUnavailable):
        await db.fetch_one("SELECT 1 AS one", {}, label="/m/")
    # The server may finish the sleeping statement later (pitfalls P9), but idle sessions end.
    assert await eventually(lambda: all(s != "idle" for s, _ in sessions(pg_server, app)))


async def test_close_idle_pool(make_db: MakeDb, pg_server: PgServer) -> None:
    db, app = await make_db(pool_min=3)
    started = time.monotonic()
    await db.close()
    assert time.monotonic() - started < 0.1
    assert await eventually(lambda: sessions(pg_server, app) == [])


async def test_host_name_dsn(pg_server: PgServer) -> None:
    """A host name is resolved off the loop; libpq still tries each address (IPv6 first)."""
    dsn = pg_server.dsn.replace("host=127.0.0.1", "host=localhost")
    db = Database(DatabaseConfig(pool_min=0), dsn=dsn)
    try:
        assert await db.fetch_one("SELECT 1 AS one", {}, label="/m/") == {"one": 1}
    finally:
        await db.close()
    db = Database(DatabaseConfig(pool_min=0, connect_timeout=1.0), dsn=dsn.replace(
        "host=localhost", "host=no-such-host.invalid"))  # fmt: skip
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await db.fetch_one("SELECT 1 AS one", {}, label="/m/")
        assert time.monotonic() - started < 1.0 + MARGIN_S
    finally:
        await db.close()


def test_invalid_dsn_is_a_value_error_without_the_secret() -> None:
    with pytest.raises(ValueError) as caught:
        Database(DatabaseConfig(), dsn="host=x password=hunter2 broken")
    assert "hunter2" not in str(caught.value)


async def test_dsn_options_are_kept(pg_server: PgServer) -> None:
    """The operator's own `options` survive; statement_timeout is appended to them."""
    dsn = f"{pg_server.dsn} options='-c search_path=pg_catalog'"
    db = Database(DatabaseConfig(pool_min=0, statement_timeout=0.25), dsn=dsn)
    try:
        row = await db.fetch_one(
            "SELECT current_setting('search_path') AS path,"
            " current_setting('statement_timeout') AS st",
            {},
            label="/m/",
        )
        assert row == {"path": "pg_catalog", "st": "250ms"}
    finally:
        await db.close()


def test_outage_and_recovery_on_uvloop(pg_server: PgServer) -> None:
    """The sidecar may run on uvloop: a refused connect must not poison the socket number.

    aiopg #856: libpq closes a refused socket under aiopg's writer; uvloop kept a dead
    poll handle for the number and every later connect failed with "UVPoll closed=True".
    """

    async def scenario() -> None:
        db = Database(DatabaseConfig(pool_min=2, statement_timeout=0.3), dsn=pg_server.dsn)
        await db.start()
        try:
            assert await db.fetch_one("SELECT 1 AS one", {}, label="/m/") == {"one": 1}
            with pytest.raises(DatabaseTimeout):
                await db.fetch_one("SELECT pg_sleep(2)", {}, label="/slow/")
            pg_server.stop()
            try:
                for _ in range(3):
                    with pytest.raises(DatabaseUnavailable):
                        await db.fetch_one("SELECT 1 AS one", {}, label="/m/")
            finally:
                pg_server.start()
            for _ in range(3):
                assert await db.fetch_one("SELECT 1 AS one", {}, label="/m/") == {"one": 1}
            task = asyncio.create_task(db.fetch_one("SELECT pg_sleep(2)", {}, label="/slow/"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            at_rest(db)
        finally:
            await db.close(grace_s=0.5)

    uvloop.run(scenario())


def test_outage_leaves_no_dead_watcher_for_other_sockets_on_uvloop(pg_server: PgServer) -> None:
    """Socket numbers libpq frees during an outage are taken at once by others: the
    sidecar accepts clients and opens S3 connections all the time. Those sockets must
    be watchable (add_writer: the splice path, aiohttp) during and after the outage.

    Found by the soak (tests/soak): uvloop closes its poll handle when a refused connect
    reports an error, libpq then closes the socket, and a socket opened before the pool
    cleaned up got the number and failed with "UVPoll closed=True", for good.
    """

    async def churn(stop: asyncio.Event, failures: list[str]) -> int:
        """Open sockets and watch them, as fast as the loop lets us; count them."""
        loop, opened = asyncio.get_running_loop(), 0
        while not stop.is_set():
            a, b = socket.socketpair()
            with a, b:
                opened += 1
                try:
                    loop.add_writer(a.fileno(), lambda: None)
                    loop.remove_writer(a.fileno())
                except RuntimeError as exc:
                    failures.append(f"fd {a.fileno()}: {exc}")
            await asyncio.sleep(0)
        return opened

    async def scenario() -> None:
        db = Database(
            DatabaseConfig(pool_min=2, pool_max=4, acquire_timeout=0.5), dsn=pg_server.dsn
        )
        await db.start()
        stop, failures = asyncio.Event(), []
        churners = [asyncio.create_task(churn(stop, failures)) for _ in range(4)]
        try:
            assert await db.fetch_one("SELECT 1 AS one", {}, label="/m/") == {"one": 1}
            pg_server.stop()
            try:
                for _ in range(5):  # refused connects, several sockets each
                    results = await asyncio.gather(
                        *(db.fetch_one("SELECT 1 AS one", {}, label="/m/") for _ in range(8)),
                        return_exceptions=True,
                    )
                    assert all(isinstance(r, DatabaseUnavailable) for r in results), results
            finally:
                pg_server.start()
            for _ in range(3):
                assert await db.fetch_one("SELECT 1 AS one", {}, label="/m/") == {"one": 1}
        finally:
            stop.set()
            opened = await asyncio.gather(*churners)
            await db.close(grace_s=0.5)
        assert min(opened) > 10, opened  # the churn really ran alongside
        assert not failures, failures[:5]
        at_rest(db)

    uvloop.run(scenario())


# ---------------------------------------------------------------- prepared statements


async def warm(db: Database, query: str, params: dict[str, Any]) -> None:
    """Run `query` past the threshold: its last run prepared it, the next ones EXECUTE it."""
    for _ in range(PREPARE_THRESHOLD + 1):
        await db.fetch_one(query, params, label="/m/")


async def own_statements(db: Database) -> list[str]:
    """The prepared statements of the session that runs this (pool_max=1: the only one)."""
    row = await db.fetch_one(
        "SELECT string_agg(name, ',' ORDER BY name) AS names FROM pg_prepared_statements"
        " WHERE name LIKE 'sidecar\\_%%'",
        {},
        label="/m/",
    )
    assert row is not None
    return str(row["names"] or "").split(",") if row["names"] else []


async def test_lookup_runs_as_one_prepared_statement(make_db: MakeDb, pg_server: PgServer) -> None:
    """After the threshold: one PREPARE per session, then EXECUTE; each is one query."""
    db, _ = await make_db(pool_max=1)
    pg_server.reset_statements()
    runs = 10
    for _ in range(runs):
        assert await db.fetch_one(VARIANT_LOOKUP, {"id": "m-pic", "variant": "thumb"}, label="/m/")
        assert (
            await db.fetch_one(VARIANT_LOOKUP, {"id": "nope", "variant": None}, label="/m/") is None
        )
    figures = db.figures()
    assert figures["prepares"] == 1 and figures["queries"] == 2 * runs, figures
    # pg_stat_statements counts each EXECUTE under the PREPARE's text, the rest as text.
    executed = pg_server.statement_calls("PREPARE sidecar\\_% AS SELECT coalesce(v.storage%")
    as_text = pg_server.statement_calls("SELECT coalesce(v.storage%")
    assert (executed, as_text) == (2 * runs - PREPARE_THRESHOLD, PREPARE_THRESHOLD)
    assert len(await own_statements(db)) == 1
    at_rest(db)


async def test_sessions_preparing_at_once_all_keep_the_statement(
    make_db: MakeDb, pg_server: PgServer
) -> None:
    """The first PREPARE of `%(variant)s IS NULL` alone fails untyped and is declared as text.
    Sessions that sent the untyped PREPARE at the same time must retry as well: once, a
    concurrent start left the statement marked unpreparable and every lookup ran as text."""
    db, _ = await make_db(pool_max=4)
    query = "SELECT key FROM media WHERE id = %(id)s AND %(variant)s IS NULL"
    params = {"id": "m-one", "variant": None}
    await asyncio.gather(*(db.fetch_one("SELECT pg_sleep(0.1)", {}, label="/m/") for _ in range(4)))
    assert db.figures()["size"] == 4
    prepared = db.figures()["prepares"]
    pg_server.reset_statements()
    for _ in range(PREPARE_THRESHOLD):  # as text
        assert await db.fetch_one(query, params, label="/m/") == {"key": "one.bin"}
    for _ in range(3):  # each session prepares in the first round, then executes
        rows = await asyncio.gather(*(db.fetch_one(query, params, label="/m/") for _ in range(4)))
        assert rows == [{"key": "one.bin"}] * 4
    assert db.figures()["prepares"] - prepared == 4 and db.figures()["errors"] == 0
    executed = pg_server.statement_calls("PREPARE sidecar\\_% AS SELECT key FROM media%")
    as_text = pg_server.statement_calls("SELECT key FROM media WHERE id = $1 AND $2 IS NULL")
    assert (executed, as_text) == (12, PREPARE_THRESHOLD)
    at_rest(db)


@pytest.mark.parametrize(
    "hostile", ["'); DROP TABLE media; --", "m-one' OR '1'='1", "%(id)s", "$1", "x\\'y", "%%"]
)
async def test_prepared_path_binds_hostile_values_as_data(
    make_db: MakeDb, pg_server: PgServer, hostile: str
) -> None:
    db, _ = await make_db()
    rows = media_rows(pg_server)
    echo = "SELECT %(v)s::text AS v, (SELECT count(*) FROM media WHERE id = %(v)s) AS n"
    await warm(db, echo, {"v": "m-one"})
    await warm(db, LOOKUP, {"id": "m-one"})
    prepares = db.figures()["prepares"]
    assert await db.fetch_one(echo, {"v": hostile}, label="/m/") == {"v": hostile, "n": 0}
    assert await db.fetch_one(LOOKUP, {"id": hostile}, label="/m/") is None
    assert db.figures()["prepares"] == prepares == 2, "both ran as prepared statements"
    assert media_rows(pg_server) == rows
    at_rest(db)


async def test_prepared_statement_after_the_server_restarts(
    make_db: MakeDb, pg_server: PgServer
) -> None:
    """A new session after an outage prepares the statement again (or EXECUTE would fail)."""
    db, _ = await make_db(pool_max=1)
    await warm(db, LOOKUP, {"id": "m-one"})
    assert await db.fetch_one(LOOKUP, {"id": "m-hello"}, label="/m/") is not None
    assert db.figures()["prepares"] == 1
    pg_server.stop()
    pg_server.start()
    for media_id in ("m-one", "m-hello", "m-one"):
        row = await db.fetch_one(LOOKUP, {"id": media_id}, label="/m/")
        assert row is not None and row["storage"] == "local", row
    assert db.figures()["prepares"] == 2
    assert len(await own_statements(db)) == 1
    at_rest(db)


async def test_statement_vanishing_falls_back_to_text(make_db: MakeDb) -> None:
    """DEALLOCATE ALL (or a pooler) under us: the query still answers; after a few such
    surprises the pool stops preparing rather than failing forever."""
    db, _ = await make_db(pool_max=1)
    await warm(db, LOOKUP, {"id": "m-one"})
    for _ in range(4):
        assert await db.fetch_one(LOOKUP, {"id": "m-one"}, label="/m/") is not None
        assert await db.fetch_one("DEALLOCATE ALL", {}, label="/m/") is None
        assert await db.fetch_one(LOOKUP, {"id": "m-one"}, label="/m/") is not None
    assert db.figures()["prepares"] == 3, "prepared again twice, then no more"
    assert await own_statements(db) == []
    assert db.figures()["errors"] == 0
    at_rest(db)


async def test_prepared_statement_follows_a_schema_change(
    make_db: MakeDb, pg_server: PgServer
) -> None:
    """`SELECT *` prepared, then a column added: PostgreSQL refuses the old plan's shape."""
    pg_server.admin("CREATE TABLE reshaped (id text PRIMARY KEY, key text)")
    try:
        pg_server.admin("GRANT SELECT ON reshaped TO sidecar")
        pg_server.admin("INSERT INTO reshaped VALUES ('a', 'a.bin')")
        db, _ = await make_db(pool_max=1)
        query = "SELECT * FROM reshaped WHERE id = %(id)s"
        await warm(db, query, {"id": "a"})
        assert await db.fetch_one(query, {"id": "a"}, label="/m/") == {"id": "a", "key": "a.bin"}
        pg_server.admin("ALTER TABLE reshaped ADD COLUMN storage text DEFAULT 'local'")
        for _ in range(2):
            row = await db.fetch_one(query, {"id": "a"}, label="/m/")
            assert row == {"id": "a", "key": "a.bin", "storage": "local"}
        assert db.figures()["prepares"] == 2 and db.figures()["errors"] == 0
        at_rest(db)
    finally:
        pg_server.admin("DROP TABLE reshaped")


async def test_queries_prepare_refuses_run_as_text(make_db: MakeDb) -> None:
    """SHOW, several statements, an untypable `$1`: always right, prepared where possible."""
    db, _ = await make_db(pool_max=1)
    several = "SELECT 1 AS one; SELECT 2 AS two"
    first = await db.fetch_one(several, {}, label="/m/")
    for _ in range(PREPARE_THRESHOLD + 3):
        assert await db.fetch_one("SHOW statement_timeout", {}, label="/m/") == {
            "statement_timeout": "1s"
        }
        assert await db.fetch_one(several, {}, label="/m/") == first
        # `%(v)s IS NULL` alone: PostgreSQL cannot infer the type; declared as text then
        assert await db.fetch_one(
            "SELECT %(v)s IS NULL AS missing, %(v)s AS v", {"v": None}, label="/m/"
        ) == {"missing": True, "v": None}
    assert db.figures()["prepares"] == 1 and db.figures()["errors"] == 0
    at_rest(db)


async def test_statement_timeout_on_the_prepared_path(
    make_db: MakeDb, pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    db, app = await make_db(statement_timeout=0.3, pool_max=1)
    sleep = "SELECT pg_backend_pid() AS pid, pg_sleep(%(s)s::float) AS slept"
    await warm(db, sleep, {"s": "0"})
    pid = (await db.fetch_one(sleep, {"s": "0"}, label="/m/") or {})["pid"]
    started = time.monotonic()
    with pytest.raises(DatabaseTimeout):
        await db.fetch_one(sleep, {"s": "5"}, label="/slow/")
    assert 0.25 <= time.monotonic() - started <= 0.3 + MARGIN_S
    assert (await db.fetch_one(sleep, {"s": "0"}, label="/m/") or {})["pid"] == pid
    assert db.figures()["prepares"] == 1 and db.figures()["timeouts"] == 1
    assert [state for state, _ in sessions(pg_server, app)] == ["idle"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    at_rest(db)


async def test_cancelled_prepared_query_leaves_no_busy_connection(
    make_db: MakeDb, pg_server: PgServer
) -> None:
    db, app = await make_db(statement_timeout=5.0, pool_max=1)
    sleep = "SELECT pg_sleep(%(s)s::float) AS slept"
    await warm(db, sleep, {"s": "0"})
    task = asyncio.create_task(db.fetch_one(sleep, {"s": "3"}, label="/slow/"))
    assert await eventually(lambda: ("active", "EXECUTE") in [
        (state, query[:7]) for state, query in sessions(pg_server, app)])  # fmt: skip
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    at_rest(db)
    assert db.figures()["size"] == 0, "the busy session was closed, not pooled"
    assert await db.fetch_one(sleep, {"s": "0"}, label="/m/") == {"slept": ""}
    assert db.figures()["prepares"] == 2  # the new session prepared it again


async def test_many_distinct_queries_stay_bounded_per_session(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reloads with ever new queries: a session keeps at most so many statements."""
    monkeypatch.setattr("proxy.db.statement.MAX_PREPARED_PER_CONNECTION", 2)
    db, _ = await make_db(pool_max=1)
    for n in range(5):
        query = f"SELECT {n} AS n, key FROM media WHERE id = %(id)s"
        await warm(db, query, {"id": "m-one"})
        assert await db.fetch_one(query, {"id": "m-one"}, label="/m/") == {"n": n, "key": "one.bin"}
    assert db.figures()["prepares"] == 5
    assert len(await own_statements(db)) <= 2
    at_rest(db)


async def test_a_waiter_is_served_before_a_newcomer(make_db: MakeDb) -> None:
    """A released connection goes to the longest waiter, not to whoever asks next."""
    db, _ = await make_db(pool_max=1, statement_timeout=3.0)
    order: list[str] = []

    async def holder() -> None:
        await db.fetch_one("SELECT pg_sleep(0.2)", {}, label="/holder/")
        # Asks again at once, before the waiter's task could run: it must queue behind.
        await db.fetch_one("SELECT 2 AS two", {}, label="/again/")
        order.append("again")

    async def waiter() -> None:
        await db.fetch_one("SELECT 1 AS one", {}, label="/waiter/")
        order.append("waiter")

    first = asyncio.create_task(holder())
    assert await eventually(lambda: db.figures()["in_use"] == 1)
    second = asyncio.create_task(waiter())
    assert await eventually(lambda: db.figures()["waiting"] == 1)
    await asyncio.gather(first, second)
    assert order == ["waiter", "again"]
    at_rest(db)
