"""The fake S3 through a real aiobotocore client: the protocol holds and each fault bites."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from tests.faults import clients
from tests.faults.fake_s3 import BUCKET, FakeS3, Fault
from tests.faults.s3_rules import parse_range

DATA = random.Random(7).randbytes(200_000)
KEY = "uploads/clip.bin"
STALL_S = 0.3  # how long a test waits before calling a read stalled


@asynccontextmanager
async def s3(fake: FakeS3) -> AsyncIterator[Any]:
    """An aiobotocore client as the sidecar configures it: path-style, one attempt.

    Its timeouts bound every call, so a framing bug in the fake fails instead of hanging.
    """
    config = AioConfig(
        s3={"addressing_style": "path"},
        connect_timeout=2,
        read_timeout=5,
        retries={"mode": "standard", "total_max_attempts": 1},
        response_checksum_validation="when_required",
        request_checksum_calculation="when_required",
    )
    async with get_session().create_client(
        "s3",
        endpoint_url=fake.endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=config,
    ) as client:
        yield client


async def settled(fake: FakeS3, timeout_s: float = 2.0) -> None:
    """Wait until the fake has no request in flight and no connection open."""
    deadline = time.monotonic() + timeout_s
    while fake.in_flight or fake.open_connections:
        assert time.monotonic() < deadline, (
            f"in_flight={fake.in_flight} open_connections={fake.open_connections}"
        )
        await asyncio.sleep(0.02)


async def read_until_stall(body: Any) -> bytes:
    """Read until the body ends or stalls for STALL_S; a stall is the expected outcome."""
    got = bytearray()
    with pytest.raises(TimeoutError):
        while True:
            async with asyncio.timeout(STALL_S):
                chunk = await body.read(65536)
            assert chunk, "the body ended instead of stalling"
            got += chunk
    return bytes(got)


# ---------------------------------------------------------------------------- protocol


async def test_head_and_ranged_get_match_s3(fake_s3: FakeS3) -> None:
    etag = fake_s3.put(KEY, DATA, content_type="video/mp4")
    assert etag == f'"{hashlib.md5(DATA).hexdigest()}"'
    async with s3(fake_s3) as client:
        head = await client.head_object(Bucket=BUCKET, Key=KEY)
        assert head["ContentLength"] == len(DATA)
        assert head["ETag"] == etag
        assert head["ContentType"] == "video/mp4"
        assert abs((datetime.now(UTC) - head["LastModified"]).total_seconds()) < 5
        for range_, first, last in [
            ("bytes=10-19", 10, 19),
            ("bytes=199990-300000", 199_990, 199_999),  # end clamped
            ("bytes=-5", 199_995, 199_999),
            ("bytes=100000-", 100_000, 199_999),
        ]:
            obj = await client.get_object(Bucket=BUCKET, Key=KEY, Range=range_, IfMatch=etag)
            async with obj["Body"] as body:
                assert await body.read() == DATA[first : last + 1]
            assert obj["ResponseMetadata"]["HTTPStatusCode"] == 206
            assert obj["ContentRange"] == f"bytes {first}-{last}/{len(DATA)}"
            assert obj["ContentLength"] == last - first + 1
        obj = await client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=5-1")  # ignored
        async with obj["Body"] as body:
            assert await body.read() == DATA
        assert obj["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert "ContentRange" not in obj
    await settled(fake_s3)


async def test_errors_are_the_ones_aiobotocore_maps(fake_s3: FakeS3) -> None:
    fake_s3.put(KEY, DATA)
    fake_s3.put("uploads/busy.bin", DATA)
    fake_s3.fault("uploads/busy.bin", status=503)
    cases: list[tuple[dict[str, str], str, int]] = [
        ({"Key": KEY, "IfMatch": '"stale"'}, "PreconditionFailed", 412),
        ({"Key": KEY, "Range": f"bytes={len(DATA)}-"}, "InvalidRange", 416),
        ({"Key": "uploads/missing.bin"}, "NoSuchKey", 404),
        ({"Key": "uploads/busy.bin"}, "SlowDown", 503),
    ]
    async with s3(fake_s3) as client:
        for kwargs, code, status in cases:
            with pytest.raises(ClientError) as err:
                await client.get_object(Bucket=BUCKET, **kwargs)
            assert err.value.response["Error"]["Code"] == code, kwargs
            assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
        with pytest.raises(ClientError) as err:  # HEAD errors have no body: the status is the code
            await client.head_object(Bucket=BUCKET, Key="uploads/missing.bin")
        assert err.value.response["Error"]["Code"] == "404"
        with pytest.raises(ClientError) as err:
            await client.head_object(Bucket=BUCKET, Key=KEY, IfMatch='"stale"')
        assert err.value.response["Error"]["Code"] == "412"
        await client.head_bucket(Bucket=BUCKET)  # the health probe
        with pytest.raises(ClientError) as err:
            await client.head_bucket(Bucket="elsewhere")
        assert err.value.response["Error"]["Code"] == "404"
    await settled(fake_s3)


async def test_bodies_read_to_the_end_keep_one_connection(fake_s3: FakeS3) -> None:
    # Exact framing is what lets aiohttp pool the connection: a wrong Content-Length would not.
    fake_s3.put(KEY, DATA)
    async with s3(fake_s3) as client:
        await client.head_object(Bucket=BUCKET, Key=KEY)
        for _ in range(3):
            obj = await client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=0-99999")
            async with obj["Body"] as body:
                assert await body.read() == DATA[:100_000]
        assert fake_s3.open_connections == 1
        # The fake counts a response done after its last write returns, in its own thread:
        # the client may have the bytes a moment before that.
        for _ in range(100):
            if fake_s3.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert fake_s3.in_flight == 0
    records = fake_s3.requests_for(KEY)
    assert [r.method for r in records] == ["HEAD", "GET", "GET", "GET"]
    assert {r.connection for r in records} == {records[0].connection}
    assert records[1].headers["range"] == "bytes=0-99999"
    await settled(fake_s3)


def test_raw_framing_of_errors_and_heads(fake_s3: FakeS3) -> None:
    fake_s3.put(KEY, DATA)
    missing = clients.fetch(fake_s3.port, f"/{BUCKET}/uploads/none")
    assert missing.status == 404 and missing.complete
    assert b"<Code>NoSuchKey</Code>" in missing.body
    assert missing.headers["content-type"] == "application/xml"
    head = clients.fetch(fake_s3.port, f"/{BUCKET}/{KEY}", method="HEAD")
    assert head.status == 200 and head.headers["content-length"] == str(len(DATA))
    # Percent-encoded keys are decoded once, as S3 does.
    fake_s3.put("uploads/with space.txt", b"spaced")
    assert clients.fetch(fake_s3.port, f"/{BUCKET}/uploads/with%20space.txt").body == b"spaced"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-0", (0, 0)),
        ("bytes=5-5", (5, 5)),
        ("bytes=90-", (90, 99)),
        ("bytes=90-1000", (90, 99)),  # RFC 9110 §14.1.2: a last past the end is clamped
        ("bytes=-10", (90, 99)),
        ("bytes=-1000", (0, 99)),
        ("bytes=100-", "unsatisfiable"),
        ("bytes=-0", "unsatisfiable"),
        ("bytes=5-1", None),  # invalid: ignored
        ("bytes=-", None),
        ("bytes=a-5", None),
        ("bytes=0-1,5-6", None),  # S3 serves no multipart: the whole object
        ("items=0-5", None),
    ],
)
def test_range_rules(header: str, expected: object) -> None:
    assert parse_range(header, 100) == expected


# ---------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("stall", "head_stalls", "get_stalls"),
    [("GET", False, True), ("HEAD", True, False), ("both", True, True)],
)
async def test_stall_before_headers(
    fake_s3: FakeS3, stall: str, head_stalls: bool, get_stalls: bool
) -> None:
    fake_s3.put(KEY, DATA)
    fake_s3.fault(KEY, stall_headers=stall)
    async with s3(fake_s3) as client:
        calls: list[tuple[bool, Callable[[], Awaitable[Any]]]] = [
            (head_stalls, lambda: client.head_object(Bucket=BUCKET, Key=KEY)),
            (get_stalls, lambda: client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=0-9")),
        ]
        for stalls, call in calls:
            if stalls:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(STALL_S):
                        await call()
            else:
                async with asyncio.timeout(5):
                    result = await call()
                if "Body" in result:
                    async with result["Body"] as body:
                        assert await body.read() == DATA[:10]
    await settled(fake_s3)  # the cancelled requests' connections were closed, not leaked


async def test_stall_after_n_bytes_holds_until_the_body_is_closed(fake_s3: FakeS3) -> None:
    fake_s3.put(KEY, DATA)
    fake_s3.fault(KEY, stall_after=70_000)
    async with s3(fake_s3) as client:
        obj = await client.get_object(Bucket=BUCKET, Key=KEY)
        assert obj["ContentLength"] == len(DATA)  # headers promise the whole object
        got = await read_until_stall(obj["Body"])
        assert got == DATA[:70_000]
        assert fake_s3.in_flight == 1
        obj["Body"].close()
        # Closing a half-read body closes its connection: the fake sees it while the
        # client (and its pool) is still alive. This is what a sidecar test asserts.
        await settled(fake_s3)


@pytest.mark.parametrize("rst", [False, True])
async def test_cut_after_n_bytes_is_a_payload_error(fake_s3: FakeS3, rst: bool) -> None:
    fake_s3.put(KEY, DATA)
    fake_s3.fault(KEY, cut_after=12_345, rst=rst)
    got = bytearray()
    async with s3(fake_s3) as client:
        obj = await client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=1000-")
        with pytest.raises(aiohttp.ClientPayloadError) as err:
            async with asyncio.timeout(5), obj["Body"] as body:
                while chunk := await body.read(4096):
                    got += chunk
    assert bytes(got) == DATA[1000 : 1000 + 12_345]  # counted within the range
    assert ("ConnectionResetError" in str(err.value)) is rst
    await settled(fake_s3)


async def test_slow_body_is_paced(fake_s3: FakeS3) -> None:
    fake_s3.put(KEY, DATA)
    fake_s3.fault(KEY, rate_bps=100_000)
    async with s3(fake_s3) as client:
        started = time.monotonic()
        obj = await client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=0-49999")
        async with obj["Body"] as body:
            assert await body.read() == DATA[:50_000]
        elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 2.0, elapsed
    await settled(fake_s3)


async def test_finite_stall_pauses_then_finishes(fake_s3: FakeS3) -> None:
    fake_s3.put(KEY, DATA)
    fake_s3.fault(KEY, stall_after=100, stall_s=0.4)
    async with s3(fake_s3) as client:
        started = time.monotonic()
        obj = await client.get_object(Bucket=BUCKET, Key=KEY)
        async with obj["Body"] as body:
            assert await body.read() == DATA
        assert time.monotonic() - started >= 0.4
    await settled(fake_s3)


async def test_fault_times_then_resume_with_range_and_if_match(fake_s3: FakeS3) -> None:
    etag = fake_s3.put(KEY, DATA)
    fake_s3.fault(KEY, cut_after=5000, times=1)
    got = bytearray()
    async with s3(fake_s3) as client:
        await client.head_object(Bucket=BUCKET, Key=KEY)  # unchanged, so not counted
        obj = await client.get_object(Bucket=BUCKET, Key=KEY)
        with pytest.raises(aiohttp.ClientPayloadError):
            async with obj["Body"] as body:
                while chunk := await body.read(4096):
                    got += chunk
        obj = await client.get_object(
            Bucket=BUCKET, Key=KEY, Range=f"bytes={len(got)}-", IfMatch=etag
        )
        async with obj["Body"] as body:
            got += await body.read()
        # A new version in between: the pinned resume is refused rather than mixed.
        fake_s3.put(KEY, DATA[::-1])
        with pytest.raises(ClientError, match="PreconditionFailed"):
            await client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=0-", IfMatch=etag)
    assert bytes(got) == DATA
    faulty = [(r.method, r.fault is not None) for r in fake_s3.requests_for(KEY)]
    assert faulty == [("HEAD", False), ("GET", True), ("GET", False), ("GET", False)]
    await settled(fake_s3)


def test_stop_closes_held_client_sockets() -> None:
    fake = FakeS3().start()
    try:
        fake.put(KEY, DATA)
        fake.fault(KEY, stall_after=10)
        sock = clients.connect(fake.port)
        clients.send_request(sock, f"/{BUCKET}/{KEY}")
        deadline = time.monotonic() + 2
        while fake.in_flight != 1:
            assert time.monotonic() < deadline, "the request never arrived"
            time.sleep(0.01)
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 1.0
        with sock:
            ending, _ = clients.drain(sock, timeout_s=1.0)
        assert ending == "reset"
        assert fake.open_connections == 0 and fake.in_flight == 0
        assert not clients_can_connect(fake.port)
    finally:
        fake.stop()
    assert not fake.errors


def clients_can_connect(port: int) -> bool:
    try:
        clients.connect(port, timeout_s=0.5).close()
    except OSError:
        return False
    return True


def test_contradictory_faults_are_refused() -> None:
    with pytest.raises(ValueError, match="exclude"):
        Fault(stall_after=1, cut_after=2)
    with pytest.raises(ValueError, match="rst"):
        Fault(rst=True)
