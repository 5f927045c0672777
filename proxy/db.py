"""The PostgreSQL database behind one small interface: pool, timeouts, errors, figures.

aiopg 1.4 is the driver (unmaintained: pitfalls §4), so nothing of it leaks past this
module. The pool is our own, on aiopg connections, because aiopg's Pool connects while
holding its lock, cannot bound a connect apart from the acquire, turns a connection
released inside a transaction into a ResourceWarning and waits forever in wait_closed().
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Mapping
from typing import Final

import aiopg
import psycopg2
import psycopg2.extensions

from proxy.config import DatabaseConfig
from proxy.errors import BadRequest, DatabaseTimeout, DatabaseUnavailable, ProxyError
from proxy.registry import LatencyWindow

logger = logging.getLogger("proxy.db")

# The server cancels a query at statement_timeout; one still unanswered this much later
# (frozen server, lost network) is abandoned by aiopg, which then closes the connection.
CLIENT_GRACE_S: Final = 0.5
# close(): in-flight queries get this long before their connections are closed under them.
CLOSE_GRACE_S: Final = 2.0
APPLICATION_NAME: Final = "media-sidecar"

Row = dict[str, object]


class QueryRejected(ProxyError):
    """The database refused the query itself: syntax, unknown table or column, parameters."""

    code = "database_query_rejected"


class _QueryCanceledNoise(logging.Filter):
    """Drop the ERROR + traceback aiopg reports to the loop for every statement timeout.

    aiopg passes the server's cancel to `loop.call_exception_handler` before turning it
    into CancelledError (pitfalls P8); we count it as a timeout and answer 503 instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, psycopg2.extensions.QueryCanceledError)


_NOISE_FILTER: Final = _QueryCanceledNoise()


class _StaleConnection(Exception):
    """A pooled connection turned out dead (server restarted); the caller may retry once."""


class _Lease:
    __slots__ = ("label", "since")

    def __init__(self, label: str, since: float) -> None:
        self.label = label
        self.since = since


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


def _check_params(params: Mapping[str, object]) -> dict[str, object]:
    """Reject values PostgreSQL text cannot hold (NUL, lone surrogates) as a bad request."""
    for value in params.values():
        if isinstance(value, str):
            if "\x00" in value:
                raise BadRequest("a query parameter contains a NUL character")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("a query parameter is not valid UTF-8") from None
    return dict(params)


def _reason(exc: BaseException) -> str:
    """The first line of a driver error, for messages (libpq messages hold no password)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _cancelled_by_server(exc: asyncio.CancelledError) -> bool:
    """aiopg re-raises the server's QueryCanceled as CancelledError (pitfalls P8)."""
    task = asyncio.current_task()
    return (task is None or task.cancelling() == 0) and isinstance(
        exc.__context__, psycopg2.extensions.QueryCanceledError
    )


