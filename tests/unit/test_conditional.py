"""Preconditions and If-Range against RFC 9110 §13 (evaluation order §13.2.2)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.conditional import decide, http_date, parse_http_date
from proxy.model import ByteRange, ObjectMeta

ETAG = '"v1"'
LM = 784111777  # Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example date
LM_TEXT = "Sun, 06 Nov 1994 08:49:37 GMT"
BEFORE = http_date(LM - 60)
AFTER = http_date(LM + 60)
META = ObjectMeta(key="k", size=1000, etag=ETAG, last_modified=LM, content_type=None)


def status(method: str = "GET", meta: ObjectMeta = META, **headers: str) -> int:
    h = CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()})
    return decide(method, meta, h).status


# §13.1.1 If-Match: strong comparison; "*" matches any current representation.
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (ETAG, 200),
        ('"x", "v1"', 200),
        ('"x","y"', 412),
        ("*", 200),
        (f"W/{ETAG}", 412),  # a weak tag never matches strongly (§8.8.3.2)
        ('"v1', 412),  # malformed
        ("", 412),
    ],
)
def test_if_match(value: str, expected: int) -> None:
    assert status(If_Match=value) == expected


def test_if_match_against_a_weak_current_tag_fails() -> None:
    weak = META._replace(etag='W/"v1"')
    assert status(meta=weak, If_Match='W/"v1"') == 412
    assert status(meta=weak, If_None_Match='"v1"') == 304  # weak comparison matches


# §13.1.2 If-None-Match: weak comparison; a match is 304 for GET and HEAD.
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (ETAG, 304),
        (f"W/{ETAG}", 304),
        ('"a", W/"v1"', 304),
        ('"a,b", "v1"', 304),  # commas inside quotes belong to the tag
        ('"a,v1"', 200),
        ("*", 304),
        ('"v2"', 200),
    ],
)
def test_if_none_match(value: str, expected: int) -> None:
    assert status(If_None_Match=value) == expected
    assert status("HEAD", If_None_Match=value) == expected


# §13.1.3 If-Modified-Since / §13.1.4 If-Unmodified-Since; invalid dates are ignored.
@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [
        ("If-Modified-Since", LM_TEXT, 304),
        ("If-Modified-Since", AFTER, 304),
        ("If-Modified-Since", BEFORE, 200),
        ("If-Modified-Since", "yesterday", 200),
        ("If-Unmodified-Since", LM_TEXT, 200),
        ("If-Unmodified-Since", AFTER, 200),
        ("If-Unmodified-Since", BEFORE, 412),
        ("If-Unmodified-Since", "garbage", 200),
    ],
)
def test_dates(header: str, value: str, expected: int) -> None:
    assert decide("GET", META, CIMultiDict({header: value})).status == expected


def test_unknown_last_modified() -> None:
    meta = META._replace(last_modified=None)
    assert status(meta=meta, If_Modified_Since=LM_TEXT) == 200
    assert status(meta=meta, If_Unmodified_Since=LM_TEXT) == 412


# §13.2.2 evaluation order.
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"If-Match": '"x"', "If-None-Match": ETAG}, 412),  # step 1 before step 3
        ({"If-Match": ETAG, "If-Unmodified-Since": BEFORE}, 200),  # IUS ignored with If-Match
        ({"If-Match": ETAG, "If-None-Match": ETAG}, 304),
        ({"If-Unmodified-Since": BEFORE, "If-None-Match": ETAG}, 412),  # step 2 before step 3
        ({"If-None-Match": '"x"', "If-Modified-Since": LM_TEXT}, 200),  # IMS ignored with INM
        ({"If-None-Match": ETAG, "Range": "bytes=0-1"}, 304),  # preconditions before Range
        ({"If-Match": '"x"', "Range": "bytes=5000-"}, 412),  # 412 beats 416
        ({"If-Modified-Since": LM_TEXT, "Range": "bytes=0-1"}, 304),
    ],
)
def test_evaluation_order(headers: dict[str, str], expected: int) -> None:
    assert decide("GET", META, CIMultiDict(headers)).status == expected


# §14.2: Range applies to GET only; HEAD and others ignore it.
def test_range_only_for_get() -> None:
    assert status("HEAD", Range="bytes=0-1") == 200
    assert status("HEAD", Range="bytes=5000-") == 200
    assert decide("GET", META, CIMultiDict(Range="bytes=0-1,10-19")).ranges == (
        ByteRange(0, 1),
        ByteRange(10, 19),
    )
    assert status(Range="bytes=5000-") == 416
    assert status(Range="bytes=x") == 200


# §13.1.5 If-Range: a strong entity tag, or a date equal to Last-Modified; else full 200.
@pytest.mark.parametrize(
    ("if_range", "expected"),
    [
        (ETAG, 206),
        (f"W/{ETAG}", 200),  # weak tags never match
        ('"v0"', 200),
        (LM_TEXT, 206),
        ("Sunday, 06-Nov-94 08:49:37 GMT", 206),  # RFC 850 form of the same instant
        (BEFORE, 200),
        (AFTER, 200),  # only an exact match counts
        ("garbage", 200),
        ("", 200),
    ],
)
def test_if_range(if_range: str, expected: int) -> None:
    assert status(Range="bytes=0-9", If_Range=if_range) == expected


def test_if_range_without_range_is_ignored() -> None:
    assert status(If_Range='"v0"') == 200


# §5.6.7: IMF-fixdate is generated; the obsolete RFC 850 and asctime forms are accepted.
@pytest.mark.parametrize(
    "text",
    ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],
)
def test_http_date_forms(text: str) -> None:
    assert parse_http_date(text) == LM


@pytest.mark.parametrize("text", ["", "yesterday", "Sun, 99 Nov 1994 08:49:37 GMT", "1994-11-06"])
def test_invalid_dates(text: str) -> None:
    assert parse_http_date(text) is None


def test_http_date_format() -> None:
    assert http_date(LM) == LM_TEXT
    assert http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert parse_http_date(http_date(1795568043)) == 1795568043
