"""`make bench`: the same files through nginx and through the sidecar, one server at a time.

The server runs alone on CPU 0 and wrk on CPU 1 (taskset), traffic on 127.0.0.1 only.
Per scenario: requests/s, MiB/s, latency p50/p99, the ratio to nginx and the server's
CPU-seconds per GiB served (utime + stime of its process tree from /proc). Every process
started here is stopped by its PID; the temporary directory is removed unless --keep.
"""

from __future__ import annotations

import argparse
import ctypes.util
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
MIB, GIB = 1 << 20, 1 << 30
FILES = {
    "4k.bin": 4 << 10,
    "256k.bin": 256 << 10,
    "1m.bin": 1 << 20,  # lookup scenarios only
    "4m.bin": 4 << 20,
    "64m.bin": 64 << 20,
}
SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}  # wrk: 1024
TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
LOOPS = "uvloop,asyncio"
Proc = subprocess.Popen[bytes]


class BenchError(Exception):
    """A server that would not start or died, or a wrk run that failed."""


@dataclass(frozen=True)
class Scenario:
    key: str
    name: str
    file: str
    body_bytes: int  # body bytes of one 2xx response
    script: str | None = None
    path: str = ""  # request path when not /media/<file>
    env: tuple[tuple[str, str], ...] = ()  # for the wrk script

    def connections(self, override: int | None) -> int:
        return override or (8 if FILES[self.file] >= 4 * MIB else 16)


SCENARIOS = [
    Scenario("4k", "4 KiB", "4k.bin", FILES["4k.bin"]),
    Scenario("256k", "256 KiB", "256k.bin", FILES["256k.bin"]),
    Scenario("4m", "4 MiB", "4m.bin", FILES["4m.bin"]),
    Scenario("64m", "64 MiB", "64m.bin", FILES["64m.bin"]),
    Scenario("range", "1 MiB ranges of 64 MiB", "64m.bin", MIB, "range_mix.lua"),
]
# The lookup scenarios: one sidecar (uvloop) with a plain, a cached and an uncached lookup
# route to the same file, against a PostgreSQL started for the run (lookup_bench.py).
LOOKUPS = {"lookup-4k": ("4 KiB", "4k.bin"), "lookup-1m": ("1 MiB", "1m.bin")}
ROUTES = ("plain", "cached", "uncached")
CACHED_MIN_RATIO = 0.9  # the targets: cached >= 0.9x plain req/s,
UNCACHED_MAX_P99_DELTA_MS = 2.0  # uncached first-byte p99 within 2 ms of plain, one query each
# The routes of a lookup scenario take turns, round after round (plain, cached, uncached;
# then cached, uncached, plain; …): a drift of the shared VM then weighs on all three alike,
# where three runs one after the other saw the same route's req/s move by 25 %. The VM's
# speed drifts over seconds, so shorter rounds pair better: the cached/plain ratio of one
# round had a standard deviation of 0.17-0.18 with rounds of 2 s and 0.11-0.14 with rounds
# of 1 s. 20 rounds of 1 s (before 2026-11-28: 5 of 2 s, whose pooled ratio spread over
# 0.86-1.05x between runs of one build); each curl round about half a wrk round long.
LOOKUP_ROUNDS = 20
ROUNDS_PER_DURATION = 10  # a wrk round lasts --duration / 10 s (at least 1 s)
FIRST_BYTE_MIN_REQUESTS = 1000  # per route and round, for curl's first-byte pass
FIRST_BYTE_MAX_REQUESTS = 30000


@dataclass
class Run:
    server: str
    scenario: str
    connections: int
    seconds: float  # wrk's measured duration
    requests: int
    requests_per_s: float  # wrk's Requests/sec
    wrk_bytes_read: int  # wrk's "Y MB read": headers included, 3 significant digits
    wrk_transfer_mib_s: float  # wrk's Transfer/sec
    mib_per_s: float
    mib_source: str  # "requests x body" (exact) or "wrk bytes read" (invalid runs)
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: str
    problems: str  # empty for a valid run
    cpu_s: float
    wall_s: float
    cpu_percent: float
    cpu_s_per_gib: float
    wrk_cpu_percent: float
    other_cpu_percent: float  # busy CPU of everything but server and wrk: noise if high
    wrk_output: str

    def detail(self) -> list[str]:
        bad = f"**INVALID: {self.problems}**" if self.problems else "ok"
        return (
            f"{self.server}|{self.scenario}|{self.connections}|{self.requests_per_s:,.0f}|"
            f"{self.mib_per_s:,.0f}|{self.p50_ms:.2f}|{self.p99_ms:.2f}|{self.cpu_percent:.0f}|"
            f"{self.cpu_s_per_gib:.2f}|{self.wrk_cpu_percent:.0f}|{self.other_cpu_percent:.0f}|{bad}"
        ).split("|")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinning() -> tuple[bool, str]:
    if not shutil.which("taskset"):
        return False, "taskset not found: NOT pinned, server and wrk share the CPUs"
    if not {0, 1} <= os.sched_getaffinity(0):
        return False, "CPUs 0 and 1 are not both usable: NOT pinned"
    return True, "server on CPU 0, wrk on CPU 1 (taskset)"


