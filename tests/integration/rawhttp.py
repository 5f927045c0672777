"""Raw HTTP/1.1 over asyncio sockets: the request target goes out byte for byte (no client
normalises `..`, `%2e` or `//`), and the response is parsed strictly, framing included.

Async on purpose: the sidecar under test runs in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?")
# RFC 2046 §5.1.1 bchars, 1-70 of them, not ending in a space.
_BYTERANGES = re.compile(
    r"multipart/byteranges\s*;\s*boundary=(\"?)([0-9A-Za-z'()+_,\-./:=? ]{0,69}"
    r"[0-9A-Za-z'()+_,\-./:=?])\1",
    re.IGNORECASE,
)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]  # in wire order, names as sent
    body: bytes  # the payload, framing removed
    wire: bytes  # everything the server sent

    def header(self, name: str) -> str | None:
        """The value of a header that must occur at most once."""
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def request(
    port: int,
    target: bytes | str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> RawResponse:
    """Send one request on a fresh connection (`Connection: close`) and read to EOF."""
    if isinstance(target, str):
        target = target.encode("ascii")
    head = [method.encode("ascii") + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    head += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
    head += [b"Connection: close", b"", b""]
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"\r\n".join(head))
            await writer.drain()
            wire = await reader.read()
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
    return parse_response(wire, head_request=method == "HEAD")


def parse_response(wire: bytes, head_request: bool = False) -> RawResponse:
    """Parse one complete HTTP/1.1 response; fail on any framing error."""
    head, sep, rest = wire.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {wire[:200]!r}"
    lines = head.split(b"\r\n")
    m = _STATUS_LINE.fullmatch(lines[0])
    assert m, f"bad status line {lines[0]!r}"
    status = int(m.group(1))
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        assert colon and name and name == name.strip(), f"malformed header line {line!r}"
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    resp = RawResponse(status=status, headers=headers, body=b"", wire=wire)
    if head_request or status in (204, 304) or 100 <= status < 200:
        assert rest == b"", f"{status} response to {'HEAD' if head_request else 'GET'} has a body"
        return resp
    te = resp.header("Transfer-Encoding")
    length = resp.header("Content-Length")
    if te is not None:
        assert length is None, "both Transfer-Encoding and Content-Length"
        assert te.lower() == "chunked", f"unexpected Transfer-Encoding {te!r}"
        resp.body = dechunk(rest)
    elif length is not None:
        assert length.isdigit(), f"bad Content-Length {length!r}"
        assert len(rest) == int(length), f"Content-Length {length} but {len(rest)} bytes sent"
        resp.body = rest
    else:
        resp.body = rest  # delimited by close
    return resp


def dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            assert data[pos:] == b"\r\n", "bad chunked trailer"
            return bytes(out)
        out += data[pos : pos + size]
        assert data[pos + size : pos + size + 2] == b"\r\n", "chunk not followed by CRLF"
        pos += size + 2


@dataclass
class Part:
    headers: dict[str, str]  # lower-cased names
    first: int
    last: int
    complete_length: int
    body: bytes


def parse_byteranges(content_type: str, body: bytes) -> list[Part]:
    """Parse a multipart/byteranges body strictly (RFC 9110 §14.6, RFC 2046 §5.1.1).

    Expected shape: for each part `--B CRLF headers CRLF CRLF bytes CRLF`, then `--B-- CRLF`;
    every part has exactly a Content-Type and a Content-Range header, and its byte count
    is the one its Content-Range announces.
    """
    m = _BYTERANGES.fullmatch(content_type)
    assert m, f"not multipart/byteranges with a valid boundary: {content_type!r}"
    delimiter = b"--" + m.group(2).encode("latin-1")
    parts: list[Part] = []
    pos = 0
    while True:
        assert body.startswith(delimiter, pos), f"expected {delimiter!r} at offset {pos}"
        pos += len(delimiter)
        if body.startswith(b"--\r\n", pos):
            assert pos + 4 == len(body), f"{len(body) - pos - 4} bytes after the close delimiter"
            assert parts, "multipart body without parts"
            return parts
        assert body.startswith(b"\r\n", pos), f"delimiter not followed by CRLF at {pos}"
        pos += 2
        head_end = body.index(b"\r\n\r\n", pos)
        headers: dict[str, str] = {}
        for line in body[pos:head_end].split(b"\r\n"):
            name, colon, value = line.partition(b":")
            assert colon and name == name.strip(), f"malformed part header {line!r}"
            key = name.decode("latin-1").lower()
            assert key not in headers, f"part header {key} repeated"
            headers[key] = value.strip(b" \t").decode("latin-1")
        assert set(headers) == {"content-type", "content-range"}, f"part headers {headers}"
        pos = head_end + 4
        cr = _CONTENT_RANGE.fullmatch(headers["content-range"])
        assert cr, f"bad part Content-Range {headers['content-range']!r}"
        first, last, complete = (int(g) for g in cr.groups())
        assert first <= last < complete, f"impossible part Content-Range {cr.group(0)!r}"
        end = pos + last - first + 1
        assert end + 2 <= len(body), "part body cut short"
        parts.append(Part(headers, first, last, complete, body[pos:end]))
        pos = end
        assert body.startswith(b"\r\n", pos), f"part body not followed by CRLF at {pos}"
        pos += 2
