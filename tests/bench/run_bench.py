"""`make bench`: the same files through nginx and through the sidecar, one after the other.

Each server runs alone on CPU 0, wrk on CPU 1, traffic on 127.0.0.1 only. For every
scenario it reports requests/s, MiB/s, the sidecar/nginx ratio and the server's
CPU-seconds per GiB served (read from /proc, so a wrk-bound run still shows the cost).
Every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
FILES = {"4k.bin": 4 << 10, "256k.bin": 256 << 10, "4m.bin": 4 << 20, "64m.bin": 64 << 20}


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    body_bytes: int  # bytes of one response body
    connections: int
    script: str | None = None


SCENARIOS = [
    Scenario("4 KiB", "/media/4k.bin", 4 << 10, 16),
    Scenario("256 KiB", "/media/256k.bin", 256 << 10, 16),
    Scenario("4 MiB", "/media/4m.bin", 4 << 20, 8),
    Scenario("64 MiB", "/media/64m.bin", 64 << 20, 8),
    Scenario("1 MiB ranges of 64 MiB", "/media/64m.bin", 1 << 20, 8, "range_mix.lua"),
]


@dataclass
class Result:
    server: str
    scenario: str
    requests_per_s: float
    mib_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_gib: float
    cpu_percent: float
    errors: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if shutil.which("taskset") else argv


def process_tree(pid: int) -> list[int]:
    """The pid and its descendants (nginx workers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [
                    int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()
                ]
        except OSError:
            pass
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / TICKS


def wait_ready(port: int, path: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"server did not become ready:\n{log.read_text(errors='replace')[-2000:]}")


def start_nginx(work: Path, port: int) -> subprocess.Popen[bytes]:
    user = "user root;" if os.geteuid() == 0 else ""
    conf = work / "nginx.conf"
    conf.write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    sendfile on; tcp_nopush on; access_log off; keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp; fastcgi_temp_path {work}/tmp;
    uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location /media/ {{ alias {work}/media/; }}
    }}
}}
""")
    (work / "tmp").mkdir(exist_ok=True)
    log = work / "nginx.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(pinned(0, ["nginx", "-p", str(work), "-c", str(conf)]),
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    wait_ready(port, "/media/4k.bin", proc, log)
    return proc


def start_sidecar(work: Path, port: int, loop: str) -> subprocess.Popen[bytes]:
    conf = work / f"sidecar-{loop}.yaml"
    conf.write_text(f"""
