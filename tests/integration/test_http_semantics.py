"""SPEC §3 (RFC 9110) over a real socket, every test once per storage: disk and S3.

Bodies are compared byte for byte with what the tests put in the storages, and framing is
checked on the wire (tests/integration/rawhttp.py): Content-Length must equal the bytes sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    BUCKET,
    DISK_MTIME_S,
    FILES,
    S3_PREFIX,
    S3Server,
    Storage,
    start_sidecar_in_process,
)
from tests.integration import rawhttp
from tests.integration.rawhttp import RawResponse, parse_byteranges

BIG = FILES["big.bin"]
SIZE = len(BIG)
HELLO = FILES["hello.txt"]
IMF_FIXDATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")
STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e\x80-\xff]*"')
BY_EXTENSION = {".txt": "text/plain", ".png": "image/png"}
OCTET = "application/octet-stream"

# One app per session (conftest `app_server`), so the tests run in the session's loop.
pytestmark = pytest.mark.asyncio(loop_scope="session")


async def fetch(
    app_server: Any,
    storage: Storage,
    key: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> RawResponse:
    """One request for `key` on the storage's route, on a fresh connection."""
    return await rawhttp.request(app_server.port, storage.path(key), method, headers)


def s3_head(s3_server: S3Server, key: str) -> dict[str, Any]:
    return dict(s3_server.client.head_object(Bucket=BUCKET, Key=S3_PREFIX + key))


def expected_type(storage: Storage, s3_server: S3Server, key: str) -> str:
    """SPEC §3: storage metadata, else by extension, else application/octet-stream."""
    if storage.kind == "s3":
        stored = s3_head(s3_server, key).get("ContentType")
        if stored and stored != "binary/octet-stream":  # S3's generic type counts as none
            return str(stored)
    return BY_EXTENSION.get(os.path.splitext(key)[1], OCTET)


def expected_last_modified(storage: Storage, s3_server: S3Server, key: str) -> str:
    if storage.kind == "s3":
        return formatdate(s3_head(s3_server, key)["LastModified"].timestamp(), usegmt=True)
    return formatdate(DISK_MTIME_S, usegmt=True)


def shift(http_date: str, seconds: float) -> str:
    return formatdate(parsedate_to_datetime(http_date).timestamp() + seconds, usegmt=True)


def assert_entity_headers(
    resp: RawResponse, storage: Storage, s3_server: S3Server, key: str
) -> None:
    """The headers every 200/206 for `key` carries (SPEC §3)."""
    assert resp.header("Accept-Ranges") == "bytes"
    etag = resp.header("ETag") or ""
    assert STRONG_ETAG.fullmatch(etag), f"not a strong entity-tag: {etag!r}"
    last_modified = resp.header("Last-Modified") or ""
    assert IMF_FIXDATE.fullmatch(last_modified), last_modified
    assert last_modified == expected_last_modified(storage, s3_server, key)
    if storage.kind == "s3":
        assert etag == s3_head(s3_server, key)["ETag"], "the S3 ETag is passed through"
    assert resp.header("X-Content-Type-Options") == "nosniff"
    assert resp.header("Cache-Control") == storage.cache_control
    assert resp.header("X-Request-ID")


# ---------------------------------------------------------------------------- 200


@pytest.mark.parametrize(
    "key", ["empty.bin", "one.bin", "big.bin", "hello.txt", "pic.png", "sub/dir/nested.bin"]
)
async def test_full_body_is_byte_exact(
    app_server: Any, storage: Storage, s3_server: S3Server, key: str
) -> None:
    resp = await fetch(app_server, storage, key)
    assert resp.status == 200
    assert resp.body == FILES[key]
    assert resp.header("Content-Length") == str(len(FILES[key]))
    assert resp.header("Transfer-Encoding") is None
    assert resp.header("Content-Range") is None
    assert resp.header("Content-Type") == expected_type(storage, s3_server, key)
    assert_entity_headers(resp, storage, s3_server, key)


async def test_percent_decoding_happens_once(app_server: Any, storage: Storage) -> None:
    resp = await fetch(app_server, storage, "with%20space.txt")
    assert (resp.status, resp.body) == (200, FILES["with space.txt"])
    # Decoded once, "%2520" is the three characters "%20": no such key.
    resp = await fetch(app_server, storage, "with%2520space.txt")
    assert resp.status == 404
    assert FILES["with space.txt"] not in resp.body


