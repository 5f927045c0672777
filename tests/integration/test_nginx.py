"""The shipped nginx file (deploy/nginx/) run by a real nginx in front of a real sidecar.

What users rely on when they copy that file: through nginx, every range, multi-range,
304 and 416 is the response the sidecar gives directly; a client that goes away is seen
by the sidecar at once; and nginx holds no copy of an object for a slow client, so the
sidecar's backpressure still reaches the storage. nginx is the Debian package, started
here on loopback ports with a private prefix, and stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson
import pytest

from proxy.config import TimeoutsConfig, load_config
from tests.conftest import (
    BUCKET,
    FILES,
    REPO,
    S3_PREFIX,
    S3Server,
    SidecarProcess,
    free_port,
    log_tail,
    make_config,
    port_accepts,
    stop_process,
    wait_until,
)
from tests.faults import clients
from tests.integration.httpclient import request
from tests.integration.rawhttp import parse_byteranges
from tests.integration.sidecars import admin, running_sidecar, stats, wait_for_stats

TEMPLATE: Final = REPO / "deploy" / "nginx" / "media-sidecar.conf.template"
BACKEND_APP: Final = REPO / "deploy" / "example-backend" / "app.py"
PLACEHOLDER: Final = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
BIG: Final = len(FILES["big.bin"])
# Headers a client or cache decides on: they must come through nginx unchanged.
PASSED: Final = (
    "content-range",
    "etag",
    "last-modified",
    "content-type",
    "accept-ranges",
    "x-request-id",
    "content-length",
    "cache-control",
    "x-content-type-options",
)
# How far the sidecar may run ahead of a slow client behind nginx. With nginx buffering
# nothing, what is left are the kernel's socket buffers on the path: the sidecar's send
# buffer towards nginx and nginx's send buffer towards the client, each autotuned up to
# net.ipv4.tcp_wmem's maximum (4 MiB by default). Measured here (4 MiB maximum), three
# runs: 3.7 MiB ahead on disk, 7.1-7.6 MiB on S3 with `proxy_buffering off`; the whole
# 64 MiB object, within 0.3 s, with `proxy_buffering on` (test_the_bound_catches_...).
TCP_WMEM_MAX: Final = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
AHEAD_BOUND: Final = 4 * TCP_WMEM_MAX
# The object slow and vanishing clients ask for: far larger than the bound, so a stream
# is still running when it is observed (big.bin, 5 MiB, fits in the socket buffers).
HUGE: Final = max(64 << 20, 4 * AHEAD_BOUND)
STORAGE_OF: Final = {"/media/": "local", "/s3/": "uploads"}


def nginx_binary() -> str:
    """The nginx executable; fail (never skip) with the fix when it is missing."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        pytest.fail("nginx is not installed: run `tests/bench/ensure_tools.sh nginx` (nginx-light)")
    return found


def render(template: str, values: dict[str, str]) -> str:
    """Fill the ${NAME} placeholders; every one must be given and every value used."""
    names = set(PLACEHOLDER.findall(template))
    assert names == set(values), f"placeholders {sorted(names)} vs values {sorted(values)}"
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def main_config(workdir: Path, server_block: Path) -> str:
    """The nginx.conf around the deploy file: private paths, one process, no daemon."""
    w = workdir
    return f"""{"user root;" if os.geteuid() == 0 else ""}
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {w}/access.log;
    client_body_temp_path {w}/tmp/body; proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi; uwsgi_temp_path {w}/tmp/uwsgi; scgi_temp_path {w}/tmp/scgi;
    include {server_block};
}}
"""


@dataclass
class Nginx:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]


