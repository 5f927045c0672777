"""The command line as a user runs it (SPEC §1): exit codes, messages, serving, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, free_port, port_accepts, start_sidecar, stop_process, wait_until
from tests.integration.httpclient import request


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_bad_config_exits_2_and_names_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    port = free_port()
    bad.write_text(f"""
server: {{prot: {port}, port: {port}}}
timeouts: {{idle: soon}}
storages:
  local: {{type: disk, root: ./media}}
  uploads: {{type: s3, bucket: media}}
routes:
  - {{prefix: /media/, storage: local}}
  - {{prefix: /a/, storage: archive}}
""")
    result = run_cli("--config", str(bad))  # no --check-config: it must not start either
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{bad}: server.prot: unknown key (did you mean 'port'?)",
        f"{bad}: timeouts.idle: expected a duration like 250ms, 30s, 5m or 1h, got 'soon'",
        f"{bad}: routes[1].storage: unknown storage 'archive' (defined: local, uploads)",
    ]
    assert not port_accepts(port)


def test_check_config_accepts_the_shipped_files() -> None:
    for name in ("config/sidecar.yaml", "config/example-s3.yaml"):
        result = run_cli("--config", name, "--check-config")
        assert (result.returncode, result.stdout.strip()) == (0, f"{name}: ok"), result.stderr


def test_unreadable_config_exits_2(tmp_path: Path) -> None:
    result = run_cli("--config", str(tmp_path / "missing.yaml"), "--check-config")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"{tmp_path / 'missing.yaml'}: cannot read file: No such file or directory"
    )


def test_startup_failure_exits_3(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
server: {{host: 127.0.0.1, port: {free_port()}}}
admin: {{port: {free_port()}}}
storages: {{local: {{type: disk, root: {tmp_path / "no-such-dir"}}}}}
routes: [{{prefix: /media/, storage: local}}]
""")
    result = run_cli("--config", str(cfg))
    assert result.returncode == 3
    assert "server.start_failed" in result.stderr and "not a directory" in result.stderr


def test_serves_the_shipped_media_and_stops_on_sigterm(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    shipped = (REPO / "config/sidecar.yaml").read_text()
    config = shipped.replace("port: 8080", f"port: {port}").replace("port: 9901", f"port: {admin}")
    config = config.replace("host: 0.0.0.0", "host: 127.0.0.1")
    proc, log = start_sidecar(config, tmp_path)
    try:
        wait_until(lambda: proc.poll() is not None or port_accepts(admin), 30, "sidecar", log)
        reply = request(port, "GET", "/media/hello.txt", {"Range": "bytes=0-99"})
        assert reply.status == 206
        assert reply.body == (REPO / "media/hello.txt").read_bytes()[:100]
        assert request(admin, "GET", "/health").body == b'{"status":"ok"}'
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        events = log.read_text()
        assert '"event":"server.listening"' in events and '"event":"server.stopped"' in events
    finally:
        stop_process(proc)