async def test_keep_alive_connection_serves_consecutive_requests(
    app_server: Any, storage: Storage
) -> None:
    """Several responses on one reused connection: each is framed and byte-exact."""
    created: list[object] = []

    async def on_create(session: Any, ctx: Any, params: Any) -> None:
        created.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{app_server.port}", auto_decompress=False, trace_configs=[trace]
    ) as session:
        for _ in range(2):
            for key, headers, status, expected in (
                ("big.bin", {}, 200, BIG),
                ("big.bin", {"Range": "bytes=100-199"}, 206, BIG[100:200]),
                ("empty.bin", {}, 200, b""),
                ("nope.bin", {}, 404, None),
                ("hello.txt", {"Range": "bytes=-10"}, 206, HELLO[-10:]),
                ("big.bin", {"Range": "bytes=0-1,-2"}, 206, None),
            ):
                async with session.get(storage.path(key), headers=headers) as resp:
                    body = await resp.read()
                    assert resp.status == status, key
                    assert len(body) == int(resp.headers["Content-Length"])
                    if expected is not None:
                        assert body == expected
    assert len(created) == 1, "the connection was not reused"


@pytest.mark.asyncio(loop_scope="function")
async def test_sidecar_starts_serves_and_stops(
    sidecar_config: dict[str, Any], storage: Storage
) -> None:
    """Sidecar.start opens the storages and listeners; stop releases them without warnings."""
    sidecar = await start_sidecar_in_process(sidecar_config)
    try:
        resp = await rawhttp.request(
            sidecar.media_port, storage.path("hello.txt").encode(), "GET", {"Range": "bytes=5-9"}
        )
        assert resp.status == 206
        assert resp.body == HELLO[5:10]
    finally:
        await sidecar.stop()  # teardown must not leak: warnings are errors in this suite
    assert sidecar.storages == {}


async def test_concurrent_ranged_requests(app_server: Any, storage: Storage) -> None:
    spans = [(i * 600_000, i * 600_000 + 300_000) for i in range(8)]
    replies = await asyncio.gather(
        *(
            fetch(app_server, storage, "big.bin", headers={"Range": f"bytes={a}-{b}"})
            for a, b in spans
        )
    )
    for (a, b), resp in zip(spans, replies, strict=True):
        assert resp.status == 206
        assert resp.body == BIG[a : b + 1]


# ---------------------------------------------------------------------------- 206 / 416


@pytest.mark.parametrize(
    ("key", "range_header", "first", "last"),
    [
        ("big.bin", "bytes=0-0", 0, 0),  # first byte
        ("big.bin", "bytes=0-99", 0, 99),  # first bytes
        ("big.bin", "bytes=1000000-2999999", 1_000_000, 2_999_999),  # middle, 2 MB
        ("big.bin", f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE - 1),  # last byte
        ("big.bin", "bytes=-1", SIZE - 1, SIZE - 1),  # suffix
        ("big.bin", "bytes=-100000", SIZE - 100_000, SIZE - 1),
        ("big.bin", f"bytes={SIZE - 500}-", SIZE - 500, SIZE - 1),  # open-ended
        ("big.bin", "bytes=4000000-", 4_000_000, SIZE - 1),  # open-ended, > 1 MiB
        ("big.bin", "bytes=5000000-999999999", 5_000_000, SIZE - 1),  # end clamped
        ("big.bin", f"bytes=10-{SIZE}", 10, SIZE - 1),  # end one past the last byte
        ("big.bin", "bytes=-999999999", 0, SIZE - 1),  # suffix longer than the object
        ("big.bin", f"bytes=0-{SIZE - 1}", 0, SIZE - 1),  # the whole object, as a range
        ("one.bin", "bytes=0-0", 0, 0),
        ("one.bin", "bytes=0-", 0, 0),
        ("one.bin", "bytes=-5", 0, 0),
        ("one.bin", "bytes=0-10", 0, 0),
        ("hello.txt", "bytes=10-20", 10, 20),
        ("sub/dir/nested.bin", "bytes=65530-65545", 65530, 65545),  # across 64 KiB
    ],
)
async def test_single_range_is_byte_exact(
    app_server: Any,
    storage: Storage,
    s3_server: S3Server,
    key: str,
    range_header: str,
    first: int,
    last: int,
) -> None:
    data = FILES[key]
    resp = await fetch(app_server, storage, key, headers={"Range": range_header})
    assert resp.status == 206
    assert resp.header("Content-Range") == f"bytes {first}-{last}/{len(data)}"
    assert resp.header("Content-Length") == str(last - first + 1)
    assert resp.body == data[first : last + 1]
    assert resp.header("Content-Type") == expected_type(storage, s3_server, key)
    assert_entity_headers(resp, storage, s3_server, key)


