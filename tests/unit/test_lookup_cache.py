"""The lookup cache: TTLs, negative entries, single-flight, stale-if-error, bounds."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import DatabaseUnavailable
from proxy.resolver.cache import LookupCache


def cache(**kw: float) -> LookupCache[str, str]:
    args = {"ttl": 10.0, "negative_ttl": 1.0, "max_entries": 100, "stale_if_error": 60.0}
    args.update(kw)
    return LookupCache(
        ttl=args["ttl"],
        negative_ttl=args["negative_ttl"],
        max_entries=int(args["max_entries"]),
        stale_if_error=args["stale_if_error"],
        unavailable=DatabaseUnavailable,
    )


class Loader:
    """Counts loads; each load waits for `gate` (if set) and returns `value`."""

    def __init__(self, value: str | None = "row") -> None:
        self.value = value
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.error: BaseException | None = None

    async def __call__(self) -> str | None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.value


async def test_hit_after_miss_and_expiry_reloads(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("proxy.resolver.cache.time.monotonic", lambda: now[0])
    c, load = cache(), Loader()
    assert await c.get("a", load) == "row" and await c.get("a", load) == "row"
    assert load.calls == 1 and (c.hits, c.misses) == (1, 1)
    now[0] += 10.5
    assert await c.get("a", load) == "row"
    assert load.calls == 2


async def test_unknown_ids_are_cached_negatively_for_the_shorter_ttl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    monkeypatch.setattr("proxy.resolver.cache.time.monotonic", lambda: now[0])
    c, load = cache(), Loader(value=None)
    assert await c.get("missing", load) is None
    assert await c.get("missing", load) is None
    assert load.calls == 1
    now[0] += 1.5  # past negative_ttl, well before ttl
    await c.get("missing", load)
    assert load.calls == 2


async def test_concurrent_misses_share_one_load() -> None:
    c, load = cache(), Loader()
    load.gate = asyncio.Event()
    waiters = [asyncio.create_task(c.get("a", load)) for _ in range(100)]
    await asyncio.sleep(0.01)
    load.gate.set()
    assert await asyncio.gather(*waiters) == ["row"] * 100
    assert load.calls == 1 and c.coalesced == 99


async def test_a_requester_that_leaves_does_not_cancel_the_shared_load() -> None:
    c, load = cache(), Loader()
    load.gate = asyncio.Event()
    first = asyncio.create_task(c.get("a", load))
    second = asyncio.create_task(c.get("a", load))
    await asyncio.sleep(0.01)
    first.cancel()  # the client of the request that started the load went away
    await asyncio.sleep(0.01)
    load.gate.set()
    assert await second == "row"
    assert first.cancelled() and load.calls == 1


async def test_errors_reach_every_waiter_and_are_not_cached() -> None:
    c, load = cache(), Loader()
    load.error = DatabaseUnavailable("down")
    load.gate = asyncio.Event()
    waiters = [asyncio.create_task(c.get("a", load)) for _ in range(3)]
    await asyncio.sleep(0.01)
    load.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, DatabaseUnavailable) for r in results)
    load.error, load.gate = None, None
    assert await c.get("a", load) == "row" and load.calls == 2


async def test_stale_if_error_serves_an_expired_row_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    monkeypatch.setattr("proxy.resolver.cache.time.monotonic", lambda: now[0])
    c, load = cache(ttl=10, stale_if_error=30), Loader()
    await c.get("a", load)
    load.error = DatabaseUnavailable("down")
    now[0] = 25.0  # expired 15 s ago: within stale_if_error
    assert await c.get("a", load) == "row" and c.stale_served == 1
    now[0] = 41.0  # expired 31 s ago: too old
    with pytest.raises(DatabaseUnavailable):
        await c.get("a", load)
    load.error = ValueError("a bug, not an outage")
    now[0] = 12.0
    with pytest.raises(ValueError):  # only "unavailable" errors may serve stale rows
        await c.get("a", load)


async def test_entries_are_bounded_lru() -> None:
    c, load = cache(max_entries=3), Loader()
    for key in "abcd":
        await c.get(key, load)
    await c.get("b", load)  # hit: b becomes most recent
    assert c.figures()["entries"] == 3
    calls = load.calls
    await c.get("a", load)  # evicted (oldest): loads again
    assert load.calls == calls + 1


async def test_ttl_zero_turns_the_cache_off() -> None:
    c, load = cache(ttl=0), Loader()
    load.gate = asyncio.Event()
    waiters = [asyncio.create_task(c.get("a", load)) for _ in range(5)]
    await asyncio.sleep(0.01)
    load.gate.set()
    await asyncio.gather(*waiters)
    assert load.calls == 5 and c.figures()["entries"] == 0
