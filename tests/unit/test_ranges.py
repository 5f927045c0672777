"""Range parsing against RFC 9110 §14 (byte ranges) and SPEC §3."""

from __future__ import annotations

import pytest

from proxy.model import ByteRange as R
from proxy.ranges import (
    MAX_RANGES,
    RangeOutcome,
    content_range,
    parse_range,
    unsatisfied_content_range,
)

FULL, PARTIAL, UNSAT = RangeOutcome.FULL, RangeOutcome.PARTIAL, RangeOutcome.UNSATISFIABLE


# §14.1.2 examples and forms: int-range, open-ended int-range, suffix-range; §14.1.1 clamping.
@pytest.mark.parametrize(
    ("header", "size", "ranges"),
    [
        ("bytes=0-499", 10000, [R(0, 499)]),  # the first 500 bytes
        ("bytes=500-999", 10000, [R(500, 999)]),  # the second 500 bytes
        ("bytes=-500", 10000, [R(9500, 9999)]),  # the final 500 bytes
        ("bytes=9500-", 10000, [R(9500, 9999)]),
        ("bytes=0-0", 10000, [R(0, 0)]),  # the first byte
        ("bytes=-1", 10000, [R(9999, 9999)]),  # the last byte
        ("bytes=0-", 10000, [R(0, 9999)]),  # the whole representation is still a 206
        ("bytes=9000-20000", 10000, [R(9000, 9999)]),  # last-pos past the end is clamped
        ("bytes=-20000", 10000, [R(0, 9999)]),  # suffix longer than the representation
        ("bytes=0-0", 1, [R(0, 0)]),
        ("bytes=-5", 1, [R(0, 0)]),
        ("bytes=0-" + "9" * 300, 100, [R(0, 99)]),  # absurd last-pos: clamped, no crash
        ("BYTES=0-1", 10, [R(0, 1)]),  # range units are case-insensitive (§14.1)
    ],
)
def test_single_ranges(header: str, size: int, ranges: list[R]) -> None:
    result = parse_range(header, size)
    assert (result.outcome, list(result.ranges)) == (PARTIAL, ranges)


# §14.1.1: a range is satisfiable only if first-pos < length, or a non-zero suffix on a
# non-empty representation; when none is satisfiable the answer is 416 (§15.5.17).
@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=10000-", 10000),
        ("bytes=10000-10005", 10000),
        ("bytes=-0", 10000),
        ("bytes=0-", 0),
        ("bytes=0-0", 0),
        ("bytes=-1", 0),
        ("bytes=1-", 1),
        ("bytes=" + "9" * 300 + "-", 100),  # absurd first-pos
        ("bytes=200-300,400-", 100),  # several, none satisfiable
    ],
)
def test_unsatisfiable(header: str, size: int) -> None:
    assert parse_range(header, size).outcome is UNSAT


# §14.2: a server MAY ignore the Range field; SPEC §3: a malformed header or an unknown
# unit is ignored (200 with the full body), never an error.
@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "items=0-1",  # another unit
        "bytes",
        "bytes=",
        "bytes=,",
        "bytes=abc",
        "bytes=5-2",  # last-pos < first-pos is invalid (§14.1.1)
        "bytes=-",
        "bytes=--1",
        "bytes=1-2-3",
        "bytes=+1-2",
        "bytes=1 -2",  # no whitespace inside a range-spec
        "bytes=0x10-20",
        "bytes=٣-٤",  # non-ASCII digits
        "bytes=0-1,5-2",  # one invalid spec spoils the whole field
        "bytes=0-1" + ",0-1" * 2000,  # absurdly long header
    ],
)
def test_ignored(header: str | None) -> None:
    result = parse_range(header, 1000)
    assert (result.outcome, result.ranges) == (FULL, ())


# §14.2: overlapping ranges MAY be coalesced; SPEC §3: sorted, overlapping and adjacent merged.
@pytest.mark.parametrize(
    ("header", "ranges"),
    [
        ("bytes=0-9,20-29", [R(0, 9), R(20, 29)]),
        ("bytes=20-29,0-9", [R(0, 9), R(20, 29)]),  # sorted
        ("bytes=0-9,5-14", [R(0, 14)]),  # overlapping
        ("bytes=0-9,10-19", [R(0, 19)]),  # adjacent
        ("bytes=0-99,10-19", [R(0, 99)]),  # contained
        ("bytes=0-9, 20-29 ,\t40-49", [R(0, 9), R(20, 29), R(40, 49)]),  # OWS around commas
        ("bytes=0-9,,20-29", [R(0, 9), R(20, 29)]),  # empty list elements (§5.6.1)
        ("bytes=0-9,-10", [R(0, 9), R(990, 999)]),
        ("bytes=0-9,5000-", [R(0, 9)]),  # unsatisfiable parts are dropped
        ("bytes=-600,0-500", [R(0, 999)]),
    ],
)
def test_multiple_ranges(header: str, ranges: list[R]) -> None:
    result = parse_range(header, 1000)
    assert (result.outcome, list(result.ranges)) == (PARTIAL, ranges)


def test_at_most_max_ranges_parts() -> None:
    sixteen = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_RANGES))
    assert len(parse_range(f"bytes={sixteen}", 1000).ranges) == MAX_RANGES
    seventeen = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_RANGES + 1))
    assert parse_range(f"bytes={seventeen}", 1000).outcome is FULL
    # ... counted after coalescing: 100 overlapping specs make one part
    many = ",".join(f"{i}-{i + 5}" for i in range(100))
    assert list(parse_range(f"bytes={many}", 1000).ranges) == [R(0, 104)]


def test_content_range_formats() -> None:  # §14.4
    assert content_range(R(0, 499), 1234) == "bytes 0-499/1234"
    assert unsatisfied_content_range(1234) == "bytes */1234"
    assert R(5, 9).length == 5