server: {{host: 127.0.0.1, port: {port}, event_loop: {loop}}}
admin: {{host: 127.0.0.1, port: {free_port()}}}
storages: {{bench: {{type: disk, root: "{work}/media"}}}}
routes: [{{prefix: /media/, storage: bench}}]
logging: {{level: warning, access_log: false}}
""")
    log = work / f"sidecar-{loop}.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(pinned(0, [sys.executable, "-m", "proxy", "--config", str(conf)]),
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    wait_ready(port, "/media/4k.bin", proc, log)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if proc.args[-1] != "nginx.conf" else signal.SIGQUIT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def wrk(port: int, sc: Scenario, seconds: float) -> str:
    argv = ["wrk", "-t1", f"-c{sc.connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    argv += ["--timeout", "30s"]  # a 64 MiB body may take longer than wrk's default 2 s
    if sc.script:
        argv += ["-s", str(HERE / sc.script)]
    argv.append(f"http://127.0.0.1:{port}{sc.path}")
    env = dict(os.environ, BENCH_SIZE=str(FILES["64m.bin"]))
    out = subprocess.run(
        pinned(1, argv), capture_output=True, text=True, env=env, timeout=seconds + 60
    )
    return out.stdout + out.stderr


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def measure(server: str, pid: int, port: int, sc: Scenario, seconds: float) -> Result:
    wrk(port, sc, 1)  # warm-up: page cache, connection setup, lazy imports
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    out = wrk(port, sc, seconds)
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - t0
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not done:
        sys.exit(f"could not parse wrk output:\n{out}")
    requests = int(done.group(1))
    span = float(done.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[done.group(3)]
    served = requests * sc.body_bytes  # exact: every 2xx carries this many body bytes
    errors = []
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors.append(f"{m.group(1)} non-2xx")
    if m := re.search(r"Socket errors: (.*)", out):
        errors.append(m.group(1).strip())
    p50 = re.search(r"50%\s+(\S+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    return Result(
        server=server,
        scenario=sc.name,
        requests_per_s=requests / span,
        mib_per_s=served / span / (1 << 20),
        p50_ms=_ms(p50.group(1)) if p50 else 0.0,
        p99_ms=_ms(p99.group(1)) if p99 else 0.0,
        cpu_s_per_gib=cpu / (served / (1 << 30)) if served else 0.0,
        cpu_percent=100 * cpu / wall,
        errors="; ".join(errors),
    )


def table(results: list[Result], servers: list[str], scenarios: list[Scenario]) -> str:
    by = {(r.server, r.scenario): r for r in results}
    head = ["scenario", "nginx req/s", "nginx MiB/s", "nginx CPU-s/GiB"]
    others = [s for s in servers if s != "nginx"]
    for s in others:
        head += [f"{s} req/s", f"{s} MiB/s", f"{s} ratio", f"{s} CPU-s/GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sc in scenarios:
        ref = by.get(("nginx", sc.name))
        row = [sc.name]
        row += (
            [f"{ref.requests_per_s:,.0f}", f"{ref.mib_per_s:,.0f}", f"{ref.cpu_s_per_gib:.2f}"]
            if ref
            else ["-"] * 3
        )
        for s in others:
            r = by.get((s, sc.name))
            if r is None:
                row += ["-"] * 4
                continue
            ratio = f"{r.requests_per_s / ref.requests_per_s:.2f}x" if ref else "-"
            row += [
                f"{r.requests_per_s:,.0f}",
                f"{r.mib_per_s:,.0f}",
                ratio,
                f"{r.cpu_s_per_gib:.2f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    bad = [f"{r.server} / {r.scenario}: {r.errors}" for r in results if r.errors]
    if bad:
        lines += ["", "**INVALID RUNS (errors):** " + "; ".join(bad)]
    return "\n".join(lines)


def machine() -> str:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "unknown"

    return (
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
        f"{version(['nginx', '-v'])}, {version(['wrk', '-v'])}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--servers", default="nginx,sidecar")
    ap.add_argument("--loops", default="uvloop,asyncio", help="sidecar event loops to run")
    ap.add_argument("--scenarios", default="", help="comma list of scenario names (default all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    scenarios = [s for s in SCENARIOS if not args.scenarios or s.name in args.scenarios.split(",")]
    servers = ["nginx"] if "nginx" in args.servers else []
    if "sidecar" in args.servers:
        servers += [f"sidecar-{loop}" for loop in args.loops.split(",")]
    work = Path(tempfile.mkdtemp(prefix="media-bench-"))
    results: list[Result] = []
    print(machine(), flush=True)
    try:
        (work / "media").mkdir()
        for name, size in FILES.items():
            (work / "media" / name).write_bytes(os.urandom(size))
        for server in servers:
            port = free_port()
            if server == "nginx":
                proc = start_nginx(work, port)
            else:
                proc = start_sidecar(work, port, server.removeprefix("sidecar-"))
            try:
                for sc in scenarios:
                    r = measure(server, proc.pid, port, sc, args.duration)
                    results.append(r)
                    print(f"{server:16} {sc.name:24} {r.requests_per_s:>10,.0f} req/s "
                          f"{r.mib_per_s:>8,.0f} MiB/s  CPU {r.cpu_percent:3.0f}%  "
                          f"{r.cpu_s_per_gib:.2f} CPU-s/GiB {r.errors}", flush=True)  # fmt: skip
            finally:
                stop(proc)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = f"{machine()}\n\n{table(results, servers, scenarios)}\n"
    print("\n" + report)
    out_dir = REPO / "bench-results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"bench-{stamp}.md").write_text(report)
    (out_dir / f"bench-{stamp}.json").write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
