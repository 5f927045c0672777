"""A bounded TTL cache of lookups: negative entries, single-flight, stale-if-error.

- A fresh entry answers without a query; an unknown id is remembered as a negative entry
  for a shorter TTL, so a flood of bad ids does not reach the database.
- Single-flight: concurrent misses for one key share one load. The load runs in its own
  task, so a requester that goes away (its handler is cancelled) never cancels the load
  the others wait for.
- Stale-if-error: when a load fails with an `unavailable` error and an expired entry is
  at most `stale_if_error` seconds past its expiry, the expired value is served instead.
- At most `max_entries` entries, least recently used evicted first. `ttl == 0` turns the
  cache off entirely: one load per call, no sharing (the benchmark's "cache off").
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Entry(Generic[V]):
    __slots__ = ("expires", "value")

    def __init__(self, value: V | None, expires: float) -> None:
        self.value = value
        self.expires = expires


class LookupCache(Generic[K, V]):
    """Cache of `load()` results by key; `None` results are negative entries."""

    def __init__(
        self,
        *,
        ttl: float,
        negative_ttl: float,
        max_entries: int,
        stale_if_error: float,
        unavailable: type[BaseException] | tuple[type[BaseException], ...] = (),
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.stale_if_error = stale_if_error
        self._unavailable = unavailable
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._loading: dict[K, asyncio.Future[V | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.hits = self.misses = self.coalesced = self.stale_served = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.max_entries > 0

    def figures(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "hits": self.hits,
            "misses": self.misses,
            "coalesced": self.coalesced,
            "stale_served": self.stale_served,
        }

    def holds(self, key: K, value: V) -> bool:
        """`key` has a fresh entry that is `value` itself; counted as a hit when it does."""
        entry = self._entries.get(key)
        if entry is None or entry.value is not value or entry.expires <= time.monotonic():
            return False
        self._entries.move_to_end(key)
        self.hits += 1
        return True

    async def get(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """The value for `key`, loading it once for all concurrent callers when needed."""
        if not self.enabled:
            self.misses += 1
            return await load()
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry.expires > now:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.value
        pending = self._loading.get(key)
        if pending is not None:
            self.coalesced += 1
            return await asyncio.shield(pending)
        self.misses += 1
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        task = asyncio.create_task(self._load(key, load, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(future)

    async def _load(
        self, key: K, load: Callable[[], Awaitable[V | None]], future: asyncio.Future[V | None]
    ) -> None:
        try:
            value = await load()
        except BaseException as exc:
            stale = self._entries.get(key)
            usable = (
                isinstance(exc, self._unavailable)
                and stale is not None
                and time.monotonic() <= stale.expires + self.stale_if_error
            )
            if usable and stale is not None:
                self.stale_served += 1
                future.set_result(stale.value)
            else:
                future.set_exception(exc)
                future.exception()  # retrieved here: a caller that left must not log it
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            ttl = self.ttl if value is not None else self.negative_ttl
            if ttl > 0:
                self._store(key, value, time.monotonic() + ttl)
            future.set_result(value)
        finally:
            del self._loading[key]

    def _store(self, key: K, value: V | None, expires: float) -> None:
        self._entries[key] = _Entry(value, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    async def close(self) -> None:
        """Cancel loads still running (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
