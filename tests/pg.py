"""A throwaway PostgreSQL for the tests: initdb in a temporary directory, 127.0.0.1 only.

The server runs as the `postgres` OS user when the suite runs as root (initdb refuses
root), listens on one explicit loopback port plus a Unix socket in its own directory,
preloads pg_stat_statements (tests count queries with it), and is stopped by its PID.
`stop()` and `start()` may be called mid-test: the data directory and port are kept.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import psycopg2
import psycopg2.extensions
import pytest

DB_NAME: Final = "media"
DB_USER: Final = "sidecar"  # the role the sidecar connects as (not a superuser)
SUPERUSER: Final = "postgres"
OS_USER: Final = "postgres"  # only used when running as root
START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0
BINARIES: Final = ("initdb", "postgres")

SCHEMA: Final = """
CREATE TABLE media (
    id text PRIMARY KEY,
    storage text NOT NULL,
    key text NOT NULL,
    content_type text,
    visibility text NOT NULL DEFAULT 'public',
    owner_id text,
    status text NOT NULL DEFAULT 'ready',
    filename text
);
CREATE TABLE variants (
    media_id text NOT NULL REFERENCES media (id) ON DELETE CASCADE,
    variant text NOT NULL,
    storage text NOT NULL,
    key text NOT NULL,
    content_type text,
    PRIMARY KEY (media_id, variant)
);
"""
# (id, storage, key, content_type, visibility, owner_id, status, filename); the storages
# and keys are those of tests/conftest.py (`local` disk, `uploads` S3).
MEDIA_ROWS: Final = (
    ("m-hello", "local", "hello.txt", "text/plain", "public", None, "ready", "hello.txt"),
    ("m-one", "local", "one.bin", None, "public", None, "ready", None),
    ("m-big", "uploads", "big.bin", "application/octet-stream", "public", None, "ready", None),
    ("m-pic", "uploads", "pic.png", "image/png", "private", "u-1", "ready", "holiday.png"),
    ("m-pending", "local", "one.bin", None, "public", None, "processing", None),
)
# The lookup query of the tests' routes (and the bench's): the media row, or one of its
# variants, by %(id)s and %(variant)s.
LOOKUP_QUERY: Final = """
SELECT m.storage, m.key, m.content_type, m.visibility, m.owner_id, m.status, m.filename
  FROM media m WHERE m.id = %(id)s AND %(variant)s IS NULL
UNION ALL
SELECT v.storage, v.key, coalesce(v.content_type, m.content_type), m.visibility, m.owner_id,
       m.status, NULL
  FROM variants v JOIN media m ON m.id = v.media_id
 WHERE v.media_id = %(id)s AND v.variant = %(variant)s
"""
# (media_id, variant, storage, key, content_type)
VARIANT_ROWS: Final = (
    ("m-pic", "thumb", "local", "pic.png", "image/png"),
    ("m-hello", "nested", "local", "sub/dir/nested.bin", None),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(parent: int) -> list[int]:
    """PIDs whose parent is `parent` (from /proc; Linux only, like the rest of the suite)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(entry))
    return found


def find_bindir() -> Path:
    """The directory holding initdb and postgres; fail (never skip) when there is none."""
    candidates: list[str] = []
    if env := os.environ.get("PG_BINDIR"):
        candidates.append(env)
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    if initdb := shutil.which("initdb"):
        candidates.append(str(Path(initdb).parent))
    # Debian keeps the server binaries off PATH, one directory per major version.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for cand in candidates:
        if cand and all((Path(cand) / b).is_file() for b in BINARIES):
            return Path(cand)
    pytest.fail(
        "PostgreSQL server binaries (initdb, postgres) not found; install them with "
        "`apt-get install -y postgresql` or set PG_BINDIR (looked in: "
        f"{', '.join(c for c in candidates if c) or 'PATH'})"
    )


