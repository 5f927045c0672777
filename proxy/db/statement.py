"""Server-side prepared statements: which queries get one, and PREPARE on a session.

A query run PREPARE_THRESHOLD times becomes a server-side prepared statement on each
connection (as psycopg 3's `prepare_threshold`): PostgreSQL then parses and plans a lookup
once per connection instead of on every request. Values are still bound by psycopg2.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from typing import Final

import psycopg2

from proxy.db.session import Session

logger = logging.getLogger("proxy.db")

# Runs of one query text before it is prepared, distinct texts counted, statements kept
# per connection (beyond it `DEALLOCATE ALL`: only reloads with ever new queries get
# there), and how often statements may vanish under us (a pooler in transaction mode)
# before we stop preparing.
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


class Statement:
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


def compile_statement(query: str) -> Statement | None:
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
    return Statement(f"sidecar_{digest}", body, tuple(names))


class Statements:
    """One database's queries and their prepared forms; PREPARE and DEALLOCATE on sessions."""

    def __init__(self) -> None:
        self._by_query: dict[str, Statement | None] = {}
        self.enabled = True  # False once statements kept vanishing (see MAX_VANISHED)
        self._vanished = 0
        self.prepares = 0

    def statement(self, query: str) -> Statement | None:
        """The prepared form of `query` once it ran PREPARE_THRESHOLD times, else None."""
        stmt = self._by_query.get(query)
        if stmt is None:
            if query in self._by_query or not self.enabled:
                return None  # cannot be prepared
            if len(self._by_query) >= MAX_STATEMENTS:  # reloads with ever new queries
                del self._by_query[next(iter(self._by_query))]
            stmt = self._by_query[query] = compile_statement(query)
            if stmt is None:
                return None
        if stmt.runs < PREPARE_THRESHOLD:
            stmt.runs += 1
            return None
        return stmt if stmt.usable else None

    async def prepare(self, conn: Session, stmt: Statement) -> bool:
        """PREPARE `stmt` on `conn`; False if refused: the query then runs as text.

        Errors of the text query too (syntax, unknown table) then map exactly as before;
        a timeout or a lost connection is raised as it is.
        """
        if len(conn.prepared) >= MAX_PREPARED_PER_CONNECTION:
            await conn.roundtrip("DEALLOCATE ALL", None)
            conn.prepared.clear()
        while True:
            # What this PREPARE said, not what stmt says once it answers: sessions prepare
            # concurrently, and another one may have declared the types meanwhile.
            untyped = stmt.typed is None
            try:
                await conn.roundtrip(stmt.prepare_sql(), None)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                raise
            except psycopg2.Error as exc:
                if exc.pgcode in _UNTYPABLE and untyped:
                    stmt.typed = "text"  # e.g. `$2 IS NULL` alone: say what our values are
                    continue
                return False
            conn.prepared.add(stmt.name)
            self.prepares += 1
            return True

    def stale(self, conn: Session, exc: psycopg2.Error) -> bool:
        """After EXECUTE failed: True if the statement itself went stale (run as text)."""
        if exc.pgcode == _VANISHED:  # DISCARD ALL, or a pooler between us and the server
            conn.prepared.clear()
            self._vanished += 1
            if self._vanished >= MAX_VANISHED and self.enabled:
                self.enabled = False
                logger.warning(
                    "database.prepare_disabled",
                    extra={"reason": "prepared statements keep vanishing (pooler?)"},
                )
            return True
        if exc.pgcode == _RESHAPED:  # the schema changed under a `SELECT *`
            return True
        return False

    async def deallocate(self, conn: Session, stmt: Statement) -> None:
        if stmt.name in conn.prepared:
            conn.prepared.discard(stmt.name)
            with contextlib.suppress(psycopg2.ProgrammingError):
                await conn.roundtrip(f"DEALLOCATE {stmt.name}", None)