def write_config(workdir: Path, server_block: str) -> list[str]:
    """Write nginx.conf and the rendered server block; return nginx's -p/-c/-e arguments."""
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    block = workdir / "media-sidecar.conf"
    block.write_text(server_block)
    conf = workdir / "nginx.conf"
    conf.write_text(main_config(workdir, block))
    return ["-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]


def nginx_check(workdir: Path, server_block: str) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on the server block inside our nginx.conf."""
    args = write_config(workdir, server_block)
    return subprocess.run(
        [nginx_binary(), "-t", *args], capture_output=True, text=True, timeout=30, check=False
    )


@contextlib.contextmanager
def running_nginx(workdir: Path, server_block: str, port: int) -> Iterator[Nginx]:
    """nginx on `server_block` (listening on `port`) until the block exits; stopped by PID."""
    args = write_config(workdir, server_block)
    out = (workdir / "stdout.log").open("wb")
    proc = subprocess.Popen(
        [nginx_binary(), *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
    )
    out.close()
    try:
        log = workdir / "error.log"
        wait_until(lambda: proc.poll() is not None or port_accepts(port), 15, "nginx", log)
        if proc.poll() is not None:
            pytest.fail(f"nginx exited with {proc.returncode}:\n{log_tail(log)}")
        yield Nginx(port=port, workdir=workdir, proc=proc)
    finally:
        stop_process(proc)


def rendered(sidecar: SidecarProcess, backend_port: int, listen_port: int) -> str:
    """The deploy file with this test's ports filled in."""
    return render(
        TEMPLATE.read_text(),
        {
            "LISTEN": f"127.0.0.1:{listen_port}",
            "SIDECAR_UPSTREAM": f"127.0.0.1:{sidecar.port}",
            "BACKEND_UPSTREAM": f"127.0.0.1:{backend_port}",
        },
    )


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory, media_root: Path, s3_server: S3Server
) -> Iterator[SidecarProcess]:
    """The sidecar process nginx forwards to (asyncio loop, the shipped default)."""
    config = make_config(
        media_root,
        s3_server.endpoint,
        timeouts={"idle": "20s", "upstream_first_byte": "5s"},
        logging={"level": "info", "format": "json", "access_log": True},
    )
    with running_sidecar(config, tmp_path_factory.mktemp("nginx-sidecar")) as proc:
        yield proc


@pytest.fixture(scope="module")
def huge_key(media_root: Path, s3_server: S3Server) -> Iterator[str]:
    """A HUGE-byte object under one key on disk and in S3, removed afterwards."""
    key = f"mutable/nginx-{uuid.uuid4().hex}.bin"
    data = os.urandom(HUGE)
    (media_root / key).write_bytes(data)
    s3_server.client.put_object(Bucket=BUCKET, Key=S3_PREFIX + key, Body=data)
    try:
        yield key
    finally:
        (media_root / key).unlink()
        s3_server.client.delete_object(Bucket=BUCKET, Key=S3_PREFIX + key)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """deploy/example-backend/app.py on a free port: what nginx sends non-media paths to."""
    port = free_port()
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(BACKEND_APP)],
            env=dict(os.environ, HOST="127.0.0.1", PORT=str(port)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: proc.poll() is not None or port_accepts(port), 30, "backend", log)
        assert proc.poll() is None, log_tail(log)
        yield port
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def nginx(
    tmp_path_factory: pytest.TempPathFactory, sidecar: SidecarProcess, backend: int
) -> Iterator[Nginx]:
    """nginx running the deploy file exactly as shipped, placeholders filled in."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("nginx")
    with running_nginx(workdir, rendered(sidecar, backend, port), port) as server:
        yield server


# ---------------------------------------------------------------------------- the file


def test_the_rendered_file_passes_nginx_t(tmp_path: Path) -> None:
    """What a user runs before reloading: the file must be valid nginx once filled in."""
    block = render(
        TEMPLATE.read_text(),
        {"LISTEN": "127.0.0.1:8000", "SIDECAR_UPSTREAM": "127.0.0.1:8080",
         "BACKEND_UPSTREAM": "127.0.0.1:8081"},
    )  # fmt: skip
    done = nginx_check(tmp_path, block)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_the_file_states_what_the_issue_requires() -> None:
    """Read the media location's directives, so a careless edit fails here, not in production."""
    text = TEMPLATE.read_text()
    media = re.search(r"location ~ \^/\(\?:media\|s3\|downloads\)/ \{(.*?)\n    \}", text, re.S)
    assert media, "the media location is missing"
    directives = {
        line.split(None, 1)[0]: line.split(None, 1)[1].split(";")[0].strip()
        for line in (raw.split("#")[0].strip() for raw in media.group(1).splitlines())
        if line
    }
    assert directives["proxy_buffering"] == "off"
    assert directives["proxy_request_buffering"] == "off"
    assert directives["proxy_http_version"] == "1.1"
    read_timeout_s = int(directives["proxy_read_timeout"].removesuffix("s"))
    shipped = [REPO / "deploy" / "sidecar.yaml", REPO / "deploy" / "compose" / "sidecar.yaml"]
    idle_s = max(TimeoutsConfig().idle, *(load_config(p).timeouts.idle for p in shipped))
    assert read_timeout_s > idle_s, "the sidecar must give up on a stalled stream first"
    # Upstream keep-alive is checked on the wire (test_nginx_keeps_sidecar_connections_alive).


