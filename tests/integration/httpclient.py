"""Minimal HTTP clients for the tests: http.client for ordinary requests, raw sockets for
request targets that a client library would normalise (`..`, `%2e`, NUL)."""

from __future__ import annotations

import http.client
import re
import socket
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    """One request on a fresh connection; the path is sent exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def raw_request(port: int, target: bytes) -> Reply:
    """Send `GET <target> HTTP/1.1` byte for byte and parse whatever comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, body)


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    """Parse multipart/byteranges strictly (RFC 9110 §14.6, RFC 2046 §5.1.1 framing)."""
    m = re.fullmatch(
        r"multipart/byteranges; boundary=([0-9A-Za-z'()+_,./:=?-]{1,70})", content_type
    )
    assert m, f"bad multipart Content-Type: {content_type!r}"
    delimiter = b"--" + m.group(1).encode()
    assert body.endswith(delimiter + b"--\r\n"), "missing or malformed close delimiter"
    parts: list[Part] = []
    pos = 0
    while True:
        assert body.startswith(delimiter, pos), f"expected delimiter at {pos}"
        pos += len(delimiter)
        if body.startswith(b"--\r\n", pos):
            assert pos + 4 == len(body), "bytes after the close delimiter"
            return parts
        assert body.startswith(b"\r\n", pos), "delimiter not followed by CRLF"
        pos += 2
        head_end = body.index(b"\r\n\r\n", pos)
        headers = {}
        for line in body[pos:head_end].decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(": ")
            assert sep, f"malformed part header {line!r}"
            headers[name.lower()] = value
        pos = head_end + 4
        cr = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers.get("content-range", ""))
        assert cr, f"part without a valid Content-Range: {headers}"
        length = int(cr.group(2)) - int(cr.group(1)) + 1
        parts.append(Part(headers, body[pos : pos + length]))
        pos += length
        assert body.startswith(b"\r\n", pos), "part body not followed by CRLF"
        pos += 2
