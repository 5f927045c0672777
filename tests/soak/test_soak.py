"""Soak: every kind of client, storage and database trouble at once, for a while; nothing leaks.

One real sidecar process (uvloop, or SOAK_LOOP) serves disk, SeaweedFS, a fault-injecting
S3 stand-in (tests/faults/fake_s3.py), PostgreSQL lookup routes (cached, uncached, signed)
and an upstream route to the example backend (tests/upstream_backend.py) to SOAK_CLIENTS
threads that pick requests from traffic.MIX: whole files, ranges, multipart ranges,
conditionals, HEADs, keep-alive runs, lookups, refused ids, signatures, the backend's
bodies and X-Accel-Redirects, clients that vanish mid-body, never read or read slowly,
malformed requests, and a storage that stalls, cuts, fails or trickles. Every answer is
checked (status, bytes, headers, how the body ended); none may hang past
traffic.DEADLINE_S.

Two phases: a warm-up of a fifth of SOAK_SECONDS, then the rest, during which PostgreSQL
is stopped for 3 s, the backend restarted, and PostgreSQL frozen (SIGSTOP) for 2 s. After
each phase the traffic stops and the sidecar must settle: no active request, no S3 body or
file held, no pool connection in use or waited for, no leaked connection listed, the
connection counts adding up. Between the two settled points:
- descriptors, by kind (Settled): no client connection left; database, S3 and backend
  sockets within what their pools report holding; no other file or socket more than at
  the first rest (one leaked per request, per fault or per outage would show);
- memory: RSS may grow by at most RSS_GROWTH_MIB + RSS_GROWTH_RATIO.

`make test` runs it for 30 s; `make soak` for SOAK_SECONDS (600 by default) and writes
bench-results/soak-<timestamp>.json. Traffic goes to 127.0.0.1 only; the sidecar is
and every backend started are stopped by their PIDs, PostgreSQL is always started again.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
import pytest

from tests.conftest import (
    REPO,
    S3Server,
    SidecarProcess,
    free_port,
    log_tail,
    make_config,
    stop_process,
)
from tests.faults.fake_s3 import FakeS3
from tests.integration.sidecars import (
    error_lines,
    invariant_holds,
    running_backend,
    running_sidecar,
    settled,
    stats,
    wait_for_stats,
)
from tests.pg import LOOKUP_QUERY, PgServer
from tests.soak import traffic

SOAK_S: Final = float(os.environ.get("SOAK_SECONDS", "30"))
CLIENTS: Final = int(os.environ.get("SOAK_CLIENTS", "16"))
LOOP: Final = os.environ.get("SOAK_LOOP", "uvloop")
REPORT: Final = os.environ.get("SOAK_REPORT")  # a directory: write the figures there
WARM_SHARE: Final = 0.2
# (what, how, when as a share of the second phase, for how many seconds)
OUTAGES: Final = (
    ("database", "stopped", 0.2, 3.0),
    ("backend", "restarted", 0.45, 2.0),
    ("database", "frozen", 0.65, 2.0),
)
# A request that fails because its database or backend is away must fail this fast:
# acquire_timeout, or statement_timeout plus the client's grace (a frozen server), or the
# backend's connect_timeout, plus scheduling slack.
FAST_FAILURE_S: Final = 2.5
IDLE_S, FIRST_BYTE_S, ACQUIRE_S, STATEMENT_S = 2.0, 1.0, 1.0, 1.0
# After PostgreSQL is back, lookups may still get 503 this long (a pool reconnecting).
RECOVERY_S: Final = 10.0
RSS_GROWTH_MIB: Final = 16.0
RSS_GROWTH_RATIO: Final = 0.10
SAMPLE_S: Final = 0.5
SETTLE_GAP_S: Final = 0.3
SIGN_KEY: Final = "soak-signing-key-0123456789abcdef"
DSN_ENV: Final = "SOAK_DATABASE_URL"


@dataclass
class Settled:
    """The sidecar at rest: its descriptors by kind, what /stats says it holds, its memory.

    Kinds: `listener`, `client` (connections on the media port), `admin_client` (ours to
    /stats), `database` (to PostgreSQL), `s3` (to either S3 server), `tcp to <port>`
    (anything else: a finding), `other_socket:<table>` (the loop's own: unix, netlink…)
    and `file` (every descriptor that is not a socket: the log, the loop, pipes, and
    the disk storages' cached small files).
    """

    fds: dict[str, int]
    held: dict[str, int]  # /stats: database size, S3 idle connections, disk cached files
    rss_kib: int
    stats: dict[str, Any] = field(repr=False)

    @property
    def files_beyond_cache(self) -> int:
        return self.fds["file"] - self.held["disk_cached"]


@dataclass
class Outage:
    """One fault of the run: PostgreSQL stopped, or frozen (SIGSTOP: connections hang
    instead of failing, so only the sidecar's own timers end its queries); the backend
    stopped by its PID and started again on the same port."""

    depends: str  # "database" | "backend": what the requests it fails depend on
    kind: str  # "stopped" | "frozen" | "restarted"
    at_share: float  # when, as a share of the second phase
    seconds: float
    down_at: float = 0.0
    up_at: float = 0.0

    def covers(self, started: float) -> bool:
        """A request started while it lasted, or while the pool was recovering from it."""
        return bool(self.up_at) and self.down_at - 0.5 <= started <= self.up_at + RECOVERY_S


def _proc(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{name} missing from /proc/{pid}/status")


def _fds(pid: int) -> tuple[int, int]:
    """(descriptors, sockets) the process holds now."""
    fds = sockets = 0
    for entry in os.scandir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            sockets += os.readlink(entry.path).startswith("socket:")
            fds += 1
    return fds, sockets


@dataclass(frozen=True)
class Ports:
    media: int
    admin: int
    database: int
    s3: frozenset[int]
    backend: int


def _fds_by_kind(pid: int, ports: Ports) -> dict[str, int]:
    """The process's descriptors by kind (see Settled), from /proc/<pid>/fd and net/*."""
    inodes: set[str] = set()
    files = 0
    for entry in os.scandir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(entry.path)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
            else:
                files += 1
    kinds = collections.Counter({"file": files})
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[9] not in inodes:
                    continue
                inodes.discard(cols[9])
                local = int(cols[1].rsplit(":", 1)[1], 16)
                remote = int(cols[2].rsplit(":", 1)[1], 16)
                if cols[3] == "0A":
                    kinds["listener"] += 1
                elif local == ports.media:
                    kinds["client"] += 1
                elif local == ports.admin:
                    kinds["admin_client"] += 1  # our own /stats request, closing
                elif remote == ports.database:
                    kinds["database"] += 1
                elif remote in ports.s3:
                    kinds["s3"] += 1
                elif remote == ports.backend:
                    kinds["upstream"] += 1
                else:
                    kinds[f"tcp to {remote}"] += 1
    for table, inode_col in (("unix", 6), ("udp", 9), ("udp6", 9), ("netlink", 9)):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if len(cols) > inode_col and cols[inode_col] in inodes:
                    inodes.discard(cols[inode_col])
                    kinds[f"other_socket:{table}"] += 1
    kinds["other_socket:unknown"] += len(inodes)
    return {k: v for k, v in kinds.items() if v}


def _held(s: dict[str, Any]) -> dict[str, int]:
    storages = s["storages"].values()
    return {
        "database": s["database"]["size"],
        "s3_idle": sum(v["upstream_idle"] for v in storages if v["type"] == "s3"),
        "upstream_idle": sum(v["upstream_idle"] for v in storages if v["type"] == "upstream"),
        "disk_cached": sum(v["upstream_idle"] for v in storages if v["type"] == "disk"),
    }


def _at_rest(s: dict[str, Any]) -> bool:
    db = s["database"]
    return settled(s) and db["in_use"] == 0 and db["waiting"] == 0 and db["connecting"] == 0


def settle(sidecar: SidecarProcess, ports: Ports) -> Settled:
    """Wait until the sidecar is at rest, then take its figures.

    At rest: nothing active or held (/stats) and no client connection left (every client
    closed its own; one the sidecar keeps, in CLOSE_WAIT say, would be a leak). Sockets
    to the servers may still close on their own (an idle S3 connection timing out): the
    figures are taken when two readings SETTLE_GAP_S apart agree.
    """
    pid = sidecar.proc.pid
    wait_for_stats(sidecar, _at_rest, 20, "at rest after the traffic")
    last = None
    for _ in range(100):
        time.sleep(SETTLE_GAP_S)  # the connection of our last /stats request closes meanwhile
        fds = _fds_by_kind(pid, ports)
        rss = _proc(pid, "VmRSS")
        after = stats(sidecar)
        reading = (fds, _held(after))
        if _at_rest(after) and reading == last:
            assert not after["database"]["leaks"], after["database"]["leaks"]
            return Settled(fds, _held(after), rss, after)
        last = reading
    pytest.fail(f"no two readings at rest agreed; last: {last}\n{log_tail(sidecar.log)}")


class Soak:
    """The client threads, the sampler, and what they saw."""

    def __init__(self, target: traffic.Target, sidecar: SidecarProcess) -> None:
        self.target = target
        self.sidecar = sidecar
        self.results: list[traffic.Result] = []
        self.samples: list[dict[str, float]] = []
        self.sampler_problems: list[str] = []  # the sampler's and the fault schedule's
        self._lock = threading.Lock()
        self._seed = 20261207

    def run(self, seconds: float, during: Any = None) -> None:
        """CLIENTS threads for `seconds`; `during(stop)` runs alongside (a fault schedule)."""
        stop = threading.Event()
        threads = [
            threading.Thread(target=self._client, args=(random.Random(self._seed + i), stop))
            for i in range(CLIENTS)
        ]
        self._seed += CLIENTS
        threads.append(threading.Thread(target=self._sample, args=(stop,)))
        if during is not None:
            threads.append(threading.Thread(target=self._guarded, args=(during, stop)))
        for t in threads:
            t.start()
        try:
            stop.wait(seconds)
        finally:
            stop.set()
            for t in threads:
                t.join(traffic.DEADLINE_S * 3)
        assert not any(t.is_alive() for t in threads), "a client thread hung"

    def _guarded(self, during: Any, stop: threading.Event) -> None:
        try:
            during(stop)
        except Exception as exc:  # PostgreSQL would not stop or start: the run proves little
            self.sampler_problems.append(f"fault schedule failed: {exc!r}")

    def _client(self, rng: random.Random, stop: threading.Event) -> None:
        while not stop.is_set():
            action = traffic.pick(rng)
            started = time.monotonic()
            try:
                result = action(self.target, rng)
            except Exception as exc:  # a refused connect, a socket error: a finding too
                why = f"{type(exc).__name__}: {exc}"
                kind = f"{action.__name__} (raised)"
                result = traffic.Result(kind, 0, why, started, time.monotonic() - started)
            with self._lock:
                self.results.append(result)

    def _sample(self, stop: threading.Event) -> None:
        pid = self.sidecar.proc.pid
        while not stop.wait(SAMPLE_S):
            try:
                s = stats(self.sidecar)
            except Exception as exc:
                self.sampler_problems.append(f"/stats failed: {exc!r}")
                continue
            if not invariant_holds(s):
                self.sampler_problems.append(f"connection counts do not add up: {s['connections']}")
            fds, sockets = _fds(pid)
            self.samples.append({
                "t": time.monotonic(),
                "rss_kib": _proc(pid, "VmRSS"),
                "fds": fds,
                "sockets": sockets,
                "active": s["connections"]["active"],
                "db_in_use": s["database"]["in_use"],
                "db_waiting": s["database"]["waiting"],
            })  # fmt: skip


def judge(result: traffic.Result, outages: list[Outage]) -> str | None:
    """The problem with a result, if any. While what it depends on is away: a fast 502,
    503 or 504 is right, and so is a backend's body cut off mid-way (never made whole)."""
    if result.problem is None:
        return None
    if any(o.depends == result.depends_on and o.covers(result.started) for o in outages):
        if result.status in (502, 503, 504) and (result.error_code or "").startswith(
            ("database", "upstream")
        ):
            if result.elapsed_s <= FAST_FAILURE_S:
                return None
            return f"{result.depends_on} away: {result.status} after {result.elapsed_s:.1f} s"
        if result.depends_on == "backend" and result.status == 200:
            if result.ending in ("eof", "reset"):
                return None
    return result.problem


@pytest.fixture
def fake_storage() -> Iterator[tuple[FakeS3, dict[str, bytes]]]:
    """The fault-injecting S3 with traffic.FAULTY's objects and faults; their bytes."""
    rng = random.Random(7)
    objects = {key: rng.randbytes(size) for key, (size, _) in traffic.FAULTY.items()}
    with FakeS3() as fake:
        for key, (_, fault) in traffic.FAULTY.items():
            fake.put(key, objects[key])
            fake.fault(key, **fault)
        yield fake, objects


class Backends:
    """The example backend (tests/upstream_backend.py) on one port, restartable."""

    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.workdir, self.port, self._stack = workdir, free_port(), stack
        self.current = stack.enter_context(running_backend(workdir, self.port))

    def stop(self) -> None:
        stop_process(self.current.proc)

    def start(self) -> None:
        self.current = self._stack.enter_context(running_backend(self.workdir, self.port))


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    with contextlib.ExitStack() as stack:  # every backend started is stopped by its PID
        yield Backends(tmp_path, stack)


@pytest.fixture
def sidecar(
    tmp_path: Path,
    media_root: Path,
    s3_server: S3Server,
    pg_server: PgServer,
    fake_storage: tuple[FakeS3, dict[str, bytes]],
    backends: Backends,
) -> Iterator[SidecarProcess]:
    config = make_config(
        media_root,
        s3_server.endpoint,
        server={"host": "127.0.0.1", "port": free_port(), "event_loop": LOOP},
        timeouts={"idle": f"{IDLE_S}s", "upstream_first_byte": f"{FIRST_BYTE_S}s"},
        database={
            "dsn_env": DSN_ENV,
            "pool_max": 4,
            "acquire_timeout": f"{ACQUIRE_S}s",
            "statement_timeout": f"{STATEMENT_S}s",
            "leak_threshold": "3s",
        },
        logging={"level": "warning", "format": "json"},
        upstreams={
            "app": {
                "url": f"http://127.0.0.1:{backends.port}",
                "connect_timeout": "1s",
                "response_timeout": "5s",
                "max_body_size": "6MiB",
            }
        },
    )
    uploads = config["storages"]["uploads"]
    config["storages"]["faulty"] = {
        **uploads,
        "endpoint_url": fake_storage[0].endpoint,
        "prefix": "",
        "max_attempts": 1,
    }
    config["routes"] = [
        {"prefix": "/api/media/", "lookup": {"query": LOOKUP_QUERY}},
        {"prefix": "/nocache/", "lookup": {"query": LOOKUP_QUERY, "cache_ttl": 0}},
        {
            "prefix": "/signed/",
            "lookup": {"query": LOOKUP_QUERY},
            "access": {"mode": "signed", "keys_env": ["SOAK_SIGN_KEY"]},
        },
        {"prefix": "/faulty/", "storage": "faulty"},
        {"prefix": "/app/", "upstream": "app"},
        {"prefix": "/protected/", "storage": "local", "internal": True},
        *config["routes"],
    ]
    env = {DSN_ENV: pg_server.dsn, "SOAK_SIGN_KEY": SIGN_KEY}
    with running_sidecar(config, tmp_path, env) as proc:
        yield proc


def test_mixed_traffic_with_faults_leaks_nothing(
    sidecar: SidecarProcess,
    pg_server: PgServer,
    s3_server: S3Server,
    fake_storage: tuple[FakeS3, dict[str, bytes]],
    backends: Backends,
) -> None:
    objects = fake_storage[1]
    target = traffic.Target(sidecar.port, objects, SIGN_KEY.encode(), IDLE_S, FIRST_BYTE_S)
    soak = Soak(target, sidecar)
    for action in traffic.ALL_ACTIONS:  # each kind once, alone: the harness itself works
        result = action(target, random.Random(1))
        assert result.problem is None, (result, log_tail(sidecar.log))

    ports = Ports(
        media=sidecar.port,
        admin=sidecar.admin_port,
        database=pg_server.port,
        s3=frozenset({urlsplit(s3_server.endpoint).port, urlsplit(fake_storage[0].endpoint).port}),
        backend=backends.port,
    )
    warm_s = max(5.0, SOAK_S * WARM_SHARE)
    soak.run(warm_s)
    warm = settle(sidecar, ports)

    outages = [Outage(*outage) for outage in OUTAGES]
    halts = {
        "stopped": (pg_server.stop, pg_server.start),
        "frozen": (pg_server.freeze, pg_server.thaw),
        "restarted": (backends.stop, backends.start),
    }
    main_s = max(sum(o.seconds for o in outages) + 2 * RECOVERY_S, SOAK_S - warm_s)

    def faults(stop: threading.Event) -> None:
        started = time.monotonic()
        for o in outages:
            if stop.wait(max(0.0, started + main_s * o.at_share - time.monotonic())):
                return
            o.down_at = time.monotonic()
            halt, resume = halts[o.kind]
            halt()
            try:
                stop.wait(o.seconds)
            finally:
                resume()
                o.up_at = time.monotonic()

    main_started = time.monotonic()
    soak.run(main_s, during=faults)
    end = settle(sidecar, ports)
    report = summarize(soak, outages, warm, end, time.monotonic() - main_started)
    if REPORT:
        write_report(Path(REPORT), report)

    problems = [(r.kind, p) for r in soak.results if (p := judge(r, outages)) is not None]
    counts = collections.Counter(problems)
    assert not problems, f"{len(problems)} wrong answers: {counts.most_common(10)}"
    assert not soak.sampler_problems, soak.sampler_problems[:5]
    answered = {r.kind for r in soak.results if r.problem is None}
    assert answered >= set(traffic.KINDS), f"never answered right: {set(traffic.KINDS) - answered}"
    for o in outages:  # each fault was felt, and requests worked again after it
        assert o.up_at, f"the {o.depends} was never {o.kind}"
        hit = [r for r in soak.results if r.depends_on == o.depends and o.covers(r.started)]
        assert any(r.status in (502, 503) for r in hit), f"no 502/503: {o.depends} {o.kind}"
        assert any(
            r.depends_on == o.depends and r.status == 200 and r.started > o.up_at
            for r in soak.results
        ), f"nothing through the {o.depends} succeeded after it was {o.kind}"

    # At rest nothing is held that the figures do not account for, and no more than after
    # the warm-up: a descriptor leaked per request, per fault or per outage would show.
    for state in (warm, end):
        assert state.fds.get("client", 0) == 0, state
        assert state.fds.get("database", 0) <= state.held["database"], state
        assert state.fds.get("s3", 0) <= state.held["s3_idle"], state
        assert state.fds.get("upstream", 0) <= state.held["upstream_idle"], state
        assert not [k for k in state.fds if k.startswith("tcp to")], state
    assert end.files_beyond_cache == warm.files_beyond_cache, (warm, end)
    others = [k for k in {**warm.fds, **end.fds} if k.startswith("other_socket")]
    assert all(end.fds.get(k, 0) <= warm.fds.get(k, 0) for k in others), (warm, end)
    assert end.fds["listener"] == warm.fds["listener"] == 2, (warm, end)
    growth_kib = end.rss_kib - warm.rss_kib
    bound_kib = RSS_GROWTH_MIB * 1024 + RSS_GROWTH_RATIO * warm.rss_kib
    assert growth_kib <= bound_kib, f"RSS grew {growth_kib} KiB (bound {bound_kib:.0f}): {report}"
    c = end.stats["connections"]
    assert c["active"] == 0 and invariant_holds(end.stats), c
    assert c["total"] >= len(soak.results), (c["total"], len(soak.results))
    assert not error_lines(sidecar), error_lines(sidecar)[:3]
    assert "Traceback" not in sidecar.log.read_text()


def summarize(
    soak: Soak, outages: list[Outage], warm: Settled, end: Settled, main_s: float
) -> dict[str, Any]:
    by_kind: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for r in soak.results:
        by_kind[r.kind][r.status] += 1
    peak = max(soak.samples, key=lambda s: s["rss_kib"], default={})
    return {
        "seconds": SOAK_S,
        "clients": CLIENTS,
        "event_loop": LOOP,
        "requests": len(soak.results),
        "by_kind": {
            k: {str(s): n for s, n in sorted(v.items())} for k, v in sorted(by_kind.items())
        },
        "outages": {f"{o.depends} {o.kind}": round(o.up_at - o.down_at, 2) for o in outages},
        "main_phase_s": round(main_s, 1),
        "warm": {k: v for k, v in asdict(warm).items() if k != "stats"},
        "end": {k: v for k, v in asdict(end).items() if k != "stats"},
        "peak_rss_kib": peak.get("rss_kib"),
        "peak_fds": max((s["fds"] for s in soak.samples), default=None),
        "peak_sockets": max((s["sockets"] for s in soak.samples), default=None),
        "connections": end.stats["connections"],
        "database": {k: end.stats["database"][k] for k in ("queries", "errors", "timeouts")},
        "samples": soak.samples,
    }


def write_report(directory: Path, report: dict[str, Any]) -> None:
    directory = directory if directory.is_absolute() else REPO / directory
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    brief = {k: v for k, v in report.items() if k != "samples"}
    print(f"\nsoak report: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    print(orjson.dumps(brief, option=orjson.OPT_INDENT_2).decode())
