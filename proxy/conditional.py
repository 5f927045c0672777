"""Decide a response's status from preconditions and Range (RFC 9110 §13.2.2), purely."""

from __future__ import annotations

import datetime
import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from proxy.model import ByteRange, ObjectMeta
from proxy.ranges import RangeOutcome, parse_range

_WEEKDAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)


@dataclass(frozen=True, slots=True)
class Decision:
    status: int  # 200, 206, 304, 412 or 416
    ranges: tuple[ByteRange, ...] = ()  # for 206: one or more (more → multipart/byteranges)


OK: Final = Decision(200)
NOT_MODIFIED: Final = Decision(304)
PRECONDITION_FAILED: Final = Decision(412)
UNSATISFIABLE: Final = Decision(416)


def decide(method: str, meta: ObjectMeta, headers: Mapping[str, str]) -> Decision:
    """Evaluate If-Match, If-Unmodified-Since, If-None-Match, If-Modified-Since, If-Range, Range."""
    if_match = headers.get("If-Match")
    if if_match is not None:  # step 1
        if not _matches(if_match, meta.etag, strong=True):
            return PRECONDITION_FAILED
    else:
        since = _date_header(headers, "If-Unmodified-Since")  # step 2
        if since is not None and (meta.last_modified is None or meta.last_modified > since):
            return PRECONDITION_FAILED
    get_or_head = method in ("GET", "HEAD")
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:  # step 3
        if _matches(if_none_match, meta.etag, strong=False):
            return NOT_MODIFIED if get_or_head else PRECONDITION_FAILED
    elif get_or_head:
        since = _date_header(headers, "If-Modified-Since")  # step 4
        if since is not None and meta.last_modified is not None and meta.last_modified <= since:
            return NOT_MODIFIED
    if method != "GET":  # §14.2: range handling is defined for GET only
        return OK
    range_header = headers.get("Range")
    if range_header is None:
        return OK
    if_range = headers.get("If-Range")  # step 5
    if if_range is not None and not _if_range_holds(if_range.strip(), meta):
        return OK
    request = parse_range(range_header, meta.size)
    if request.outcome is RangeOutcome.PARTIAL:
        return Decision(206, request.ranges)
    if request.outcome is RangeOutcome.UNSATISFIABLE:
        return UNSATISFIABLE
    return OK


def http_date(epoch_s: int) -> str:
    """Format an IMF-fixdate (RFC 9110 §5.6.7) without depending on the locale."""
    t = time.gmtime(epoch_s)
    return (
        f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def parse_http_date(value: str) -> int | None:
    """Parse IMF-fixdate, RFC 850 and asctime dates (§5.6.7); None when invalid."""
    parsed = email.utils.parsedate_tz(value.strip())
    if parsed is None:
        return None
    try:  # datetime() refuses impossible fields (day 99) that timegm would roll over
        moment = datetime.datetime(*parsed[:6], tzinfo=datetime.UTC)
    except (OverflowError, ValueError):
        return None
    return int(moment.timestamp()) - (parsed[9] or 0)


def _date_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    return parse_http_date(value) if value is not None else None


def _if_range_holds(value: str, meta: ObjectMeta) -> bool:
    """§13.1.5: an entity tag must match strongly; a date must equal Last-Modified exactly."""
    if value.startswith(('"', "W/")):
        return not value.startswith("W/") and _opaque(value) == _strong_opaque(meta.etag)
    date = parse_http_date(value)
    return date is not None and meta.last_modified is not None and date == meta.last_modified


def _matches(field: str, etag: str, *, strong: bool) -> bool:
    """Compare an If-Match/If-None-Match list with the current tag (§8.8.3.2)."""
    if field.strip() == "*":
        return True
    current = _strong_opaque(etag) if strong else _opaque(etag)
    if current is None:
        return False
    for tag in _split_tags(field):
        if strong and tag.startswith("W/"):
            continue
        if _opaque(tag) == current:
            return True
    return False


def _opaque(tag: str) -> str | None:
    """The quoted part of a tag, weak prefix dropped; None when malformed."""
    tag = tag[2:] if tag.startswith("W/") else tag
    if len(tag) >= 2 and tag[0] == '"' and tag[-1] == '"' and '"' not in tag[1:-1]:
        return tag
    return None


def _strong_opaque(tag: str) -> str | None:
    return None if tag.startswith("W/") else _opaque(tag)


def _split_tags(field: str) -> list[str]:
    """Split a list of entity tags; commas may appear inside quotes (etagc allows them)."""
    tags: list[str] = []
    i, n = 0, len(field)
    while i < n:
        while i < n and field[i] in " \t,":
            i += 1
        if i >= n:
            break
        start = i
        if field.startswith("W/", i):
            i += 2
        if i < n and field[i] == '"':
            end = field.find('"', i + 1)
            if end < 0:
                tags.append(field[start:])
                break
            i = end + 1
            tags.append(field[start:i])
        else:
            while i < n and field[i] not in ",":
                i += 1
            tags.append(field[start:i].strip())
    return tags
