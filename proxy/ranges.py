"""Range header parsing and Content-Range formatting (RFC 9110 §14), pure functions."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from proxy.model import ByteRange

MAX_RANGES: Final = 16  # more parts than this after coalescing → 200 full body (SPEC §3)
MAX_HEADER_LENGTH: Final = 4096


class RangeOutcome(enum.Enum):
    FULL = "full"  # no usable Range: send 200 with the whole representation
    PARTIAL = "partial"  # 206 with one or more ranges
    UNSATISFIABLE = "unsatisfiable"  # 416


@dataclass(frozen=True, slots=True)
class RangeRequest:
    outcome: RangeOutcome
    ranges: tuple[ByteRange, ...] = ()


_FULL: Final = RangeRequest(RangeOutcome.FULL)
_UNSATISFIABLE: Final = RangeRequest(RangeOutcome.UNSATISFIABLE)


def parse_range(header: str | None, size: int) -> RangeRequest:
    """Interpret a Range header against a representation of `size` bytes.

    A malformed header or another unit is ignored (RFC 9110 §14.2: a server MAY
    ignore the field), as is one asking for more than MAX_RANGES parts.
    """
    if not header:
        return _FULL
    if len(header) > MAX_HEADER_LENGTH:
        return _FULL
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return _FULL
    satisfiable: list[ByteRange] = []
    seen_any = False
    for element in spec.split(","):
        element = element.strip(" \t")
        if not element:
            continue  # RFC 9110 §5.6.1: empty list elements are ignored
        first, dash, last = element.partition("-")
        if not dash or (first and not _is_digits(first)) or (last and not _is_digits(last)):
            return _FULL
        seen_any = True
        if first:
            start = int(first)
            end = int(last) if last else None
            if end is not None and end < start:
                return _FULL  # §14.1.1: invalid when last-pos < first-pos
            if start >= size:
                continue  # §14.1.1: unsatisfiable unless first-pos < length
            satisfiable.append(ByteRange(start, size - 1 if end is None else min(end, size - 1)))
        elif last:
            suffix = int(last)
            if suffix == 0 or size == 0:
                continue  # §14.1.1: a suffix needs a non-zero length on both sides
            satisfiable.append(ByteRange(max(size - suffix, 0), size - 1))
        else:
            return _FULL  # a lone "-"
    if not seen_any:
        return _FULL
    if not satisfiable:
        return _UNSATISFIABLE
    merged = _coalesce(satisfiable)
    if len(merged) > MAX_RANGES:
        return _FULL
    return RangeRequest(RangeOutcome.PARTIAL, merged)


def content_range(r: ByteRange, size: int) -> str:
    """Format `bytes a-b/size` (RFC 9110 §14.4)."""
    return f"bytes {r.start}-{r.end}/{size}"


def unsatisfied_content_range(size: int) -> str:
    """Format `bytes */size` for a 416 (RFC 9110 §14.4)."""
    return f"bytes */{size}"


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _coalesce(ranges: list[ByteRange]) -> tuple[ByteRange, ...]:
    """Sort, then merge overlapping and adjacent ranges (§14.2 allows coalescing)."""
    ranges.sort(key=lambda r: r.start)
    merged = [ranges[0]]
    for r in ranges[1:]:
        last = merged[-1]
        if r.start <= last.end + 1:
            if r.end > last.end:
                merged[-1] = ByteRange(last.start, r.end)
        else:
            merged.append(r)
    return tuple(merged)
