"""Preconditions, If-Range and Range against RFC 9110 §13 (evaluation order §13.2.2)."""

from __future__ import annotations

import calendar
import time
from types import SimpleNamespace

import pytest
from multidict import CIMultiDict

from proxy import conditional
from proxy.conditional import Decision, decide, http_date, parse_http_date
from proxy.model import ByteRange, ObjectMeta

ETAG = '"v1"'
WEAK = 'W/"v1"'
LM = 784111777  # RFC 9110 §5.6.7's example instant
LM_TEXT = "Sun, 06 Nov 1994 08:49:37 GMT"
LM_RFC850 = "Sunday, 06-Nov-94 08:49:37 GMT"
LM_ASCTIME = "Sun Nov  6 08:49:37 1994"
BEFORE = http_date(LM - 60)
AFTER = http_date(LM + 60)
META = ObjectMeta(key="k", size=1000, etag=ETAG, last_modified=LM, content_type=None)
WEAK_META = META._replace(etag=WEAK)
NO_DATE_META = META._replace(last_modified=None)
EMPTY_META = META._replace(size=0)
BAD_META = META._replace(etag="v1")  # a malformed current tag: only "*" matches it


def status(headers: dict[str, str], method: str = "GET", meta: ObjectMeta = META) -> int:
    return decide(method, meta, CIMultiDict(headers)).status


