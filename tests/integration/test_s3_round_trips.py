"""S3 requests per response against SeaweedFS: a GET goes out at once, with no HEAD first.

A HEAD and then a GET cost two round trips before the first byte. A plain or single-range
GET is sent to S3 as that GET; its answer's headers are the metadata. HEAD, preconditions
and multipart ranges still stat first. Counted with the storage's own `heads_total` and
`unseen_gets_total` (also in /stats); the bytes are checked against the uploaded files.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from proxy.storage.s3 import S3Storage
from tests.conftest import FILES
from tests.integration import rawhttp

pytestmark = pytest.mark.asyncio(loop_scope="session")

BIG = FILES["big.bin"]
SIZE = len(BIG)
HELLO = FILES["hello.txt"]


def uploads(app_server: Any) -> S3Storage:
    storage = app_server.sidecar.storages["uploads"]
    assert isinstance(storage, S3Storage)
    return storage


async def counted(
    app_server: Any, key: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[rawhttp.RawResponse, int, int]:
    """One request; the HEADs and the HEAD-less GETs it cost; S3 connections all back."""
    s3 = uploads(app_server)
    heads, gets = s3.heads_total, s3.unseen_gets_total
    resp = await rawhttp.request(app_server.port, f"/s3/{key}", method, headers)
    for _ in range(50):  # the handler's finally may run just after the last byte left
        if s3.in_use() == 0:
            break
        await asyncio.sleep(0.01)
    assert s3.in_use() == 0, "an S3 connection is still checked out"
    return resp, s3.heads_total - heads, s3.unseen_gets_total - gets


async def test_whole_object_is_one_get(app_server: Any) -> None:
    resp, heads, gets = await counted(app_server, "big.bin")
    assert resp.status == 200 and resp.body == BIG
    assert resp.header("Content-Length") == str(SIZE)
    assert (heads, gets) == (0, 1)


async def test_small_object_is_one_get_and_its_connection_is_reused(app_server: Any) -> None:
    s3 = uploads(app_server)
    resp, heads, gets = await counted(app_server, "hello.txt")
    assert resp.status == 200 and resp.body == HELLO
    assert (heads, gets) == (0, 1)
    assert s3.idle() >= 1, "a body read to its end goes back to the pool"


@pytest.mark.parametrize(
    ("range_field", "first", "last"),
    [
        ("bytes=100-199", 100, 199),
        ("bytes=-1000", SIZE - 1000, SIZE - 1),
        ("bytes=5000000-", 5_000_000, SIZE - 1),
        ("bytes=4000000-99999999", 4_000_000, SIZE - 1),  # past the end: clamped
        ("bytes=0-", 0, SIZE - 1),
        ("bytes=-99999999", 0, SIZE - 1),  # a suffix longer than the object: all of it
    ],
)
async def test_one_range_is_one_get(
    app_server: Any, range_field: str, first: int, last: int
) -> None:
    resp, heads, gets = await counted(app_server, "big.bin", headers={"Range": range_field})
    assert resp.status == 206
    assert resp.header("Content-Range") == f"bytes {first}-{last}/{SIZE}"
    assert resp.body == BIG[first : last + 1]
    assert (heads, gets) == (0, 1)


async def test_if_range_that_fails_gets_the_whole_object(app_server: Any) -> None:
    """The ranged GET is closed unread and the whole object fetched: no HEAD needed."""
    headers = {"Range": "bytes=10-20", "If-Range": '"not-the-etag"'}
    resp, heads, gets = await counted(app_server, "big.bin", headers=headers)
    assert resp.status == 200 and resp.body == BIG
    assert (heads, gets) == (0, 1)


async def test_if_range_that_holds_serves_the_first_get(app_server: Any) -> None:
    etag = (await rawhttp.request(app_server.port, "/s3/hello.txt", "HEAD")).header("ETag")
    assert etag
    headers = {"Range": "bytes=10-20", "If-Range": etag}
    resp, heads, gets = await counted(app_server, "hello.txt", headers=headers)
    assert resp.status == 206 and resp.body == HELLO[10:21]
    assert (heads, gets) == (0, 1)


async def test_unsatisfiable_range_stats_and_answers_416(app_server: Any) -> None:
    resp, heads, gets = await counted(app_server, "big.bin", headers={"Range": "bytes=99999999-"})
    assert resp.status == 416
    assert resp.header("Content-Range") == f"bytes */{SIZE}"
    assert (heads, gets) == (1, 1), "S3's 416 to the GET sends it the HEAD way"


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("HEAD", {}),
        ("GET", {"If-None-Match": "*"}),
        ("GET", {"If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}),
        ("GET", {"Range": "bytes=0-9,100-109"}),
    ],
    ids=["HEAD", "if-none-match", "if-modified-since", "multipart"],
)
async def test_metadata_first_where_a_get_would_be_wasted(
    app_server: Any, method: str, headers: dict[str, str]
) -> None:
    resp, heads, gets = await counted(app_server, "hello.txt", method, headers)
    assert resp.status in (200, 206, 304)
    assert heads == 1 and gets == 0


async def test_missing_key_is_404_after_one_get(app_server: Any) -> None:
    resp, heads, gets = await counted(app_server, "no-such-object.bin")
    assert resp.status == 404
    assert (heads, gets) == (0, 1)  # S3's NoSuchKey to the GET is the answer


async def test_counters_are_in_stats(app_server: Any) -> None:
    resp = await rawhttp.request(app_server.sidecar.admin_port, "/stats")
    figures = json.loads(resp.body)["storages"]["uploads"]
    assert figures["unseen_gets_total"] == uploads(app_server).unseen_gets_total > 0
    assert figures["heads_total"] == uploads(app_server).heads_total


async def test_empty_object_is_one_get(app_server: Any) -> None:
    resp, heads, gets = await counted(app_server, "empty.bin")
    assert resp.status == 200 and resp.body == b""
    assert resp.header("Content-Length") == "0"
    assert (heads, gets) == (0, 1)


@pytest.mark.parametrize("range_field", ["bytes=0-0", "bytes=-1"])
async def test_any_range_of_an_empty_object_is_416(app_server: Any, range_field: str) -> None:
    resp, _, _ = await counted(app_server, "empty.bin", headers={"Range": range_field})
    assert resp.status == 416
    assert resp.header("Content-Range") == "bytes */0"


async def test_stored_content_type_comes_from_the_get(app_server: Any) -> None:
    resp, heads, _ = await counted(app_server, "custom.dat", headers={"Range": "bytes=0-9"})
    assert resp.status == 206 and resp.body == FILES["custom.dat"][:10]
    assert resp.header("Content-Type") == "video/mp4"
    assert heads == 0