@pytest.mark.parametrize(
    ("key", "range_header"),
    [
        ("big.bin", f"bytes={SIZE}-"),  # starts just past the end
        ("big.bin", f"bytes={SIZE + 10}-{SIZE + 20}"),
        ("big.bin", "bytes=-0"),  # an empty suffix
        ("big.bin", f"bytes={SIZE}-,{SIZE + 5}-{SIZE + 9}"),  # several, none satisfiable
        ("one.bin", "bytes=1-"),
        ("empty.bin", "bytes=0-"),  # any range on a 0-byte object
        ("empty.bin", "bytes=0-0"),
        ("empty.bin", "bytes=-1"),
        ("empty.bin", "bytes=-0"),
    ],
)
async def test_unsatisfiable_range_is_416(
    app_server: Any, storage: Storage, key: str, range_header: str
) -> None:
    resp = await fetch(app_server, storage, key, headers={"Range": range_header})
    assert resp.status == 416
    assert resp.header("Content-Range") == f"bytes */{len(FILES[key])}"
    assert len(resp.body) < 200, "an error body is small"
    if FILES[key]:
        assert FILES[key][:64] not in resp.body


@pytest.mark.parametrize(
    "range_header",
    [
        "items=0-1",  # unknown unit
        "bytes=abc",
        "bytes=5-2",  # last-pos < first-pos: an invalid range-spec (RFC 9110 §14.1.1)
        "bytes",
        "bytes=",
        "bytes=-",
        "bytes=--1",
        "bytes=1-2-3",
        "bytes=0x10-20",
        "bytes=1-2;x",
    ],
)
async def test_malformed_range_is_ignored(
    app_server: Any, storage: Storage, s3_server: S3Server, range_header: str
) -> None:
    resp = await fetch(app_server, storage, "hello.txt", headers={"Range": range_header})
    assert resp.status == 200
    assert resp.body == HELLO
    assert resp.header("Content-Range") is None
    assert resp.header("Content-Length") == str(len(HELLO))
    assert_entity_headers(resp, storage, s3_server, "hello.txt")


# ---------------------------------------------------------------------------- multipart


def assert_byteranges(
    resp: RawResponse, data: bytes, ctype: str, expected: list[tuple[int, int]]
) -> None:
    """A 206 multipart/byteranges holding exactly `expected` (inclusive spans), in order."""
    assert resp.status == 206
    assert resp.header("Content-Range") is None, "a multipart 206 has no top-level Content-Range"
    assert resp.header("Transfer-Encoding") is None
    assert resp.header("Content-Length") == str(len(resp.body))
    parts = parse_byteranges(resp.header("Content-Type") or "", resp.body)
    assert [(p.first, p.last, p.complete_length) for p in parts] == [
        (a, b, len(data)) for a, b in expected
    ]
    assert [p.headers["content-range"] for p in parts] == [
        f"bytes {a}-{b}/{len(data)}" for a, b in expected
    ]
    assert [p.headers["content-type"] for p in parts] == [ctype] * len(expected)
    assert [p.body for p in parts] == [data[a : b + 1] for a, b in expected]


@pytest.mark.parametrize(
    ("key", "range_header", "expected"),
    [
        (
            "big.bin",
            "bytes=0-9,100000-1199999,-10",
            [(0, 9), (100_000, 1_199_999), (SIZE - 10, SIZE - 1)],
        ),
        ("hello.txt", "bytes=0-0,5-9,3000-", [(0, 0), (5, 9), (3000, len(HELLO) - 1)]),
        ("sub/dir/nested.bin", "bytes=65530-65545,69990-", [(65530, 65545), (69990, 69999)]),
    ],
)
async def test_multirange_framing(
    app_server: Any,
    storage: Storage,
    s3_server: S3Server,
    key: str,
    range_header: str,
    expected: list[tuple[int, int]],
) -> None:
    resp = await fetch(app_server, storage, key, headers={"Range": range_header})
    assert_byteranges(resp, FILES[key], expected_type(storage, s3_server, key), expected)
    assert_entity_headers(resp, storage, s3_server, key)


