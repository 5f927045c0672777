"""SIGTERM with live streams (SPEC §6): /health says draining at once, no new connections,
streams that can finish within `shutdown_timeout` complete byte-exact, the rest are aborted
and counted, and the process exits 0.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import FILES, S3Server, free_port, make_config
from tests.integration.httpclient import request
from tests.integration.sidecars import running_sidecar, wait_for_stats

SHUTDOWN_S = 3.0
BIG = FILES["big.bin"]


def open_stream(port: int, path: str) -> tuple[socket.socket, bytes]:
    """Request `path`, read the headers and a first piece; return the socket and the piece."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    client.settimeout(15)
    client.connect(("127.0.0.1", port))
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += client.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return client, body


def read_rest(client: socket.socket, first: bytes, results: list[tuple[str, bytes]]) -> None:
    got = bytearray(first)
    end = "eof"
    try:
        while len(got) < len(BIG):
            chunk = client.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        else:
            end = "complete"
    except ConnectionResetError:
        end = "reset"
    results.append((end, bytes(got)))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigterm_drains_then_aborts_and_exits_0(
    tmp_path: Path, media_root: Path, s3_server: S3Server, loop: str
) -> None:
    config = make_config(
        media_root,
        s3_server.endpoint,
        server={
            "host": "127.0.0.1",
            "port": free_port(),
            "event_loop": loop,
            "shutdown_timeout": f"{SHUTDOWN_S}s",
        },
        timeouts={"idle": "30s"},
        logging={"level": "info", "format": "json"},
    )
    with running_sidecar(config, tmp_path) as sidecar:
        paths = ["/media/big.bin", "/s3/big.bin"] * 10
        streams = [open_stream(sidecar.port, p) for p in paths]
        try:
            wait_for_stats(sidecar, lambda s: s["connections"]["active"] == 20, 10, "20 streams")
            finishers, stallers = streams[:10], streams[10:]  # stallers never read again

            sigterm_at = time.monotonic()
            sidecar.proc.send_signal(signal.SIGTERM)
            health = request(sidecar.admin_port, "GET", "/health")
            assert health.status == 503 and orjson.loads(health.body) == {"status": "draining"}
            assert time.monotonic() - sigterm_at < 1.0

            results: list[tuple[str, bytes]] = []
            readers = [
                threading.Thread(target=read_rest, args=(client, first, results))
                for client, first in finishers
            ]
            for reader in readers:
                reader.start()
            time.sleep(0.3)
            with pytest.raises(OSError):  # the listener stopped accepting
                socket.create_connection(("127.0.0.1", sidecar.port), timeout=2).close()
            for reader in readers:
                reader.join(15)
            assert [end for end, _ in results] == ["complete"] * 10
            assert all(body == BIG for _, body in results)

            assert sidecar.proc.wait(SHUTDOWN_S * 2 + 10) == 0
            elapsed = time.monotonic() - sigterm_at
            assert SHUTDOWN_S * 0.9 <= elapsed < SHUTDOWN_S * 2 + 5, elapsed
            # The stallers read only now: what was queued, then the cut, never the whole body.
            for client, first in stallers:
                read_rest(client, first, results)
            cut = results[10:]
            assert len(cut) == 10
            assert all(end in ("reset", "eof") and len(body) < len(BIG) for end, body in cut), [
                (end, len(body)) for end, body in cut
            ]
        finally:  # closed whatever failed: a leaked socket would fail a later test
            for client, _ in streams:
                client.close()

    events = [orjson.loads(line) for line in sidecar.log.read_text().splitlines()]
    aborted = [e for e in events if e["event"] == "stream.aborted"]
    assert len(aborted) == 10 and {e["reason"] for e in aborted} == {"shutdown_timeout"}
    stopped = [e for e in events if e["event"] == "server.stopped"]
    assert len(stopped) == 1
    final = stopped[0]
    assert final["active"] == 0 and final["failed"] == 10 and final["completed"] >= 10
    assert final["total"] == final["completed"] + final["failed"] + final["client_disconnected"]
    assert not [e for e in events if e["level"] == "error"], "errors logged during the drain"
