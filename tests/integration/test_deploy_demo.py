"""The compose demo's X-Accel-Redirect downloads work: the example backend of deploy/ and
the sidecar configuration of deploy/compose, with only addresses and paths swapped in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml

from tests.conftest import REPO, S3Server, free_port, port_accepts, stop_process, wait_until
from tests.integration.httpclient import request
from tests.integration.sidecars import running_sidecar

HELLO = (REPO / "media" / "hello.txt").read_bytes()


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """deploy/example-backend/app.py as a process on a free loopback port."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo-backend") / "backend.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "deploy" / "example-backend" / "app.py")],
            env=dict(os.environ, HOST="127.0.0.1", PORT=str(port)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: port_accepts(port), 30, "example backend", log)
        yield port
    finally:
        stop_process(proc)


def test_downloads_are_authorised_by_the_backend_and_served_by_the_sidecar(
    tmp_path: Path, backend: int, s3_server: S3Server
) -> None:
    config = yaml.safe_load((REPO / "deploy" / "compose" / "sidecar.yaml").read_text())
    config["server"].update(host="127.0.0.1", port=free_port())
    config["admin"].update(port=free_port())
    config["storages"]["local"]["root"] = str(REPO / "media")
    config["storages"]["uploads"]["endpoint_url"] = s3_server.endpoint
    config["upstreams"]["app"]["url"] = f"http://127.0.0.1:{backend}"
    env = {"S3_ACCESS_KEY_ID": "x", "S3_SECRET_ACCESS_KEY": "y"}
    with running_sidecar(config, tmp_path, env) as sidecar:
        denied = request(sidecar.port, "GET", "/downloads/hello.txt")
        assert denied.status == 401 and orjson.loads(denied.body) == {"error": "login required"}

        got = request(
            sidecar.port,
            "GET",
            "/downloads/hello.txt",
            {"X-Demo-User": "ann", "Range": "bytes=0-9"},
        )
        assert got.status == 206 and got.body == HELLO[:10]
        assert got.header("Content-Disposition") == 'attachment; filename="hello.txt"'
        assert got.header("Cache-Control") == "private, max-age=60"
        assert got.header("Content-Range") == f"bytes 0-9/{len(HELLO)}"
        # The internal route is not reachable directly.
        assert request(sidecar.port, "GET", "/protected/hello.txt").status == 404
