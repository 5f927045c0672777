"""SPEC §3 over a real sidecar process, for both storages: bytes, statuses and headers."""

from __future__ import annotations

import json
import re
from email.utils import formatdate, parsedate_to_datetime

import pytest

from tests.conftest import FILES, S3_CONTENT_TYPES, SidecarProcess
from tests.integration.httpclient import Reply, parse_multipart, request

BIG = FILES["big.bin"]
STORAGES = {"disk": ("/media/", "public, max-age=86400"), "s3": ("/s3/", "public, max-age=60")}


@pytest.fixture(params=sorted(STORAGES))
def storage(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def get(
    sidecar: SidecarProcess, storage: str, name: str, method: str = "GET", **headers: str
) -> Reply:
    return request(
        sidecar.port,
        method,
        STORAGES[storage][0] + name,
        {k.replace("_", "-"): v for k, v in headers.items()},
    )


def assert_entity_headers(reply: Reply, storage: str) -> None:
    assert reply.header("Accept-Ranges") == "bytes"
    assert re.fullmatch(r'"[^"]+"', reply.header("ETag") or ""), reply.headers
    assert parsedate_to_datetime(reply.header("Last-Modified") or "")
    assert reply.header("X-Content-Type-Options") == "nosniff"
    assert reply.header("Cache-Control") == STORAGES[storage][1]
    assert reply.header("X-Request-ID")


@pytest.mark.parametrize(
    "name", ["empty.bin", "one.bin", "big.bin", "hello.txt", "sub/dir/nested.bin"]
)
def test_full_body_is_byte_exact(sidecar: SidecarProcess, storage: str, name: str) -> None:
    reply = get(sidecar, storage, name)
    assert reply.status == 200
    assert reply.body == FILES[name]
    assert reply.header("Content-Length") == str(len(FILES[name]))
    assert reply.header("Content-Range") is None
    assert_entity_headers(reply, storage)


def test_encoded_name_is_decoded_once(sidecar: SidecarProcess, storage: str) -> None:
    reply = get(sidecar, storage, "with%20space.txt")
    assert (reply.status, reply.body) == (200, FILES["with space.txt"])


SIZE = len(BIG)


@pytest.mark.parametrize(
    ("name", "range_header", "start", "end"),
    [
        ("big.bin", "bytes=0-0", 0, 0),  # first byte
        ("big.bin", "bytes=0-99", 0, 99),
        ("big.bin", "bytes=1000000-1999999", 1_000_000, 1_999_999),  # middle, 1 MB
        ("big.bin", f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE - 1),  # last byte
        ("big.bin", "bytes=-1", SIZE - 1, SIZE - 1),  # suffix
        ("big.bin", "bytes=-100000", SIZE - 100_000, SIZE - 1),
        ("big.bin", f"bytes={SIZE - 500}-", SIZE - 500, SIZE - 1),  # open-ended
        ("big.bin", "bytes=5000000-999999999", 5_000_000, SIZE - 1),  # end clamped
        ("big.bin", "bytes=-999999999", 0, SIZE - 1),  # suffix longer than the object
        ("one.bin", "bytes=0-0", 0, 0),
        ("one.bin", "bytes=-5", 0, 0),
        ("one.bin", "bytes=0-10", 0, 0),
        ("hello.txt", "bytes=10-20", 10, 20),
        ("sub/dir/nested.bin", "bytes=65530-65545", 65530, 65545),  # across a chunk boundary
    ],
)
def test_single_range_is_byte_exact(
    sidecar: SidecarProcess, storage: str, name: str, range_header: str, start: int, end: int
) -> None:
    data = FILES[name]
    reply = get(sidecar, storage, name, Range=range_header)
    assert reply.status == 206
    assert reply.header("Content-Range") == f"bytes {start}-{end}/{len(data)}"
    assert reply.header("Content-Length") == str(end - start + 1)
    assert reply.body == data[start : end + 1]
    assert_entity_headers(reply, storage)


@pytest.mark.parametrize(
    ("name", "range_header"),
    [
        ("big.bin", f"bytes={SIZE}-"),
        ("big.bin", f"bytes={SIZE + 10}-{SIZE + 20}"),
        ("big.bin", "bytes=-0"),
        ("empty.bin", "bytes=0-"),
        ("empty.bin", "bytes=-1"),
        ("one.bin", "bytes=1-"),
    ],
)
def test_unsatisfiable_range_is_416(
    sidecar: SidecarProcess, storage: str, name: str, range_header: str
) -> None:
    reply = get(sidecar, storage, name, Range=range_header)
    assert reply.status == 416
    assert reply.header("Content-Range") == f"bytes */{len(FILES[name])}"
    assert FILES[name] == b"" or FILES[name] not in reply.body


@pytest.mark.parametrize(
    "range_header", ["bytes=abc", "bytes=5-2", "items=0-1", "bytes", "bytes=--1", "bytes=1-2-3"]
)
def test_malformed_range_is_ignored(
    sidecar: SidecarProcess, storage: str, range_header: str
) -> None:
    reply = get(sidecar, storage, "hello.txt", Range=range_header)
    assert reply.status == 200
    assert reply.body == FILES["hello.txt"]


def test_multirange_framing(sidecar: SidecarProcess, storage: str) -> None:
    reply = get(sidecar, storage, "big.bin", Range="bytes=0-9,100000-199999,-10")
    assert reply.status == 206
    assert reply.header("Content-Length") == str(len(reply.body))
    assert reply.header("Content-Range") is None
    parts = parse_multipart(reply.header("Content-Type") or "", reply.body)
    expected = [(0, 9), (100_000, 199_999), (SIZE - 10, SIZE - 1)]
    assert [p.headers["content-range"] for p in parts] == [
        f"bytes {s}-{e}/{SIZE}" for s, e in expected
    ]
    assert [p.body for p in parts] == [BIG[s : e + 1] for s, e in expected]
    assert {p.headers["content-type"] for p in parts} == {"application/octet-stream"}


def test_multirange_overlapping_ranges_are_coalesced(sidecar: SidecarProcess, storage: str) -> None:
    reply = get(sidecar, storage, "big.bin", Range="bytes=300-309,0-99,50-149")
    parts = parse_multipart(reply.header("Content-Type") or "", reply.body)
    assert [p.headers["content-range"] for p in parts] == [
        f"bytes 0-149/{SIZE}",
        f"bytes 300-309/{SIZE}",
    ]
    assert [p.body for p in parts] == [BIG[0:150], BIG[300:310]]


def test_multirange_that_coalesces_to_one_is_a_single_part(
    sidecar: SidecarProcess, storage: str
) -> None:
    reply = get(sidecar, storage, "hello.txt", Range="bytes=0-9,10-19")
    assert reply.status == 206
    assert reply.header("Content-Range") == f"bytes 0-19/{len(FILES['hello.txt'])}"
    assert reply.body == FILES["hello.txt"][:20]


def test_more_than_16_parts_gets_the_whole_body(sidecar: SidecarProcess, storage: str) -> None:
    ranges = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(17))
    reply = get(sidecar, storage, "hello.txt", Range=f"bytes={ranges}")
    assert reply.status == 200
    assert reply.body == FILES["hello.txt"]