@pytest.mark.parametrize(
    ("range_header", "expected"),
    [
        ("bytes=300-309,0-99,50-149", [(0, 149), (300, 309)]),  # overlapping, unsorted
        ("bytes=20-29,0-9,10-19,40-49", [(0, 29), (40, 49)]),  # adjacent
        ("bytes=0-99,10-20,500-599,-5", [(0, 99), (500, 599), (SIZE - 5, SIZE - 1)]),  # nested
        (f"bytes={SIZE - 20}-,-10,0-0", [(0, 0), (SIZE - 20, SIZE - 1)]),  # suffix inside
    ],
)
async def test_multirange_coalesces_overlapping_ranges(
    app_server: Any, storage: Storage, range_header: str, expected: list[tuple[int, int]]
) -> None:
    resp = await fetch(app_server, storage, "big.bin", headers={"Range": range_header})
    assert_byteranges(resp, BIG, OCTET, expected)


@pytest.mark.parametrize(
    ("range_header", "first", "last"),
    [
        ("bytes=0-9,10-19", 0, 19),
        ("bytes=5-10,0-20", 0, 20),
        ("bytes=100-199,150-", 100, len(HELLO) - 1),
        (f"bytes=0-9,{len(HELLO) + 100}-", 0, 9),  # the unsatisfiable one is dropped
    ],
)
async def test_multirange_that_coalesces_to_one_is_a_single_part(
    app_server: Any, storage: Storage, s3_server: S3Server, range_header: str, first: int, last: int
) -> None:
    resp = await fetch(app_server, storage, "hello.txt", headers={"Range": range_header})
    assert resp.status == 206
    assert resp.header("Content-Range") == f"bytes {first}-{last}/{len(HELLO)}"
    assert resp.header("Content-Type") == expected_type(storage, s3_server, "hello.txt")
    assert resp.body == HELLO[first : last + 1]


async def test_sixteen_parts_are_served(app_server: Any, storage: Storage) -> None:
    spans = [(i * 100, i * 100 + 9) for i in range(16)]
    header = "bytes=" + ",".join(f"{a}-{b}" for a, b in spans)
    resp = await fetch(app_server, storage, "hello.txt", headers={"Range": header})
    ctype = "text/plain; charset=utf-8" if storage.kind == "s3" else "text/plain"
    assert_byteranges(resp, HELLO, ctype, spans)


@pytest.mark.parametrize("count", [17, 40])
async def test_more_than_sixteen_parts_get_the_whole_body(
    app_server: Any, storage: Storage, count: int
) -> None:
    header = "bytes=" + ",".join(f"{i * 100}-{i * 100 + 9}" for i in range(count))
    resp = await fetch(app_server, storage, "hello.txt", headers={"Range": header})
    assert resp.status == 200
    assert resp.header("Content-Range") is None
    assert resp.body == HELLO


# ---------------------------------------------------------------------------- HEAD


@pytest.mark.parametrize(
    ("key", "range_header"),
    [
        ("big.bin", None),
        ("hello.txt", None),
        ("empty.bin", None),
        ("noext", None),
        ("big.bin", "bytes=0-9"),  # RFC 9110 §14.2: a server ignores Range on HEAD
        ("big.bin", "bytes=0-9,20-29"),
        ("big.bin", f"bytes={SIZE}-"),
    ],
)
async def test_head_has_exactly_the_headers_of_get(
    app_server: Any, storage: Storage, key: str, range_header: str | None
) -> None:
    rid = {"X-Request-ID": f"head-vs-get-{uuid.uuid4().hex}"}
    head = await fetch(
        app_server,
        storage,
        key,
        "HEAD",
        {**rid, **({"Range": range_header} if range_header else {})},
    )
    get = await fetch(app_server, storage, key, "GET", rid)
    assert head.status == get.status == 200
    assert head.body == b"", "HEAD has no body"  # rawhttp also checks nothing followed
    assert get.body == FILES[key]

    def comparable(resp: RawResponse) -> list[tuple[str, str]]:
        return sorted((k.lower(), v) for k, v in resp.headers if k.lower() != "date")

    assert comparable(head) == comparable(get)
    assert head.header("Content-Length") == str(len(FILES[key]))


