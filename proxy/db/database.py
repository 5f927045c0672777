"""Queries on the pool: prepared or as text, one retry on a dead session, errors mapped."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

import psycopg2
import psycopg2.extensions

from proxy.config import DatabaseConfig
from proxy.db.pool import CLOSE_GRACE_S, Pool
from proxy.db.session import Params, Session, Values, reason
from proxy.db.statement import Statement, Statements
from proxy.errors import BadRequest, DatabaseTimeout, DatabaseUnavailable, QueryRejected
from proxy.registry import LatencyWindow

logger = logging.getLogger("proxy.db")

Row = dict[str, object]


def _names(description: Any) -> list[str]:
    """The column names of a psycopg2 description (None: a statement with no rows)."""
    return [col.name for col in description] if description else []


class _StaleConnection(Exception):
    """A pooled connection turned out dead (server restarted); the caller may retry once."""


# What a query can raise that _failure maps to ours (psycopg2.Warning is not raised here).
_DRIVER_ERRORS: Final = (psycopg2.Error, TimeoutError, KeyError, IndexError, TypeError, ValueError)


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


class Database:
    """A bounded pool of aiopg connections and the queries lookups run on it."""

    def __init__(self, cfg: DatabaseConfig, *, dsn: str) -> None:
        self._cfg = cfg
        self._pool = Pool(cfg, dsn=dsn)
        self._statements = Statements()
        self._query_ms = LatencyWindow()
        self._queries = 0
        self._errors = 0
        self._timeouts = 0

    async def start(self) -> None:
        """Open pool_min connections; a database that is down is only logged (503s until back)."""
        await self._pool.start()

    async def fetch_one(
        self, query: str, params: Mapping[str, object], *, label: str
    ) -> Row | None:
        """The first row as {column: value}, or None; parameters are never formatted in."""
        description, row = await self._run(
            query, _check_params(params), label=label, stmt=self._statements.statement(query)
        )
        return None if row is None else dict(zip(_names(description), row, strict=True))

    async def fetch_value(
        self, query: str, params: Mapping[str, object], *, label: str
    ) -> object | None:
        """The first column of the first row, or None (no row); no column names are read."""
        _, row = await self._run(
            query, _check_params(params), label=label, stmt=self._statements.statement(query)
        )
        return None if row is None else row[0]

    async def columns(self, query: str, params: Mapping[str, object]) -> list[str]:
        """The column names `query` returns, planned but not run (LIMIT 0 around it).

        Every parameter named in `params` is bound to NULL: only the shape matters, and
        a sample value could fail a cast (`''::int`) that the planner folds.
        """
        body = query.rstrip().rstrip(";")  # one trailing `;` is common in YAML queries
        # newlines: a trailing `-- comment` in the query must not swallow the wrapper
        wrapped = f"SELECT * FROM (\n{body}\n) AS q LIMIT 0"
        description, _ = await self._run(wrapped, dict.fromkeys(params), label="columns")
        return _names(description)

    async def probe(self) -> None:
        """SELECT 1 within acquire_timeout, or DatabaseUnavailable."""
        try:
            async with asyncio.timeout(self._cfg.acquire_timeout):
                await self._run("SELECT 1", {}, label="probe")
        except TimeoutError:
            raise DatabaseUnavailable("database probe timed out") from None

    def figures(self) -> dict[str, object]:
        """Pool gauges, latency percentiles, counters and connections held too long."""
        pool = self._pool
        return {
            **pool.figures(),
            "query_ms": self._query_ms.percentiles_ms(),
            "queries": self._queries,
            "prepares": self._statements.prepares,
            "errors": self._errors + pool.errors,
            "timeouts": self._timeouts,
            "acquire_timeouts": pool.acquire_timeouts,
            "leaks": pool.leaks(),
        }

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Refuse new queries, give running ones `grace_s`, then close every connection."""
        await self._pool.close(grace_s)

    # ------------------------------------------------------------------ internals

    async def _run(
        self, query: str, params: Params, *, label: str, stmt: Statement | None = None
    ) -> tuple[Any, Values | None]:
        """Acquire, execute, release; retry once on a dead pooled connection, same budget.

        The usual case, a statement prepared on a free connection, runs in this one
        coroutine: each level of coroutines costs a call and a resume per query.
        """
        started = time.monotonic()
        pool = self._pool
        statements = self._statements
        for attempt in (1, 2):
            now = started if attempt == 1 else time.monotonic()
            conn = pool.take_free(label, now)  # the usual case: no coroutine, no timer
            if conn is not None:
                reused = True
            else:
                conn, reused = await pool.acquire(started)
                pool.lease(conn, label)
                now = time.monotonic()
            self._queries += 1
            broken = False
            try:
                try:
                    if stmt is not None and statements.enabled and stmt.name in conn.prepared:
                        try:
                            return await conn.roundtrip(stmt.execute, params)
                        except psycopg2.Error as exc:
                            if not statements.stale(conn, exc):
                                raise
                            await statements.deallocate(conn, stmt)
                        return await conn.roundtrip(query, params)  # as text, this once
                    return await self._prepare_or_text(conn, query, params, stmt)
                except _DRIVER_ERRORS as exc:
                    raise self._failure(exc, conn) from None
                finally:
                    self._query_ms.add(time.monotonic() - now)
            except _StaleConnection as exc:
                broken = True
                # The free connections date from the same server run as the dead one: drop
                # them all (as SQLAlchemy does on a disconnect), so the retry connects anew.
                pool.drop_free()
                # Safe to repeat: lookups only read. A fresh connection failing is an outage.
                budget = self._cfg.acquire_timeout
                if attempt == 1 and reused and time.monotonic() - started < budget:
                    continue
                raise DatabaseUnavailable(f"database connection lost: {exc}") from None
            finally:
                pool.release(conn, broken=broken)
        raise AssertionError("unreachable")

    async def _prepare_or_text(
        self, conn: Session, query: str, params: Params, stmt: Statement | None
    ) -> tuple[Any, Values | None]:
        """A query not prepared on `conn`: PREPARE it first once its turn came, else as text."""
        statements = self._statements
        if stmt is None or not statements.enabled:
            return await conn.roundtrip(query, params)
        if await statements.prepare(conn, stmt):
            return await conn.roundtrip(stmt.execute, params)
        result = await conn.roundtrip(query, params)
        stmt.usable = False  # the text worked where PREPARE did not
        logger.info("database.unprepared", extra={"statement": stmt.name})
        return result

    def _failure(self, exc: Exception, conn: Session) -> Exception:
        """Ours for a driver error (or our own timeout) of a query on `conn`, counted."""
        if isinstance(exc, psycopg2.extensions.QueryCanceledError):
            # The server's statement_timeout (pitfalls P9); the session stays usable. Our
            # own poll sees psycopg2's error itself, not aiopg's CancelledError (P8).
            self._timeouts += 1
            return DatabaseTimeout("query cancelled at statement_timeout")
        if isinstance(exc, TimeoutError):
            self._timeouts += 1  # no answer even after the server-side timeout
            return DatabaseTimeout("no answer from the database")
        if isinstance(exc, psycopg2.DataError):  # SQLSTATE 22: a value the query cannot take
            return BadRequest(f"invalid query parameter: {reason(exc)}")
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
            self._errors += 1
            if conn.closed:
                return _StaleConnection(reason(exc))
            return DatabaseUnavailable(f"database error: {reason(exc)}")
        if isinstance(exc, psycopg2.Error):
            self._errors += 1
            return QueryRejected(f"query rejected ({exc.pgcode}): {reason(exc)}")
        if isinstance(exc, (KeyError, IndexError, TypeError)):  # placeholders vs. params
            self._errors += 1
            return QueryRejected(f"query parameters do not match: {exc!r}")
        return BadRequest(f"invalid query parameter: {exc}")  # ValueError: cannot adapt it
