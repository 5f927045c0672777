"""Range header parsing and Content-Range formatting (RFC 9110 §14), pure functions."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from proxy.model import ByteRange

MAX_RANGES: Final = 16  # more parts than this after coalescing → 200 full body (SPEC §3)
MAX_HEADER_LENGTH: Final = 4096  # longer Range fields are ignored, not parsed (§14.2: MAY ignore)
# Positions with more significant digits than this are "huge": no representation is that large
# (2**63 has 19 digits), so they are compared as _HUGE instead of being converted with int().
_MAX_DIGITS: Final = 18
_HUGE: Final = 10**_MAX_DIGITS
_OWS: Final = " \t"


class RangeOutcome(enum.Enum):
    """What a Range header asks of the response."""

    FULL = "full"  # no usable Range: 200 with the whole representation
    PARTIAL = "partial"  # 206 with one or more ranges
    UNSATISFIABLE = "unsatisfiable"  # 416


@dataclass(frozen=True, slots=True)
class RangeRequest:
    """The outcome of parsing a Range header, with the sorted, coalesced ranges for PARTIAL."""

    outcome: RangeOutcome
    ranges: tuple[ByteRange, ...] = ()


_FULL: Final = RangeRequest(RangeOutcome.FULL)
_UNSATISFIABLE: Final = RangeRequest(RangeOutcome.UNSATISFIABLE)


def parse_range(header: str | None, size: int) -> RangeRequest:
    """Interpret a Range header against a representation of `size` bytes."""
    if not header:  # the common case: no Range at all
        return _FULL
    # §14.2: a server MAY ignore the Range field; SPEC §3 ignores a malformed one, another
    # unit, an absurdly long one and one that asks for more than MAX_RANGES parts.
    if len(header) > MAX_HEADER_LENGTH:
        return _FULL
    # §14.1: ranges-specifier = range-unit "=" range-set, no whitespace around "=";
    # leading/trailing OWS is not part of a field value (§5.5), so it is stripped.
    unit, sep, spec = header.strip(_OWS).partition("=")
    if not sep or unit.lower() != "bytes":  # §14.1: range units are case-insensitive
        return _FULL
    satisfiable: list[ByteRange] = []
    seen_spec = False
    # §5.6.1: range-set is a #list: OWS around commas, empty elements tolerated.
    for element in spec.split(","):
        element = element.strip(_OWS)
        if not element:
            continue
        first, dash, last = element.partition("-")
        if not dash or (first and not _is_digits(first)) or (last and not _is_digits(last)):
            return _FULL  # not a range-spec (signs, spaces, letters, non-ASCII digits, "1-2-3")
        seen_spec = True
        if first:  # int-range: first-pos "-" [ last-pos ]
            start = _position(first)
            end = _position(last) if last else _HUGE
            if end < start:
                return _FULL  # §14.1.1: invalid when last-pos < first-pos
            if start >= size:
                continue  # §14.1.1: satisfiable only if first-pos < length
            satisfiable.append(ByteRange(start, min(end, size - 1)))  # end past size: clamped
        elif last:  # suffix-range: "-" suffix-length
            suffix = _position(last)
            if suffix == 0 or size == 0:
                continue  # §14.1.1: a suffix-range needs a non-zero length on both sides
            satisfiable.append(ByteRange(max(size - suffix, 0), size - 1))
        else:
            return _FULL  # a lone "-"
    if not seen_spec:
        return _FULL  # "bytes=" or only empty elements: no range-spec at all
    if not satisfiable:
        return _UNSATISFIABLE  # §14.1.1 / §15.5.17: 416
    if len(satisfiable) == 1:
        return RangeRequest(RangeOutcome.PARTIAL, (satisfiable[0],))
    merged = _coalesce(satisfiable)
    if len(merged) > MAX_RANGES:
        return _FULL
    return RangeRequest(RangeOutcome.PARTIAL, merged)


def lone_range(header: str) -> str | None:
    """`bytes=first-last`, `bytes=first-` or `bytes=-suffix` when `header` is one such range.

    Whatever it is, `parse_range` gives it the same meaning once the size is known: the spec
    can be asked of a storage before its size is (a GET without a HEAD). None for anything
    else (several ranges, another unit, malformed, absurd), which needs the size first.
    """
    if len(header) > MAX_HEADER_LENGTH:
        return None
    unit, sep, spec = header.strip(_OWS).partition("=")
    if not sep or unit.lower() != "bytes":
        return None
    first, dash, last = spec.strip(_OWS).partition("-")
    if not dash or not (first or last):
        return None
    if (first and not _is_digits(first)) or (last and not _is_digits(last)):
        return None
    if len(first) > _MAX_DIGITS or len(last) > _MAX_DIGITS:
        return None
    if first and last and int(last) < int(first):
        return None
    if not first and int(last) == 0:
        return None
    return f"bytes={int(first) if first else ''}-{int(last) if last else ''}"


def content_range(r: ByteRange, size: int) -> str:
    """Format `bytes first-last/complete-length` (RFC 9110 §14.4)."""
    return f"bytes {r.start}-{r.end}/{size}"


def unsatisfied_content_range(size: int) -> str:
    """Format `bytes */complete-length` for a 416 (RFC 9110 §14.4)."""
    return f"bytes */{size}"


def _is_digits(text: str) -> bool:
    """Tell whether `text` is 1*DIGIT in ASCII (str.isdigit alone accepts "٣" and "²")."""
    return text.isascii() and text.isdigit()


def _position(digits: str) -> int:
    """Convert 1*DIGIT to an int, or _HUGE when it cannot be a real byte position."""
    if len(digits) <= _MAX_DIGITS:  # the usual case: no need to look at leading zeros
        return int(digits)
    significant = digits.lstrip("0")
    return _HUGE if len(significant) > _MAX_DIGITS else int(significant or "0")


def _coalesce(ranges: list[ByteRange]) -> tuple[ByteRange, ...]:
    """Sort, then merge overlapping and adjacent ranges (§14.2: a server MAY coalesce)."""
    ranges.sort()
    merged = [ranges[0]]
    for r in ranges[1:]:
        last = merged[-1]
        if r.start <= last.end + 1:
            if r.end > last.end:
                merged[-1] = ByteRange(last.start, r.end)
        else:
            merged.append(r)
    return tuple(merged)
