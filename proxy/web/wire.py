"""Whole responses on the wire in one write: status line, headers and a small body.

Most media responses are whole (a small file, a range of it, 304, 412, 416, a JSON
error). aiohttp spends more on such a response than we do on finding its bytes: a
CIMultiDict of headers, a payload writer and three awaits. Here the response is a
plain `Whole`, serialized to bytes and handed to the transport at once; aiohttp gets a
`Sent` stand-in whose prepare() and write_eof() have nothing left to do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion

_BODYLESS: Final = frozenset({204, 304})  # RFC 9110 §6.4.1: no body, no Content-Length
_REASONS: Final = {s.value: s.phrase for s in HTTPStatus}
_TRAILER: Final = f"Server: {SERVER_SOFTWARE}\r\n"


@dataclass(slots=True)
class Whole:
    """A response written in one piece. `length` is what HEAD announces (GET: len(body))."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    length: int | None = None


class Sent(web.StreamResponse):
    """What aiohttp sees of a response already on the wire: its status, its keep-alive,
    the length of its body (access log), and nothing left to send."""

    def __init__(self, status: int, keep_alive: bool, body_length: int) -> None:
        # No StreamResponse.__init__: its header multidict would never be used.
        self._status = status
        self._reason = _REASONS.get(status, "")
        self._keep_alive = keep_alive
        self._body_length = body_length
        self._eof_sent = True
        self._state = {}

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def serialize(whole: Whole, version: HttpVersion, keep_alive: bool, head_only: bool) -> bytes:
    """The response as bytes, with the headers aiohttp would add (Date, Server, Connection).

    A CR or LF inside a name or value (a database column, say) is refused with ValueError
    rather than written: it would split the header block (response splitting).
    """
    status, headers = whole.status, whole.headers
    text = ""
    for name, value in headers.items():  # a loop, not a comprehension: one frame less
        text += f"{name}: {value}\r\n"
    lines = len(headers)
    if status not in _BODYLESS:
        length = whole.length if whole.length is not None else len(whole.body)
        text += f"Content-Length: {length}\r\n"
        lines += 1
    _check_lines(text, lines)
    status_line = _STATUS_LINES.get((version, status)) or _status_line(version, status)
    connection = b"" if "Connection" in headers else _CONNECTION[keep_alive, version.minor]
    head = b"".join((status_line, text.encode("utf-8"), connection, _date_and_server()))
    if head_only or status in _BODYLESS or not whole.body:
        return head
    return head + whole.body


def _status_line(version: HttpVersion, status: int) -> bytes:
    text = f"HTTP/{version.major}.{version.minor} {status} {_REASONS.get(status, '')}\r\n"
    line = text.encode("latin-1")
    if len(_STATUS_LINES) < 256:  # statuses and versions are few; a bound all the same
        _STATUS_LINES[version, status] = line
    return line


def _date_and_server() -> bytes:
    """The last header lines and the blank line; Date changes once a second."""
    global _clock_s, _clock_lines
    now = int(time.time())
    if now != _clock_s:
        _clock_s = now
        _clock_lines = f"Date: {rfc822_formatted_time()}\r\n{_TRAILER}\r\n".encode("latin-1")
    return _clock_lines


_STATUS_LINES: dict[tuple[HttpVersion, int], bytes] = {}
# What aiohttp says about the connection, by (keep-alive, HTTP/1.minor): HTTP/1.1 keeps
# connections unless told otherwise, HTTP/1.0 closes them unless told otherwise.
_CONNECTION: Final = {
    (True, 1): b"",
    (False, 1): b"Connection: close\r\n",
    (True, 0): b"Connection: keep-alive\r\n",
    (False, 0): b"",
}
_clock_s = 0
_clock_lines = b""


def fixed_response(
    fixed: bytes, request_id: str, version: HttpVersion, keep_alive: bool, body: bytes
) -> bytes:
    """A 200 from headers serialized once (`fixed_fields`) plus the per-request ones.

    `request_id` is printable ASCII by construction (media.request_id), so it is not
    checked again here: this is the hot path of small files.
    """
    connection = _CONNECTION[keep_alive, version.minor]
    status_line = _STATUS_LINES.get((version, 200)) or _status_line(version, 200)
    return b"".join((status_line, fixed, b"X-Request-ID: ", request_id.encode("ascii"),
                     b"\r\n", connection, _date_and_server(), body))  # fmt: skip


def fixed_fields(headers: dict[str, str], length: int) -> bytes:
    """Headers that are the same for every response of one object, with its length."""
    text = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    text += f"Content-Length: {length}\r\n"
    _check_lines(text, len(headers) + 1)
    return text.encode("utf-8")


def _check_lines(text: str, lines: int) -> None:
    """`text` is exactly `lines` header lines: no CR or LF inside a name or value."""
    if text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("CR or LF inside a response header")
