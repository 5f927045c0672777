"""Whole responses serialized by hand (proxy.web.wire): what aiohttp would have written."""

from __future__ import annotations

import re

import pytest
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11

from proxy.web.wire import Sent, Whole, fixed_fields, fixed_response, serialize

DATE = re.compile(rb"Date: [A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT\r\n")


def split(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, lines, body


def test_a_keep_alive_200_carries_length_date_server_and_its_body() -> None:
    whole = Whole(200, {"ETag": '"x"', "Content-Type": "text/plain"}, b"hello")
    data = serialize(whole, HttpVersion11, keep_alive=True, head_only=False)
    status, lines, body = split(data)
    assert status == b"HTTP/1.1 200 OK"
    assert lines[:3] == [b'ETag: "x"', b"Content-Type: text/plain", b"Content-Length: 5"]
    assert DATE.search(data)
    assert f"Server: {SERVER_SOFTWARE}".encode() in lines
    assert not any(line.startswith(b"Connection") for line in lines)
    assert body == b"hello"


def test_head_announces_the_length_without_sending_a_body() -> None:
    whole = Whole(200, {"Content-Type": "video/mp4"}, length=123_456)
    _, lines, body = split(serialize(whole, HttpVersion11, keep_alive=True, head_only=True))
    assert b"Content-Length: 123456" in lines and body == b""
    # A JSON error answered to HEAD: its length, not its bytes.
    err = Whole(404, {"Content-Type": "application/json"}, b'{"error":"not_found"}')
    _, lines, body = split(serialize(err, HttpVersion11, keep_alive=True, head_only=True))
    assert b"Content-Length: 21" in lines and body == b""


def test_304_has_neither_length_nor_body() -> None:
    data = serialize(Whole(304, {"ETag": '"x"'}), HttpVersion11, keep_alive=True, head_only=False)
    status, lines, body = split(data)
    assert status == b"HTTP/1.1 304 Not Modified"
    assert not any(line.startswith(b"Content-Length") for line in lines) and body == b""


@pytest.mark.parametrize(
    ("version", "keep_alive", "expected"),
    [
        (HttpVersion11, True, None),
        (HttpVersion11, False, b"Connection: close"),
        (HttpVersion10, True, b"Connection: keep-alive"),
        (HttpVersion10, False, None),  # HTTP/1.0 closes unless asked otherwise
    ],
)
def test_connection_header_follows_version_and_keep_alive(
    version: object, keep_alive: bool, expected: bytes | None
) -> None:
    for data in (
        serialize(Whole(200, {}, b"x"), version, keep_alive, head_only=False),  # type: ignore[arg-type]
        fixed_response(b"Content-Length: 1\r\n", "rid", version, keep_alive, b"x"),  # type: ignore[arg-type]
    ):
        status, lines, _ = split(data)
        assert status.startswith(b"HTTP/1.%d 200" % version.minor)  # type: ignore[attr-defined]
        connection = [line for line in lines if line.startswith(b"Connection")]
        assert connection == ([expected] if expected else [])


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain\r\nSet-Cookie: stolen=1"},
        {"Content-Type": "text/plain\nX-Injected: 1"},
        {"Content-Disposition": "inline\r"},
        {"X-Bad\r\nName": "v"},
    ],
)
def test_cr_or_lf_in_a_header_is_refused_not_written(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        serialize(Whole(200, headers, b"x"), HttpVersion11, keep_alive=True, head_only=False)
    with pytest.raises(ValueError, match="CR or LF"):
        fixed_fields(headers, 1)


def test_fixed_response_is_the_fixed_fields_plus_request_id_date_and_server() -> None:
    fixed = fixed_fields({"ETag": '"e"', "Content-Type": "image/png"}, 3)
    assert fixed == b'ETag: "e"\r\nContent-Type: image/png\r\nContent-Length: 3\r\n'
    data = fixed_response(fixed, "abc-1", HttpVersion11, True, b"PNG")
    status, lines, body = split(data)
    assert status == b"HTTP/1.1 200 OK"
    assert lines[:4] == [b'ETag: "e"', b"Content-Type: image/png", b"Content-Length: 3",
                         b"X-Request-ID: abc-1"]  # fmt: skip
    assert DATE.search(data) and body == b"PNG"
    # The same bytes the general serializer writes for that response.
    general = serialize(
        Whole(200, {"ETag": '"e"', "Content-Type": "image/png", "X-Request-ID": "abc-1"}, b"PNG"),
        HttpVersion11,
        keep_alive=True,
        head_only=False,
    )
    assert sorted(split(general)[1]) == sorted(lines) and split(general)[2] == body


async def test_sent_tells_aiohttp_there_is_nothing_left_to_send() -> None:
    sent = Sent(206, keep_alive=False, body_length=10)
    assert (sent.status, sent.reason, sent.keep_alive, sent.body_length) == (
        206,
        "Partial Content",
        False,
        10,
    )
    assert await sent.prepare(None) is None  # type: ignore[arg-type]
    await sent.write_eof()
    assert sent.prepared  # aiohttp does not prepare it again
