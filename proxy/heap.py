"""glibc's `malloc_trim`, to give freed heap pages back to the OS (streaming-pitfalls P12).

glibc keeps RSS at its high-water mark: buffers of streams that ended stay counted
against a container's memory limit until trimmed. None where there is no glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _load() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


malloc_trim = _load()