class Database:
    """A bounded pool of aiopg connections and the queries lookups run on it."""

    def __init__(self, cfg: DatabaseConfig, *, dsn: str) -> None:
        self._cfg = cfg
        self._dsn = _statement_dsn(dsn, cfg.statement_timeout)
        self._host = _host_to_resolve(self._dsn)
        self._query_guard_s = cfg.statement_timeout + CLIENT_GRACE_S
        self._free: deque[aiopg.Connection] = deque()
        self._leases: dict[aiopg.Connection, _Lease] = {}
        self._fds: dict[aiopg.Connection, int] = {}  # for _forget_fd once closed
        # One connect at a time: no other connection of ours can take a socket number
        # between libpq closing it and _forget_fd cleaning up after it.
        self._connect_lock = asyncio.Lock()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._connecting = 0
        self._waiting = 0
        self._closing = False
        self._drained: asyncio.Event | None = None
        self._acquire_ms = LatencyWindow()
        self._query_ms = LatencyWindow()
        self._queries = 0
        self._errors = 0
        self._timeouts = 0
        self._acquire_timeouts = 0

    @property
    def _size(self) -> int:
        return len(self._free) + len(self._leases) + self._connecting

    async def start(self) -> None:
        """Open pool_min connections; a database that is down is only logged (503s until back)."""
        logging.getLogger("asyncio").addFilter(_NOISE_FILTER)  # a no-op when already there
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
        names, row = await self._run(query, _check_params(params), label=label)
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
        held = sorted((lease.since, lease.label) for lease in self._leases.values())
        leaks = [
            {"label": label, "age_s": round(now - since, 3)}
            for since, label in held
            if now - since > self._cfg.leak_threshold
        ]  # oldest first
        return {
            "size": self._size,
            "max": self._cfg.pool_max,
            "free": len(self._free),
            "in_use": len(self._leases),
            "connecting": self._connecting,
            "waiting": self._waiting,
            "acquire_ms": self._acquire_ms.percentiles_ms(),
            "query_ms": self._query_ms.percentiles_ms(),
            "queries": self._queries,
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
        if self._leases:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._drained.wait()
        if self._leases:
            # Leaked or slow: close them under their holders, who get DatabaseUnavailable;
            # aiopg's wait_closed() would wait for them forever (pitfalls §4).
            held = sorted({lease.label for lease in self._leases.values()})
            logger.warning(
                "database.close_forced", extra={"connections": len(self._leases), "labels": held}
            )
            for conn in list(self._leases):
                self._discard(conn)

    # ------------------------------------------------------------------ internals

    async def _run(
        self, query: str, params: dict[str, object], *, label: str
    ) -> tuple[list[str], tuple[object, ...] | None]:
        """Acquire, execute, release; retry once on a dead pooled connection, same budget."""
        deadline = asyncio.get_running_loop().time() + self._cfg.acquire_timeout
        for attempt in (1, 2):
            conn, reused = await self._acquire(label, deadline)
            broken = False
            try:
                return await self._execute(conn, query, params)
            except _StaleConnection as exc:
                broken = True
                # The free connections date from the same server run as the dead one: drop
                # them all (as SQLAlchemy does on a disconnect), so the retry connects anew.
                while self._free:
                    self._discard(self._free.pop())
                # Safe to repeat: lookups only read. A fresh connection failing is an outage.
                if attempt == 1 and reused and asyncio.get_running_loop().time() < deadline:
                    continue
                raise DatabaseUnavailable(f"database connection lost: {exc}") from None
            finally:
                self._release(conn, broken=broken)
        raise AssertionError("unreachable")

    async def _execute(
        self, conn: aiopg.Connection, query: str, params: dict[str, object]
    ) -> tuple[list[str], tuple[object, ...] | None]:
        started = time.monotonic()
        self._queries += 1
        try:
            async with conn.cursor(timeout=self._query_guard_s) as cur:
                await cur.execute(query, params)
                names = [col.name for col in cur.description or ()]
                row = await cur.fetchone() if cur.description else None
                return names, None if row is None else tuple(row)
        except asyncio.CancelledError as exc:
            if _cancelled_by_server(exc):
                self._timeouts += 1
                raise DatabaseTimeout("query cancelled at statement_timeout") from None
            raise  # a real cancellation (client gone): aiopg already closed the connection
        except psycopg2.extensions.QueryCanceledError:
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

    async def _acquire(self, label: str, deadline: float) -> tuple[aiopg.Connection, bool]:
        """A connection within the request's acquire budget, registered under `label`."""
        started = time.monotonic()
        self._waiting += 1
        try:
            async with asyncio.timeout_at(deadline):
                conn, reused = await self._take()
        except TimeoutError:
            self._acquire_timeouts += 1
            raise DatabaseUnavailable(
                f"no database connection within {self._cfg.acquire_timeout:g} s"
            ) from None
        finally:
            self._waiting -= 1
        self._acquire_ms.add(time.monotonic() - started)
        self._leases[conn] = _Lease(label, time.monotonic())
        return conn, reused

    async def _take(self) -> tuple[aiopg.Connection, bool]:
        """A live free connection, a new one if the pool has room, or wait for either."""
        while True:
            if self._closing:
                raise DatabaseUnavailable("database connections are closing")
            while self._free:
                conn = self._free.pop()  # LIFO: the warmest connection
                if not conn.closed:  # aiopg notices when the server ends a session
                    return conn, True
                self._discard(conn)
            if self._size < self._cfg.pool_max:
                conn = await self._connect()
                if self._closing:  # close() ran while we connected
                    self._discard(conn)
                    continue
                return conn, False
            woken = asyncio.get_running_loop().create_future()
            self._waiters.append(woken)
            try:
                await woken
            except asyncio.CancelledError:
                if woken.done() and not woken.cancelled():
                    self._wake_one()  # woken, then timed out: pass the turn on
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(woken)

    async def _connect(self) -> aiopg.Connection:
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
                self._fds[conn] = fd
                return conn
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

    def _release(self, conn: aiopg.Connection, *, broken: bool = False) -> None:
        """Back to the free list if reusable, else closed; synchronous, so safe on cancel."""
        self._leases.pop(conn, None)
        if conn.closed:
            self._discard(conn)
        elif (
            broken
            or self._closing
            # autocommit: only a query that opened a transaction leaves it unfinished;
            # closing rolls it back (aiopg would warn and close it too)
            or conn.raw.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE
        ):
            self._discard(conn)
        else:
            self._free.append(conn)
        if self._drained is not None and not self._leases:
            self._drained.set()
        self._wake_one()

    def _discard(self, conn: aiopg.Connection) -> None:
        """Close a connection for good and clean up after its socket."""
        if not conn.closed:  # aiopg's close() is not idempotent: it touches the fd again
            conn.close()
        if (fd := self._fds.pop(conn, None)) is not None:
            _forget_fd(fd)

    def _wake_one(self) -> None:
        while self._waiters:
            if not (fut := self._waiters.popleft()).done():
                fut.set_result(None)
                return
