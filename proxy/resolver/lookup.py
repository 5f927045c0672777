"""Media ids to storage keys through the database (SPEC §7), through a cache.

A lookup route answers `/<prefix>/<id>` and `/<prefix>/<id>/<variant>`: its SQL query,
written in the YAML with `%(id)s` and `%(variant)s`, is run with the values passed as
parameters (never formatted into the text) and returns named columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, NamedTuple, Protocol

from proxy.config import RouteConfig
from proxy.errors import (
    BadRequest,
    DatabaseUnavailable,
    NotFound,
    NotReady,
    QueryRejected,
    StorageError,
)
from proxy.resolver.cache import LookupCache
from proxy.resolver.path import check_key

REQUIRED_COLUMNS: Final = ("storage", "key")
OPTIONAL_COLUMNS: Final = ("content_type", "visibility", "owner_id", "status", "filename")
MAX_ID_LENGTH: Final = 256
_COLUMNS: Final = REQUIRED_COLUMNS + OPTIONAL_COLUMNS


class MediaRow(NamedTuple):
    """What the query said about one media id (and variant)."""

    storage: str
    key: str
    content_type: str | None = None
    visibility: str | None = None
    owner_id: str | None = None
    status: str | None = None
    filename: str | None = None


class Querier(Protocol):
    """The part of the database lookups use (proxy.db.Database)."""

    async def fetch_one(
        self, query: str, params: Mapping[str, object], *, label: str
    ) -> dict[str, object] | None: ...

    async def fetch_value(
        self, query: str, params: Mapping[str, object], *, label: str
    ) -> object | None: ...

    async def columns(self, query: str, params: Mapping[str, object]) -> list[str]: ...


def split_id(key: str) -> tuple[str, str | None]:
    """`<id>` or `<id>/<variant>` (already percent-decoded and confined); else 400/404."""
    media_id, _, variant = key.partition("/")
    if "/" in variant:
        raise NotFound("too many path segments for a media id")
    if len(media_id) > MAX_ID_LENGTH or len(variant) > MAX_ID_LENGTH:
        raise BadRequest("media id too long")
    return media_id, variant or None


def check_columns(columns: list[str]) -> list[str]:
    """Problems with the columns a lookup query returns (empty when fine)."""
    problems = [f"missing column {name!r}" for name in REQUIRED_COLUMNS if name not in columns]
    known = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
    problems += [
        f"unknown column {name!r} (known: {', '.join(known)})"
        for name in columns
        if name not in known
    ]
    problems += [
        f"column {name!r} returned more than once" for name in known if columns.count(name) > 1
    ]
    return problems


def row_query(query: str, columns: list[str]) -> str:
    """The lookup query as the resolver runs it: the first row's columns as one text array,
    in MediaRow's order (NULL for a column the query does not return).

    psycopg2 describes every column of every result: a Column object, a type lookup, the
    name decoded through a Python codec, about 3,500 instructions each. Seven columns took
    about 10 % of an uncached request's instructions; one array column costs one
    description and a parse in C. LIMIT 1: PostgreSQL stops at the row that is read. The
    values come in PostgreSQL's text form (`::text`), whatever their type. The names are
    ours (known columns), never the YAML's, so quoting them is all the formatting there is.
    """
    body = query.rstrip().rstrip(";").rstrip()
    items = ", ".join(f'q."{name}"::text' if name in columns else "NULL::text" for name in _COLUMNS)
    # newlines: a trailing `-- comment` in the query must not swallow the wrapper
    return f"SELECT ARRAY[{items}] AS media_row FROM (\n{body}\n) AS q LIMIT 1"


class LookupResolver:
    """Resolve ids of one lookup route: cache, then the database."""

    def __init__(self, route: RouteConfig, db: Querier, storages: Mapping[str, Any]) -> None:
        assert route.lookup is not None
        self.route = route
        self._lookup = route.lookup
        self._db = db
        self._storages = storages
        self._statuses = frozenset(route.lookup.serve_statuses)
        self.cache: LookupCache[tuple[str, str | None], MediaRow] = LookupCache(
            ttl=route.lookup.cache_ttl,
            negative_ttl=route.lookup.negative_ttl,
            max_entries=route.lookup.cache_max_entries,
            stale_if_error=route.lookup.stale_if_error,
            unavailable=DatabaseUnavailable,
        )
        self._query: str | None = None  # row_query(), once the columns are known

    async def check(self) -> list[str]:
        """Ask the database which columns the query returns; problems, or [] when fine."""
        columns = await self._db.columns(self._lookup.query, {"id": "", "variant": None})
        problems = check_columns(columns)
        self._query = None if problems else row_query(self._lookup.query, columns)
        return problems

    async def resolve(self, media_id: str, variant: str | None) -> MediaRow:
        """The row for an id; NotFound (unknown), NotReady (status), DatabaseUnavailable."""
        if self.cache.enabled:
            row = await self.cache.get((media_id, variant), lambda: self._load(media_id, variant))
        else:  # cache_ttl 0: one query per request, without the cache's layers
            self.cache.misses += 1
            row = await self._load(media_id, variant)
        if row is None:
            raise NotFound("unknown media id")
        if row.status is not None and row.status not in self._statuses:
            raise NotReady(f"status {row.status!r}")
        return row

    async def _load(self, media_id: str, variant: str | None) -> MediaRow | None:
        query = self._query
        if query is None:  # the database was down at start-up, or the columns changed
            if problems := await self.check():
                raise StorageError(f"lookup query of {self.route.prefix}: {'; '.join(problems)}")
            query = self._query
            assert query is not None
        try:
            # row_query's one column: the row's text array, or NULL (no row)
            values = await self._db.fetch_value(
                query, {"id": media_id, "variant": variant}, label=self.route.prefix
            )
        except QueryRejected:
            self._query = None  # e.g. a column dropped from the table: ask again next time
            raise
        return None if values is None else self._row(values)

    def _row(self, values: Any) -> MediaRow:
        """Validate a row (row_query's text array): a known storage, a confined key."""
        if not isinstance(values, list) or len(values) != len(_COLUMNS):
            raise StorageError(f"lookup returned {values!r}, not its columns as text")
        storage, key = values[0], values[1]
        if storage not in self._storages:
            raise StorageError(f"lookup returned unknown storage {storage!r}")
        if key is None:
            raise StorageError("lookup returned no key")
        try:
            check_key(key)  # the row holds a plain key, not a URL: nothing to decode
        except (BadRequest, NotFound):
            raise StorageError("lookup returned an invalid key") from None
        return MediaRow._make(values)
