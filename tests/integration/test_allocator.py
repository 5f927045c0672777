"""`server.allocator` in the real process: jemalloc by default where installed, same PID.

The test machine has libjemalloc2 (`tests/bench/ensure_tools.sh jemalloc`, run by `make
test`): the default `auto` must end up serving on it, with Python's objects in it too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FILES, S3Server, free_port, make_config
from tests.integration.httpclient import request
from tests.integration.sidecars import running_sidecar, stats


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def maps_of(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def config(media_root: Path, s3_server: S3Server, allocator: str | None) -> dict[str, object]:
    server: dict[str, object] = {"host": "127.0.0.1", "port": free_port()}
    if allocator is not None:
        server["allocator"] = allocator
    return make_config(media_root, s3_server.endpoint, server=server)


@pytest.mark.parametrize("allocator", [None, "jemalloc"], ids=["default-auto", "required"])
def test_serves_on_jemalloc_in_the_same_process(
    tmp_path: Path, media_root: Path, s3_server: S3Server, allocator: str | None
) -> None:
    with running_sidecar(config(media_root, s3_server, allocator), tmp_path) as sidecar:
        pid = sidecar.proc.pid
        assert "libjemalloc" in maps_of(pid)
        env = environ_of(pid)
        assert env["PYTHONMALLOC"] == "malloc"
        assert "background_thread:true" in env["MALLOC_CONF"]
        process = stats(sidecar)["process"]
        assert (process["pid"], process["allocator"]) == (pid, "jemalloc"), "execve keeps the PID"
        reply = request(sidecar.port, "GET", "/s3/big.bin")
        assert (reply.status, reply.body) == (200, FILES["big.bin"])


def test_an_operators_malloc_conf_is_kept(
    tmp_path: Path, media_root: Path, s3_server: S3Server
) -> None:
    env = {"MALLOC_CONF": "narenas:1,dirty_decay_ms:500"}
    with running_sidecar(config(media_root, s3_server, None), tmp_path, env) as sidecar:
        assert environ_of(sidecar.proc.pid)["MALLOC_CONF"] == "narenas:1,dirty_decay_ms:500"
        assert stats(sidecar)["process"]["allocator"] == "jemalloc"


def test_system_keeps_pythons_own_allocator(
    tmp_path: Path, media_root: Path, s3_server: S3Server
) -> None:
    with running_sidecar(config(media_root, s3_server, "system"), tmp_path) as sidecar:
        pid = sidecar.proc.pid
        assert "libjemalloc" not in maps_of(pid)
        assert "PYTHONMALLOC" not in environ_of(pid)
        assert stats(sidecar)["process"]["allocator"] == "pymalloc"
        reply = request(sidecar.port, "GET", "/media/hello.txt")
        assert (reply.status, reply.body) == (200, FILES["hello.txt"])
