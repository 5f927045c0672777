"""Decide a response's status from preconditions and Range (RFC 9110 §13.2.2), purely."""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from proxy.model import ByteRange, ObjectMeta
from proxy.ranges import RangeOutcome, parse_range

_WEEKDAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # time.gmtime's tm_wday
_MONTHS: Final = tuple("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split())
_MONTH_NUMBER: Final = {name: i for i, name in enumerate(_MONTHS, 1)}
_DAY: Final = "(?:" + "|".join(_WEEKDAYS) + ")"
_DAY_L: Final = "(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MON: Final = "(" + "|".join(_MONTHS) + ")"
_TIME: Final = "([0-9]{2}):([0-9]{2}):([0-9]{2})"
# §5.6.7: HTTP-date is case-sensitive; weekday names are checked, not matched to the date.
_IMF_FIXDATE: Final = re.compile(f"{_DAY}, ([0-9]{{2}}) {_MON} ([0-9]{{4}}) {_TIME} GMT")
_RFC850_DATE: Final = re.compile(f"{_DAY_L}, ([0-9]{{2}})-{_MON}-([0-9]{{2}}) {_TIME} GMT")
_ASCTIME_DATE: Final = re.compile(f"{_DAY} {_MON} ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})")
# §8.8.3: entity-tag = [ W/ ] DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text.
# Any non-ASCII character stands in for obs-text (aiohttp decodes it with surrogateescape).
_ENTITY_TAG: Final = re.compile(r'(?:W/)?"[^\x00-\x20"\x7f]*"')
_EPOCH_ORDINAL: Final = datetime.date(1970, 1, 1).toordinal()
_OWS: Final = " \t"


@dataclass(frozen=True, slots=True)
class Decision:
    """The status to answer with and, for a 206, the ranges to send."""

    status: int  # 200, 206, 304, 412 or 416
    ranges: tuple[ByteRange, ...] = ()  # for 206: one or more (more → multipart/byteranges)


OK: Final = Decision(200)
NOT_MODIFIED: Final = Decision(304)
PRECONDITION_FAILED: Final = Decision(412)
UNSATISFIABLE: Final = Decision(416)


def decide(method: str, meta: ObjectMeta, headers: Mapping[str, str]) -> Decision:
    """Evaluate preconditions, If-Range and Range in RFC 9110 §13.2.2 order."""
    get_or_head = method in ("GET", "HEAD")
    if_match = _field(headers, "If-Match")
    if if_match is not None:  # step 1: §13.1.1, strong comparison
        if not _matches(if_match, meta.etag, strong=True):
            return PRECONDITION_FAILED
    else:  # step 2: §13.1.4, only without If-Match
        since = _date_field(headers, "If-Unmodified-Since")
        # Judgement call (SPEC): with no Last-Modified the condition cannot be shown true → 412;
        # §13.1.4 would also allow ignoring the field.
        if since is not None and (meta.last_modified is None or meta.last_modified > since):
            return PRECONDITION_FAILED
    if_none_match = _field(headers, "If-None-Match")
    if if_none_match is not None:  # step 3: §13.1.2, weak comparison
        if _matches(if_none_match, meta.etag, strong=False):
            return NOT_MODIFIED if get_or_head else PRECONDITION_FAILED
    elif get_or_head:  # step 4: §13.1.3, only without If-None-Match, only GET/HEAD
        since = _date_field(headers, "If-Modified-Since")
        if since is not None and meta.last_modified is not None and meta.last_modified <= since:
            return NOT_MODIFIED
    if method != "GET":  # §14.2: Range is ignored for methods other than GET (HEAD too)
        return OK
    range_field = _field(headers, "Range")
    if range_field is None:
        return OK
    if_range = _field(headers, "If-Range")  # step 5: §13.1.5, only together with Range
    if if_range is not None and not _if_range_holds(if_range.strip(_OWS), meta):
        return OK
    request = parse_range(range_field, meta.size)
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
    """Parse an IMF-fixdate, RFC 850 or asctime date (§5.6.7) to epoch seconds; None if invalid."""
    value = value.strip(_OWS)
    if m := _IMF_FIXDATE.fullmatch(value):
        day, month, year, hh, mm, ss = m.groups()
        return _epoch(int(year), _MONTH_NUMBER[month], int(day), int(hh), int(mm), int(ss))
    if m := _RFC850_DATE.fullmatch(value):
        day, month, yy, hh, mm, ss = m.groups()
        # §5.6.7: a two-digit year more than 50 years in the future means the most recent
        # past year with those digits. The current year is read per call: nothing goes stale.
        this_year = time.gmtime().tm_year
        year = this_year - this_year % 100 + int(yy)
        if year > this_year + 50:
            year -= 100
        elif year + 100 <= this_year + 50:
            year += 100
        return _epoch(year, _MONTH_NUMBER[month], int(day), int(hh), int(mm), int(ss))
    if m := _ASCTIME_DATE.fullmatch(value):
        month, day, hh, mm, ss, year = m.groups()
        return _epoch(int(year), _MONTH_NUMBER[month], int(day), int(hh), int(mm), int(ss))
    return None  # includes a list of dates (§13.1.3, §13.1.4: ignore such a field)


def _epoch(year: int, month: int, day: int, hour: int, minute: int, second: int) -> int | None:
    """Convert UTC fields to epoch seconds; None for impossible ones (day 31 of April)."""
    if hour > 23 or minute > 59 or second > 60:  # §5.6.7 allows 60 for a leap second
        return None
    try:
        days = datetime.date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError:  # also year 0000
        return None
    return days * 86400 + hour * 3600 + minute * 60 + second


def _field(headers: Mapping[str, str], name: str) -> str | None:
    """Return a field's value, its field lines combined into one list as in §5.3."""
    value = headers.get(name)
    if value is None:
        return None
    getall = getattr(headers, "getall", None)  # a multidict keeps repeated lines apart
    if getall is not None:
        values: list[str] = getall(name)
        if len(values) > 1:  # a list of dates, If-Ranges or ranges that way becomes invalid
            return ", ".join(values)
    return value


def _date_field(headers: Mapping[str, str], name: str) -> int | None:
    """Return a date field as epoch seconds; None when absent or invalid (and so ignored)."""
    value = _field(headers, name)
    return parse_http_date(value) if value is not None else None


def _if_range_holds(value: str, meta: ObjectMeta) -> bool:
    """§13.1.5: an entity tag must match strongly; a date must equal Last-Modified exactly."""
    if _ENTITY_TAG.fullmatch(value):
        # A weak tag on either side never matches strongly (§8.8.3.2); `value` is a valid
        # tag, so equality also rules out a malformed current tag.
        return not value.startswith("W/") and value == meta.etag
    date = parse_http_date(value)
    # Neither a tag nor a date → condition false → the Range is ignored (200).
    return date is not None and date == meta.last_modified


def _matches(field: str, etag: str, *, strong: bool) -> bool:
    """Compare an If-Match/If-None-Match field with the current tag (§8.8.3.2)."""
    field = field.strip(_OWS)
    if field == "*":  # the resource has a current representation: we are serving one
        return True
    weak_current = etag.startswith("W/")
    if (strong and weak_current) or not _ENTITY_TAG.fullmatch(etag):
        return False  # a malformed current tag matches nothing
    if field == etag:  # fast path: the single tag a client stored from our ETag
        return True
    opaque = etag[2:] if weak_current else etag
    for element in _elements(field):
        if not _ENTITY_TAG.fullmatch(element):
            continue  # an unparseable element matches nothing
        if element.startswith("W/"):
            if strong:
                continue
            element = element[2:]
        if element == opaque:
            return True
    return False


def _elements(field: str) -> list[str]:
    """Split a #list of entity tags; commas inside quotes belong to the tag (etagc allows them)."""
    elements: list[str] = []
    start = i = 0
    while True:
        comma = field.find(",", i)
        quote = field.find('"', i)
        if quote >= 0 and (comma < 0 or quote < comma):
            close = field.find('"', quote + 1)
            if close >= 0:
                i = close + 1
                continue
            comma = -1  # unterminated quote: the rest is one (malformed) element
        end = len(field) if comma < 0 else comma
        element = field[start:end].strip(_OWS)
        if element:  # §5.6.1: empty elements are ignored
            elements.append(element)
        if comma < 0:
            return elements
        start = i = comma + 1