# §13.1.1 If-Match: true if any listed tag matches by strong comparison (§8.8.3.2: both
# tags strong and identical), or "*" with a current representation; false → 412.
@pytest.mark.parametrize(
    ("value", "meta", "expected"),
    [
        (ETAG, META, 200),
        ('"x", "v1"', META, 200),
        ('"x" ,\t"v1" ', META, 200),  # OWS around commas
        ('"x",,"v1"', META, 200),  # §5.6.1: empty list elements
        ('"x","y"', META, 412),
        ('"V1"', META, 412),  # opaque-tags compare case-sensitively
        ("*", META, 200),
        ("*", WEAK_META, 200),
        (WEAK, META, 412),  # a weak tag never matches strongly
        ('"x", W/"v1"', META, 412),
        (WEAK, WEAK_META, 412),  # nor does a weak current tag
        (ETAG, WEAK_META, 412),
        ('"a,v1"', META, 412),  # commas inside quotes belong to the tag
        ('"a,b", "v1"', META, 200),
        ('"v1', META, 412),  # malformed elements match nothing...
        ("v1", META, 412),
        ('"v1"x', META, 412),
        ('"v1" "x"', META, 412),
        ('v1, "v1"', META, 200),  # ...but do not spoil the others
        ('*, "v1"', META, 200),
        ("", META, 412),  # an empty list matches nothing
        ("v1", BAD_META, 412),
        ("*", BAD_META, 200),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_if_match(value: str, meta: ObjectMeta, expected: int, method: str) -> None:
    assert status({"If-Match": value}, method, meta) == expected


# §13.1.2 If-None-Match: false if any listed tag matches by weak comparison (§8.8.3.2:
# opaque-tags identical, either or both weak), or "*"; false → 304 for GET and HEAD.
@pytest.mark.parametrize(
    ("value", "meta", "expected"),
    [
        (ETAG, META, 304),
        (WEAK, META, 304),
        (ETAG, WEAK_META, 304),
        (WEAK, WEAK_META, 304),
        ('"a", W/"v1"', META, 304),
        ('"a" , , "v1"', META, 304),
        ('"a,b", "v1"', META, 304),  # commas inside quotes belong to the tag
        ('"a,v1"', META, 200),
        ("*", META, 304),
        ('"v2"', META, 200),
        ('"V1"', META, 200),
        ("v1", META, 200),  # malformed elements match nothing
        ('"v1" "v2"', META, 200),
        ("W/v1", META, 200),
        ("w/" + ETAG, META, 200),  # §8.8.3: the weak indicator is case-sensitive
        ("", META, 200),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_if_none_match(value: str, meta: ObjectMeta, expected: int, method: str) -> None:
    assert status({"If-None-Match": value}, method, meta) == expected


# §13.1.2: for methods other than GET and HEAD a false If-None-Match is a 412.
@pytest.mark.parametrize(("value", "expected"), [(ETAG, 412), ("*", 412), ('"v2"', 200)])
def test_if_none_match_other_methods(value: str, expected: int) -> None:
    assert status({"If-None-Match": value}, "DELETE") == expected


# §13.1.3 If-Modified-Since (GET/HEAD only): 304 when not modified since the date.
# §13.1.4 If-Unmodified-Since (any method): 412 when modified since the date.
# Both: an invalid date, or a list of dates, is ignored.
@pytest.mark.parametrize(
    ("header", "value", "method", "meta", "expected"),
    [
        ("If-Modified-Since", LM_TEXT, "GET", META, 304),
        ("If-Modified-Since", LM_TEXT, "HEAD", META, 304),
        ("If-Modified-Since", LM_RFC850, "GET", META, 304),
        ("If-Modified-Since", LM_ASCTIME, "GET", META, 304),
        ("If-Modified-Since", AFTER, "GET", META, 304),
        ("If-Modified-Since", BEFORE, "GET", META, 200),
        ("If-Modified-Since", BEFORE, "HEAD", META, 200),
        ("If-Modified-Since", LM_TEXT, "POST", META, 200),  # GET/HEAD only
        ("If-Modified-Since", "yesterday", "GET", META, 200),
        ("If-Modified-Since", LM_TEXT.lower(), "GET", META, 200),  # §5.6.7: case-sensitive
        ("If-Modified-Since", f"{LM_TEXT}, {LM_TEXT}", "GET", META, 200),
        ("If-Modified-Since", LM_TEXT, "GET", NO_DATE_META, 200),
        ("If-Unmodified-Since", LM_TEXT, "GET", META, 200),
        ("If-Unmodified-Since", AFTER, "GET", META, 200),
        ("If-Unmodified-Since", BEFORE, "GET", META, 412),
        ("If-Unmodified-Since", BEFORE, "HEAD", META, 412),
        ("If-Unmodified-Since", BEFORE, "POST", META, 412),  # any method
        ("If-Unmodified-Since", "garbage", "GET", META, 200),
        ("If-Unmodified-Since", f"{BEFORE}, {AFTER}", "GET", META, 200),
        ("If-Unmodified-Since", LM_TEXT, "GET", NO_DATE_META, 412),  # cannot be shown unmodified
    ],
)
def test_dates(header: str, value: str, method: str, meta: ObjectMeta, expected: int) -> None:
    assert status({header: value}, method, meta) == expected


# §13.2.2 evaluation order: If-Match, else If-Unmodified-Since; If-None-Match, else
# If-Modified-Since; then If-Range with Range (GET only). The first failure decides.
@pytest.mark.parametrize(
    ("headers", "method", "expected"),
    [
        ({"If-Match": '"x"', "If-None-Match": ETAG}, "GET", 412),  # step 1 before step 3
        ({"If-Match": '"x"', "If-Modified-Since": LM_TEXT}, "GET", 412),
        ({"If-Match": '"x"', "If-None-Match": ETAG}, "HEAD", 412),
        ({"If-Match": ETAG, "If-Unmodified-Since": BEFORE}, "GET", 200),  # IUS ignored
        ({"If-Match": "*", "If-Unmodified-Since": BEFORE}, "GET", 200),
        ({"If-Match": '"x"', "If-Unmodified-Since": AFTER}, "GET", 412),
        ({"If-Match": ETAG, "If-None-Match": ETAG}, "GET", 304),  # step 1 passes, step 3
        ({"If-Match": ETAG, "If-None-Match": '"x"'}, "GET", 200),
        ({"If-Unmodified-Since": BEFORE, "If-None-Match": ETAG}, "GET", 412),  # 2 before 3
        ({"If-Unmodified-Since": BEFORE, "If-Modified-Since": LM_TEXT}, "GET", 412),
        ({"If-Unmodified-Since": AFTER, "If-None-Match": ETAG}, "GET", 304),
        ({"If-None-Match": '"x"', "If-Modified-Since": LM_TEXT}, "GET", 200),  # IMS ignored
        ({"If-None-Match": '"x"', "If-Modified-Since": LM_TEXT}, "HEAD", 200),
        ({"If-None-Match": ETAG, "If-Modified-Since": BEFORE}, "GET", 304),
        ({"If-None-Match": ETAG, "Range": "bytes=0-1"}, "GET", 304),  # before Range
        ({"If-None-Match": '"x"', "If-Modified-Since": LM_TEXT, "Range": "bytes=0-1"}, "GET", 206),
        ({"If-Modified-Since": LM_TEXT, "Range": "bytes=0-1"}, "GET", 304),
        ({"If-Modified-Since": BEFORE, "Range": "bytes=0-1"}, "GET", 206),
        ({"If-Match": '"x"', "Range": "bytes=5000-"}, "GET", 412),  # 412 beats 416
        ({"If-Unmodified-Since": BEFORE, "Range": "bytes=5000-"}, "GET", 412),
        ({"If-Match": ETAG, "Range": "bytes=0-1"}, "GET", 206),
        ({"If-Match": ETAG, "Range": "bytes=5000-"}, "GET", 416),
        ({"If-None-Match": ETAG, "If-Range": '"x"', "Range": "bytes=0-1"}, "GET", 304),
        ({"If-Match": '"x"', "If-Range": ETAG, "Range": "bytes=0-1"}, "GET", 412),
    ],
)
def test_evaluation_order(headers: dict[str, str], method: str, expected: int) -> None:
    assert status(headers, method) == expected


# §14.2: Range is defined for GET only; HEAD and other methods ignore it. §14.1.1 and
# SPEC §3: satisfiable → 206 with the coalesced ranges, none satisfiable → 416, malformed,
# another unit or too many parts → 200.
@pytest.mark.parametrize(
    ("method", "range_", "meta", "expected"),
    [
        ("GET", "bytes=0-1", META, Decision(206, (ByteRange(0, 1),))),
        ("GET", "bytes=10-19,0-1", META, Decision(206, (ByteRange(0, 1), ByteRange(10, 19)))),
        ("GET", "bytes=0-1,2-3", META, Decision(206, (ByteRange(0, 3),))),
        ("GET", "bytes=-5", META, Decision(206, (ByteRange(995, 999),))),
        ("GET", "bytes=5000-", META, Decision(416)),
        ("GET", "bytes=-0", META, Decision(416)),
        ("GET", "bytes=0-", EMPTY_META, Decision(416)),
        ("GET", "bytes=x", META, Decision(200)),
        ("GET", "items=0-1", META, Decision(200)),
        ("GET", "bytes=" + ",".join(f"{i * 10}-{i * 10}" for i in range(17)), META, Decision(200)),
        ("HEAD", "bytes=0-1", META, Decision(200)),
        ("HEAD", "bytes=5000-", META, Decision(200)),
        ("HEAD", "bytes=x", META, Decision(200)),
        ("POST", "bytes=0-1", META, Decision(200)),
    ],
)
def test_range(method: str, range_: str, meta: ObjectMeta, expected: Decision) -> None:
    assert decide(method, meta, CIMultiDict({"Range": range_})) == expected


# §13.1.5 If-Range: with Range on a GET, an entity-tag matches only by strong comparison,
# a date only when it exactly equals Last-Modified; otherwise, or when the value is
# neither, the Range is ignored and the whole representation sent (200).
@pytest.mark.parametrize(
    ("if_range", "meta", "expected"),
    [
        (ETAG, META, 206),
        (f" {ETAG} ", META, 206),
        (WEAK, META, 200),  # a weak tag never matches strongly
        (WEAK, WEAK_META, 200),
        (ETAG, WEAK_META, 200),
        ('"v0"', META, 200),
        ('"V1"', META, 200),
        (f"{ETAG}, {ETAG}", META, 200),  # a list is neither an entity-tag nor a date
        ("*", META, 200),
        ("v1", META, 200),
        ("v1", BAD_META, 200),
        ('"v1', BAD_META, 200),
        (LM_TEXT, META, 206),
        (LM_RFC850, META, 206),  # the same instant in the obsolete forms
        (LM_ASCTIME, META, 206),
        (LM_TEXT, WEAK_META, 206),
        (BEFORE, META, 200),
        (AFTER, META, 200),  # only an exact match counts
        (LM_TEXT, NO_DATE_META, 200),
        ("garbage", META, 200),
        ("", META, 200),
    ],
)
def test_if_range(if_range: str, meta: ObjectMeta, expected: int) -> None:
    assert status({"Range": "bytes=0-9", "If-Range": if_range}, "GET", meta) == expected


@pytest.mark.parametrize(
    ("headers", "method", "expected"),
    [
        ({"If-Range": '"v0"'}, "GET", 200),  # without Range, If-Range is ignored
        ({"If-Range": ETAG}, "GET", 200),
        ({"If-Range": ETAG, "Range": "bytes=0-9"}, "HEAD", 200),  # HEAD ignores Range
        ({"If-Range": ETAG, "Range": "bytes=5000-"}, "GET", 416),  # matching: Range applies
        ({"If-Range": '"v0"', "Range": "bytes=5000-"}, "GET", 200),  # else ignored: no 416
        ({"If-Range": ETAG, "Range": "bytes=x"}, "GET", 200),
    ],
)
def test_if_range_scope(headers: dict[str, str], method: str, expected: int) -> None:
    assert status(headers, method) == expected


# §5.3: several field lines of one name are one list; repeated singleton fields are invalid.
@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([("If-Match", '"x"'), ("If-Match", ETAG)], 200),
        ([("If-Match", '"x"'), ("If-Match", '"y"')], 412),
        ([("If-None-Match", '"x"'), ("if-none-match", ETAG)], 304),
        ([("If-Modified-Since", LM_TEXT), ("If-Modified-Since", LM_TEXT)], 200),
        ([("If-Unmodified-Since", BEFORE), ("If-Unmodified-Since", BEFORE)], 200),
        ([("Range", "bytes=0-1"), ("Range", "bytes=2-3")], 200),
        ([("Range", "bytes=0-1"), ("If-Range", ETAG), ("If-Range", ETAG)], 200),
    ],
)
def test_repeated_field_lines(lines: list[tuple[str, str]], expected: int) -> None:
    assert decide("GET", META, CIMultiDict(lines)).status == expected


def test_plain_mapping_is_accepted() -> None:
    assert decide("GET", META, {"If-None-Match": ETAG}).status == 304  # names as sent


def rfc850_year(offset: int) -> tuple[str, int]:
    """Return an RFC 850 date `offset` years from now and the year it must mean."""
    this_year = time.gmtime().tm_year
    year = this_year + offset
    expected = year if offset <= 50 else year - 100  # §5.6.7: > 50 years ahead → past
    return f"Monday, 01-Jan-{year % 100:02d} 00:00:00 GMT", expected


# §5.6.7: recipients accept IMF-fixdate and the obsolete RFC 850 and asctime forms.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (LM_TEXT, LM),
        (LM_RFC850, LM),
        (LM_ASCTIME, LM),
        ("Sun Nov 06 08:49:37 1994", LM),  # date3 allows 2DIGIT too
        (f" {LM_TEXT}\t", LM),  # surrounding OWS is not part of the value
        ("Mon, 06 Nov 1994 08:49:37 GMT", LM),  # judgement call: the weekday is not checked
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0),
        ("Tue, 29 Feb 2000 00:00:00 GMT", 951782400),  # a leap day
        ("Wed, 31 Dec 1969 23:59:59 GMT", -1),
        ("Sat, 31 Dec 2016 23:59:60 GMT", 1483228800),  # a leap second: 00:00:00 next day
        ("Tue, 19 Jan 2038 03:14:08 GMT", 2**31),
        (rfc850_year(1)[0], calendar.timegm((rfc850_year(1)[1], 1, 1, 0, 0, 0))),
        (rfc850_year(50)[0], calendar.timegm((rfc850_year(50)[1], 1, 1, 0, 0, 0))),
        (rfc850_year(51)[0], calendar.timegm((rfc850_year(51)[1], 1, 1, 0, 0, 0))),
        (rfc850_year(-30)[0], calendar.timegm((rfc850_year(-30)[1], 1, 1, 0, 0, 0))),
    ],
)
def test_parse_http_date(text: str, expected: int) -> None:
    assert parse_http_date(text) == expected