# ---------------------------------------------------------------------------- conditionals


async def validators(app_server: Any, storage: Storage, key: str) -> tuple[str, str]:
    """The current ETag and Last-Modified of `key`, as the sidecar reports them."""
    resp = await fetch(app_server, storage, key, "HEAD")
    assert resp.status == 200
    return resp.header("ETag") or "", resp.header("Last-Modified") or ""


async def settle(last_modified: str) -> None:
    """Wait until Last-Modified is a strong validator: 1 s before the response date (§8.8.2.2)."""
    delay = parsedate_to_datetime(last_modified).timestamp() + 2 - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda etag, lm: {"If-None-Match": etag}, id="inm-exact"),
        pytest.param(lambda etag, lm: {"If-None-Match": f"W/{etag}"}, id="inm-weak-form"),
        pytest.param(lambda etag, lm: {"If-None-Match": "*"}, id="inm-star"),
        pytest.param(lambda etag, lm: {"If-None-Match": f'"nope", {etag}, "x"'}, id="inm-list"),
        pytest.param(lambda etag, lm: {"If-None-Match": f'"nope",{etag}'}, id="inm-list-no-space"),
        pytest.param(lambda etag, lm: {"If-Modified-Since": lm}, id="ims-equal"),
        pytest.param(
            lambda etag, lm: {"If-None-Match": etag, "If-Modified-Since": shift(lm, -3600)},
            id="inm-wins-over-ims",
        ),
        pytest.param(
            lambda etag, lm: {"If-None-Match": etag, "Range": "bytes=0-9"}, id="inm-with-range"
        ),
    ],
)
async def test_not_modified(app_server: Any, storage: Storage, make: Any) -> None:
    etag, last_modified = await validators(app_server, storage, "hello.txt")
    resp = await fetch(app_server, storage, "hello.txt", headers=make(etag, last_modified))
    assert resp.status == 304
    assert resp.body == b""  # rawhttp also fails on any byte after the headers
    assert resp.header("ETag") == etag
    assert resp.header("Last-Modified") == last_modified
    assert resp.header("Cache-Control") == storage.cache_control
    assert resp.header("Content-Range") is None


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda etag, lm: {"If-None-Match": '"other"'}, id="inm-other"),
        pytest.param(lambda etag, lm: {"If-None-Match": '"a", "b"'}, id="inm-list-other"),
        pytest.param(lambda etag, lm: {"If-Modified-Since": shift(lm, -3600)}, id="ims-past"),
        pytest.param(
            # RFC 9110 §13.1.3: If-Modified-Since is ignored when If-None-Match is present.
            lambda etag, lm: {"If-None-Match": '"other"', "If-Modified-Since": lm},
            id="inm-other-ignores-ims",
        ),
        pytest.param(lambda etag, lm: {"If-Modified-Since": "yesterday"}, id="ims-invalid"),
    ],
)
async def test_modified_gets_the_body(app_server: Any, storage: Storage, make: Any) -> None:
    etag, last_modified = await validators(app_server, storage, "hello.txt")
    resp = await fetch(app_server, storage, "hello.txt", headers=make(etag, last_modified))
    assert (resp.status, resp.body) == (200, HELLO)
    assert resp.header("ETag") == etag


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda etag, lm: {"If-Match": '"other"'}, id="im-other"),
        pytest.param(lambda etag, lm: {"If-Match": '"a", "b"'}, id="im-list-other"),
        pytest.param(lambda etag, lm: {"If-Match": f"W/{etag}"}, id="im-weak-never-matches"),
        pytest.param(lambda etag, lm: {"If-Unmodified-Since": shift(lm, -3600)}, id="ius-past"),
        pytest.param(
            lambda etag, lm: {"If-Match": '"other"', "If-None-Match": etag}, id="im-before-inm"
        ),
        pytest.param(
            lambda etag, lm: {"If-Unmodified-Since": shift(lm, -3600), "If-None-Match": etag},
            id="ius-before-inm",
        ),
        pytest.param(
            lambda etag, lm: {"If-Match": '"other"', "Range": "bytes=0-9"}, id="im-with-range"
        ),
    ],
)
async def test_precondition_failed(app_server: Any, storage: Storage, make: Any) -> None:
    etag, last_modified = await validators(app_server, storage, "hello.txt")
    resp = await fetch(app_server, storage, "hello.txt", headers=make(etag, last_modified))
    assert resp.status == 412
    assert HELLO[:40] not in resp.body
    body = json.loads(resp.body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str)