# ---------------------------------------------------------------------------- semantics


def compare(
    nginx: Nginx, sidecar: SidecarProcess, path: str, headers: dict[str, str]
) -> clients.Received:
    """One request direct and one through nginx: same status, body and passed headers."""
    method = headers.pop("method", "GET")
    headers = {"X-Request-ID": f"cmp-{uuid.uuid4().hex[:12]}", **headers}
    direct = clients.fetch(sidecar.port, path, method=method, headers=headers)
    proxied = clients.fetch(nginx.port, path, method=method, headers=headers)
    assert direct.complete and proxied.complete, (direct.ending, proxied.ending)
    assert proxied.status == direct.status, (proxied.status, direct.status)
    ctype_d, ctype_p = direct.headers.get("content-type", ""), proxied.headers.get("content-type")
    body_d, body_p = direct.body, proxied.body
    if ctype_d.startswith("multipart/byteranges"):
        # The boundary is random per response (RFC 9110 §14.6): compare with it swapped.
        b_d, b_p = ctype_d.split("boundary=")[1], (ctype_p or "").split("boundary=")[1]
        assert [p.body for p in parse_byteranges(ctype_p or "", body_p)] == [
            p.body for p in parse_byteranges(ctype_d, body_d)
        ]
        body_p = body_p.replace(b_p.encode(), b_d.encode())
        proxied.headers["content-type"] = (ctype_p or "").replace(b_p, b_d)
    assert body_p == body_d, f"bodies differ: {len(body_p)} vs {len(body_d)} bytes"
    for name in PASSED:
        assert proxied.headers.get(name) == direct.headers.get(name), name
    assert proxied.headers["x-request-id"] == headers["X-Request-ID"]
    assert "transfer-encoding" not in proxied.headers, "nginx re-framed the body"
    return direct


@pytest.fixture(params=sorted(STORAGE_OF))
def prefix(request: pytest.FixtureRequest) -> str:
    """Each test runs for the disk route and for the S3 route."""
    return str(request.param)


def validators(sidecar: SidecarProcess, path: str) -> tuple[str, str]:
    """The ETag and Last-Modified the sidecar gives for `path`."""
    reply = request(sidecar.port, "HEAD", path)
    assert reply.status == 200, reply.status
    return reply.headers["etag"], reply.headers["last-modified"]