@pytest.mark.parametrize(
    ("name", "range_header"),
    [("big.bin", None), ("hello.txt", None), ("empty.bin", None), ("big.bin", "bytes=0-9")],
)
def test_head_has_the_headers_of_get(
    sidecar: SidecarProcess, storage: str, name: str, range_header: str | None
) -> None:
    extra = {"Range": range_header} if range_header else {}
    head = get(sidecar, storage, name, "HEAD", **extra)
    full = get(sidecar, storage, name)  # RFC 9110 §14.2: HEAD ignores Range
    assert head.status == 200
    assert head.body == b""
    volatile = {"date", "x-request-id"}
    assert {k: v for k, v in head.headers.items() if k not in volatile} == {
        k: v for k, v in full.headers.items() if k not in volatile
    }


def test_conditional_get_round_trip(sidecar: SidecarProcess, storage: str) -> None:
    first = get(sidecar, storage, "hello.txt")
    etag, last_modified = first.header("ETag") or "", first.header("Last-Modified") or ""
    for headers in (
        {"If-None-Match": etag},
        {"If-None-Match": f"W/{etag}"},
        {"If-None-Match": "*"},
        {"If-None-Match": f'"nope", {etag}'},
        {"If-Modified-Since": last_modified},
    ):
        reply = get(sidecar, storage, "hello.txt", **headers)
        assert reply.status == 304, headers
        assert reply.body == b""
        assert reply.header("ETag") == etag
        assert reply.header("Cache-Control") == STORAGES[storage][1]
    past = formatdate(parsedate_to_datetime(last_modified).timestamp() - 3600, usegmt=True)
    for headers in (
        {"If-None-Match": '"other"'},
        {"If-Modified-Since": past},
        # §13.2.2: If-Modified-Since is ignored when If-None-Match is present
        {"If-None-Match": '"other"', "If-Modified-Since": last_modified},
    ):
        reply = get(sidecar, storage, "hello.txt", **headers)
        assert (reply.status, reply.body) == (200, FILES["hello.txt"]), headers


