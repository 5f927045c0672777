"""Range parsing against RFC 9110 §14 (range requests) and SPEC §3."""

from __future__ import annotations

import pytest

from proxy.model import ByteRange as R
from proxy.ranges import (
    MAX_HEADER_LENGTH,
    MAX_RANGES,
    RangeOutcome,
    RangeRequest,
    content_range,
    lone_range,
    parse_range,
    unsatisfied_content_range,
)

FULL, PARTIAL, UNSAT = RangeOutcome.FULL, RangeOutcome.PARTIAL, RangeOutcome.UNSATISFIABLE


def parts(n: int, step: int = 10) -> str:
    """Return `bytes=` with `n` disjoint two-byte ranges, `step` bytes apart."""
    return "bytes=" + ",".join(f"{i * step}-{i * step + 1}" for i in range(n))


# §14.1.2 forms and examples: int-range, open int-range ("a-"), suffix-range ("-n");
# §14.1.1: a last-pos past the end means "to the end"; a suffix longer than the
# representation means the whole of it.
@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-499", 10000, R(0, 499)),  # §14.1.2: the first 500 bytes
        ("bytes=500-999", 10000, R(500, 999)),  # §14.1.2: the second 500 bytes
        ("bytes=-500", 10000, R(9500, 9999)),  # §14.1.2: the final 500 bytes
        ("bytes=9500-", 10000, R(9500, 9999)),  # §14.1.2: the final 500 bytes
        ("bytes=0-0", 10000, R(0, 0)),  # §14.1.2: the first byte
        ("bytes=-1", 10000, R(9999, 9999)),  # §14.1.2: the last byte
        ("bytes=9999-9999", 10000, R(9999, 9999)),
        ("bytes=0-", 10000, R(0, 9999)),  # the whole representation is still a 206
        ("bytes=-10000", 10000, R(0, 9999)),  # suffix exactly the size
        ("bytes=9000-20000", 10000, R(9000, 9999)),  # last-pos past the end: clamped
        ("bytes=0-10000", 10000, R(0, 9999)),  # last-pos == size: clamped
        ("bytes=-20000", 10000, R(0, 9999)),  # suffix longer than the representation
        ("bytes=007-0009", 10000, R(7, 9)),  # 1*DIGIT allows leading zeros
        # one-byte representation
        ("bytes=0-0", 1, R(0, 0)),
        ("bytes=0-", 1, R(0, 0)),
        ("bytes=0-5", 1, R(0, 0)),
        ("bytes=-1", 1, R(0, 0)),
        ("bytes=-5", 1, R(0, 0)),
        # absurd numbers: never a crash; a huge last-pos or suffix means "to the end"
        ("bytes=0-" + "9" * 300, 100, R(0, 99)),
        ("bytes=5-" + "9" * 19, 100, R(5, 99)),
        ("bytes=-" + "9" * 300, 100, R(0, 99)),
        ("bytes=" + "0" * 300 + "5-9", 100, R(5, 9)),  # many digits, small value
        # §14.1: range units are case-insensitive
        ("BYTES=0-1", 10, R(0, 1)),
        ("Bytes=0-1", 10, R(0, 1)),
        # §5.5: OWS around a field value is not part of it; §5.6.1: OWS around list elements
        (" bytes=0-1\t", 10, R(0, 1)),
        ("bytes= 0-1 ", 10, R(0, 1)),
        ("bytes=,0-1,", 10, R(0, 1)),  # empty list elements are tolerated
    ],
)
def test_single_range(header: str, size: int, expected: R) -> None:
    assert parse_range(header, size) == RangeRequest(PARTIAL, (expected,))