# name: (request headers, the status the sidecar must give, so each case tests its point)
CASES: Final = {
    "full": ({}, 200),
    "head": ({"method": "HEAD"}, 200),
    "range": ({"Range": "bytes=100-1099"}, 206),
    "suffix": ({"Range": "bytes=-777"}, 206),
    "open-ended": ({"Range": "bytes=5242000-"}, 206),
    "clamped": ({"Range": "bytes=5000000-99999999"}, 206),
    "multi-range": ({"Range": "bytes=0-9,1000-1999,-5"}, 206),
    "unsatisfiable": ({"Range": f"bytes={BIG + 10}-"}, 416),
    "malformed-range": ({"Range": "bytes=oops"}, 200),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_big_object_is_identical_through_nginx(
    nginx: Nginx, sidecar: SidecarProcess, prefix: str, case: str
) -> None:
    """Ranges, multi-range and 416 through nginx are the sidecar's own answers."""
    headers, status = CASES[case]
    direct = compare(nginx, sidecar, prefix + "big.bin", dict(headers))
    assert direct.status == status
    if case == "multi-range":
        assert direct.headers["content-type"].startswith("multipart/byteranges")


@pytest.mark.parametrize(
    "case",
    [
        "if-none-match",
        "if-modified-since",
        "if-range-match",
        "if-range-stale",
        "if-match-fails",
        "if-unmodified-since-fails",
    ],
)
def test_conditionals_are_identical_through_nginx(
    nginx: Nginx, sidecar: SidecarProcess, prefix: str, case: str
) -> None:
    """nginx passes validators and preconditions on; the sidecar decides 304/412/If-Range."""
    path = prefix + "hello.txt"
    etag, last_modified = validators(sidecar, path)
    headers = {
        "if-none-match": {"If-None-Match": etag},
        "if-modified-since": {"If-Modified-Since": last_modified},
        "if-range-match": {"Range": "bytes=10-19", "If-Range": etag},
        "if-range-stale": {"Range": "bytes=10-19", "If-Range": '"stale"'},
        "if-match-fails": {"If-Match": '"other"'},
        "if-unmodified-since-fails": {"If-Unmodified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"},
    }[case]
    expected = {"if-none-match": 304, "if-modified-since": 304, "if-range-match": 206}
    direct = request(sidecar.port, "GET", path, headers)
    assert direct.status == expected.get(case, 200 if case == "if-range-stale" else 412)
    compare(nginx, sidecar, path, dict(headers))


@pytest.mark.parametrize(
    "key", ["hello.txt", "with%20space.txt", "empty.bin", "sub/dir/nested.bin", "missing.bin"]
)
def test_other_objects_are_identical_through_nginx(
    nginx: Nginx, sidecar: SidecarProcess, prefix: str, key: str
) -> None:
    """Small, empty, nested, escaped and missing keys (404) come through unchanged."""
    compare(nginx, sidecar, prefix + key, {"Range": "bytes=0-4,10-14"})
    compare(nginx, sidecar, prefix + key, {})


def sidecar_peers(port: int) -> set[int]:
    """Local ports of the established TCP connections to 127.0.0.1:port (/proc/net/tcp)."""
    target = f"0100007F:{port:04X}"
    peers = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if remote == target and state == "01":  # 01 = TCP_ESTABLISHED
            peers.add(int(local.split(":")[1], 16))
    return peers


def test_nginx_keeps_sidecar_connections_alive(nginx: Nginx, sidecar: SidecarProcess) -> None:
    """HTTP/1.1 keep-alive upstream: sequential requests reuse nginx's connection."""
    for _ in range(3):
        assert request(nginx.port, "GET", "/media/one.bin").status == 200
    kept = sidecar_peers(sidecar.port)
    assert kept, "nginx closed its connection to the sidecar after each request"
    for _ in range(5):
        assert request(nginx.port, "GET", "/s3/one.bin").status == 200
    assert sidecar_peers(sidecar.port) & kept, "no connection to the sidecar was reused"


def test_request_id_is_made_by_nginx_when_absent(nginx: Nginx, sidecar: SidecarProcess) -> None:
    """Without a client id, nginx's $request_id reaches the sidecar and its logs."""
    reply = request(nginx.port, "GET", "/media/one.bin")
    assert reply.status == 200
    rid = reply.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
    wait_until(lambda: rid in sidecar.log.read_text(), 5, "request id in the sidecar log")


def test_other_paths_go_to_the_backend(nginx: Nginx) -> None:
    """The same server block keeps the application's routes, with the request id."""
    reply = request(nginx.port, "GET", "/api/hello", {"X-Request-ID": "to-the-backend"})
    assert reply.status == 200, reply.body[:300]
    assert orjson.loads(reply.body)["request_id"] == "to-the-backend"


# ---------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("close", ["fin", "rst"])
def test_a_client_leaving_nginx_is_a_disconnect_in_the_sidecar(
    nginx: Nginx, sidecar: SidecarProcess, huge_key: str, prefix: str, close: str
) -> None:
    """nginx drops its upstream connection when the client goes: no orphaned stream."""
    before = quiet(sidecar)["connections"]["client_disconnected"]
    got = clients.read_then_vanish(
        nginx.port,
        prefix + huge_key,
        100_000,
        close=close,  # type: ignore[arg-type]
    )
    assert got.status == 200 and got.complete, got.ending
    left = time.monotonic()
    wait_for_stats(
        sidecar,
        lambda s: (
            s["connections"]["client_disconnected"] == before + 1
            and s["connections"]["active"] == 0
        ),
        2.0,
        "client_disconnected after the client left nginx",
    )
    assert time.monotonic() - left < 2.0
    quiet(sidecar)


def quiet(sidecar: SidecarProcess) -> dict[str, object]:
    """Wait until no stream is active and no storage handle is held."""
    result: dict[str, object] = wait_for_stats(
        sidecar,
        lambda s: (
            s["connections"]["active"] == 0
            and all(st["upstream_in_use"] == 0 for st in s["storages"].values())
        ),
        10,
        "sidecar quiet",
    )
    return result


@dataclass
class Sample:
    elapsed_s: float
    client_bytes: int  # body bytes the client has read
    sidecar_bytes: int  # body bytes the sidecar handed to its socket for this request
    state: str | None  # the stream's state in /stats/connections; None when it ended

    @property
    def ahead(self) -> int:
        return self.sidecar_bytes - self.client_bytes


def read_slowly_and_watch(
    nginx_port: int,
    sidecar: SidecarProcess,
    path: str,
    rate_bps: int = 200_000,
    duration_s: float = 3.0,
) -> list[Sample]:
    """Read `path` through nginx at `rate_bps`, sampling the sidecar's view every 0.25 s."""
    storage = STORAGE_OF["/" + path.split("/")[1] + "/"]
    rid = f"slow-{uuid.uuid4().hex[:12]}"
    base = quiet(sidecar)["storages"][storage]["bytes_sent"]  # type: ignore[index]
    samples: list[Sample] = []
    with clients.connect(nginx_port, rcvbuf=8192) as sock:
        clients.send_request(sock, path, headers={"X-Request-ID": rid})
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            assert chunk, f"nginx closed before the headers: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        got, started, next_sample = 0, time.monotonic(), 0.25
        while (elapsed := time.monotonic() - started) < duration_s:
            if elapsed >= next_sample:
                figures = stats(sidecar)
                live = [
                    c
                    for c in admin(sidecar, "/stats/connections")["connections"]
                    if c["request_id"] == rid
                ]
                sent = figures["storages"][storage]["bytes_sent"] - base
                samples.append(Sample(elapsed, got, sent, live[0]["state"] if live else None))
                next_sample += 0.25
            time.sleep(max(0.0, got / rate_bps - elapsed))
            got += len(sock.recv(4096))
    quiet(sidecar)
    return samples


def report(samples: list[Sample]) -> str:
    return "\n".join(
        f"t={s.elapsed_s:.2f}s client={s.client_bytes} sidecar={s.sidecar_bytes} "
        f"ahead={s.ahead} state={s.state}"
        for s in samples
    )


def test_a_slow_client_behind_nginx_holds_the_sidecar_back(
    nginx: Nginx, sidecar: SidecarProcess, huge_key: str, prefix: str
) -> None:
    """With proxy_buffering off, the sidecar's backpressure reaches through nginx."""
    samples = read_slowly_and_watch(nginx.port, sidecar, prefix + huge_key)
    print(report(samples))
    assert all(s.state == "streaming" for s in samples), report(samples)
    assert max(s.ahead for s in samples) < AHEAD_BOUND, report(samples)
    assert samples[-1].client_bytes > 300_000, "the client was not served at its pace"


def test_the_bound_catches_a_buffering_nginx(
    tmp_path: Path, sidecar: SidecarProcess, backend: int, huge_key: str, prefix: str
) -> None:
    """The same file with `proxy_buffering on` must fail the test above: nginx reads ahead."""
    port = free_port()
    block = rendered(sidecar, backend, port)
    assert block.count("proxy_buffering off;") == 1
    with running_nginx(
        tmp_path, block.replace("proxy_buffering off;", "proxy_buffering on;"), port
    ):
        samples = read_slowly_and_watch(port, sidecar, prefix + huge_key, duration_s=1.5)
    print(report(samples))
    assert max(s.ahead for s in samples) > AHEAD_BOUND, report(samples)
