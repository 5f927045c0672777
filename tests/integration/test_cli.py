"""The command line as an operator runs it (SPEC §1): `python -m proxy --config PATH`.

Real subprocesses; readiness is polled, never slept for; every process is stopped by PID.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    ACCESS_KEY,
    ACCESS_KEY_ENV,
    BUCKET,
    FILES,
    REPO,
    S3_PREFIX,
    SECRET_KEY,
    SECRET_KEY_ENV,
    S3Server,
    free_port,
    is_free,
    log_tail,
    port_accepts,
    stop_process,
)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Served:
    """A `python -m proxy --config` subprocess, its media port and its log."""

    def __init__(self, config: dict[str, Any], workdir: Path, env: dict[str, str]) -> None:
        self.port = int(config["server"]["port"])
        self.config_path = workdir / "sidecar.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = workdir / "sidecar.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--config", str(self.config_path)],
                cwd=REPO,
                env=cli_env(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, probe_path: str) -> None:
        """Poll until the media listener answers HTTP; fail at once if the process exits."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"sidecar exited with {self.proc.returncode}:\n{log_tail(self.log)}")
            try:
                http_get(self.port, probe_path)
                return
            except (ConnectionError, OSError, http.client.HTTPException):
                time.sleep(0.05)
        pytest.fail(f"sidecar not serving after {START_TIMEOUT_S} s:\n{log_tail(self.log)}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start sidecar subprocesses; every one is stopped by its PID at teardown."""
    started: list[Served] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> Served:
        workdir = tmp_path / f"run{len(started)}"
        workdir.mkdir()
        served = Served(config, workdir, env or {})
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            stop_process(served.proc)


def shipped_config(port: int) -> dict[str, Any]:
    """config/sidecar.yaml as shipped, on loopback ports of our own."""
    config = yaml.safe_load((REPO / "config/sidecar.yaml").read_text())
    config["server"].update(host="127.0.0.1", port=port)
    config.setdefault("admin", {}).update(host="127.0.0.1", port=free_port())
    return dict(config)


# ---------------------------------------------------------------------------- bad configs


BAD_YAML = """\
server: {{host: 127.0.0.1, prot: {port}, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
timeouts: {{idle: soon}}
storages:
  local: {{type: disk, root: ./media}}
  uploads: {{type: s3, bucket: media}}
routes:
  - {{prefix: /media/, storage: local}}
  - {{prefix: /a/, storage: archive}}
"""


def assert_bad_config_report(stderr: str, path: str) -> None:
    """Every problem on its own line, `PATH: dotted.path: reason`, and nothing else."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 3, stderr
    by_field = {}
    for line in lines:
        assert line.startswith(f"{path}: "), line
        field, sep, reason = line[len(path) + 2 :].partition(": ")
        assert sep and reason.strip(), line
        by_field[field] = reason
    assert set(by_field) == {"server.prot", "timeouts.idle", "routes[1].storage"}, lines
    assert "unknown key" in by_field["server.prot"]
    assert "did you mean 'port'" in by_field["server.prot"]
    assert by_field["routes[1].storage"] == "unknown storage 'archive' (defined: local, uploads)"


def test_check_config_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_YAML.format(port=free_port(), admin=free_port()))
    result = run_cli("--config", "bad.yaml", "--check-config", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert_bad_config_report(result.stderr, "bad.yaml")


def test_bad_config_never_starts_a_server(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML.format(port=port, admin=admin))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--config", str(bad)],  # no --check-config
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        listening = False
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            listening = listening or port_accepts(port) or port_accepts(admin)
            time.sleep(0.01)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 2, stderr
        assert not listening, "a bad config bound a port"
        assert is_free(port) and is_free(admin)
        assert_bad_config_report(stderr, str(bad))
    finally:
        stop_process(proc)


def test_check_config_accepts_a_good_config(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(shipped_config(free_port())))
    result = run_cli("--config", str(good), "--check-config")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# ---------------------------------------------------------------------------- serving


def test_serves_the_shipped_media_and_exits_0_on_sigterm(serve: Any) -> None:
    shipped = sorted(p for p in (REPO / "media").iterdir() if p.is_file())
    assert shipped, "the repository ships no media/ file"
    name, data = shipped[0].name, shipped[0].read_bytes()
    assert len(data) > 20
    served = serve(shipped_config(free_port()))
    served.wait_ready(f"/media/{name}")

    assert http_get(served.port, f"/media/{name}") == (200, data)
    assert http_get(served.port, f"/media/{name}", {"Range": "bytes=3-12"}) == (206, data[3:13])
    assert http_get(served.port, f"/media/{name}", {"Range": "bytes=-7"}) == (206, data[-7:])
    assert http_get(served.port, "/media/no-such-file")[0] == 404

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(STOP_TIMEOUT_S) == 0, log_tail(served.log)
    assert not port_accepts(served.port)
    log = served.log.read_text(errors="replace")
    assert "Traceback" not in log
    # start-up objects were frozen out of the collector's walks (proxy.heap)
    listening = [json.loads(line) for line in log.splitlines() if '"server.listening"' in line]
    assert len(listening) == 1 and listening[0]["gc_frozen"] > 50_000, listening


def test_serves_s3_through_the_cli(serve: Any, s3_server: S3Server) -> None:
    config = shipped_config(free_port())
    config["storages"]["uploads"] = {
        "type": "s3",
        "bucket": BUCKET,
        "prefix": S3_PREFIX,
        "endpoint_url": s3_server.endpoint,
        "addressing_style": "path",
        "access_key_id_env": ACCESS_KEY_ENV,
        "secret_access_key_env": SECRET_KEY_ENV,
    }
    config["routes"].append({"prefix": "/s3/", "storage": "uploads"})
    served = serve(config, {ACCESS_KEY_ENV: ACCESS_KEY, SECRET_KEY_ENV: SECRET_KEY})
    served.wait_ready("/s3/one.bin")
    big = FILES["big.bin"]
    assert http_get(served.port, "/s3/big.bin", {"Range": "bytes=1000-1999"}) == (
        206,
        big[1000:2000],
    )
    assert http_get(served.port, "/s3/hello.txt") == (200, FILES["hello.txt"])
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(STOP_TIMEOUT_S) == 0, log_tail(served.log)


def test_sigterm_drains_an_active_stream(serve: Any, tmp_path: Path) -> None:
    """A response in flight when SIGTERM arrives is completed, then the process exits 0."""
    root = tmp_path / "media"
    root.mkdir()
    data = os.urandom(32 * 1024 * 1024)
    (root / "large.bin").write_bytes(data)
    config = shipped_config(free_port())
    config["server"]["shutdown_timeout"] = "20s"
    config["storages"] = {"local": {"type": "disk", "root": str(root)}}
    served = serve(config)
    served.wait_ready("/media/missing")

    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as sock:
        sock.sendall(b"GET /media/large.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        received = sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200"), received[:100]
        served.proc.send_signal(signal.SIGTERM)
        while chunk := sock.recv(1 << 20):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert f"content-length: {len(data)}".encode() in head.lower()
    assert len(body) == len(data)
    assert body == data
    assert served.proc.wait(STOP_TIMEOUT_S) == 0, log_tail(served.log)
