"""The process's memory allocator: jemalloc for Python's objects too, where it is installed.

CPython's small-object allocator (pymalloc) gives a 1 MiB arena back to the OS only once
every object in it is gone. After a burst of streams a few hundred KiB of survivors
(free lists of uvloop and aiohttp, interpreter caches) are spread over the arenas the
burst needed and keep them resident: +21 to +25 % RSS 10 s after 1000 S3 clients left,
with 728 empty 16 KiB pools inside live arenas (README, "Memory allocator"). jemalloc,
with `PYTHONMALLOC=malloc` so that Python's objects come from it, returns free pages after
`dirty_decay_ms` from a background thread, whatever else lives nearby: +3 to +10 % in the
same benchmark, and no measurable cost per request in the 4 KiB one.

Both settings must be in the environment before the interpreter starts, so `serve`
executes itself once more with them (same PID, same argv; nothing is open yet). The
setting `server.allocator` says whether: `auto` (jemalloc when the library is installed),
`jemalloc` (required: start-up fails without it) or `system` (never).
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import Callable, Mapping
from typing import Final

from proxy.errors import ProxyError

JEMALLOC: Final = "jemalloc"
# Two arenas: one thread does the work (the event loop). Pages freed 1 s ago go back to
# the OS at once (muzzy 0: no second, lazier stage), by jemalloc's own thread.
MALLOC_CONF: Final = "narenas:2,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
EXECUTED_MARK: Final = "MEDIA_SIDECAR_ALLOCATOR"  # set in the second process: never a third


class AllocatorError(ProxyError):
    """`server.allocator: jemalloc` and the library cannot be loaded."""


def in_use(maps_path: str = "/proc/self/maps", environ: Mapping[str, str] = os.environ) -> str:
    """`jemalloc`, `malloc` (the C library's, for every object) or `pymalloc`: for /stats."""
    try:
        with open(maps_path, encoding="ascii", errors="replace") as maps:
            if any("libjemalloc" in line for line in maps):
                return JEMALLOC if environ.get("PYTHONMALLOC") == "malloc" else "pymalloc"
    except OSError:
        pass
    return "malloc" if environ.get("PYTHONMALLOC") == "malloc" else "pymalloc"


def environment_to_execute(
    setting: str,
    environ: Mapping[str, str],
    *,
    running: str,
    find_library: Callable[[str], str | None] = ctypes.util.find_library,
) -> dict[str, str] | None:
    """The environment to execute the process again with, or None: go on as it is.

    `running` is what in_use() says now. Raises AllocatorError when jemalloc is required
    and cannot be had.
    """
    if setting == "system" or running == JEMALLOC:
        return None
    if environ.get(EXECUTED_MARK):  # executed once already, and still not on jemalloc
        if setting == JEMALLOC:
            raise AllocatorError("server.allocator: jemalloc could not be preloaded")
        return None
    library = find_library(JEMALLOC)  # "libjemalloc.so.2", found the way ld.so will
    if library is None:
        if setting == JEMALLOC:
            raise AllocatorError(
                "server.allocator: jemalloc is not installed (Debian: apt install libjemalloc2)"
            )
        return None
    env = dict(environ)
    preload = env.get("LD_PRELOAD")
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    env["PYTHONMALLOC"] = "malloc"
    env.setdefault("MALLOC_CONF", MALLOC_CONF)  # an operator's own tuning wins
    env[EXECUTED_MARK] = setting
    return env
