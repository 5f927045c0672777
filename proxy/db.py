"""The PostgreSQL database behind one small interface: pool, timeouts, errors, figures.

aiopg 1.4 is the driver (unmaintained: pitfalls §4), so nothing of it leaks past this
module. The pool is our own, on aiopg connections, because aiopg's Pool connects while
holding its lock, cannot bound a connect apart from the acquire, turns a connection
released inside a transaction into a ResourceWarning and waits forever in wait_closed().

A query run PREPARE_THRESHOLD times becomes a server-side prepared statement on each
connection (as psycopg 3's `prepare_threshold`): PostgreSQL then parses and plans a lookup
once per connection instead of on every request. Values are still bound by psycopg2.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

import aiopg
import psycopg2
import psycopg2.extensions

from proxy.config import DatabaseConfig
from proxy.errors import BadRequest, DatabaseTimeout, DatabaseUnavailable, ProxyError
from proxy.registry import LatencyWindow

logger = logging.getLogger("proxy.db")

# The server cancels a query at statement_timeout; one still unanswered this much later
# (frozen server, lost network) is abandoned, and its connection closed. One watchdog
# checks every WATCH_S while queries run, instead of a timer per query.
CLIENT_GRACE_S: Final = 0.5
WATCH_S: Final = 0.1
# close(): in-flight queries get this long before their connections are closed under them.
CLOSE_GRACE_S: Final = 2.0
APPLICATION_NAME: Final = "media-sidecar"
# Prepared statements: runs of one query text before it is prepared, distinct texts
# counted, statements kept per connection (beyond it `DEALLOCATE ALL`: only reloads with
# ever new queries get there), and how often statements may vanish under us (a pooler in
# transaction mode) before we stop preparing.
PREPARE_THRESHOLD: Final = 3
MAX_STATEMENTS: Final = 64
MAX_PREPARED_PER_CONNECTION: Final = 32
MAX_VANISHED: Final = 3
# A PREPARE that cannot infer its parameters' types (`$2 IS NULL` alone, `SELECT $1`).
_UNTYPABLE: Final = frozenset({"42P08", "42P18"})
_VANISHED: Final = "26000"  # invalid_sql_statement_name: not prepared on this session
_RESHAPED: Final = "0A000"  # "cached plan must not change result type" (schema changed)
# psycopg2's placeholder grammar: `%%` or `%(name)s`; anything else leaves a query unprepared.
_PLACEHOLDER: Final = re.compile(r"%(?:%|\(([^)]*)\)s|)")

Row = dict[str, object]
Params = dict[str, object]


class QueryRejected(ProxyError):
    """The database refused the query itself: syntax, unknown table or column, parameters."""

    code = "database_query_rejected"


class _StaleConnection(Exception):
    """A pooled connection turned out dead (server restarted); the caller may retry once."""


class _Statement:
    """A query as a server-side prepared statement: `PREPARE name AS body`, `EXECUTE name(…)`.

    `typed` is None while PostgreSQL should infer the parameter types from the query, as
    it does for psycopg2's quoted literals; "text" once it could not (our values are text
    or NULL). `usable` turns False when a PREPARE failed where the query as text worked
    (`SHOW`, several statements, parameters of other types): it then always runs as text.
    """

    __slots__ = ("body", "execute", "name", "params", "runs", "typed", "usable")

    def __init__(self, name: str, body: str, params: tuple[str, ...]) -> None:
        self.name = name
        self.body = body
        self.params = params
        # psycopg2 quotes the values into EXECUTE's arguments: binding, never formatting.
        args = ", ".join(f"%({p})s" for p in params)
        self.execute = f"EXECUTE {name}({args})" if params else f"EXECUTE {name}"
        self.typed: str | None = None
        self.usable = True
        self.runs = 0

    def prepare_sql(self) -> str:
        types = f" ({', '.join([self.typed] * len(self.params))})" if self.typed else ""
        return f"PREPARE {self.name}{types} AS {self.body}"


def compile_statement(query: str) -> _Statement | None:
    """The prepared form of a psycopg2-style query (`%(name)s` → `$n`), or None if unsure."""
    names: dict[str, int] = {}
    unsure = False

    def swap(match: re.Match[str]) -> str:
        nonlocal unsure
        text = match.group(0)
        if text == "%%":
            return "%"
        name = match.group(1)
        if name is None:  # `%s` or a stray `%`: psycopg2 decides what it means
            unsure = True
            return text
        return f"${names.setdefault(name, len(names) + 1)}"

    body = _PLACEHOLDER.sub(swap, query.rstrip().rstrip(";").rstrip())
    # `PREPARE n AS SELECT 1; SELECT 2` would prepare the first and run the second at
    # once: any other `;` (even one in a literal) leaves the query as text.
    if unsure or not body.strip() or ";" in body:
        return None
    digest = hashlib.sha256(query.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return _Statement(f"sidecar_{digest}", body, tuple(names))


class _Conn:
    """One pooled session: aiopg's connection, its socket number, a cursor used for every
    query, the statements prepared on it, and the label of whoever holds it now."""

    __slots__ = ("aio", "cursor", "expires", "fd", "label", "loop", "prepared", "since", "waiter")

    def __init__(self, aio: aiopg.Connection, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.aio = aio
        self.fd = fd
        self.loop = loop
        self.cursor: Any = aio.raw.cursor()
        self.prepared: set[str] = set()
        self.label = ""
        self.since = 0.0
        self.waiter: asyncio.Future[None] | None = None  # the query in flight
        self.expires = 0.0  # time.monotonic() past which it is abandoned

    @property
    def closed(self) -> bool:
        return bool(self.aio.closed)


def _statement_dsn(dsn: str, statement_timeout_s: float) -> str:
    """The DSN with `-c statement_timeout=<ms>` added to its options (pitfalls P9)."""
    try:
        parsed = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        raise ValueError("invalid database DSN") from None  # the text may hold a password
    ms = max(1, round(statement_timeout_s * 1000))
    options = f"{parsed.get('options', '')} -c statement_timeout={ms}".strip()
    return str(
        psycopg2.extensions.make_dsn(
            dsn,
            options=options,
            client_encoding="UTF8",
            application_name=parsed.get("application_name", APPLICATION_NAME),
        )
    )


def _host_to_resolve(dsn: str) -> str | None:
    """The one host name of the DSN that libpq would look up while blocking the loop.

    libpq resolves `host` inside PQconnectStart, synchronously, even in async mode; with
    `hostaddr` it does not. Lists, IP literals, socket directories and DSNs that already
    carry `hostaddr` are left to libpq.
    """
    parsed = psycopg2.extensions.parse_dsn(dsn)
    host = str(parsed.get("host") or "")
    if not host or "hostaddr" in parsed or "," in host or host.startswith(("/", "@")):
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def _forget_fd(fd: int) -> None:
    """Drop loop watchers left on a socket libpq closed under them (aiopg #856).

    When a connect fails, libpq closes the socket before aiopg removes its writer; uvloop
    then keeps a dead poll handle for that fd number, and every later connection that
    gets the number fails in add_reader with "UVPoll closed=True": the sidecar would never
    recover from an outage. Only a closed fd is touched, so a reused number is left alone.
    """
    try:
        os.fstat(fd)
        return  # open again: someone else's now
    except OSError:
        pass
    loop = asyncio.get_running_loop()
    for remove in (loop.remove_writer, loop.remove_reader):
        with contextlib.suppress(Exception):
            remove(fd)


def _check_params(params: Mapping[str, object]) -> Params:
    """Reject values PostgreSQL text cannot hold (NUL, lone surrogates) as a bad request."""
    for value in params.values():
        if isinstance(value, str):
            if "\x00" in value:
                raise BadRequest("a query parameter contains a NUL character")
            if value.isascii():  # the usual id: nothing else to check
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("a query parameter is not valid UTF-8") from None
    return dict(params)


def _reason(exc: BaseException) -> str:
    """The first line of a driver error, for messages (libpq messages hold no password)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Database:
    """A bounded pool of aiopg connections and the queries lookups run on it."""

    def __init__(self, cfg: DatabaseConfig, *, dsn: str) -> None:
        self._cfg = cfg
        self._dsn = _statement_dsn(dsn, cfg.statement_timeout)
        self._host = _host_to_resolve(self._dsn)
        self._query_guard_s = cfg.statement_timeout + CLIENT_GRACE_S
        self._free: deque[_Conn] = deque()
        self._leased: set[_Conn] = set()
        # One connect at a time: no other connection of ours can take a socket number
        # between libpq closing it and _forget_fd cleaning up after it.
        self._connect_lock = asyncio.Lock()
        # Each gets a released connection handed over (FIFO: a newcomer cannot take it
        # first, so nobody waits twice), or None: a slot is free, try to connect.
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._connecting = 0
        self._waiting = 0
        self._closing = False
        self._drained: asyncio.Event | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._statements: dict[str, _Statement | None] = {}
        self._prepare = True  # False once statements kept vanishing (see MAX_VANISHED)
        self._vanished = 0
        self._acquire_ms = LatencyWindow()
        self._query_ms = LatencyWindow()
        self._queries = 0
        self._prepares = 0
        self._errors = 0
        self._timeouts = 0
        self._acquire_timeouts = 0

    @property
    def _size(self) -> int:
        return len(self._free) + len(self._leased) + self._connecting

    async def start(self) -> None:
        """Open pool_min connections; a database that is down is only logged (503s until back)."""
        try:
            async with asyncio.timeout(self._cfg.connect_timeout):
                while self._size < self._cfg.pool_min:
                    self._free.append(await self._connect())
        except (DatabaseUnavailable, TimeoutError) as exc:
            reason = str(exc) or "connect timed out"
            logger.warning("database.unavailable", extra={"reason": reason})

    async def fetch_one(
        self, query: str, params: Mapping[str, object], *, label: str
    ) -> Row | None:
        """The first row as {column: value}, or None; parameters are never formatted in."""
        names, row = await self._run(
            query, _check_params(params), label=label, stmt=self._statement(query)
        )
        return None if row is None else dict(zip(names, row, strict=True))

    async def columns(self, query: str, params: Mapping[str, object]) -> list[str]:
        """The column names `query` returns, planned but not run (LIMIT 0 around it).

        Every parameter named in `params` is bound to NULL: only the shape matters, and
        a sample value could fail a cast (`''::int`) that the planner folds.
        """
        body = query.rstrip().rstrip(";")  # one trailing `;` is common in YAML queries
        # newlines: a trailing `-- comment` in the query must not swallow the wrapper
        wrapped = f"SELECT * FROM (\n{body}\n) AS q LIMIT 0"
        names, _ = await self._run(wrapped, dict.fromkeys(params), label="columns")
        return names

    async def probe(self) -> None:
        """SELECT 1 within acquire_timeout, or DatabaseUnavailable."""
        try:
            async with asyncio.timeout(self._cfg.acquire_timeout):
                await self._run("SELECT 1", {}, label="probe")
        except TimeoutError:
            raise DatabaseUnavailable("database probe timed out") from None

    def figures(self) -> dict[str, object]:
        """Pool gauges, latency percentiles, counters and connections held too long."""
        now = time.monotonic()
        held = sorted((conn.since, conn.label) for conn in self._leased)
        leaks = [
            {"label": label, "age_s": round(now - since, 3)}
            for since, label in held
            if now - since > self._cfg.leak_threshold
        ]  # oldest first
        return {
            "size": self._size,
            "max": self._cfg.pool_max,
            "free": len(self._free),
            "in_use": len(self._leased),
            "connecting": self._connecting,
            "waiting": self._waiting,
            "acquire_ms": self._acquire_ms.percentiles_ms(),
            "query_ms": self._query_ms.percentiles_ms(),
            "queries": self._queries,
            "prepares": self._prepares,
            "errors": self._errors,
            "timeouts": self._timeouts,
            "acquire_timeouts": self._acquire_timeouts,
            "leaks": leaks,
        }

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Refuse new queries, give running ones `grace_s`, then close every connection."""
        self._closing = True
        while self._waiters:  # they see _closing and give up at once
            if not (fut := self._waiters.popleft()).done():
                fut.set_result(None)
        while self._free:
            self._discard(self._free.pop())
        if self._leased:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._drained.wait()
        if self._leased:
            # Leaked or slow: close them under their holders, who get DatabaseUnavailable;
            # aiopg's wait_closed() would wait for them forever (pitfalls §4).
            held = sorted({conn.label for conn in self._leased})
            logger.warning(
                "database.close_forced", extra={"connections": len(self._leased), "labels": held}
            )
            for conn in list(self._leased):
                self._discard(conn)

    # ------------------------------------------------------------------ internals

    def _statement(self, query: str) -> _Statement | None:
        """The prepared form of `query` once it ran PREPARE_THRESHOLD times, else None."""
        stmt = self._statements.get(query)
        if stmt is None:
            if query in self._statements or not self._prepare:
                return None  # cannot be prepared
            if len(self._statements) >= MAX_STATEMENTS:  # reloads with ever new queries
                del self._statements[next(iter(self._statements))]
            stmt = self._statements[query] = compile_statement(query)
            if stmt is None:
                return None
        if stmt.runs < PREPARE_THRESHOLD:
            stmt.runs += 1
            return None
        return stmt if stmt.usable else None

    async def _run(
        self, query: str, params: Params, *, label: str, stmt: _Statement | None = None
    ) -> tuple[list[str], tuple[object, ...] | None]:
        """Acquire, execute, release; retry once on a dead pooled connection, same budget."""
        started = time.monotonic()
        for attempt in (1, 2):
            conn = self._pop_free()  # the usual case: no coroutine, no timer
            if conn is not None:
                reused = True
                self._acquire_ms.add(0.0)
            else:
                conn, reused = await self._acquire(started)
            conn.label, conn.since = label, time.monotonic()
            self._leased.add(conn)
            broken = False
            try:
                return await self._execute(conn, query, params, stmt)
            except _StaleConnection as exc:
                broken = True
                # The free connections date from the same server run as the dead one: drop
                # them all (as SQLAlchemy does on a disconnect), so the retry connects anew.
                while self._free:
                    self._discard(self._free.pop())
                # Safe to repeat: lookups only read. A fresh connection failing is an outage.
                budget = self._cfg.acquire_timeout
                if attempt == 1 and reused and time.monotonic() - started < budget:
                    continue
                raise DatabaseUnavailable(f"database connection lost: {exc}") from None
            finally:
                self._release(conn, broken=broken)
        raise AssertionError("unreachable")

    async def _execute(
        self, conn: _Conn, query: str, params: Params, stmt: _Statement | None
    ) -> tuple[list[str], tuple[object, ...] | None]:
        started = time.monotonic()
        self._queries += 1
        try:
            refused = False  # PREPARE refused the query itself
            if stmt is not None and self._prepare:
                if stmt.name in conn.prepared:
                    try:
                        return await self._roundtrip(conn, stmt.execute, params)
                    except psycopg2.Error as exc:
                        if not self._stale(conn, stmt, exc):
                            raise
                        await self._deallocate(conn, stmt)  # then run it as text, below
                else:
                    refused = not await self._prepared(conn, stmt)
                    if not refused:
                        return await self._roundtrip(conn, stmt.execute, params)
            result = await self._roundtrip(conn, query, params)
            if refused and stmt is not None:  # the text worked where PREPARE did not
                stmt.usable = False
                logger.info("database.unprepared", extra={"statement": stmt.name})
            return result
        except psycopg2.extensions.QueryCanceledError:
            # The server's statement_timeout (pitfalls P9); the session stays usable. Our
            # own poll sees psycopg2's error itself, not aiopg's CancelledError (P8).
            self._timeouts += 1
            raise DatabaseTimeout("query cancelled at statement_timeout") from None
        except TimeoutError:
            self._timeouts += 1  # no answer even after the server-side timeout
            raise DatabaseTimeout("no answer from the database") from None
        except psycopg2.DataError as exc:  # SQLSTATE 22: a value the query cannot take
            raise BadRequest(f"invalid query parameter: {_reason(exc)}") from None
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            self._errors += 1
            if conn.closed:
                raise _StaleConnection(_reason(exc)) from None
            raise DatabaseUnavailable(f"database error: {_reason(exc)}") from None
        except psycopg2.Error as exc:
            self._errors += 1
            raise QueryRejected(f"query rejected ({exc.pgcode}): {_reason(exc)}") from None
        except (KeyError, IndexError, TypeError) as exc:  # placeholders vs. params
            self._errors += 1
            raise QueryRejected(f"query parameters do not match: {exc!r}") from None
        except ValueError as exc:  # psycopg2 cannot adapt a value
            raise BadRequest(f"invalid query parameter: {exc}") from None
        finally:
            self._query_ms.add(time.monotonic() - started)

    async def _prepared(self, conn: _Conn, stmt: _Statement) -> bool:
        """PREPARE `stmt` on `conn`; False if refused: the query then runs as text.

        Errors of the text query too (syntax, unknown table) then map exactly as before;
        a timeout or a lost connection is raised as it is.
        """
        if len(conn.prepared) >= MAX_PREPARED_PER_CONNECTION:
            await self._roundtrip(conn, "DEALLOCATE ALL", None)
            conn.prepared.clear()
        while True:
            try:
                await self._roundtrip(conn, stmt.prepare_sql(), None)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                raise
            except psycopg2.Error as exc:
                if exc.pgcode in _UNTYPABLE and stmt.typed is None:
                    stmt.typed = "text"  # e.g. `$2 IS NULL` alone: say what our values are
                    continue
                return False
            conn.prepared.add(stmt.name)
            self._prepares += 1
            return True

    def _stale(self, conn: _Conn, stmt: _Statement, exc: psycopg2.Error) -> bool:
        """After EXECUTE failed: True if the statement itself went stale (run as text)."""
        if exc.pgcode == _VANISHED:  # DISCARD ALL, or a pooler between us and the server
            conn.prepared.clear()
            self._vanished += 1
            if self._vanished >= MAX_VANISHED and self._prepare:
                self._prepare = False
                logger.warning(
                    "database.prepare_disabled",
                    extra={"reason": "prepared statements keep vanishing (pooler?)"},
                )
            return True
        if exc.pgcode == _RESHAPED:  # the schema changed under a `SELECT *`
            return True
        return False

    async def _deallocate(self, conn: _Conn, stmt: _Statement) -> None:
        if stmt.name in conn.prepared:
            conn.prepared.discard(stmt.name)
            with contextlib.suppress(psycopg2.ProgrammingError):
                await self._roundtrip(conn, f"DEALLOCATE {stmt.name}", None)

    async def _roundtrip(
        self, conn: _Conn, sql: str, params: Params | None
    ) -> tuple[list[str], tuple[object, ...] | None]:
        """Send one statement and wait for its first row, with no aiopg cursor in between.

        aiopg's Cursor.execute costs a cursor, a context manager and a wait_for (another
        future, a timer, a callback hop) per query, and its _poll turns the server's
        cancel into CancelledError (pitfalls P8). Here: one reused psycopg2 cursor, aiopg's
        own reader (`_ready`) completes our waiter, the pool's watchdog guards it. aiopg
        1.4 is pinned (constraints.txt) and unmaintained, so these private names hold still.
        """
        aio = conn.aio
        waiter = aio._create_waiter("execute")  # raises if busy: a pooled conn never is
        try:
            conn.cursor.execute(sql, params)
        except BaseException:
            aio._waiter = None
            raise
        aio._ready(aio._weakref)  # flush the query; later results arrive via the reader
        conn.waiter, conn.expires = waiter, time.monotonic() + self._query_guard_s
        if self._watchdog is None:
            self._watchdog = conn.loop.call_later(WATCH_S, self._watch)
        try:
            await waiter
        except (asyncio.CancelledError, TimeoutError):
            # Cancelled (client gone) or unanswered: the query may still run, so the
            # session is busy: close it (it leaves the pool) rather than reuse it (P9).
            aio.close()
            raise
        finally:
            conn.waiter = aio._waiter = None
        cur = conn.cursor
        description = cur.description
        if not description:
            return [], None
        return [col.name for col in description], cur.fetchone()

    def _watch(self) -> None:
        """Abandon queries unanswered past their guard; look again while any runs."""
        self._watchdog = None
        now = time.monotonic()
        running = False
        for conn in self._leased:
            if (waiter := conn.waiter) is not None and not waiter.done():
                running = True
                if now > conn.expires:
                    waiter.set_exception(TimeoutError())
        if running:
            self._watchdog = asyncio.get_running_loop().call_later(WATCH_S, self._watch)

    def _pop_free(self) -> _Conn | None:
        """A live free connection, if any (the warmest first: LIFO)."""
        while self._free and not self._closing:
            conn = self._free.pop()
            if not conn.closed:  # aiopg notices when the server ends a session
                return conn
            self._discard(conn)
        return None

    async def _acquire(self, since: float) -> tuple[_Conn, bool]:
        """A connection within the request's acquire budget (counted from `since`)."""
        started = time.monotonic()
        budget = self._cfg.acquire_timeout - (started - since)
        self._waiting += 1
        try:
            async with asyncio.timeout(max(0.0, budget)):
                conn, reused = await self._take()
        except TimeoutError:
            self._acquire_timeouts += 1
            raise DatabaseUnavailable(
                f"no database connection within {self._cfg.acquire_timeout:g} s"
            ) from None
        finally:
            self._waiting -= 1
        self._acquire_ms.add(time.monotonic() - started)
        return conn, reused

    async def _take(self) -> tuple[_Conn, bool]:
        """A live free connection, a new one if the pool has room, or wait for either."""
        while True:
            if self._closing:
                raise DatabaseUnavailable("database connections are closing")
            if (conn := self._pop_free()) is not None:
                return conn, True
            if self._size < self._cfg.pool_max:
                conn = await self._connect()
                if self._closing:  # close() ran while we connected
                    self._discard(conn)
                    continue
                return conn, False
            woken: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(woken)
            try:
                handed = await woken
            except asyncio.CancelledError:
                if woken.done() and not woken.cancelled():  # woken, then timed out
                    if (got := woken.result()) is not None:
                        self._release(got)  # pass the connection on
                    else:
                        self._wake_one()  # pass the turn on
                raise
            finally:
                if woken in self._waiters:  # not remove()'s ValueError: it reprs the future
                    self._waiters.remove(woken)
            if handed is not None:
                return handed, True

    async def _connect(self) -> _Conn:
        """One new connection within connect_timeout (the caller's budget may be shorter)."""
        self._connecting += 1
        try:
            async with asyncio.timeout(self._cfg.connect_timeout), self._connect_lock:
                dsn = await self._resolved_dsn()
                # hstore off: its OID lookup would cost a round trip per connection
                conn = aiopg.Connection(dsn, self._query_guard_s, enable_hstore=False)
                fd = conn.raw.fileno()
                try:
                    await conn
                except BaseException:
                    _forget_fd(fd)
                    raise
                return _Conn(conn, fd, asyncio.get_running_loop())
        except (TimeoutError, psycopg2.Error, OSError, RuntimeError) as exc:
            self._errors += 1
            self._wake_one()  # the slot is free again: a waiter may try (and fail fast)
            reason = _reason(exc) if str(exc) else "connect timed out"
            raise DatabaseUnavailable(f"cannot connect to the database: {reason}") from None
        except BaseException:
            self._wake_one()  # cancelled: the slot is free again for a waiter
            raise
        finally:
            self._connecting -= 1

    async def _resolved_dsn(self) -> str:
        """The DSN with `hostaddr` from a lookup in the executor, so libpq does not block."""
        if self._host is None:
            return self._dsn
        infos = await asyncio.get_running_loop().getaddrinfo(
            self._host, None, type=socket.SOCK_STREAM
        )
        addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
        # One `host` entry per address, so libpq still tries each in turn (IPv6, then IPv4).
        return str(
            psycopg2.extensions.make_dsn(
                self._dsn, host=",".join([self._host] * len(addrs)), hostaddr=",".join(addrs)
            )
        )

    def _release(self, conn: _Conn, *, broken: bool = False) -> None:
        """To the first waiter or the free list if reusable, else closed; synchronous, so
        safe on cancel."""
        self._leased.discard(conn)
        if (
            conn.closed
            or broken
            or self._closing
            # autocommit: only a query that opened a transaction leaves it unfinished;
            # closing rolls it back (aiopg would warn and close it too)
            or conn.aio.raw.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE
        ):
            self._discard(conn)
            self._wake_one()  # a slot is free: a waiter may connect
        else:
            self._hand_over(conn)
        if self._drained is not None and not self._leased:
            self._drained.set()

    def _hand_over(self, conn: _Conn) -> None:
        while self._waiters:
            if not (fut := self._waiters.popleft()).done():
                self._leased.add(conn)  # in transit to the waiter: counted, never lost
                conn.label, conn.since = "(handed over)", time.monotonic()
                fut.set_result(conn)
                return
        self._free.append(conn)

    def _discard(self, conn: _Conn) -> None:
        """Close a connection for good and clean up after its socket."""
        if not conn.closed:  # aiopg's close() is not idempotent: it touches the fd again
            conn.aio.close()
        if conn.fd >= 0:  # once: the number may belong to someone else later
            _forget_fd(conn.fd)
            conn.fd = -1

    def _wake_one(self) -> None:
        while self._waiters:
            if not (fut := self._waiters.popleft()).done():
                fut.set_result(None)
                return