# §14.1.1: an int-range is satisfiable only if first-pos < length; a suffix-range only
# with a non-zero suffix-length on a non-empty representation. When no range-spec in
# the set is satisfiable the answer is 416 (§15.5.17).
@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=10000-", 10000),  # first-pos == length
        ("bytes=10000-10005", 10000),
        ("bytes=20000-30000", 10000),
        ("bytes=-0", 10000),  # zero-length suffix
        ("bytes=-000", 10000),
        ("bytes=1-", 1),
        ("bytes=1-1", 1),
        # zero-length representation: every range is unsatisfiable
        ("bytes=0-", 0),
        ("bytes=0-0", 0),
        ("bytes=0-99", 0),
        ("bytes=-1", 0),
        ("bytes=-0", 0),
        ("bytes=0-0,-1", 0),
        # absurd first-pos
        ("bytes=" + "9" * 300 + "-", 100),
        ("bytes=" + "9" * 19 + "-" + "9" * 20, 100),
        # several, none satisfiable
        ("bytes=200-300,400-", 100),
        ("bytes=-0,-0", 100),
        ("bytes=100-,-0, 150-160", 100),
    ],
)
def test_unsatisfiable(header: str, size: int) -> None:
    assert parse_range(header, size) == RangeRequest(UNSAT)


# §14.2: a server MAY ignore the Range field; it MAY ignore an invalid ranges-specifier
# (§14.1.1) or a set of many small ranges. SPEC §3: a malformed header or an unknown unit
# is ignored (200 with the full body), never an error; even when no range could be satisfied.
@pytest.mark.parametrize("size", [0, 1000])
@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "items=0-1",  # another range unit
        "none",
        "bytes",
        "bytes 0-1",
        "=0-1",
        "bytes =0-1",  # §14.1: no whitespace between range-unit and "="
        "bytes==0-1",
        "bytes=",
        "bytes=,",
        "bytes= , ,",
        "bytes=abc",
        "bytes=5-2",  # §14.1.1: invalid when last-pos < first-pos
        "bytes=" + "9" * 30 + "-5",  # the same with a huge first-pos
        "bytes=-",
        "bytes=--1",
        "bytes=1--2",
        "bytes=1-2-3",
        "bytes=+1-2",
        "bytes=-+1",
        "bytes=1-+2",
        "bytes=1 -2",  # no whitespace inside a range-spec
        "bytes=1- 2",
        "bytes=1.5-2",
        "bytes=0x10-20",
        "bytes=1e3-",
        "bytes=٣-٤",  # non-ASCII digits are not DIGIT
        "bytes=²-3",
        "bytes=0-1;q=1",
        "bytes=0-1,5-2",  # one invalid range-spec spoils the whole field
        "bytes=0-1,abc",
        "bytes=0-1, bytes=2-3",  # two Range field lines combined (§5.3)
        "bytes=0-1" + ",0-1" * (MAX_HEADER_LENGTH // 4),  # absurdly long field
    ],
)
def test_ignored(header: str | None, size: int) -> None:
    assert parse_range(header, size) == RangeRequest(FULL)


# §14.2: a server MAY coalesce overlapping ranges and MAY reorder them; SPEC §3: sorted,
# overlapping and adjacent ranges merged; unsatisfiable members of a set are dropped.
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9,20-29", [R(0, 9), R(20, 29)]),
        ("bytes=20-29,0-9", [R(0, 9), R(20, 29)]),  # sorted
        ("bytes=50-59,0-9,20-29", [R(0, 9), R(20, 29), R(50, 59)]),
        ("bytes=0-9,5-14", [R(0, 14)]),  # overlapping
        ("bytes=5-14,0-9", [R(0, 14)]),
        ("bytes=0-9,10-19", [R(0, 19)]),  # adjacent
        ("bytes=10-19,0-9,20-29", [R(0, 29)]),  # an unsorted adjacent chain
        ("bytes=0-9,11-19", [R(0, 9), R(11, 19)]),  # one byte apart: not adjacent
        ("bytes=0-99,10-19", [R(0, 99)]),  # contained
        ("bytes=0-9,0-9", [R(0, 9)]),  # duplicates
        ("bytes=0-9,-10", [R(0, 9), R(990, 999)]),
        ("bytes=-600,0-500", [R(0, 999)]),
        ("bytes=500-,0-499", [R(0, 999)]),  # the whole, still a 206
        ("bytes=990-2000,-5", [R(990, 999)]),  # a clamped range overlapping a suffix
        ("bytes=0-9,5000-", [R(0, 9)]),  # unsatisfiable members are dropped...
        ("bytes=-0,0-9", [R(0, 9)]),  # ... including "-0"
        ("bytes=0-9, 20-29 ,\t40-49", [R(0, 9), R(20, 29), R(40, 49)]),  # OWS around commas
        ("bytes=0-9,,20-29", [R(0, 9), R(20, 29)]),  # §5.6.1: empty list elements
    ],
)
def test_multiple_ranges(header: str, expected: list[R]) -> None:
    assert parse_range(header, 1000) == RangeRequest(PARTIAL, tuple(expected))