# §5.6.7: the two-digit year of an RFC 850 date is read relative to the current year.
@pytest.mark.parametrize(
    ("this_year", "yy", "year"),
    [
        (2026, "94", 1994),
        (2026, "76", 2076),  # exactly 50 years ahead: not "more than 50"
        (2026, "77", 1977),
        (2026, "26", 2026),
        (2090, "10", 2110),  # 20 years ahead, in the next century
        (2090, "40", 2140),
        (2090, "41", 2041),
        (2099, "00", 2100),
    ],
)
def test_rfc850_two_digit_year(
    this_year: int, yy: str, year: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SimpleNamespace(gmtime=lambda: SimpleNamespace(tm_year=this_year))
    monkeypatch.setattr(conditional, "time", clock)
    expected = calendar.timegm((year, 1, 1, 0, 0, 0))
    assert parse_http_date(f"Monday, 01-Jan-{yy} 00:00:00 GMT") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "784111777",
        "1994-11-06T08:49:37Z",
        "Sun, 99 Nov 1994 08:49:37 GMT",
        "Sun, 00 Nov 1994 08:49:37 GMT",
        "Sun, 31 Apr 1994 08:49:37 GMT",  # April has 30 days
        "Wed, 29 Feb 1995 08:49:37 GMT",  # not a leap year
        "Sun, 06 Nov 0000 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Nov 1994 08:60:37 GMT",
        "Sun, 06 Nov 1994 08:49:61 GMT",
        "Sun, 06 Nov 1994 08:49:37 UTC",  # HTTP-date is always GMT
        "Sun, 06 Nov 1994 08:49:37 +0000",
        "Sun, 06 Nov 1994 08:49:37",
        "sun, 06 nov 1994 08:49:37 gmt",  # §5.6.7: case-sensitive
        "Sun, 6 Nov 1994 08:49:37 GMT",  # IMF-fixdate has a 2DIGIT day
        "Sun,  06 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 94 08:49:37 GMT",
        "Sunday, 06 Nov 1994 08:49:37 GMT",  # the long name belongs to RFC 850 only
        "Sun, 06-Nov-94 08:49:37 GMT",
        "Sunday, 06-Nov-1994 08:49:37 GMT",
        "Sun Nov 6 08:49:37 1994",  # asctime pads a one-digit day with a space
        "Sun Nov  6 08:49:37 1994 GMT",
        "Foo, 06 Nov 1994 08:49:37 GMT",
        "Sun, 06 Foo 1994 08:49:37 GMT",
        "Sun, \u06606 Nov 1994 08:49:37 GMT",  # non-ASCII digits (ARABIC-INDIC ZERO)
        f"{LM_TEXT}, {LM_TEXT}",  # a list of dates
    ],
)
def test_invalid_http_date(text: str) -> None:
    assert parse_http_date(text) is None


# §5.6.7: a sender generates IMF-fixdate (fixed width, English names, GMT).
@pytest.mark.parametrize(
    ("epoch_s", "text"),
    [
        (LM, LM_TEXT),
        (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
        (946684800, "Sat, 01 Jan 2000 00:00:00 GMT"),
        (951782400, "Tue, 29 Feb 2000 00:00:00 GMT"),
        (2**31, "Tue, 19 Jan 2038 03:14:08 GMT"),
        (-1, "Wed, 31 Dec 1969 23:59:59 GMT"),
    ],
)
def test_http_date(epoch_s: int, text: str) -> None:
    assert http_date(epoch_s) == text
    assert parse_http_date(text) == epoch_s


@pytest.mark.parametrize("epoch_s", [1, 59, 86399, 1795568043, 4102444799, int(time.time())])
def test_http_date_round_trip(epoch_s: int) -> None:
    assert parse_http_date(http_date(epoch_s)) == epoch_s