def test_preconditions_fail_with_412(sidecar: SidecarProcess, storage: str) -> None:
    first = get(sidecar, storage, "hello.txt")
    etag, last_modified = first.header("ETag") or "", first.header("Last-Modified") or ""
    past = formatdate(parsedate_to_datetime(last_modified).timestamp() - 3600, usegmt=True)
    for headers in (
        {"If-Match": '"other"'},
        {"If-Match": f"W/{etag}"},  # strong comparison
        {"If-Unmodified-Since": past},
        {"If-Match": '"other"', "If-None-Match": etag},
    ):  # If-Match is evaluated first
        reply = get(sidecar, storage, "hello.txt", **headers)
        assert reply.status == 412, headers
        assert json.loads(reply.body) == {"error": "precondition_failed"}
    for headers in ({"If-Match": etag}, {"If-Match": "*"}, {"If-Unmodified-Since": last_modified}):
        reply = get(sidecar, storage, "hello.txt", **headers)
        assert (reply.status, reply.body) == (200, FILES["hello.txt"]), headers


def test_if_range(sidecar: SidecarProcess, storage: str) -> None:
    first = get(sidecar, storage, "big.bin", "HEAD")
    etag, last_modified = first.header("ETag") or "", first.header("Last-Modified") or ""
    earlier = formatdate(parsedate_to_datetime(last_modified).timestamp() - 10, usegmt=True)
    for if_range, status in (
        (etag, 206),
        (last_modified, 206),
        ('"stale"', 200),
        (f"W/{etag}", 200),
        (earlier, 200),
        ("garbage", 200),
    ):
        reply = get(sidecar, storage, "big.bin", Range="bytes=10-19", If_Range=if_range)
        assert reply.status == status, if_range
        assert reply.body == (BIG[10:20] if status == 206 else BIG)


def test_missing_object_is_404_json(sidecar: SidecarProcess, storage: str) -> None:
    for name in ("nope.bin", "sub/nope", "sub/dir"):
        reply = get(sidecar, storage, name)
        assert reply.status == 404, name
        assert (
            reply.header(
                "Content-Type",
            )
            == "application/json"
        )
        assert json.loads(reply.body) == {"error": "not_found"}


def test_unrouted_path_is_404(sidecar: SidecarProcess) -> None:
    reply = request(sidecar.port, "GET", "/elsewhere/hello.txt")
    assert reply.status == 404
    assert json.loads(reply.body) == {"error": "not_found"}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405(sidecar: SidecarProcess, storage: str, method: str) -> None:
    reply = get(sidecar, storage, "hello.txt", method)
    assert reply.status == 405
    assert reply.header("Allow") == "GET, HEAD"
    assert json.loads(reply.body) == {"error": "method_not_allowed"}


def test_request_id_is_echoed_or_generated(sidecar: SidecarProcess, storage: str) -> None:
    assert get(sidecar, storage, "one.bin", X_Request_ID="trace-42").header("X-Request-ID") == (
        "trace-42"
    )
    generated = {get(sidecar, storage, "one.bin").header("X-Request-ID") for _ in range(3)}
    assert len(generated) == 3 and all(generated)
    insane = get(sidecar, storage, "one.bin", X_Request_ID="x" * 200).header("X-Request-ID")
    assert insane and insane != "x" * 200
    assert get(sidecar, storage, "nope", X_Request_ID="trace-43").header("X-Request-ID") == (
        "trace-43"
    )


@pytest.mark.parametrize("name", ["hello.txt", "pic.png", "noext", "custom.dat", "big.bin"])
def test_content_type(sidecar: SidecarProcess, storage: str, name: str) -> None:
    by_extension = {"hello.txt": "text/plain", "pic.png": "image/png"}
    expected = by_extension.get(name, "application/octet-stream")
    if storage == "s3":  # metadata first, then the extension
        expected = S3_CONTENT_TYPES.get(name, expected)
    assert get(sidecar, storage, name, "HEAD").header("Content-Type") == expected