@pytest.mark.parametrize(
    ("make", "status"),
    [
        pytest.param(lambda etag, lm: {"If-Match": etag}, 200, id="im-exact"),
        pytest.param(lambda etag, lm: {"If-Match": "*"}, 200, id="im-star"),
        pytest.param(lambda etag, lm: {"If-Match": f'"a", {etag}'}, 200, id="im-list"),
        pytest.param(lambda etag, lm: {"If-Unmodified-Since": lm}, 200, id="ius-equal"),
        pytest.param(
            # RFC 9110 §13.1.4: If-Unmodified-Since is ignored when If-Match is present.
            lambda etag, lm: {"If-Match": etag, "If-Unmodified-Since": shift(lm, -3600)},
            200,
            id="im-match-ignores-ius",
        ),
        pytest.param(lambda etag, lm: {"If-Match": etag, "Range": "bytes=0-9"}, 206, id="im-range"),
    ],
)
async def test_precondition_passes(
    app_server: Any, storage: Storage, make: Any, status: int
) -> None:
    etag, last_modified = await validators(app_server, storage, "hello.txt")
    resp = await fetch(app_server, storage, "hello.txt", headers=make(etag, last_modified))
    assert resp.status == status
    assert resp.body == (HELLO if status == 200 else HELLO[:10])


@pytest.mark.parametrize(
    ("make", "partial"),
    [
        pytest.param(lambda etag, lm: etag, True, id="current-etag"),
        pytest.param(lambda etag, lm: lm, True, id="last-modified"),
        pytest.param(lambda etag, lm: '"stale"', False, id="stale-etag"),
        pytest.param(lambda etag, lm: f"W/{etag}", False, id="weak-etag"),
        pytest.param(lambda etag, lm: shift(lm, -10), False, id="earlier-date"),
        pytest.param(lambda etag, lm: shift(lm, 10), False, id="later-date"),
        pytest.param(lambda etag, lm: "garbage", False, id="garbage"),
    ],
)
async def test_if_range(app_server: Any, storage: Storage, make: Any, partial: bool) -> None:
    etag, last_modified = await validators(app_server, storage, "big.bin")
    await settle(last_modified)
    resp = await fetch(
        app_server,
        storage,
        "big.bin",
        headers={"Range": "bytes=10-19", "If-Range": make(etag, last_modified)},
    )
    if partial:
        assert resp.status == 206
        assert resp.header("Content-Range") == f"bytes 10-19/{SIZE}"
        assert resp.body == BIG[10:20]
    else:
        assert resp.status == 200
        assert resp.header("Content-Range") is None
        assert resp.body == BIG


async def test_if_range_applies_to_multirange(app_server: Any, storage: Storage) -> None:
    etag, _ = await validators(app_server, storage, "big.bin")
    headers = {"Range": "bytes=0-9,20-29", "If-Range": etag}
    resp = await fetch(app_server, storage, "big.bin", headers=headers)
    assert_byteranges(resp, BIG, OCTET, [(0, 9), (20, 29)])
    resp = await fetch(app_server, storage, "big.bin", headers={**headers, "If-Range": '"old"'})
    assert (resp.status, resp.body) == (200, BIG)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("key", ["nope.bin", "sub/nope", "sub/dir", "sub", "nope/deeper/x.png"])
async def test_missing_object_is_404_json(app_server: Any, storage: Storage, key: str) -> None:
    resp = await fetch(app_server, storage, key)
    assert resp.status == 404
    assert resp.header("Content-Type") == "application/json"
    assert json.loads(resp.body) == {"error": "not_found"}
    head = await fetch(app_server, storage, key, "HEAD")
    assert head.status == 404


@pytest.mark.parametrize("path", ["/", "/elsewhere/hello.txt", "/media", "/mediax/hello.txt"])
async def test_unknown_route_is_404(app_server: Any, path: str) -> None:
    resp = await rawhttp.request(app_server.port, path)
    assert resp.status == 404
    assert json.loads(resp.body) == {"error": "not_found"}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_are_405(app_server: Any, storage: Storage, method: str) -> None:
    resp = await fetch(app_server, storage, "hello.txt", method, {"Content-Length": "0"})
    assert resp.status == 405
    assert resp.header("Allow") == "GET, HEAD"
    assert resp.header("Content-Type") == "application/json"
    assert json.loads(resp.body) == {"error": "method_not_allowed"}


