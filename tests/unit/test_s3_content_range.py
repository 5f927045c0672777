"""The Content-Range of a GET sent before any HEAD is where the object's size comes from."""

from __future__ import annotations

import pytest

from proxy.model import ByteRange
from proxy.storage.s3 import _parse_content_range


def test_a_range_and_its_complete_length() -> None:
    assert _parse_content_range("bytes 0-99/1000") == (ByteRange(0, 99), 1000)
    assert _parse_content_range("bytes 999-999/1000") == (ByteRange(999, 999), 1000)


@pytest.mark.parametrize(
    "value",
    [
        "bytes 0-99/*",  # length unknown: the size must come from a HEAD
        "bytes */1000",
        "bytes 5-4/1000",
        "bytes 0-1000/1000",  # past the end
        "items 0-9/10",
        "bytes 0-9",
        "bytes -1-9/10",
        "bytes 0-9/1²",  # a digit to str.isdigit, not to int()
        "",
    ],
)
def test_anything_else_is_refused(value: str) -> None:
    assert _parse_content_range(value) is None
