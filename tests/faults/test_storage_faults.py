"""A storage that stalls or cuts its body (a fault-injecting S3 over a real socket), seen
through a real sidecar process: 504 fast, aborted streams, the right outcome counted once,
and every S3 response released afterwards.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.stream import SPLICE_MIN
from tests.conftest import S3_PREFIX, SidecarProcess, free_port, make_config
from tests.faults.clients import fetch
from tests.faults.fake_s3 import FakeS3
from tests.integration.sidecars import error_lines, running_sidecar, stats, wait_for_stats

FIRST_BYTE_S = 1.0
IDLE_S = 1.0
DATA = random.Random(5).randbytes(3 * 1024 * 1024 + 17)
KEY = "faulty.bin"
# Bodies of at least SPLICE_MIN are spliced socket to socket, smaller ones copied: each
# mid-body fault is checked on both paths.
SMALL_KEY = "small.bin"
PATHS = {KEY: DATA, SMALL_KEY: DATA[: SPLICE_MIN - 100_000]}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeS3]:
    with FakeS3() as s3:
        yield s3
    assert not s3.errors, s3.errors


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def sidecar(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    media_root: Path,
    fake: FakeS3,
) -> Iterator[SidecarProcess]:
    config = make_config(
        media_root,
        fake.endpoint,
        server={"host": "127.0.0.1", "port": free_port(), "event_loop": request.param},
        timeouts={"idle": f"{IDLE_S}s", "upstream_first_byte": f"{FIRST_BYTE_S}s"},
        logging={"level": "info", "format": "json"},
    )
    config["storages"]["uploads"].update(max_attempts=1, read_timeout="30s")
    with running_sidecar(config, tmp_path_factory.mktemp(f"faults-{request.param}")) as proc:
        yield proc
        assert not error_lines(proc), error_lines(proc)[:3]


@pytest.fixture
def s3(fake: FakeS3, sidecar: SidecarProcess) -> Iterator[FakeS3]:
    """The fake with KEY stored and no faults; afterwards every S3 response was released."""
    fake.reset()
    for key, data in PATHS.items():
        fake.put(S3_PREFIX + key, data, "application/octet-stream")
    yield fake
    settle(sidecar)
    deadline = time.monotonic() + 5
    while fake.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.in_flight == 0, "the sidecar still holds an S3 response"


def settle(sidecar: SidecarProcess) -> Any:
    return wait_for_stats(
        sidecar,
        lambda s: (
            s["connections"]["active"] == 0
            and s["storages"]["uploads"]["upstream_in_use"] == 0
            and s["storages"]["uploads"]["detached_active"] == 0
        ),
        10,
        "settled",
    )


def handovers(before: Any, after: Any) -> int:
    key = "handovers_total"
    return int(after["storages"]["uploads"][key] - before["storages"]["uploads"][key])


def delta(before: Any, after: Any) -> dict[str, int]:
    return {k: after["connections"][k] - before["connections"][k] for k in after["connections"]}


# A plain or ranged GET goes to S3 as a GET at once; a precondition stats (HEAD) first.
@pytest.mark.parametrize(
    ("stall_on", "headers"),
    [("HEAD", {"If-None-Match": '"other"'}), ("GET", {}), ("GET", {"Range": "bytes=10-"})],
    ids=["HEAD-precondition", "GET", "GET-range"],
)
def test_storage_silent_before_first_byte_is_504_within_the_timeout(
    sidecar: SidecarProcess, s3: FakeS3, stall_on: str, headers: dict[str, str]
) -> None:
    s3.fault(S3_PREFIX + KEY, stall_headers=stall_on)
    before = settle(sidecar)
    started = time.monotonic()
    got = fetch(sidecar.port, f"/s3/{KEY}", headers=headers, timeout_s=10)
    elapsed = time.monotonic() - started
    assert got.status == 504 and got.complete, got
    assert b'"storage_timeout"' in got.body
    assert FIRST_BYTE_S * 0.9 <= elapsed < FIRST_BYTE_S + 1.0, elapsed
    after = settle(sidecar)
    assert delta(before, after)["timed_out"] == 1
    assert after["responses"]["5xx"] - before["responses"]["5xx"] == 1


@pytest.mark.parametrize("key", [KEY, SMALL_KEY], ids=["spliced", "copied"])
def test_storage_stalling_mid_body_is_aborted_after_idle(
    sidecar: SidecarProcess, s3: FakeS3, key: str
) -> None:
    s3.fault(S3_PREFIX + key, stall_after=200_000)
    before = settle(sidecar)
    started = time.monotonic()
    got = fetch(sidecar.port, f"/s3/{key}", timeout_s=10)
    elapsed = time.monotonic() - started
    assert got.status == 200 and got.ending in ("reset", "eof"), got.ending  # never "complete"
    assert len(got.body) < len(PATHS[key]) and PATHS[key].startswith(got.body)
    assert IDLE_S * 0.9 <= elapsed < IDLE_S + 2.0, elapsed
    after = settle(sidecar)
    assert delta(before, after)["timed_out"] == 1
    assert delta(before, after)["completed"] == 0
    assert handovers(before, after) == (key == KEY)


@pytest.mark.parametrize("key", [KEY, SMALL_KEY], ids=["spliced", "copied"])
@pytest.mark.parametrize("rst", [False, True])
def test_storage_cutting_the_body_aborts_the_client_connection(
    sidecar: SidecarProcess, s3: FakeS3, rst: bool, key: str
) -> None:
    s3.fault(S3_PREFIX + key, cut_after=300_000, rst=rst)
    before = settle(sidecar)
    for keep_alive in (True, False):  # never complete-looking, whatever the framing
        got = fetch(sidecar.port, f"/s3/{key}", keep_alive=keep_alive, timeout_s=10)
        assert got.status == 200 and got.ending in ("reset", "eof"), got.ending
        assert len(got.body) < len(PATHS[key]) and PATHS[key].startswith(got.body)
    after = settle(sidecar)
    assert handovers(before, after) == (2 if key == KEY else 0)
    d = delta(before, after)
    assert (d["failed"], d["completed"], d["active"]) == (2, 0, 0)
    assert after["storages"]["uploads"]["failed"] - before["storages"]["uploads"]["failed"] == 2
    log = sidecar.log.read_text()
    assert '"event":"stream.failed"' in log and "Traceback" not in log


def test_storage_error_status_is_a_fast_502(sidecar: SidecarProcess, s3: FakeS3) -> None:
    s3.fault(S3_PREFIX + KEY, status=500)
    before = settle(sidecar)
    started = time.monotonic()
    got = fetch(sidecar.port, f"/s3/{KEY}")
    assert got.status == 502 and got.complete and time.monotonic() - started < 1.0
    assert delta(before, settle(sidecar))["failed"] == 1


def test_slow_storage_that_keeps_delivering_completes(sidecar: SidecarProcess, s3: FakeS3) -> None:
    # 4 chunks a second: never idle for IDLE_S, so the stream must not be cut.
    s3.fault(S3_PREFIX + KEY, rate_bps=256 * 1024)
    before = settle(sidecar)
    got = fetch(sidecar.port, f"/s3/{KEY}", headers={"Range": "bytes=0-599999"}, timeout_s=15)
    assert got.status == 206 and got.complete and got.body == DATA[:600_000]
    assert delta(before, settle(sidecar))["completed"] == 1


def test_faults_leave_the_server_healthy(sidecar: SidecarProcess, s3: FakeS3) -> None:
    got = fetch(sidecar.port, f"/s3/{KEY}")
    assert got.status == 200 and got.complete and got.body == DATA
    s = stats(sidecar)
    assert s["connections"]["active"] == 0


def test_storage_error_on_the_presigned_get_is_sent_again_through_botocore(
    sidecar: SidecarProcess, s3: FakeS3
) -> None:
    """A 503 (SlowDown) to the presigned GET: botocore's own GET then serves the client."""
    s3.fault(S3_PREFIX + KEY, status=503, times=1)
    before = settle(sidecar)
    got = fetch(sidecar.port, f"/s3/{KEY}", headers={"Range": "bytes=0-99"})
    assert got.status == 206 and got.complete and got.body == DATA[:100]
    after = settle(sidecar)
    presigned, sdk = s3.requests_for(S3_PREFIX + KEY, "GET")[-2:]
    assert "authorization" not in presigned.headers and presigned.fault is not None
    assert sdk.headers["authorization"].startswith("AWS4-HMAC-SHA256") and sdk.fault is None
    assert sdk.headers["range"] == "bytes=0-99"
    figures = {k: after["storages"]["uploads"][k] - before["storages"]["uploads"][k]
               for k in ("presigned_total", "presigned_fallbacks_total")}  # fmt: skip
    assert figures == {"presigned_total": 0, "presigned_fallbacks_total": 1}
    assert delta(before, after)["completed"] == 1
