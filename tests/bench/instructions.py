"""CPU instructions per request of the lookup routes (callgrind): `make bench-instructions`.

Wall-clock A/B runs on this shared VM scatter by ±10 µs per request, more than most code
changes of the database path are worth. callgrind counts the instructions the sidecar
executes (user space; not the kernel's work in syscalls), the same to ±0.1 % from one run
to the next whatever else the machine does. So a change is measured by running this on
the build before and after it (`--repo` takes another checkout, e.g. a git worktree).

One PostgreSQL (tests/pg.py) and one sidecar under valgrind with the lookup scenario's
routes on a 4 KiB file (lookup_bench.py); per route, curl sends `--requests` GETs, 16 at a
time, over the 1,000 ids, after a warm-up of each route (templates, prepared statements,
a warm cache). Instrumentation is off until then, so the ~60x slower start-up does not
count. Everything listens on 127.0.0.1; every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import lookup_bench as lb  # noqa: E402
from run_bench import free_port  # noqa: E402

FILE = "4k.bin"
ROUTES = {
    "plain": (lb.PLAIN, lb.plain_pattern(FILE)),
    "cached": (lb.CACHED, lb.id_pattern(FILE)),
    "uncached": (lb.UNCACHED, lb.id_pattern(FILE)),
}
PARALLEL = 16
WARM_REQUESTS = 1000  # per route: every id once (a warm cache, every path's template)
START_TIMEOUT_S = 180.0  # python under valgrind imports slowly


def curl(port: int, route: str, count: int, work: Path) -> int:
    """`count` GETs of the route by curl, PARALLEL at a time; how many were 200."""
    prefix, pattern = ROUTES[route]
    config = work / f"{route}.cfg"
    with config.open("w") as f:
        for i in range(count):
            f.write(f'url = "http://127.0.0.1:{port}{prefix}{pattern % (i % lb.IDS_PER_FILE)}"\n')
            f.write('output = "/dev/null"\n')
    argv = ["curl", "--silent", "--parallel", "--parallel-max", str(PARALLEL)]
    argv += ["--config", str(config), "--write-out", "%{http_code}\\n"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=count + 120)
    return done.stdout.split().count("200")


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True)


def dumped_total(out: Path, before: set[str]) -> int:
    """The `totals:` of the dump callgrind wrote since `before` (the files seen then)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for name in sorted(set(glob.glob(f"{out}*")) - before):
            for line in Path(name).read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind dump next to {out}")


def measure(repo: Path, requests: int, routes: list[str]) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="media-instr-"))
    db = lb.LookupDb([FILE])
    proc: subprocess.Popen[bytes] | None = None
    try:
        media = work / "media"
        media.mkdir()
        (media / FILE).write_bytes(os.urandom(4096))
        lb.link_plain_names(media, [FILE])
        db.start()
        port, admin = free_port(), free_port()
        config = work / "sidecar.yaml"
        config.write_text(lb.sidecar_config(port, admin, media))
        out = work / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes"]
        argv += [f"--callgrind-out-file={out}", sys.executable, "-m", "proxy"]
        argv += ["--config", str(config)]
        env = dict(os.environ, **{lb.DSN_ENV: db.dsn})
        # cwd: `python -m proxy` imports the checkout being measured
        proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                lb.admin_stats(admin)
                break
            except (OSError, lb.LookupSetupError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the sidecar did not start under valgrind") from None
                time.sleep(0.5)
        per_request = {}
        for route in routes:  # each warmed just before: its cache has not expired since
            if curl(port, route, WARM_REQUESTS, work) != WARM_REQUESTS:
                raise RuntimeError(f"{route}: not every warm-up request was a 200")
            control(proc.pid, "--zero")
            control(proc.pid, "--instr=on")
            ok = curl(port, route, requests, work)
            control(proc.pid, "--instr=off")
            if ok != requests:
                raise RuntimeError(f"{route}: {requests - ok} of {requests} requests failed")
            before = set(glob.glob(f"{out}*"))
            control(proc.pid, "--dump")
            per_request[route] = dumped_total(out, before) / requests
        return per_request
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        db.destroy()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout to measure")
    ap.add_argument("--requests", type=int, default=2000, help="per route (default 2000)")
    ap.add_argument(
        "--routes", default=",".join(ROUTES), help="comma list of plain,cached,uncached"
    )
    args = ap.parse_args()
    routes = args.routes.split(",")
    if unknown := set(routes) - set(ROUTES):
        ap.error(f"unknown routes: {', '.join(sorted(unknown))}")
    for tool in ("valgrind", "callgrind_control", "curl"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (tests/bench/ensure_tools.sh valgrind curl)", file=sys.stderr)
            return 2
    got = measure(args.repo.resolve(), args.requests, routes)
    commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    print(f"instructions per request, {args.requests:,} GETs of a 4 KiB file per route,"
          f" {PARALLEL} at a time (callgrind; build {commit or '?'})")  # fmt: skip
    for route, count in got.items():
        print(f"  {route:9s} {count:12,.0f}")
    if "plain" in got:
        for route in ("cached", "uncached"):
            if route in got:
                print(f"  {route} - plain: {got[route] - got['plain']:+,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
