"""The PostgreSQL side of `make bench`'s lookup scenarios (`lookup-4k`, `lookup-1m`).

A throwaway cluster (tests/pg.py) with the `media` table of the test schema, filled with
FILLER_ROWS unrelated rows and IDS_PER_FILE ids per benchmark file; the sidecar's three
routes on the same files; helpers to warm the cache, read the admin `/stats` and count the
lookup queries PostgreSQL ran (pg_stat_statements). Nothing here runs wrk: run_bench.py does.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # run as `python tests/bench/run_bench.py`
    sys.path.insert(0, str(REPO))

import psycopg2  # noqa: E402
import pytest  # noqa: E402  (tests/pg.py reports failures with pytest.fail)

from tests.pg import LOOKUP_QUERY, PgServer, find_bindir  # noqa: E402

DSN_ENV: Final = "BENCH_DATABASE_URL"
STORAGE: Final = "bench"
PLAIN: Final = "/media/"
CACHED: Final = "/api/media/"
UNCACHED: Final = "/nocache/media/"
IDS_PER_FILE: Final = 1000
FILLER_ROWS: Final = 100_000


class LookupSetupError(Exception):
    """PostgreSQL would not start or be seeded, or a lookup answered wrongly."""


def id_pattern(file: str) -> str:
    """The ids of one file, for string.format / %: `4k.bin` -> `b-4k-%04d`."""
    return f"b-{file.removesuffix('.bin')}-%04d"


def plain_pattern(file: str) -> str:
    """The plain route's names of one file: `4k.bin` -> `p-4k-%04d.bin` (hard links).

    The plain route cycles through as many distinct paths as the lookup routes do ids:
    per-URL caches (yarl's, aiohttp's, the sidecar's templates) made a single repeated
    path 16-30 % cheaper than 1,000 distinct ones on the same route, measured with wrk.
    """
    return f"p-{file.removesuffix('.bin')}-%04d.bin"


def link_plain_names(media: Path, files: list[str]) -> None:
    """Hard-link IDS_PER_FILE plain names to each file (the same inode, one page cache)."""
    for file in files:
        for i in range(IDS_PER_FILE):
            link = media / (plain_pattern(file) % i)
            if not link.exists():
                os.link(media / file, link)


def marker(prefix: str) -> str:
    return "cached" if prefix == CACHED else "uncached"


def query_for(prefix: str) -> str:
    """What a user's lookup route runs (the test suite's query), its route in a comment.

    pg_stat_statements ignores comments: both routes' queries are one entry (its text is the
    first one seen), so calls are counted as the change over a run in which only one route
    is requested.
    """
    return f"/* bench:{marker(prefix)} */{LOOKUP_QUERY.rstrip()}"


def sidecar_config(port: int, admin_port: int, media: Path) -> str:
    """One sidecar (uvloop, the default): the plain route and two lookup routes on the same files.

    The cached route keeps every default (cache_ttl 30 s, 10,000 entries, pool 1-10).
    """

    def lookup(prefix: str, extra: str = "") -> str:
        query = json.dumps(query_for(prefix))  # JSON strings are YAML strings
        return f"  - prefix: {prefix}\n    lookup:\n      query: {query}\n{extra}"

    routes = f"  - {{prefix: {PLAIN}, storage: {STORAGE}}}\n"
    routes += lookup(CACHED) + lookup(UNCACHED, "      cache_ttl: 0\n")
    return f"""server: {{host: 127.0.0.1, port: {port}, event_loop: uvloop}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
storages: {{{STORAGE}: {{type: disk, root: {json.dumps(str(media))}}}}}
database: {{dsn_env: {DSN_ENV}}}
routes:
{routes}logging: {{level: warning, access_log: false}}
"""


class LookupDb:
    """The cluster: start, seed, pin, count queries, CPU of its processes, destroy."""

    def __init__(self, files: list[str]) -> None:
        self.files = files
        self.pg: PgServer | None = None

    def start(self) -> None:
        try:
            try:
                bindir = find_bindir()
            except pytest.fail.Exception:  # `make bench` installs nginx and wrk, not this
                subprocess.run([str(HERE / "ensure_tools.sh"), "postgres"], check=True)
                bindir = find_bindir()
            self.pg = PgServer(bindir)
            self.pg.init()
            self.pg.start()
            self.pg.seed()  # role, database, pg_stat_statements, tables, the test rows
            rows = [
                (id_pattern(f) % i, STORAGE, plain_pattern(f) % i)  # the plain route's keys
                for f in self.files
                for i in range(IDS_PER_FILE)
            ]
            values = ",".join(f"('{i}', '{s}', '{k}')" for i, s, k in rows)  # our own text
            self.pg.admin(f"INSERT INTO media (id, storage, key) VALUES {values}")
            self.pg.admin(
                "INSERT INTO media (id, storage, key, content_type) SELECT 'filler-' || n,"
                " 'elsewhere', 'objects/' || md5(n::text), 'image/jpeg'"
                f" FROM generate_series(1, {FILLER_ROWS}) AS n"
            )
            self.pg.admin("ANALYZE media")
        except (pytest.fail.Exception, subprocess.CalledProcessError, psycopg2.Error) as exc:
            raise LookupSetupError(f"PostgreSQL: {exc}") from None

    @property
    def dsn(self) -> str:
        assert self.pg is not None
        return self.pg.dsn

    @property
    def pid(self) -> int:
        assert self.pg is not None and self.pg.pid is not None
        return self.pg.pid

    def pin(self, pids: list[int], cpu: int) -> None:
        """Pin the postmaster and its processes; backends forked later inherit it."""
        for pid in pids:
            try:
                os.sched_setaffinity(pid, {cpu})
            except OSError:  # exited meanwhile
                pass

    def calls(self) -> int:
        """Executions of the lookup query so far, both routes (pg_stat_statements).

        The sidecar runs a route's query wrapped as one text array column (`SELECT ARRAY[`…
        `FROM (<query>) AS q LIMIT 1`); anchored on that, as the column check it runs at
        start wraps the query too (`SELECT * FROM (`). The sidecar prepares a query it keeps
        running: pg_stat_statements then counts each EXECUTE under the text of the PREPARE
        (not the EXECUTE, nor the PREPARE itself).
        """
        return self.prepared_calls() + self.text_calls()

    def prepared_calls(self) -> int:
        """Of calls(): EXECUTEs of the prepared statement (parsed and planned once)."""
        assert self.pg is not None
        return self.pg.statement_calls("PREPARE % AS SELECT ARRAY[%/* bench:%")

    def text_calls(self) -> int:
        """Of calls(): runs as text, each parsed and planned anew (the first ones)."""
        assert self.pg is not None
        return self.pg.statement_calls("SELECT ARRAY[%/* bench:%")

    def version(self) -> str:
        assert self.pg is not None
        return str(self.pg.admin("SHOW server_version")[0][0])

    def destroy(self) -> None:
        if self.pg is not None:
            self.pg.destroy()
            self.pg = None


def admin_stats(admin_port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    try:
        conn.request("GET", "/stats")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise LookupSetupError(f"/stats answered {resp.status}: {body[:200]!r}")
        return dict(json.loads(body))
    finally:
        conn.close()


def settled_stats(admin_port: int, timeout_s: float = 5.0) -> dict[str, Any]:
    """/stats once no request is active (wrk stopped: handlers of its last requests end)."""
    deadline = time.monotonic() + timeout_s
    while (stats := admin_stats(admin_port))["connections"]["active"] and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    return stats


def check_and_warm(port: int, prefix: str, file: str, expected: bytes) -> None:
    """GET one id (the file's exact bytes), then HEAD every id: a warm cache when cached."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", prefix + id_pattern(file) % 0)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or body != expected:
            got = f"HTTP {resp.status}, {len(body)} B"
            raise LookupSetupError(f"{prefix}{id_pattern(file) % 0}: {got}, not {file}")
        for i in range(IDS_PER_FILE):
            conn.request("HEAD", prefix + id_pattern(file) % i)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise LookupSetupError(f"HEAD {prefix}{id_pattern(file) % i}: {resp.status}")
    except (OSError, http.client.HTTPException) as exc:
        raise LookupSetupError(f"warming {prefix}: {exc!r}") from None
    finally:
        conn.close()
