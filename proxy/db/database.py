"""Queries on the pool: prepared or as text, one retry on a dead session, errors mapped."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import psycopg2
import psycopg2.extensions

from proxy.config import DatabaseConfig
from proxy.db.pool import CLOSE_GRACE_S, Pool
from proxy.db.session import Params, Session, reason
from proxy.db.statement import Statement, Statements
from proxy.errors import BadRequest, DatabaseTimeout, DatabaseUnavailable, QueryRejected
from proxy.registry import LatencyWindow

logger = logging.getLogger("proxy.db")

Row = dict[str, object]


class _StaleConnection(Exception):
    """A pooled connection turned out dead (server restarted); the caller may retry once."""


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
        names, row = await self._run(
            query, _check_params(params), label=label, stmt=self._statements.statement(query)
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
    ) -> tuple[list[str], tuple[object, ...] | None]:
        """Acquire, execute, release; retry once on a dead pooled connection, same budget."""
        started = time.monotonic()
        pool = self._pool
        for attempt in (1, 2):
            conn = pool.take_free()  # the usual case: no coroutine, no timer
            if conn is not None:
                reused = True
            else:
                conn, reused = await pool.acquire(started)
            pool.lease(conn, label)
            broken = False
            try:
                return await self._execute(conn, query, params, stmt)
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

    async def _execute(
        self, conn: Session, query: str, params: Params, stmt: Statement | None
    ) -> tuple[list[str], tuple[object, ...] | None]:
        started = time.monotonic()
        self._queries += 1
        statements = self._statements
        try:
            refused = False  # PREPARE refused the query itself
            if stmt is not None and statements.enabled:
                if stmt.name in conn.prepared:
                    try:
                        return await conn.roundtrip(stmt.execute, params)
                    except psycopg2.Error as exc:
                        if not statements.stale(conn, exc):
                            raise
                        await statements.deallocate(conn, stmt)  # then run it as text, below
                else:
                    refused = not await statements.prepare(conn, stmt)
                    if not refused:
                        return await conn.roundtrip(stmt.execute, params)
            result = await conn.roundtrip(query, params)
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
            raise BadRequest(f"invalid query parameter: {reason(exc)}") from None
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            self._errors += 1
            if conn.closed:
                raise _StaleConnection(reason(exc)) from None
            raise DatabaseUnavailable(f"database error: {reason(exc)}") from None
        except psycopg2.Error as exc:
            self._errors += 1
            raise QueryRejected(f"query rejected ({exc.pgcode}): {reason(exc)}") from None
        except (KeyError, IndexError, TypeError) as exc:  # placeholders vs. params
            self._errors += 1
            raise QueryRejected(f"query parameters do not match: {exc!r}") from None
        except ValueError as exc:  # psycopg2 cannot adapt a value
            raise BadRequest(f"invalid query parameter: {exc}") from None
        finally:
            self._query_ms.add(time.monotonic() - started)
