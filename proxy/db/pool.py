"""A bounded pool of PostgreSQL sessions: connect, acquire within a budget, release, close.

The pool is our own, on aiopg connections, because aiopg's Pool connects while holding its
lock, cannot bound a connect apart from the acquire, turns a connection released inside a
transaction into a ResourceWarning and waits forever in wait_closed().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Final

import psycopg2
import psycopg2.extensions

from proxy.config import DatabaseConfig
from proxy.db.dsn import host_to_resolve, resolve_dsn, statement_dsn
from proxy.db.session import Connection, Session, reason
from proxy.errors import DatabaseUnavailable
from proxy.registry import LatencyWindow

logger = logging.getLogger("proxy.db")
_IDLE: Final = psycopg2.extensions.TRANSACTION_STATUS_IDLE

# The server cancels a query at statement_timeout; one still unanswered this much later
# (frozen server, lost network) is abandoned, and its connection closed. One watchdog
# checks every WATCH_S while any session is leased, instead of a timer per query.
CLIENT_GRACE_S: Final = 0.5
WATCH_S: Final = 0.1
# close(): in-flight queries get this long before their connections are closed under them.
CLOSE_GRACE_S: Final = 2.0


class Pool:
    """Sessions to one database: at most pool_max, handed to waiters first come first served."""

    def __init__(self, cfg: DatabaseConfig, *, dsn: str) -> None:
        self._cfg = cfg
        self._dsn = statement_dsn(dsn, cfg.statement_timeout)
        self._host = host_to_resolve(self._dsn)
        self._query_guard_s = cfg.statement_timeout + CLIENT_GRACE_S
        self._free: deque[Session] = deque()
        self._leased: set[Session] = set()
        # One connect at a time: fewer refused connects at once when the server is down.
        self._connect_lock = asyncio.Lock()
        # Each gets a released connection handed over (FIFO: a newcomer cannot take it
        # first, so nobody waits twice), or None: a slot is free, try to connect.
        self._waiters: deque[asyncio.Future[Session | None]] = deque()
        self._connecting = 0
        self._waiting = 0
        self._closing = False
        self._drained: asyncio.Event | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._acquire_ms = LatencyWindow()
        self.errors = 0  # failed connects
        self.acquire_timeouts = 0

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
            why = str(exc) or "connect timed out"
            logger.warning("database.unavailable", extra={"reason": why})

    def figures(self) -> dict[str, object]:
        """Pool gauges and acquire latency percentiles."""
        return {
            "size": self._size,
            "max": self._cfg.pool_max,
            "free": len(self._free),
            "in_use": len(self._leased),
            "connecting": self._connecting,
            "waiting": self._waiting,
            "acquire_ms": self._acquire_ms.percentiles_ms(),
        }

    def leaks(self) -> list[dict[str, object]]:
        """Connections held past leak_threshold, oldest first."""
        now = time.monotonic()
        held = sorted((conn.since, conn.label) for conn in self._leased)
        return [
            {"label": label, "age_s": round(now - since, 3)}
            for since, label in held
            if now - since > self._cfg.leak_threshold
        ]

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Refuse new leases, give leased connections `grace_s`, then close every one."""
        self._closing = True
        while self._waiters:  # they see _closing and give up at once
            if not (fut := self._waiters.popleft()).done():
                fut.set_result(None)
        self.drop_free()
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

    def take_free(self, label: str, now: float) -> Session | None:
        """A live free connection at once, leased to `label` since `now`, or None: no
        coroutine, no timer. The usual case under load, so _pop_free and lease inline."""
        free = self._free
        while free and not self._closing:
            conn = free.pop()
            if conn.raw.closed:  # aiopg notices when the server ends a session
                self._discard(conn)
                continue
            conn.label, conn.since = label, now
            self._leased.add(conn)
            if self._watchdog is None:
                self._arm_watchdog(conn.loop)
            self._acquire_ms.add(0.0)
            return conn
        return None

    async def acquire(self, since: float) -> tuple[Session, bool]:
        """A connection within the request's acquire budget (counted from `since`)."""
        started = time.monotonic()
        budget = max(0.0, self._cfg.acquire_timeout - (started - since))
        self._waiting += 1
        try:
            conn, reused = await self._take(budget)
        except TimeoutError:
            self.acquire_timeouts += 1
            raise DatabaseUnavailable(
                f"no database connection within {self._cfg.acquire_timeout:g} s"
            ) from None
        finally:
            self._waiting -= 1
        self._acquire_ms.add(time.monotonic() - started)
        return conn, reused

    def lease(self, conn: Session, label: str) -> None:
        """Count `conn` as held by `label` from now on (figures, leaks, the watchdog)."""
        conn.label, conn.since = label, time.monotonic()
        self._leased.add(conn)
        if self._watchdog is None:
            self._arm_watchdog(conn.loop)

    def release(self, conn: Session, *, broken: bool = False) -> None:
        """To the first waiter or the free list if reusable, else closed; synchronous, so
        safe on cancel."""
        self._leased.discard(conn)
        raw = conn.raw
        if (
            broken
            or raw.closed
            or self._closing
            # autocommit: only a query that opened a transaction leaves it unfinished;
            # closing rolls it back (aiopg would warn and close it too)
            or raw.get_transaction_status() != _IDLE
        ):
            self._discard(conn)
            self._wake_one()  # a slot is free: a waiter may connect
        elif self._waiters:
            self._hand_over(conn)
        else:
            self._free.append(conn)
        if self._drained is not None and not self._leased:
            self._drained.set()

    def drop_free(self) -> None:
        """Close every free connection (they date from a server run that ended)."""
        while self._free:
            self._discard(self._free.pop())

    # ------------------------------------------------------------------ internals

    def _watch(self) -> None:
        """Abandon queries unanswered past their guard; look again while any session is
        leased (armed by the lease, not by each query: one call less per query)."""
        self._watchdog = None
        now = time.monotonic()
        for conn in self._leased:
            if (waiter := conn.waiter) is not None and not waiter.done() and now > conn.expires:
                waiter.set_exception(TimeoutError())
        if self._leased:
            self._arm_watchdog(asyncio.get_running_loop())

    def _arm_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = loop.call_later(WATCH_S, self._watch)

    def _pop_free(self) -> Session | None:
        """A live free connection, if any (the warmest first: LIFO)."""
        while self._free and not self._closing:
            conn = self._free.pop()
            if not conn.closed:  # aiopg notices when the server ends a session
                return conn
            self._discard(conn)
        return None

    async def _take(self, budget: float) -> tuple[Session, bool]:
        """A live free connection, a new one if the pool has room, or wait for either;
        TimeoutError after `budget` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        while True:
            if self._closing:
                raise DatabaseUnavailable("database connections are closing")
            if (conn := self._pop_free()) is not None:
                return conn, True
            if self._size < self._cfg.pool_max:
                async with asyncio.timeout_at(deadline):
                    conn = await self._connect()
                if self._closing:  # close() ran while we connected
                    self._discard(conn)
                    continue
                return conn, False
            # Waiting is the common case under load: a bare timer fails the future, which
            # costs less than asyncio.timeout's context (its task bookkeeping, a callback).
            woken: asyncio.Future[Session | None] = loop.create_future()
            self._waiters.append(woken)
            timer = loop.call_at(deadline, _time_out, woken)
            try:
                handed = await woken
            except asyncio.CancelledError:
                if woken.done() and not woken.cancelled():  # woken, then cancelled
                    if (got := woken.result()) is not None:
                        self.release(got)  # pass the connection on
                    else:
                        self._wake_one()  # pass the turn on
                raise
            finally:
                timer.cancel()
                if woken in self._waiters:  # not remove()'s ValueError: it reprs the future
                    self._waiters.remove(woken)
            if handed is not None:
                return handed, True

    async def _connect(self) -> Session:
        """One new connection within connect_timeout (the caller's budget may be shorter)."""
        self._connecting += 1
        try:
            async with asyncio.timeout(self._cfg.connect_timeout), self._connect_lock:
                dsn = await resolve_dsn(self._dsn, self._host)
                # hstore off: its OID lookup would cost a round trip per connection
                conn = Connection(dsn, self._query_guard_s, enable_hstore=False)
                try:
                    await conn
                except BaseException:
                    conn.abandon()
                    raise
                return Session(conn, asyncio.get_running_loop(), guard_s=self._query_guard_s)
        except (TimeoutError, psycopg2.Error, OSError, RuntimeError) as exc:
            self.errors += 1
            self._wake_one()  # the slot is free again: a waiter may try (and fail fast)
            why = reason(exc) if str(exc) else "connect timed out"
            raise DatabaseUnavailable(f"cannot connect to the database: {why}") from None
        except BaseException:
            self._wake_one()  # cancelled: the slot is free again for a waiter
            raise
        finally:
            self._connecting -= 1

    def _hand_over(self, conn: Session) -> None:
        while self._waiters:
            if not (fut := self._waiters.popleft()).done():
                self._leased.add(conn)  # in transit to the waiter: counted, never lost
                conn.label, conn.since = "(handed over)", time.monotonic()
                fut.set_result(conn)
                return
        self._free.append(conn)

    def _discard(self, conn: Session) -> None:
        """Close a connection for good, its socket off the loop first (Connection)."""
        conn.aio.close()  # also when psycopg2 says closed: a lost one still has its socket

    def _wake_one(self) -> None:
        while self._waiters:
            if not (fut := self._waiters.popleft()).done():
                fut.set_result(None)
                return


def _time_out(woken: asyncio.Future[Session | None]) -> None:
    """A waiter's budget ran out; one already handed a connection or a turn keeps it."""
    if not woken.done():
        woken.set_exception(TimeoutError())
