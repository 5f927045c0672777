"""The S3 rules the fake follows, kept pure: request parsing, ranges, conditionals, errors.

Checked against what aiobotocore expects (see test_fake_s3.py), not against all of S3.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import formatdate
from typing import Final
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape


@dataclass(frozen=True, slots=True)
class StoredObject:
    data: bytes
    content_type: str
    etag: str  # quoted, as S3 sends it
    last_modified: float


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]
    bucket: str
    key: str


REASONS: Final = {
    200: "OK",
    206: "Partial Content",
    304: "Not Modified",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    412: "Precondition Failed",
    416: "Requested Range Not Satisfiable",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
CODES: Final = {
    400: "BadRequest",
    403: "AccessDenied",
    500: "InternalError",
    501: "NotImplemented",
    503: "SlowDown",
}


def error_code(status: int) -> str:
    """The S3 error code botocore would see for an injected `status`."""
    return CODES.get(status, f"Status{status}")


def parse_request(head: bytes) -> Request | None:
    """A request head, path-style (`/bucket/key`, key percent-decoded once); None if malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, colon, value = line.partition(":")
            if not colon:
                return None
            headers[name.strip().lower()] = value.strip()
    bucket, _, key = unquote(urlsplit(parts[1]).path).lstrip("/").partition("/")
    return Request(parts[0], parts[1], headers, bucket, key)


def object_response(req: Request, obj: StoredObject) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a GET/HEAD of `obj`, conditionals and Range applied."""
    headers = {
        "etag": obj.etag,
        "last-modified": formatdate(obj.last_modified, usegmt=True),
        "content-type": obj.content_type,
        "accept-ranges": "bytes",
    }
    if_match = req.headers.get("if-match")
    if if_match is not None and if_match != "*" and obj.etag not in _etags(if_match):
        return 412, {}, b""
    if_none_match = req.headers.get("if-none-match")
    if if_none_match is not None and (if_none_match == "*" or obj.etag in _etags(if_none_match)):
        return 304, {"etag": obj.etag, "last-modified": headers["last-modified"]}, b""
    byte_range = parse_range(req.headers.get("range"), len(obj.data))
    if byte_range is None:
        return 200, headers, obj.data
    if isinstance(byte_range, str):  # "unsatisfiable"
        return 416, {"content-range": f"bytes */{len(obj.data)}"}, b""
    first, last = byte_range
    headers["content-range"] = f"bytes {first}-{last}/{len(obj.data)}"
    return 206, headers, obj.data[first : last + 1]


def _etags(value: str) -> list[str]:
    return [tag.strip() for tag in value.split(",")]


def parse_range(value: str | None, size: int) -> tuple[int, int] | str | None:
    """One `bytes=` range as S3 reads it: None (ignored), "unsatisfiable" or (first, last)."""
    if value is None or not value.startswith("bytes=") or "," in value:
        return None
    first_s, dash, last_s = value[6:].strip().partition("-")
    digits = [s for s in (first_s, last_s) if s]
    if not dash or not digits or not all(s.isdigit() for s in digits):
        return None  # malformed, including "bytes=-"
    if not first_s:  # suffix: the last n bytes
        n = int(last_s)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    first = int(first_s)
    if last_s and int(last_s) < first:
        return None
    if first >= size:
        return "unsatisfiable"
    last = int(last_s) if last_s else size - 1
    return first, min(last, size - 1)


def error_xml(code: str, message: str, key: str = "") -> bytes:
    """An S3 error body: botocore reads the code from it (HEAD errors have none)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<Key>{escape(key)}</Key><RequestId>fake</RequestId></Error>"
    ).encode()