# SPEC §3: at most MAX_RANGES parts, counted after dropping and coalescing; more → 200.
@pytest.mark.parametrize(
    ("header", "outcome", "count"),
    [
        (parts(MAX_RANGES), PARTIAL, MAX_RANGES),
        (parts(MAX_RANGES + 1), FULL, 0),
        (parts(200, step=3), FULL, 0),
        (parts(MAX_RANGES + 1, step=2), PARTIAL, 1),  # 17 adjacent specs make one part
        (parts(MAX_RANGES) + ",5000-", PARTIAL, MAX_RANGES),  # the unsatisfiable one is dropped
        (parts(MAX_RANGES) + ",0-1", PARTIAL, MAX_RANGES),  # a duplicate is merged
        ("bytes=" + ",".join(f"{i}-{i + 5}" for i in range(100)), PARTIAL, 1),
    ],
)
def test_part_limit(header: str, outcome: RangeOutcome, count: int) -> None:
    result = parse_range(header, 1000)
    assert (result.outcome, len(result.ranges)) == (outcome, count)


# §14.4: Content-Range = range-unit SP ( range-resp / unsatisfied-range ).
@pytest.mark.parametrize(
    ("r", "size", "expected"),
    [
        (R(0, 499), 1234, "bytes 0-499/1234"),
        (R(0, 0), 1, "bytes 0-0/1"),
        (R(9500, 9999), 10000, "bytes 9500-9999/10000"),
    ],
)
def test_content_range(r: R, size: int, expected: str) -> None:
    assert content_range(r, size) == expected


@pytest.mark.parametrize(("size", "expected"), [(0, "bytes */0"), (1234, "bytes */1234")])
def test_unsatisfied_content_range(size: int, expected: str) -> None:
    assert unsatisfied_content_range(size) == expected


def test_byte_range_length_is_inclusive() -> None:
    assert (R(5, 9).length, R(0, 0).length) == (5, 1)


# ---------------------------------------------------------------------------- lone_range


@pytest.mark.parametrize(
    ("header", "spec"),
    [
        ("bytes=0-99", "bytes=0-99"),
        ("bytes=100-", "bytes=100-"),
        ("bytes=-500", "bytes=-500"),
        ("BYTES=5-5", "bytes=5-5"),
        (" bytes=007-0010 ", "bytes=7-10"),  # leading zeros and OWS: same meaning, canonical
        ("bytes= 1-2", "bytes=1-2"),
    ],
)
def test_lone_range_passes_one_range_on(header: str, spec: str) -> None:
    assert lone_range(header) == spec


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-1,5-6",  # several: multipart needs the size first
        "bytes=0-1,",  # an empty element: parse_range tolerates it, a storage might not
        "bytes=5-1",  # last < first: ignored (200), never sent as a range
        "bytes=-0",  # unsatisfiable suffix
        "bytes=-",
        "bytes=",
        "items=0-1",
        "bytes 0-1",
        "bytes=a-1",
        "bytes=+1-2",
        "bytes=٣-5",  # non-ASCII digits
        "bytes=" + "9" * 19 + "-",  # beyond any real position
        "bytes=0-" + "1" * 5000,  # absurdly long
    ],
)
def test_lone_range_refuses_everything_else(header: str) -> None:
    assert lone_range(header) is None


@pytest.mark.parametrize(
    "header", ["bytes=0-99", "bytes=100-", "bytes=-500", "bytes=990-5000", "bytes=-5000"]
)
@pytest.mark.parametrize("size", [1, 100, 1000])
def test_lone_range_means_what_parse_range_means(header: str, size: int) -> None:
    """What a storage is asked for is what the sidecar would decide once it knows the size."""
    spec = lone_range(header)
    assert spec is not None
    assert parse_range(spec, size) == parse_range(header, size)
