"""A storm: many concurrent random-range requests, a third of the clients vanishing at
random points, against both storages. Afterwards nothing is active, the invariant holds,
every outcome was counted once, and S3 connections and open files are back to baseline.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FILES, S3Server, SidecarProcess, free_port, make_config
from tests.integration.sidecars import (
    error_lines,
    invariant_holds,
    running_sidecar,
    settled,
    stats,
    wait_for_stats,
)

REQUESTS = 600
CONCURRENCY = 48
KEYS = ("big.bin", "sub/dir/nested.bin", "hello.txt", "pic.png")
PREFIXES = ("/media/", "/s3/")


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def sidecar(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    media_root: Path,
    s3_server: S3Server,
) -> Iterator[SidecarProcess]:
    config = make_config(
        media_root,
        s3_server.endpoint,
        server={"host": "127.0.0.1", "port": free_port(), "event_loop": request.param},
        timeouts={"idle": "5s", "upstream_first_byte": "5s"},
        logging={"level": "warning", "format": "json", "access_log": False},
    )
    with running_sidecar(config, tmp_path_factory.mktemp(f"storm-{request.param}")) as proc:
        yield proc
        assert not error_lines(proc), error_lines(proc)[:3]


def pick(rng: random.Random) -> tuple[str, str, tuple[int, int] | None]:
    """A path and a Range: whole object, or one random range within it."""
    key = rng.choice(KEYS)
    size = len(FILES[key])
    if rng.random() < 0.2:
        return rng.choice(PREFIXES) + key, key, None
    start = rng.randrange(size)
    end = min(size - 1, start + rng.randrange(1, 1 << 20))
    return rng.choice(PREFIXES) + key, key, (start, end)


async def one_client(port: int, rng: random.Random, tally: dict[str, int]) -> None:
    path, key, byte_range = pick(rng)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    try:
        head = f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        if byte_range:
            head += f"Range: bytes={byte_range[0]}-{byte_range[1]}\r\n"
        writer.write((head + "\r\n").encode())
        await writer.drain()
        if rng.random() < 1 / 3:  # vanish: before the headers, or somewhere in the body
            await reader.read(rng.choice((0, 1, 100, 5000, 70_000)))
            if rng.random() < 0.5:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tally["vanished"] += 1
            return
        data = await asyncio.wait_for(reader.read(), 30)
        header, _, body = data.partition(b"\r\n\r\n")
        expected = (
            FILES[key] if byte_range is None else FILES[key][byte_range[0] : byte_range[1] + 1]
        )
        status = 206 if byte_range else 200
        assert header.startswith(f"HTTP/1.1 {status}".encode()), (path, byte_range, header[:200])
        assert body == expected, (path, byte_range, len(body), len(expected))
        tally["complete"] += 1
    finally:
        writer.close()


async def storm(port: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    tally = {"complete": 0, "vanished": 0}
    gate = asyncio.Semaphore(CONCURRENCY)

    async def guarded(i: int) -> None:
        async with gate:
            await one_client(port, random.Random(rng.random()), tally)

    async with asyncio.timeout(120):
        await asyncio.gather(*(guarded(i) for i in range(REQUESTS)))
    return tally


def test_storm_leaves_nothing_behind(sidecar: SidecarProcess) -> None:
    asyncio.run(storm(sidecar.port, seed=1))  # warm-up: pools and caches reach their size
    base = wait_for_stats(sidecar, settled, 10, "settled after warm-up")

    tally = asyncio.run(storm(sidecar.port, seed=2))
    assert tally["vanished"] > REQUESTS // 5 and tally["complete"] > REQUESTS // 2

    after = wait_for_stats(sidecar, settled, 10, "settled after the storm")
    assert invariant_holds(after)
    delta = {k: after["connections"][k] - base["connections"][k] for k in after["connections"]}
    assert delta["total"] == REQUESTS and delta["active"] == 0
    # Every complete read was a completed stream; a vanished client is either
    # client_disconnected or, if the server had already handed everything over, completed.
    assert delta["completed"] >= tally["complete"]
    assert delta["completed"] + delta["client_disconnected"] == REQUESTS
    assert delta["failed"] == delta["timed_out"] == delta["rejected"] == 0
    assert delta["client_disconnected"] > 0
    # Open files back to baseline: idle keep-alive connections to S3 may vary by a few.
    fds = after["process"]["open_fds"] - after["storages"]["uploads"].get("upstream_idle", 0)
    base_fds = base["process"]["open_fds"] - base["storages"]["uploads"].get("upstream_idle", 0)
    assert fds <= base_fds, (after["process"], base["process"])
    assert stats(sidecar)["oldest_active_s"] == 0