class PgServer:
    """One PostgreSQL cluster in a temporary directory; `dsn` is the sidecar's view of it."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="media-sidecar-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False  # later starts keep the port the sidecar was given
        # initdb refuses root: run the server as `postgres`, which must own the directory.
        self._user = OS_USER if os.geteuid() == 0 else None
        if self._user is not None:
            try:
                pw = pwd.getpwnam(self._user)
            except KeyError:
                pytest.fail(
                    f"running as root needs the `{self._user}` OS user to run PostgreSQL "
                    "(the postgresql-common package creates it)"
                )
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.base.chmod(0o700)

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def dsn(self) -> str:
        """A libpq DSN for the test role over TCP."""
        return self.dsn_for(DB_USER, DB_NAME)

    def dsn_for(self, user: str, dbname: str) -> str:
        """A libpq DSN for any role and database of this cluster."""
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"

    def _run(self, args: list[str]) -> None:
        done = subprocess.run(
            args, cwd=self.base, user=self._user, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            pytest.fail(f"{args[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def init(self) -> None:
        """Create the cluster (trust auth: the server only listens on loopback)."""
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )

    def start(self, retries: int = 2) -> None:
        """Start the postmaster on self.port and wait until it accepts queries."""
        if self.pid is not None:
            return
        args = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.base),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "shared_preload_libraries=pg_stat_statements",
            "-c",
            "max_connections=200",
            # durability is pointless for a throwaway cluster and slows every start
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        with self.log.open("ab") as out:
            log_start = out.tell()
            # Its own session: a Ctrl-C meant for pytest does not reach the server.
            self.proc = subprocess.Popen(
                args,
                cwd=self.base,
                user=self._user,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                lost_race = b"could not bind" in self.log.read_bytes()[log_start:]
                if lost_race and not self._started_once and retries > 0:
                    self.proc, self.port = None, _free_port()  # taken since we picked it
                    return self.start(retries - 1)
                pytest.fail(f"postgres exited at start ({self.proc.returncode}):\n{self.tail()}")
            try:
                psycopg2.connect(self.dsn_for(SUPERUSER, "postgres"), connect_timeout=2).close()
                self._started_once = True
                return
            except psycopg2.OperationalError as exc:  # starting up, or not listening yet
                last = exc
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"postgres not ready after {START_TIMEOUT_S} s: {last}\n{self.tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Fast shutdown by PID (SIGINT), then immediate (SIGQUIT), then SIGKILL.

        PostgreSQL's SIGTERM is a *smart* shutdown that waits for every client to leave,
        so a pool would keep it alive; SIGINT ends the sessions, as a real outage would.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                continue
        proc.wait(timeout_s)

    def freeze(self) -> None:
        """SIGSTOP the postmaster and its backends: connections hang instead of failing."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        """Undo freeze()."""
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: signal.Signals) -> None:
        # Each backend calls setsid(), so no process group covers them: find the children.
        if (parent := self.pid) is None:
            return
        for pid in [parent, *_children(parent)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def destroy(self) -> None:
        """Stop the server (if running) and remove its directory."""
        try:
            self.thaw()
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def tail(self, chars: int = 4000) -> str:
        """The end of the server log, for failure messages."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def admin(self, sql: str, params: Any = None, dbname: str = DB_NAME) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser (autocommit); rows if it returns any."""
        conn = psycopg2.connect(self.dsn_for(SUPERUSER, dbname), connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def seed(self) -> None:
        """The test role, database `media`, pg_stat_statements, tables and MEDIA_ROWS."""
        self.admin(f"CREATE ROLE {DB_USER} LOGIN", dbname="postgres")
        self.admin(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}", dbname="postgres")
        self.admin("CREATE EXTENSION pg_stat_statements")
        conn = psycopg2.connect(self.dsn, connect_timeout=5)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(SCHEMA)
                cur.executemany(
                    "INSERT INTO media VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", MEDIA_ROWS
                )
                cur.executemany("INSERT INTO variants VALUES (%s, %s, %s, %s, %s)", VARIANT_ROWS)
        finally:
            conn.close()

    def backends(self, user: str = DB_USER) -> list[tuple[str, str]]:
        """(state, query) of every session of `user`, from pg_stat_activity."""
        rows = self.admin(
            "SELECT state, query FROM pg_stat_activity WHERE usename = %s AND pid <> "
            "pg_backend_pid()",
            (user,),
        )
        return [(str(state), str(query)) for state, query in rows]

    def statement_calls(self, like: str) -> int:
        """How many times statements matching the LIKE pattern ran (pg_stat_statements)."""
        rows = self.admin(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE %s", (like,)
        )
        return int(rows[0][0])

    def reset_statements(self) -> None:
        """Zero pg_stat_statements."""
        self.admin("SELECT pg_stat_statements_reset()")
