"""SIGHUP (SPEC §6): a valid file takes effect for new requests while active streams finish
on the old one; an invalid file keeps the old configuration and logs every problem.
"""

from __future__ import annotations

import copy
import signal
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.conftest import FILES, S3Server, SidecarProcess, free_port, make_config, wait_until
from tests.integration.httpclient import request
from tests.integration.sidecars import error_lines, running_sidecar, stats

BIG = FILES["big.bin"]


def events(sidecar: SidecarProcess, name: str) -> list[dict[str, Any]]:
    return [
        e
        for e in (orjson.loads(line) for line in sidecar.log.read_text().splitlines())
        if e["event"] == name
    ]


def sighup(sidecar: SidecarProcess, config_file: Path, text: str, expect: str) -> dict[str, Any]:
    """Write the file, send SIGHUP, and wait for the `expect` event it causes."""
    seen = len(events(sidecar, expect))
    config_file.write_text(text)
    sidecar.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(events(sidecar, expect)) > seen, 10, expect, sidecar.log)
    return events(sidecar, expect)[-1]


def test_sighup_applies_a_valid_file_and_keeps_the_old_one_when_invalid(
    tmp_path: Path, media_root: Path, s3_server: S3Server
) -> None:
    config = make_config(media_root, s3_server.endpoint, logging={"level": "info"})
    with running_sidecar(config, tmp_path) as sidecar:
        config_file = tmp_path / "sidecar.yaml"
        assert request(sidecar.port, "GET", "/s3/one.bin").status == 200

        # A stream of the old configuration, on the S3 storage the new file removes.
        old = socket.create_connection(("127.0.0.1", sidecar.port), timeout=10)
        old.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        old.sendall(b"GET /s3/big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        first = old.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")

        new = copy.deepcopy(config)
        del new["storages"]["uploads"]
        new["routes"] = [
            {"prefix": "/media/", "storage": "local", "cache_control": "no-store"},
            {"prefix": "/v2/", "storage": "local"},
        ]
        new["limits"] = {"max_streams": 50}
        new["server"] = {**config["server"], "port": free_port()}  # needs a restart
        reloaded = sighup(sidecar, config_file, yaml.safe_dump(new), "config.reloaded")
        assert reloaded["needs_restart"] == ["server.port"]

        # New requests see the new file at once (keep-alive or not)...
        assert request(sidecar.port, "GET", "/v2/one.bin").body == FILES["one.bin"]
        assert request(sidecar.port, "GET", "/media/one.bin").header("Cache-Control") == "no-store"
        assert request(sidecar.port, "GET", "/s3/one.bin").status == 404
        figures = stats(sidecar)
        assert figures["limits"]["max_streams"] == 50
        assert set(figures["storages"]) == {"local"}
        # ...while the old stream finishes on the old one, byte for byte.
        assert not events(sidecar, "storage.closed")
        body = bytearray(first.partition(b"\r\n\r\n")[2])
        while len(body) < len(BIG):
            chunk = old.recv(1 << 20)
            assert chunk, "the old stream was cut by the reload"
            body += chunk
        old.close()
        assert bytes(body) == BIG
        wait_until(lambda: bool(events(sidecar, "storage.closed")), 5, "old storage closed")
        assert events(sidecar, "storage.closed")[0]["storage"] == "uploads"

        # An invalid file: every problem logged, the running configuration untouched.
        broken = copy.deepcopy(new)
        broken["limits"] = {"max_streams": 0, "chunk_sise": "64KiB"}
        broken["routes"].append({"prefix": "/x/", "storage": "missing"})
        failed = sighup(sidecar, config_file, yaml.safe_dump(broken), "config.reload_failed")
        problems = "\n".join(failed["problems"])
        for path in ("limits.max_streams", "limits.chunk_sise", "routes[2].storage"):
            assert path in problems, problems
        assert request(sidecar.port, "GET", "/v2/one.bin").status == 200
        assert stats(sidecar)["limits"]["max_streams"] == 50

        # A file that parses but cannot start (an S3 storage without its credentials).
        unstartable = copy.deepcopy(new)
        unstartable["storages"]["other"] = {
            **config["storages"]["uploads"],
            "access_key_id_env": "TEST_UNSET_KEY_ID",
            "secret_access_key_env": "TEST_UNSET_SECRET",
        }
        failed = sighup(sidecar, config_file, yaml.safe_dump(unstartable), "config.reload_failed")
        assert "TEST_UNSET_KEY_ID" in "\n".join(failed["problems"])
        assert set(stats(sidecar)["storages"]) == {"local"}

        time.sleep(0.2)
        assert stats(sidecar)["connections"]["active"] == 0
    assert sidecar.proc.returncode == 0
    errors = [e for e in error_lines(sidecar) if "config.reload_failed" not in e]
    assert not errors, errors
