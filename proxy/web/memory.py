"""Give freed heap memory back to the OS after a burst of streams ends.

glibc keeps RSS at its high-water mark: buffers of a thousand streams that ended stay
counted against the container's memory limit (streaming-pitfalls P12). `malloc_trim(0)`
returns free pages; it walks the heap, so it runs only after `active` fell well below its
peak, at most once per interval, never per request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Final

from proxy import heap
from proxy.log import log_event
from proxy.registry import Registry

TRIM_INTERVAL_S: Final = 5.0
TRIM_MIN_DROP: Final = 16  # streams ended since the peak before a trim is worth its cost
log = logging.getLogger("proxy.server")


malloc_trim = heap.malloc_trim  # module attribute: tests replace it


def should_trim(peak: int, active: int) -> bool:
    """True after a burst: many streams ended since the peak, and at most half remain."""
    return peak - active >= TRIM_MIN_DROP and active <= peak // 2


async def trim_after_bursts(registry: Registry, interval_s: float = TRIM_INTERVAL_S) -> None:
    """Run until cancelled: trim the heap whenever a burst of streams has ended."""
    if malloc_trim is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        active = len(registry.active)
        if should_trim(registry.peak_active, active):
            gc.collect()  # cycles of a thousand ended streams hold whole pymalloc arenas
            released = malloc_trim(0)
            log_event(log, "memory.trimmed", logging.DEBUG, peak=registry.peak_active,
                      active=active, released=bool(released))  # fmt: skip
            registry.peak_active = active