def process_tree(pid: int) -> list[int]:
    """The pid and its descendants (nginx workers, any sidecar children)."""
    pids, todo = [], [pid]
    while todo:
        pids.append(p := todo.pop())
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += map(int, Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except OSError:
            pass
    return pids


def stat_fields(pid: int) -> list[str] | None:
    try:  # fields after "(comm)": [0] state, [11] utime, [12] stime, [19] starttime
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    stats = [f for f in map(stat_fields, process_tree(pid)) if f]
    return sum(int(f[11]) + int(f[12]) for f in stats) / TICKS


def pg_cpu_seconds(postmaster: int) -> float:
    """CPU-seconds of PostgreSQL: its live processes plus the backends it already reaped."""
    root = stat_fields(postmaster)
    reaped = (int(root[13]) + int(root[14])) / TICKS if root else 0.0  # cutime, cstime
    return cpu_seconds(postmaster) + reaped


def _busy(stat_line: str) -> float:
    """CPU-seconds busy of one /proc/stat `cpu` line: user..steal minus idle, iowait."""
    ticks = [int(x) for x in stat_line.split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS


def busy_seconds() -> float:
    """CPU-seconds the whole machine spent busy (the first /proc/stat line, all CPUs)."""
    return _busy(Path("/proc/stat").read_text().split("\n", 1)[0])


def cpus_busy_seconds() -> list[float]:
    """Busy CPU-seconds of each CPU (the /proc/stat `cpuN` lines)."""
    lines = Path("/proc/stat").read_text().splitlines()
    return [_busy(line) for line in lines if line.startswith("cpu") and line[3].isdigit()]


def children_seconds() -> float:
    """CPU-seconds of this script's finished children (wrk runs)."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def parse_wrk(out: str) -> dict[str, Any]:
    """wrk's summary as Run fields."""
    summary = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    tps = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    if not (summary and rps and tps):
        raise BenchError(f"could not parse wrk output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    got = {
        "requests": int(summary[1]),
        "seconds": float(summary[2]) * TIME_UNITS[summary[3]],
        "wrk_bytes_read": int(float(summary[4]) * SIZE_UNITS[summary[5]]),
        "requests_per_s": float(rps[1]),
        "wrk_transfer_mib_s": float(tps[1]) * SIZE_UNITS[tps[2]] / MIB,
        "non_2xx": int(non_2xx[1]) if non_2xx else 0,
        "socket_errors": sock[1].strip() if sock else "",
        "wrk_output": out,
    }
    for pct in (50, 99):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(\w+)", out, re.M)
        got[f"p{pct}_ms"] = float(m[1]) * TIME_UNITS[m[2]] * 1000 if m else float("nan")
    return got


# One line per transfer, in the order they complete.
CURL_WRITE_OUT = "%{http_code} %{size_download} %{num_connects} %{time_starttransfer}\\n"


@dataclass
class FirstBytes:
    """Client-side time to first byte of one route (curl), pooled over its rounds."""

    requests: int
    seconds: float  # curl's wall time, all rounds
    new_connections: int  # transfers that opened a connection (the rest reused one)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    problems: str  # empty when every transfer got 200 and the whole body
    samples_ms: list[float]
    # What the transfers cost the machine: curl's CPU, PostgreSQL's (lookup scenarios), and
    # each CPU's busy seconds. With every CPU near 100 %, the client's side bounds req/s too.
    client_cpu_s: float = 0.0
    pg_cpu_s: float = 0.0
    cpus_busy_s: list[float] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")

    def per_request_us(self, cpu_s: float) -> float:
        return 1e6 * cpu_s / self.requests if self.requests else float("nan")

    def cpus_busy_percent(self) -> str:
        """`CPU 0 97 %, CPU 1 99 %`: how busy each CPU was while curl ran."""
        return ", ".join(
            f"CPU {n} {100 * busy / self.seconds:.0f} %" for n, busy in enumerate(self.cpus_busy_s)
        )


def percentile(sorted_values: list[float], pct: float) -> float:
    """The nearest-rank percentile (wrk's definition) of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def first_bytes_of(
    samples_ms: list[float], requests: int, seconds: float, new: int, problems: str
) -> FirstBytes:
    ordered = sorted(samples_ms)
    return FirstBytes(
        requests=requests,
        seconds=seconds,
        new_connections=new,
        p50_ms=percentile(ordered, 50),
        p90_ms=percentile(ordered, 90),
        p99_ms=percentile(ordered, 99),
        problems=problems,
        samples_ms=samples_ms,
    )


def parse_curl(out: str, err: str, count: int, body_bytes: int, seconds: float) -> FirstBytes:
    """CURL_WRITE_OUT lines as FirstBytes; a wrong status or size is a problem, not a sample."""
    samples, bad, new = [], Counter[str](), 0
    for line in out.splitlines():
        status, size, connects, first = line.split()
        new += int(connects)
        if status != "200" or int(size) != body_bytes:
            bad[f"HTTP {status} with {size} B"] += 1
            continue
        samples.append(float(first) * 1000)
    problems = [f"{n}x {what}" for what, n in bad.most_common(3)]
    if len(samples) + sum(bad.values()) != count:
        problems.append(f"{count - len(samples) - sum(bad.values())} transfers missing")
    if errors := [line for line in err.splitlines() if line.startswith("curl:")]:
        problems.append(f"{len(errors)} curl errors, the last: {errors[-1]}")
    return first_bytes_of(samples, count, seconds, new, "; ".join(problems))


def pool_first_bytes(parts: list[FirstBytes]) -> FirstBytes:
    pooled = first_bytes_of(
        [ms for p in parts for ms in p.samples_ms],
        sum(p.requests for p in parts),
        sum(p.seconds for p in parts),
        sum(p.new_connections for p in parts),
        "; ".join(p.problems for p in parts if p.problems),
    )
    pooled.client_cpu_s = sum(p.client_cpu_s for p in parts)
    pooled.pg_cpu_s = sum(p.pg_cpu_s for p in parts)
    pooled.cpus_busy_s = [sum(cpu) for cpu in zip(*(p.cpus_busy_s for p in parts), strict=True)]
    return pooled


def pool_runs(runs: list[Run]) -> Run:
    """Rounds of one route as one run: sums for counts, bytes and CPU; latency percentiles of
    the median round (wrk prints percentiles, not its histogram); other CPU of the worst."""
    first, seconds, wall = runs[0], sum(r.seconds for r in runs), sum(r.wall_s for r in runs)
    cpu, served = sum(r.cpu_s for r in runs), sum(r.mib_per_s * r.seconds for r in runs) * MIB
    problems = "; ".join(r.problems for r in runs if r.problems)
    return Run(
        server=first.server,
        scenario=first.scenario,
        connections=first.connections,
        seconds=seconds,
        requests=(requests := sum(r.requests for r in runs)),
        requests_per_s=requests / seconds,
        wrk_bytes_read=sum(r.wrk_bytes_read for r in runs),
        wrk_transfer_mib_s=sum(r.wrk_transfer_mib_s * r.seconds for r in runs) / seconds,
        mib_per_s=served / seconds / MIB,
        mib_source="wrk bytes read" if problems else "requests x body",
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        non_2xx=sum(r.non_2xx for r in runs),
        socket_errors="; ".join(r.socket_errors for r in runs if r.socket_errors),
        problems=problems,
        cpu_s=cpu,
        wall_s=wall,
        cpu_percent=100 * cpu / wall,
        cpu_s_per_gib=cpu / (served / GIB) if served else float("nan"),
        wrk_cpu_percent=sum(r.wrk_cpu_percent * r.wall_s for r in runs) / wall,
        other_cpu_percent=max(r.other_cpu_percent for r in runs),
        wrk_output="\n".join(r.wrk_output for r in runs),
    )


def log_summary(text: str) -> str:
    """Line count and the most frequent lines; JSON log records as level, event, exception."""
    lines, seen = text.splitlines(), Counter[str]()
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and "event" in rec:
            why = str(rec.get("exc") or rec.get("reason") or "").strip().splitlines()[-1:]
            line = f"{rec.get('level')} {rec['event']} {''.join(why)}"
        seen[line[:200]] += 1
    return f"{len(lines)} lines: " + "; ".join(f"{n}x {k}" for k, n in seen.most_common(5))


class Bench:
    def __init__(self, work: Path, duration: int, connections: int | None, pin: bool) -> None:
        self.work, self.duration, self.connections, self.pin = work, duration, connections, pin
        self.started: list[Proc] = []
        self.failures: list[str] = []
        self.logs: dict[str, str] = {}  # server -> summary of what it wrote (warnings, errors)
        self.lookup_facts: dict[str, str] = {}

    def pinned(self, cpu: int, argv: list[str]) -> list[str]:
        return ["taskset", "-c", str(cpu), *argv] if self.pin else argv

    def make_media(self) -> None:
        (self.work / "media").mkdir()
        for name, size in FILES.items():
            (self.work / "media" / name).write_bytes(os.urandom(size))
            (self.work / "media" / name).read_bytes()  # warm the page cache

    def launch(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None
    ) -> tuple[Proc, Path]:
        log = self.work / f"{name}.log"
        with log.open("ab") as out:  # append: nginx's error_log shares the file
            argv = self.pinned(0, argv)
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=dict(os.environ, **(env or {})),
            )
        self.started.append(proc)
        try:
            self.wait_ready(name, port, proc, log)
        except BenchError:
            self.stop(proc)
            raise
        return proc, log

    def wait_ready(self, name: str, port: int, proc: Proc, log: Path) -> None:
        """GET /media/4k.bin until it answers 200 with the right bytes (30 s)."""
        expected, last = (self.work / "media" / "4k.bin").read_bytes(), "no answer"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/media/4k.bin")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200 and body == expected:
                    return
                last = f"HTTP {resp.status}: {body[:200]!r}"
            except (OSError, http.client.HTTPException) as exc:
                last = repr(exc)
            finally:
                conn.close()
            time.sleep(0.1)
        if proc.poll() is not None:
            last = f"exited with status {proc.returncode}"
        tail = log.read_text(errors="replace")[-3000:]
        raise BenchError(f"{name} not ready on 127.0.0.1:{port} ({last}); output tail:\n{tail}")

    def start_nginx(self, port: int) -> tuple[Proc, Path]:
        w = self.work
        (w / "tmp").mkdir(exist_ok=True)
        (w / "nginx.conf").write_text(f"""{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1; daemon off; master_process on;
pid {w}/nginx.pid; error_log {w}/nginx.log warn;
events {{ worker_connections 4096; }}
http {{
    sendfile on; tcp_nopush on; access_log off; keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {w}/tmp/body; proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi; uwsgi_temp_path {w}/tmp/uwsgi; scgi_temp_path {w}/tmp/scgi;
    server {{ listen 127.0.0.1:{port}; location /media/ {{ alias {w}/media/; }} }}
}}
""")
        argv = ["nginx", "-p", str(w), "-c", str(w / "nginx.conf"), "-e", str(w / "nginx.log")]
        return self.launch("nginx", argv, port)

    def start_sidecar(self, port: int, loop: str) -> tuple[Proc, Path]:
        conf = self.work / f"sidecar-{loop}.yaml"
        conf.write_text(f"""server: {{host: 127.0.0.1, port: {port}, event_loop: {loop}}}
admin: {{host: 127.0.0.1, port: {free_port()}}}
storages: {{bench: {{type: disk, root: "{self.work}/media"}}}}
routes: [{{prefix: /media/, storage: bench}}]
logging: {{level: warning, access_log: false}}
""")
        argv = [sys.executable, "-m", "proxy", "--config", str(conf)]
        return self.launch(f"sidecar-{loop}", argv, port)

    def stop(self, proc: Proc) -> None:
        """terminate, wait, kill; then any orphaned descendant that is still the same process."""
        tree = [(p, f[19]) for p in process_tree(proc.pid)[1:] if (f := stat_fields(p))]
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
        for pid, start in tree:
            if (f := stat_fields(pid)) and f[19] == start and f[0] != "Z":
                os.kill(pid, signal.SIGKILL)
        self.started.remove(proc)

    def wrk(self, port: int, sc: Scenario, seconds: int) -> str:
        argv = ["wrk", "-t1", f"-c{sc.connections(self.connections)}", f"-d{seconds}s"]
        argv += ["--latency", "--timeout", "30s"]  # a 64 MiB body can outlast the default 2 s
        argv += ["-s", str(HERE / sc.script)] if sc.script else []
        argv.append(f"http://127.0.0.1:{port}{sc.path or '/media/' + sc.file}")
        env = dict(os.environ, BENCH_SIZE=str(FILES[sc.file]), **dict(sc.env))
        argv, limit = self.pinned(1, argv), seconds + 90
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=limit)
        if done.returncode != 0:
            raise BenchError(f"wrk exited with {done.returncode}: {done.stderr or done.stdout}")
        return done.stdout

    def first_bytes(self, port: int, sc: Scenario, count: int) -> FirstBytes:
        """`count` GETs by curl, as many at a time as wrk has connections, on kept-alive
        connections: each response's time to its first byte (`time_starttransfer`, from
        the transfer's start), which wrk cannot report (it times whole responses).

        Only for scripted lookup scenarios: the paths are lookup_ids.lua's, from sc.env.
        """
        env = dict(sc.env)
        prefix, pattern, ids = env["BENCH_PREFIX"], env["BENCH_PATTERN"], int(env["BENCH_IDS"])
        config = self.work / "curl-urls.cfg"
        with config.open("w") as f:  # curl's config syntax: one url and output per transfer
            for i in range(count):
                f.write(f'url = "http://127.0.0.1:{port}{prefix}{pattern % (i % ids)}"\n')
                f.write('output = "/dev/null"\n')
        conns = sc.connections(self.connections)
        argv = ["curl", "--silent", "--show-error", "--no-progress-meter", "--parallel"]
        argv += ["--parallel-max", str(conns)]
        argv += ["--config", str(config), "--write-out", CURL_WRITE_OUT]
        client0, cpus0, started = children_seconds(), cpus_busy_seconds(), time.monotonic()
        try:
            done = subprocess.run(
                self.pinned(1, argv), capture_output=True, text=True, timeout=count / 100 + 60
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"curl did not finish {count} requests in time") from None
        seconds = time.monotonic() - started
        cpus1, client1 = cpus_busy_seconds(), children_seconds()
        part = parse_curl(done.stdout, done.stderr, count, sc.body_bytes, seconds)
        part.client_cpu_s = client1 - client0
        part.cpus_busy_s = [b - a for a, b in zip(cpus0, cpus1, strict=True)]
        return part

    def measure(
        self,
        server: str,
        proc: Proc,
        port: int,
        sc: Scenario,
        warmup: bool = True,
        seconds: int | None = None,
    ) -> Run:
        if warmup:
            self.wrk(port, sc, 1)  # warm-up: connections, page cache, lazy imports
        before = cpu_seconds(proc.pid), children_seconds(), busy_seconds(), time.monotonic()
        out = self.wrk(port, sc, seconds or self.duration)
        after = cpu_seconds(proc.pid), children_seconds(), busy_seconds(), time.monotonic()
        cpu, wrk_cpu, busy, wall = (a - b for a, b in zip(after, before, strict=True))
        if proc.poll() is not None:
            raise BenchError(f"{server} exited with {proc.returncode} during {sc.name}")
        w, conns = parse_wrk(out), sc.connections(self.connections)
        exact, read = w["requests"] * sc.body_bytes, w["wrk_bytes_read"]
        problems = [f"{w['non_2xx']} non-2xx"] if w["non_2xx"] else []
        problems += [f"socket errors: {w['socket_errors']}"] if w["socket_errors"] else []
        # wrk's bytes: + headers (< 2 KiB each), + bodies in flight at the end, +- 0.5 % rounding;
        # a server answering a Range request with the whole file shows up here
        high = (w["requests"] + conns) * (sc.body_bytes + 2048) * 1.01
        if not problems and not exact * 0.99 <= read <= high:
            problems.append(f"wrk read {read} B, expected ~{exact} B")
        served = read if problems else exact
        return Run(
            server=server,
            scenario=sc.name,
            connections=conns,
            mib_per_s=served / w["seconds"] / MIB,
            mib_source="wrk bytes read" if problems else "requests x body",
            problems="; ".join(problems),
            cpu_s=cpu,
            wall_s=wall,
            cpu_percent=100 * cpu / wall,
            cpu_s_per_gib=cpu / (served / GIB) if served else float("nan"),
            wrk_cpu_percent=100 * wrk_cpu / wall,
            other_cpu_percent=100 * max(0.0, busy - cpu - wrk_cpu) / wall,
            **w,
        )

    def run_server(self, server: str, scenarios: list[Scenario]) -> Iterator[Run]:
        port = free_port()
        if server == "nginx":
            proc, log = self.start_nginx(port)
        else:
            proc, log = self.start_sidecar(port, server.removeprefix("sidecar(")[:-1])
        try:
            for sc in scenarios:
                run = self.measure(server, proc, port, sc)
                print(" | ".join(run.detail()), flush=True)
                yield run
        finally:
            self.stop(proc)
            if text := log.read_text(errors="replace").strip():
                self.logs[server] = log_summary(text)
                print(f"--- {server} output: {self.logs[server]}", flush=True)


@dataclass
class LookupRun:
    """One route of a lookup scenario: wrk's figures plus the database's and /stats'.

    As measured: one wrk run. As reported: its LOOKUP_ROUNDS runs pooled (pool_lookup_runs),
    plus curl's client-side first bytes.
    """

    scenario: str  # "4 KiB", "1 MiB"
    route: str  # plain, cached, uncached
    path: str
    run: Run
    p90_ms: float
    first_byte_p99_ms: float  # /stats: admission to headers, the run's last 4096 requests
    pg_cpu_s: float
    pg_cpu_percent: float
    sidecar_requests: int  # /stats connections.total during the measured run
    completed: int  # of which the sidecar completed (the rest: cut when wrk stopped)
    queries: int  # pg_stat_statements calls of this route's query during the run
    prepared: int  # of which EXECUTEs of its prepared statement (the rest: run as text)
    cache_hits: int
    cache_misses: int
    query_ms_p99: float  # /stats database.query_ms: execute + fetch, its recent window
    acquire_ms_p99: float  # /stats database.acquire_ms: waiting for a pool connection
    rounds: int = 1
    round_requests_per_s: list[float] = field(default_factory=list)
    round_cpu_us_per_request: list[float] = field(default_factory=list)  # the sidecar's
    client_first_byte: FirstBytes | None = None  # curl, pooled over the rounds


def lookup_scenarios(keys: list[str], ids: int) -> Iterator[tuple[str, str, Scenario]]:
    """(scenario name, route, wrk scenario) for each route of each lookup scenario."""
    import lookup_bench as lb

    for key in keys:
        name, file = LOOKUPS[key]
        for route in ROUTES:
            prefix = {"plain": lb.PLAIN, "cached": lb.CACHED, "uncached": lb.UNCACHED}[route]
            pattern = lb.plain_pattern(file) if route == "plain" else lb.id_pattern(file)
            count = ids
            env = (("BENCH_PREFIX", prefix), ("BENCH_PATTERN", pattern), ("BENCH_IDS", str(count)))
            path = prefix + pattern % 0
            sc = Scenario(key, f"{name} {route}", file, FILES[file], "lookup_ids.lua", path, env)
            yield name, route, sc


def lookup_prefix(sc: Scenario) -> str:
    return sc.path.rsplit("/", 1)[0] + "/"


def turn(round_no: int) -> tuple[str, ...]:
    """The routes' order in one round: each route starts one round in three."""
    k = round_no % len(ROUTES)
    return ROUTES[k:] + ROUTES[:k]


@dataclass
class LookupTarget:
    """The running sidecar and database a lookup scenario measures."""

    proc: Proc
    port: int
    admin: int
    db: Any  # lookup_bench.LookupDb


def run_lookups(bench: Bench, keys: list[str], pg_cpu: int | None, out: list[LookupRun]) -> None:
    """PostgreSQL, one sidecar with three routes, then each lookup scenario in turn.

    Results are appended to `out` as they come (a failure keeps the earlier ones); not a
    generator, so PostgreSQL is stopped here whatever interrupts the run.
    """
    import lookup_bench as lb

    db = lb.LookupDb([LOOKUPS[k][1] for k in keys])
    try:
        db.start()
        if pg_cpu is not None and bench.pin:
            db.pin(process_tree(db.pid), pg_cpu)
        port, admin = free_port(), free_port()
        lb.link_plain_names(bench.work / "media", [LOOKUPS[k][1] for k in keys])
        conf = bench.work / "sidecar-lookup.yaml"
        conf.write_text(lb.sidecar_config(port, admin, bench.work / "media"))
        argv = [sys.executable, "-m", "proxy", "--config", str(conf)]
        proc, log = bench.launch("sidecar-lookup", argv, port, {lb.DSN_ENV: db.dsn})
        bench.lookup_facts.update(
            {"postgres": db.version(), "postgres pid": str(db.pid), "sidecar pid": str(proc.pid)}
        )
        target = LookupTarget(proc, port, admin, db)
        try:
            for key in keys:
                out += measure_lookup(bench, target, key)
        finally:
            bench.stop(proc)
            if text := log.read_text(errors="replace").strip():
                bench.logs["sidecar-lookup"] = log_summary(text)
                print(f"--- sidecar-lookup output: {bench.logs['sidecar-lookup']}", flush=True)
    except lb.LookupSetupError as exc:
        raise BenchError(str(exc)) from None
    finally:
        db.destroy()


def measure_lookup(bench: Bench, t: LookupTarget, key: str) -> list[LookupRun]:
    """One lookup scenario: warm every route, LOOKUP_ROUNDS rounds of wrk in which the routes
    take turns, then as many rounds of curl for first bytes; one pooled LookupRun per route."""
    import lookup_bench as lb

    routes = {route: sc for _, route, sc in lookup_scenarios([key], lb.IDS_PER_FILE)}
    expected = (bench.work / "media" / routes["plain"].file).read_bytes()

    for route, sc in routes.items():
        if route != "plain":  # right bytes, then every id once: the cache is warm
            lb.check_and_warm(t.port, lookup_prefix(sc), sc.file, expected)
        bench.wrk(t.port, sc, 1)  # warm-up run: connections, pool, cache
    seconds = max(1, -(-bench.duration // ROUNDS_PER_DURATION))  # 1 s with the default 10
    measured: dict[str, list[LookupRun]] = {route: [] for route in ROUTES}
    for round_no in range(LOOKUP_ROUNDS):
        for route in turn(round_no):
            result = measure_route(bench, t, route, routes[route], seconds)
            print(f"round {round_no + 1}: " + " | ".join(lookup_detail(result)), flush=True)
            measured[route].append(result)
    pooled = {route: pool_lookup_runs(measured[route]) for route in ROUTES}
    parts: dict[str, list[FirstBytes]] = {route: [] for route in ROUTES}
    for round_no in range(LOOKUP_ROUNDS):
        for route in turn(round_no):  # about half as long as a wrk round, at wrk's rate
            count = round(pooled[route].run.requests_per_s * seconds / 2)
            count = min(max(count, FIRST_BYTE_MIN_REQUESTS), FIRST_BYTE_MAX_REQUESTS)
            pg0 = pg_cpu_seconds(t.db.pid)
            part = bench.first_bytes(t.port, routes[route], count)
            part.pg_cpu_s = pg_cpu_seconds(t.db.pid) - pg0
            print(
                f"round {round_no + 1}: {routes[route].name} first bytes (curl): {part.requests:,}"
                f" requests, {part.requests_per_s:,.0f}/s, p50 {part.p50_ms:.2f} ms,"
                f" p99 {part.p99_ms:.2f} ms, {part.cpus_busy_percent()} {part.problems}",
                flush=True,
            )
            parts[route].append(part)
    for route in ROUTES:
        pooled[route].client_first_byte = pool_first_bytes(parts[route])
    return [pooled[route] for route in ROUTES]


def measure_route(
    bench: Bench, t: LookupTarget, route: str, sc: Scenario, seconds: int
) -> LookupRun:
    """One wrk run on one route, with PostgreSQL's CPU and calls and /stats around it."""
    import lookup_bench as lb

    prefix = lookup_prefix(sc)
    stats0, calls0, prepared0 = lb.settled_stats(t.admin), t.db.calls(), t.db.prepared_calls()
    pg0 = pg_cpu_seconds(t.db.pid)
    run = bench.measure("sidecar(uvloop)", t.proc, t.port, sc, warmup=False, seconds=seconds)
    pg1 = pg_cpu_seconds(t.db.pid)
    stats1, calls1, prepared1 = lb.settled_stats(t.admin), t.db.calls(), t.db.prepared_calls()
    pg_pct = 100 * (pg1 - pg0) / run.wall_s
    run.other_cpu_percent = max(0.0, run.other_cpu_percent - pg_pct)
    conns0, conns1 = stats0["connections"], stats1["connections"]
    c0 = stats0["database"]["cache"].get(prefix, {})
    c1 = stats1["database"]["cache"].get(prefix, {})
    p90 = re.search(r"^\s+90%\s+([\d.]+)(\w+)", run.wrk_output, re.M)
    measured = LookupRun(
        scenario=LOOKUPS[sc.key][0],
        route=route,
        path=sc.path,
        run=run,
        p90_ms=float(p90[1]) * TIME_UNITS[p90[2]] * 1000 if p90 else float("nan"),
        first_byte_p99_ms=float(stats1["latency_ms"]["first_byte"]["p99"]),
        pg_cpu_s=pg1 - pg0,
        pg_cpu_percent=pg_pct,
        sidecar_requests=conns1["total"] - conns0["total"],
        completed=conns1["completed"] - conns0["completed"],
        queries=calls1 - calls0,
        prepared=prepared1 - prepared0,
        cache_hits=c1.get("hits", 0) - c0.get("hits", 0),
        cache_misses=c1.get("misses", 0) - c0.get("misses", 0),
        query_ms_p99=float(stats1["database"]["query_ms"]["p99"]),
        acquire_ms_p99=float(stats1["database"]["acquire_ms"]["p99"]),
        round_requests_per_s=[run.requests_per_s],
    )
    measured.round_cpu_us_per_request = [per_request(run.cpu_s, measured)]
    return measured


def pool_lookup_runs(rounds: list[LookupRun]) -> LookupRun:
    """One route's rounds as one: sums for counts and CPU, the median round for percentiles."""
    first, run = rounds[0], pool_runs([r.run for r in rounds])
    pg_cpu_s = sum(r.pg_cpu_s for r in rounds)

    def median(name: str) -> float:
        return float(statistics.median(getattr(r, name) for r in rounds))

    return LookupRun(
        scenario=first.scenario,
        route=first.route,
        path=first.path,
        run=run,
        p90_ms=median("p90_ms"),
        first_byte_p99_ms=median("first_byte_p99_ms"),
        pg_cpu_s=pg_cpu_s,
        pg_cpu_percent=100 * pg_cpu_s / run.wall_s,
        sidecar_requests=sum(r.sidecar_requests for r in rounds),
        completed=sum(r.completed for r in rounds),
        queries=sum(r.queries for r in rounds),
        prepared=sum(r.prepared for r in rounds),
        cache_hits=sum(r.cache_hits for r in rounds),
        cache_misses=sum(r.cache_misses for r in rounds),
        query_ms_p99=median("query_ms_p99"),
        acquire_ms_p99=median("acquire_ms_p99"),
        rounds=len(rounds),
        round_requests_per_s=[r.run.requests_per_s for r in rounds],
        round_cpu_us_per_request=[x for r in rounds for x in r.round_cpu_us_per_request],
    )


def per_request(cpu_s: float, r: LookupRun) -> float:
    """CPU microseconds per request the sidecar admitted during the run."""
    return 1e6 * cpu_s / r.sidecar_requests if r.sidecar_requests else float("nan")


def lookup_detail(r: LookupRun) -> list[str]:
    q = f"{r.queries / r.completed:.3f}" if r.completed else "-"
    fb = r.client_first_byte
    problems = "; ".join(p for p in (r.run.problems, fb.problems if fb else "") if p)
    bad = f"**INVALID: {problems}**" if problems else "ok"
    return [
        r.scenario,
        r.route,
        f"`{r.path}`",
        f"{r.run.requests_per_s:,.0f}",
        ", ".join(f"{x:,.0f}" for x in r.round_requests_per_s),
        f"{r.run.p50_ms:.2f}",
        f"{r.p90_ms:.2f}",
        f"{r.run.p99_ms:.2f}",
        f"{fb.p50_ms:.2f}" if fb else "-",
        f"{fb.p99_ms:.2f}" if fb else "-",
        f"{fb.requests:,} at {fb.requests_per_s:,.0f}/s" if fb else "-",
        f"{fb.per_request_us(fb.client_cpu_s):.0f}" if fb else "-",
        f"{fb.per_request_us(fb.pg_cpu_s):.0f}" if fb else "-",
        fb.cpus_busy_percent() if fb else "-",
        f"{r.first_byte_p99_ms:.2f}",
        f"{r.run.cpu_percent:.0f}",
        f"{per_request(r.run.cpu_s, r):.0f}",
        f"{r.pg_cpu_percent:.0f}",
        f"{per_request(r.pg_cpu_s, r):.0f}",
        f"{r.run.wrk_cpu_percent:.0f}",
        f"{r.run.other_cpu_percent:.0f}",
        f"{r.run.requests:,}",
        f"{r.sidecar_requests:,}",
        f"{r.completed:,}",
        f"{r.queries:,}",
        f"{r.prepared:,}",
        q,
        f"{r.cache_hits:,}/{r.cache_misses:,}",
        f"{r.query_ms_p99:.2f}" if r.route == "uncached" else "-",
        f"{r.acquire_ms_p99:.2f}" if r.route == "uncached" else "-",
        bad,
    ]


LOOKUP_HEAD = (
    "scenario|route|path|req/s|req/s per round|p50 ms|p90 ms|p99 ms"
    "|first byte p50 ms (curl)|first byte p99 ms (curl)|curl requests"
    "|curl CPU µs/request|postgres CPU µs/request (curl)|CPUs busy (curl)"
    "|server first-byte p99 ms|sidecar CPU %"
    "|sidecar CPU µs/request|postgres CPU %|postgres CPU µs/request|wrk CPU %|other CPU %"
    "|wrk requests|sidecar requests|completed"
    "|queries|of which prepared|queries/completed|cache hits/misses"
    "|query p99 ms|pool wait p99 ms|errors"
)


def lookup_verdicts(runs: list[LookupRun]) -> list[tuple[str, bool]]:
    """The issue's targets, one line each with its figures: (text, passed)."""
    by = {(r.scenario, r.route): r for r in runs}
    out: list[tuple[str, bool]] = []
    for name in dict.fromkeys(r.scenario for r in runs):
        plain, cached, uncached = (by.get((name, route)) for route in ROUTES)
        if not (plain and cached and uncached):
            out.append((f"{name}: incomplete (a route was not measured)", False))
            continue
        valid = not (plain.run.problems or cached.run.problems or uncached.run.problems)
        ratio = cached.run.requests_per_s / plain.run.requests_per_s
        per_round = ", ".join(
            f"{c / p:.2f}"
            for c, p in zip(cached.round_requests_per_s, plain.round_requests_per_s, strict=True)
        )
        capacity = per_request(plain.run.cpu_s, plain) / per_request(cached.run.cpu_s, cached)
        out.append(
            (
                f"{name}: cached/plain req/s = {ratio:.2f}x over {cached.rounds} rounds (per"
                f" round: {per_round}; target >= {CACHED_MIN_RATIO}x; cache misses during"
                f" the runs: {cached.cache_misses}; sidecar CPU per request plain/cached ="
                f" {capacity:.2f}x, less sensitive to other load)",
                valid and ratio >= CACHED_MIN_RATIO,
            )
        )
        u_ratio = uncached.run.requests_per_s / plain.run.requests_per_s
        whole = uncached.run.p99_ms - plain.run.p99_ms
        fb_u, fb_p = uncached.client_first_byte, plain.client_first_byte
        if fb_u is None or fb_p is None:
            out.append((f"{name}: uncached first byte: not measured", False))
        else:
            delta = fb_u.p99_ms - fb_p.p99_ms
            fb_valid = valid and not (fb_u.problems or fb_p.problems)
            out.append(
                (
                    f"{name}: uncached first-byte p99 - plain first-byte p99 = {delta:+.2f} ms"
                    f" ({fb_u.p99_ms:.2f} vs {fb_p.p99_ms:.2f}, curl, {fb_u.requests:,} and"
                    f" {fb_p.requests:,} requests, {fb_u.requests_per_s:,.0f} and"
                    f" {fb_p.requests_per_s:,.0f}/s; target <= {UNCACHED_MAX_P99_DELTA_MS:g}"
                    f" ms). Whole responses (wrk, median round): {whole:+.2f} ms"
                    f" ({uncached.run.p99_ms:.2f} vs {plain.run.p99_ms:.2f});"
                    f" uncached/plain req/s = {u_ratio:.2f}x. While curl timed them:"
                    f" uncached {fb_u.cpus_busy_percent()}, curl"
                    f" {fb_u.per_request_us(fb_u.client_cpu_s):.0f} µs and PostgreSQL"
                    f" {fb_u.per_request_us(fb_u.pg_cpu_s):.0f} µs of CPU per request;"
                    f" plain {fb_p.cpus_busy_percent()}, curl"
                    f" {fb_p.per_request_us(fb_p.client_cpu_s):.0f} µs per request",
                    fb_valid and delta <= UNCACHED_MAX_P99_DELTA_MS,
                )
            )
        # Requests cut when wrk stopped (at most one per connection and run) may or may not
        # have had their query: completed <= queries <= admitted, nothing else.
        u = uncached
        ok = 0 < u.completed <= u.queries <= u.sidecar_requests
        ok = ok and u.sidecar_requests - u.completed <= u.run.connections * u.rounds
        out.append(
            (
                f"{name}: uncached queries = {u.queries:,} (pg_stat_statements) for"
                f" {u.sidecar_requests:,} requests admitted, {u.completed:,} completed"
                f" (wrk counted {u.run.requests:,}), {u.prepared:,} of them as the prepared"
                " statement; target: one query per request",
                ok,
            )
        )
    return out


def lookup_json(r: LookupRun) -> dict[str, Any]:
    """asdict without curl's samples (tens of thousands per route): their percentiles stay."""
    out = asdict(r)
    if out["client_first_byte"]:
        del out["client_first_byte"]["samples_ms"]
    return out


def lookup_report(runs: list[LookupRun], facts: dict[str, str]) -> list[str]:
    lines = ["", "## Lookup routes (`/api/media/<id>` through PostgreSQL)", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    lines += ["", *md(LOOKUP_HEAD.split("|"), [lookup_detail(r) for r in runs]), ""]
    lines += [
        f"Each route: {LOOKUP_ROUNDS} wrk runs, the routes taking turns (plain, cached,"
        " uncached; cached, uncached, plain; …), then as many rounds of curl, each about half"
        " as long. req/s and CPU:",
        "the runs pooled. p50/p90/p99: wrk, the whole response (for 4 KiB the first byte and",
        "the last arrive together; for 1 MiB it includes the transfer), the median run.",
        "First byte (curl): each response's time_starttransfer, the same number of requests",
        "in parallel on kept-alive connections, all rounds pooled. Server first-byte p99: the",
        "sidecar's /stats `latency_ms.first_byte` (admission to headers, its last 4096",
        "requests), the median run.",
    ]
    lines += ["", "Targets:"]
    for text, passed in lookup_verdicts(runs):
        lines.append(f"- **{'PASS' if passed else 'FAIL'}** {text}")
    if noisy := [r for r in runs if r.run.other_cpu_percent > 10]:
        worst = max(r.run.other_cpu_percent for r in noisy)
        lines += ["", f"**NOISY:** other processes used up to {worst:.0f} % CPU during"]
        lines[-1] += f" {len(noisy)} lookup route(s): the verdicts compare runs made at"
        lines[-1] += " different moments, rerun on a quiet machine before trusting them."
    if facts.get("postgres pinning") == "CPU 1":  # with curl: see client_bound
        lines += ["", "Client side:", *(f"- {text}" for text in client_bound(runs))]
    return lines


def postgres_cpu(choice: str) -> int | None:
    """The CPU PostgreSQL is pinned to: `auto` gives it CPU 2 where there is one."""
    if choice == "none":
        return None
    if choice == "auto":
        return 2 if 2 in os.sched_getaffinity(0) else 1
    return int(choice)


def client_bound(runs: list[LookupRun]) -> list[str]:
    """What CPU 1 (curl, and PostgreSQL pinned beside it) allowed the first-byte passes.

    curl's CPU per request is of the order of the sidecar's, and an uncached request adds
    PostgreSQL's: CPU 1 alone then caps the uncached route near half the plain route's
    rate, and with 16 clients in a closed loop the wait is 16 / (req/s), sidecar or not.
    """
    out = []
    by = {(r.scenario, r.route): r.client_first_byte for r in runs}
    for name in dict.fromkeys(r.scenario for r in runs):
        plain, uncached = by.get((name, "plain")), by.get((name, "uncached"))
        if not (plain and uncached and plain.requests and uncached.requests):
            continue
        p_us = plain.per_request_us(plain.client_cpu_s)
        u_us = uncached.per_request_us(uncached.client_cpu_s + uncached.pg_cpu_s)
        if not (p_us > 0 and u_us > 0):  # nothing measured (no rusage): no bound to give
            continue
        out.append(
            f"{name}: CPU 1 spent {u_us:.0f} µs per uncached request (curl and PostgreSQL)"
            f" and {p_us:.0f} µs per plain one (curl): by itself it allows at most"
            f" {1e6 / u_us:,.0f} and {1e6 / p_us:,.0f} requests/s; curl measured"
            f" {uncached.requests_per_s:,.0f} and {plain.requests_per_s:,.0f}/s"
        )
    return out


def md(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows]]


def cells(r: Run | None, ref: Run | None, with_ratio: bool) -> list[str]:
    if r is None:
        return ["-"] * (4 if with_ratio else 3)
    out = [f"{r.requests_per_s:,.0f}" + (" **INVALID**" if r.problems else "")]
    out.append(f"{r.mib_per_s:,.0f}" + ("~" if r.problems else ""))
    if with_ratio:
        out.append(f"{r.mib_per_s / ref.mib_per_s:.2f}x" if ref else "-")
    return [*out, f"{r.cpu_s_per_gib:.2f}"]


def report(facts: dict[str, str], runs: list[Run], servers: list[str], bench: Bench) -> str:
    by = {(r.server, r.scenario): r for r in runs}
    head = ["scenario"]
    for s in servers:
        head += [f"{s} req/s", f"{s} MiB/s", *([f"{s} ratio"] if s != "nginx" else [])]
        head.append(f"{s} CPU-s/GiB")
    rows = []
    for sc in [sc.name for sc in SCENARIOS if any(r.scenario == sc.name for r in runs)]:
        rows.append([sc])
        for s in servers:
            rows[-1] += cells(by.get((s, sc)), by.get(("nginx", sc)), with_ratio=s != "nginx")
    dhead = "server|scenario|conns|req/s|MiB/s|p50 ms|p99 ms|CPU %|CPU-s/GiB"
    dhead += "|wrk CPU %|other CPU %|errors"
    lines = [*(f"- {k}: {v}" for k, v in facts.items())]
    if runs:
        lines += ["", *md(head, rows), ""]
        lines.append("ratio = MiB/s / nginx's. MiB/s = 2xx requests x body size / wrk's duration")
        lines.append("(exact); `~` = wrk's bytes read (with headers), used when a run had errors.")
        lines += ["", *md(dhead.split("|"), [r.detail() for r in runs])]
    if noisy := [r for r in runs if r.other_cpu_percent > 10]:
        worst = max(r.other_cpu_percent for r in noisy)
        lines += ["", f"**NOISY:** other processes used up to {worst:.0f} % CPU during"]
        lines[-1] += f" {len(noisy)} run(s) (column `other CPU %`): compare with care."
    if bad := [f"- {r.server} / {r.scenario}: {r.problems}" for r in runs if r.problems]:
        lines += ["", "**INVALID RUNS (non-2xx, socket errors or wrong sizes):**", *bad]
    if bench.failures:
        lines += ["", "**FAILED SERVERS:**", *(f"- {f}" for f in bench.failures)]
    if bench.logs:
        lines += ["", "Server output (warnings and errors):"]
        lines += [f"- {server}: {text}" for server, text in bench.logs.items()]
    return "\n".join(lines) + "\n"


def machine_facts(pin_note: str) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    return {
        "nproc": f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "pinning": pin_note,
        # server.allocator is left at auto, the shipped default (proxy/allocator.py)
        "sidecar allocator": "jemalloc" if ctypes.util.find_library("jemalloc") else "pymalloc",
    }


def parse_args() -> argparse.Namespace:
    keys = ",".join([*(s.key for s in SCENARIOS), *LOOKUPS])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    ap.add_argument("--connections", type=int, help="default 16 (files < 4 MiB), else 8")
    ap.add_argument("--servers", default="nginx,sidecar", help="comma list of nginx,sidecar")
    ap.add_argument("--loops", default=LOOPS, help="sidecar event loops (comma list)")
    ap.add_argument("--scenarios", default=keys, help=f"comma list of {keys}")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--pg-cpu",
        default="auto",
        choices=["auto", "0", "1", "2", "none"],
        help="lookup scenarios: the CPU PostgreSQL is pinned to (default: 2 when the"
        " machine has it, so the client has CPU 1 to itself; else 1, with the client)",
    )
    args = ap.parse_args()
    for name, allowed in [("servers", "nginx,sidecar"), ("loops", LOOPS), ("scenarios", keys)]:
        if bad := set(getattr(args, name).split(",")) - set(allowed.split(",")):
            ap.error(f"--{name}: unknown {', '.join(sorted(bad))} (choose from {allowed})")
    return args


def main() -> int:
    args = parse_args()
    scenarios = [s for s in SCENARIOS if s.key in args.scenarios.split(",")]
    lookups = [k for k in LOOKUPS if k in args.scenarios.split(",")]
    if "sidecar" not in args.servers.split(","):
        lookups = []
    servers = ["nginx"] if "nginx" in args.servers.split(",") else []
    if "sidecar" in args.servers.split(","):
        servers += [f"sidecar({loop})" for loop in args.loops.split(",")]
    pin, pin_note = pinning()
    facts = machine_facts(pin_note)
    print(*(f"{k}: {v}" for k, v in facts.items()), sep="\n", flush=True)
    work = Path(tempfile.mkdtemp(prefix="media-bench-"))
    bench = Bench(work, args.duration, args.connections, pin)
    runs: list[Run] = []
    lookup_runs: list[LookupRun] = []
    try:
        bench.make_media()
        for server in servers if scenarios else []:
            try:
                for run in bench.run_server(server, scenarios):
                    runs.append(run)
            except BenchError as exc:
                bench.failures.append(f"{server}: {str(exc).splitlines()[0]}")
                print(f"\n*** {server} FAILED: {exc}\n", file=sys.stderr, flush=True)
        if lookups:
            pg_cpu = postgres_cpu(args.pg_cpu)
            bench.lookup_facts["postgres pinning"] = (
                f"CPU {pg_cpu}" if pg_cpu is not None and pin else "not pinned"
            )
            try:
                run_lookups(bench, lookups, pg_cpu, lookup_runs)
            except BenchError as exc:
                bench.failures.append(f"sidecar-lookup: {str(exc).splitlines()[0]}")
                print(f"\n*** lookup FAILED: {exc}\n", file=sys.stderr, flush=True)
    finally:
        for proc in list(bench.started):
            bench.stop(proc)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = report(facts, runs, servers if scenarios else [], bench)
    verdicts = lookup_verdicts(lookup_runs)
    if lookup_runs:
        text += "\n".join(lookup_report(lookup_runs, bench.lookup_facts)) + "\n"
    print("\n" + text)
    out = REPO / "bench-results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    out.parent.mkdir(exist_ok=True)
    out.with_suffix(".md").write_text(text)
    raw = {
        "machine": facts,
        "args": vars(args),
        "runs": [asdict(r) for r in runs],
        "failures": bench.failures,
        "server_output": bench.logs,
        "lookup": {
            "facts": bench.lookup_facts,
            "runs": [lookup_json(r) for r in lookup_runs],
            "targets": [{"text": t, "passed": ok} for t, ok in verdicts],
        },
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(f"written: {out.relative_to(REPO)}.md and .json")
    bad_lookup = any(r.run.problems for r in lookup_runs) or not all(ok for _, ok in verdicts)
    return 1 if bench.failures or any(r.problems for r in runs) or bad_lookup else 0


if __name__ == "__main__":
    sys.exit(main())