# ---------------------------------------------------------------------------- headers


async def test_request_id_is_echoed_when_sane(app_server: Any, storage: Storage) -> None:
    for rid in ("trace-42", "a" * 128, "0123-abcd-ef~!@#$%^&*()"):
        for key in ("one.bin", "nope.bin"):  # success and error responses alike
            resp = await fetch(app_server, storage, key, headers={"X-Request-ID": rid})
            assert resp.header("X-Request-ID") == rid, (rid, key)


async def test_request_id_is_generated_otherwise(app_server: Any, storage: Storage) -> None:
    generated = []
    for headers in ({}, {}, {"X-Request-ID": "a" * 129}, {"X-Request-ID": "tab\there"}):
        resp = await fetch(app_server, storage, "one.bin", headers=headers)
        rid = resp.header("X-Request-ID") or ""
        assert re.fullmatch(r"[\x21-\x7e]{1,128}", rid), rid
        assert rid != headers.get("X-Request-ID")
        generated.append(rid)
    assert len(set(generated)) == len(generated), "generated ids repeat"


@pytest.mark.parametrize(
    "key", ["hello.txt", "pic.png", "generic.png", "noext", "custom.dat", "big.bin", "one.bin"]
)
async def test_content_type(
    app_server: Any, storage: Storage, s3_server: S3Server, key: str
) -> None:
    resp = await fetch(app_server, storage, key, "HEAD")
    assert resp.header("Content-Type") == expected_type(storage, s3_server, key)
    assert resp.header("X-Content-Type-Options") == "nosniff"
    # The same, pinned: metadata first, S3's generic binary/octet-stream is no metadata.
    pinned = {
        ("disk", "hello.txt"): "text/plain",
        ("s3", "hello.txt"): "text/plain; charset=utf-8",
        ("disk", "custom.dat"): OCTET,
        ("s3", "custom.dat"): "video/mp4",
        ("disk", "generic.png"): "image/png",
        ("s3", "generic.png"): "image/png",
        ("disk", "noext"): OCTET,
        ("s3", "noext"): OCTET,
    }
    if (storage.kind, key) in pinned:
        assert resp.header("Content-Type") == pinned[storage.kind, key]


# ---------------------------------------------------------------------------- disk ETags


async def test_disk_etag_changes_when_the_file_changes(app_server: Any, media_root: Path) -> None:
    disk = Storage(kind="disk", prefix="/media/", cache_control="", files={})
    key = f"mutable/{uuid.uuid4().hex}.bin"
    path = media_root / key
    path.write_bytes(b"a" * 100)
    os.utime(path, (DISK_MTIME_S, DISK_MTIME_S))
    first = await fetch(app_server, disk, key)

    path.write_bytes(b"b" * 100)  # rewritten in place, same size
    second = await fetch(app_server, disk, key)

    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"c" * 100)
    st = path.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and same mtime ...
    os.replace(tmp, path)  # ... but another file
    third = await fetch(app_server, disk, key)

    assert [(r.status, r.body) for r in (first, second, third)] == [
        (200, b"a" * 100),
        (200, b"b" * 100),
        (200, b"c" * 100),
    ]
    etags = [r.header("ETag") or "" for r in (first, second, third)]
    assert all(STRONG_ETAG.fullmatch(e) for e in etags), etags
    assert len(set(etags)) == 3, etags

    # Old validators no longer match: the new bytes are served in full.
    stale = await fetch(app_server, disk, key, headers={"If-None-Match": etags[0]})
    assert (stale.status, stale.body) == (200, b"c" * 100)
    stale = await fetch(app_server, disk, key, headers={"Range": "bytes=0-9", "If-Range": etags[1]})
    assert (stale.status, stale.body) == (200, b"c" * 100)
    stale = await fetch(app_server, disk, key, headers={"If-Match": etags[1]})
    assert stale.status == 412
    fresh = await fetch(app_server, disk, key, headers={"If-None-Match": etags[2]})
    assert fresh.status == 304
