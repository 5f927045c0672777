"""LookupResolver against a real PostgreSQL: how a row's columns reach the resolver.

The resolver runs the route's query wrapped as one text array column (row_query): these
tests pin that the values arrive exactly, as text or as the prepared statement, and that
the columns the query returns are checked again when they change under it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.config import DatabaseConfig, LookupConfig, RouteConfig
from proxy.db import PREPARE_THRESHOLD, Database, QueryRejected
from proxy.resolver.lookup import LookupResolver, MediaRow
from tests.pg import PgServer

pytestmark = pytest.mark.integration

TABLE = "odd_media"
# Array syntax inside values: spaces, quotes, commas, braces, a backslash, the word NULL.
KEY = 'a b/"c",{d} NULL.bin'
FILENAME = 'say "hi"\\ {x}, y.txt'


@pytest.fixture
async def database(pg_server: PgServer) -> AsyncIterator[Database]:
    cfg = DatabaseConfig(pool_min=1, pool_max=1, acquire_timeout=1.0, statement_timeout=1.0)
    db = Database(cfg, dsn=pg_server.dsn)
    await db.start()
    yield db
    await db.close(grace_s=1.0)


@pytest.fixture
def odd_table(pg_server: PgServer) -> Any:
    pg_server.admin(
        f"CREATE TABLE {TABLE} (id text PRIMARY KEY, storage text, key text, owner_id bigint,"
        " status text, filename text, content_type text)"
    )
    try:
        pg_server.admin(f"GRANT SELECT ON {TABLE} TO sidecar")
        pg_server.admin(
            f"INSERT INTO {TABLE} VALUES ('x', 'local', %s, 42, 'ready', %s, 'NULL')",
            (KEY, FILENAME),
        )
        yield
    finally:
        pg_server.admin(f"DROP TABLE {TABLE}")


def resolver_for(db: Database, query: str) -> LookupResolver:
    route = RouteConfig(prefix="/odd/", lookup=LookupConfig(query=query, cache_ttl=0))
    return LookupResolver(route, db, {"local": object()})


async def test_values_arrive_exactly_as_text(database: Database, odd_table: Any) -> None:
    """Special characters survive the array; SQL NULL and the string 'NULL' stay apart;
    a bigint arrives in PostgreSQL's text form; as text and as the prepared statement."""
    resolver = resolver_for(
        database,
        f"SELECT storage, key, owner_id, status, filename, content_type FROM {TABLE}"
        " WHERE id = %(id)s;",
    )
    assert await resolver.check() == []
    expected = MediaRow("local", KEY, "NULL", None, "42", "ready", FILENAME)
    for _ in range(PREPARE_THRESHOLD + 2):
        assert await resolver.resolve("x", None) == expected
    assert database.figures()["prepares"] == 1


async def test_a_dropped_column_is_checked_again(
    database: Database, odd_table: Any, pg_server: PgServer
) -> None:
    """`SELECT *` from a view that loses a column under a running sidecar: that request
    fails (the wrapped query names the column), the next one asks for the columns again."""
    view = f"CREATE VIEW odd_view AS SELECT storage, key{{}} FROM {TABLE}"
    pg_server.admin(view.format(", filename"))
    try:
        pg_server.admin("GRANT SELECT ON odd_view TO sidecar")
        resolver = resolver_for(database, "SELECT * FROM odd_view WHERE 'x' = %(id)s")
        assert await resolver.check() == []
        assert await resolver.resolve("x", None) == MediaRow("local", KEY, filename=FILENAME)
        pg_server.admin("DROP VIEW odd_view")
        pg_server.admin(view.format(""))
        pg_server.admin("GRANT SELECT ON odd_view TO sidecar")
        with pytest.raises(QueryRejected):
            await resolver.resolve("x", None)
        assert await resolver.resolve("x", None) == MediaRow("local", KEY)
    finally:
        pg_server.admin("DROP VIEW IF EXISTS odd_view")
