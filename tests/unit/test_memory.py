"""Heap trimming after bursts (when it runs, and that it runs at all on glibc); start-up
objects frozen out of the collector's walks."""

from __future__ import annotations

import asyncio
import gc
import platform

import pytest

from proxy.heap import freeze_startup_objects
from proxy.registry import COMPLETED, Registry
from proxy.web import memory
from proxy.web.memory import should_trim, trim_after_bursts


@pytest.mark.parametrize(
    ("peak", "active", "expected"),
    [
        (0, 0, False),
        (10, 0, False),
        (16, 0, True),
        (1000, 500, True),
        (1000, 501, False),
        (1000, 990, False),
        (40, 20, True),
    ],
)
def test_trims_only_after_a_burst_ended(peak: int, active: int, expected: bool) -> None:
    assert should_trim(peak, active) is expected


def test_malloc_trim_is_found_on_glibc() -> None:
    if platform.libc_ver()[0] == "glibc":
        assert memory.malloc_trim is not None and memory.malloc_trim(0) in (0, 1)


async def test_trimmer_resets_the_peak_after_a_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "malloc_trim", lambda pad: calls.append(pad) or 1)
    reg = Registry(["disk"], max_streams=100, max_per_client=0)
    burst = [reg.admit("GET", "/m", "c", str(i)) for i in range(20)]
    for t in burst[:-2]:
        reg.finish(t, COMPLETED, 200)
    task = asyncio.create_task(trim_after_bursts(reg, interval_s=0.01))
    await asyncio.sleep(0.05)
    task.cancel()
    assert calls == [0] and reg.peak_active == 2  # once, and the peak starts over


def test_freezing_start_up_objects_hides_them_from_collections() -> None:
    """After the freeze a full collection has only the objects made since to walk."""
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 10_000  # the test process's imports
        assert sum(len(gc.get_objects(g)) for g in range(3)) < frozen / 10
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
