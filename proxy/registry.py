"""Every media request from admission to its one outcome (SPEC §4), and the figures of /stats.

The registry is the single place where counters change. Each request is a `Tracked`
entry; `Registry.finish` records its outcome exactly once (later calls are no-ops), and
moves it from `active` to that outcome in one synchronous step, so the invariant

    total = active + completed + failed + client_disconnected + timed_out + rejected

holds at every instant an observer on the event loop can see.
"""

from __future__ import annotations

import itertools
import time
from array import array
from typing import Any, Final

from proxy.errors import Overloaded

COMPLETED: Final = "completed"
FAILED: Final = "failed"
CLIENT_DISCONNECTED: Final = "client_disconnected"
TIMED_OUT: Final = "timed_out"
REJECTED: Final = "rejected"
OUTCOMES: Final = (COMPLETED, FAILED, CLIENT_DISCONNECTED, TIMED_OUT, REJECTED)

# Connection states shown by /stats/connections.
RESOLVING: Final = "resolving"
WAITING_UPSTREAM: Final = "waiting_upstream"
STREAMING: Final = "streaming"

LATENCY_WINDOW: Final = 4096  # recent samples kept for percentiles (a ring, fixed memory)
RETRY_AFTER_S: Final = 1


class LatencyWindow:
    """The most recent samples in a fixed ring; percentiles are computed when asked."""

    __slots__ = ("_next", "_samples", "_size")

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        self._samples = array("d")
        self._size = size
        self._next = 0

    def add(self, seconds: float) -> None:
        if len(self._samples) < self._size:
            self._samples.append(seconds)
        else:
            self._samples[self._next] = seconds
            self._next = (self._next + 1) % self._size

    def percentiles_ms(self) -> dict[str, float]:
        """p50/p95/p99 in milliseconds (nearest rank); zeros before the first sample."""
        ordered = sorted(self._samples)
        if not ordered:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
        last = len(ordered) - 1
        return {
            name: round(ordered[min(last, int(q * len(ordered)))] * 1000, 3)
            for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
        }


class StorageFigures:
    """Per-storage counters of /stats (`upstream_in_use` is read from the storage itself)."""

    __slots__ = ("active", "bytes_sent", "failed", "first_byte", "timed_out", "total")

    def __init__(self) -> None:
        self.active = 0
        self.total = 0
        self.failed = 0
        self.timed_out = 0
        self.bytes_sent = 0
        self.first_byte = LatencyWindow()


class Tracked:
    """One media request: who asked for what, how far it got, and (once) how it ended."""

    __slots__ = (
        "aborted",
        "bytes_sent",
        "client",
        "first_byte_s",
        "id",
        "key",
        "last_progress",
        "method",
        "outcome",
        "path",
        "range",
        "request",
        "request_id",
        "started",
        "state",
        "status",
        "storage",
    )

    def __init__(self, conn_id: int, method: str, path: str, client: str, request_id: str) -> None:
        self.id = conn_id
        self.method = method
        self.path = path
        self.client = client
        self.request_id = request_id
        self.storage: StorageFigures | None = None
        self.key = ""
        self.range: str | None = None
        self.state = RESOLVING
        self.started = self.last_progress = time.monotonic()
        self.first_byte_s: float | None = None
        self.bytes_sent = 0
        self.status: int | None = None
        self.outcome: str | None = None
        self.request: Any = None  # the aiohttp request (its .task), for cleanup at shutdown
        self.aborted: str | None = None  # why the server cut it (e.g. "shutdown_timeout")

    def sent(self, n: int) -> None:
        """Count `n` body bytes handed to the client (progress for idle_s)."""
        self.bytes_sent += n
        self.last_progress = time.monotonic()


class Registry:
    """Admission control and the outcome of every media request."""

    def __init__(self, storages: list[str], *, max_streams: int, max_per_client: int) -> None:
        self.max_streams = max_streams
        self.max_per_client = max_per_client
        self.active: dict[int, Tracked] = {}
        self.total = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.responses = {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
        self.finished_bytes = 0  # body bytes of finished requests (active ones add theirs)
        self.peak_active = 0  # highest `active` since someone last reset it (memory trimming)
        self.first_byte = LatencyWindow()
        self.storages = {name: StorageFigures() for name in storages}
        self._names = {id(fig): name for name, fig in self.storages.items()}
        self._per_client: dict[str, int] = {}
        self._ids = itertools.count(1)
        self.started = time.monotonic()

    def reconfigure(self, storages: list[str], *, max_streams: int, max_per_client: int) -> None:
        """New limits and storages after a reload; counters and active requests carry on."""
        self.max_streams = max_streams
        if max_per_client != self.max_per_client:  # recount who holds what now
            self._per_client = {}
            if max_per_client:
                for tracked in self.active.values():
                    held = self._per_client.get(tracked.client, 0)
                    self._per_client[tracked.client] = held + 1
            self.max_per_client = max_per_client
        for name in storages:
            if name not in self.storages:
                self.storages[name] = StorageFigures()
        self._names = {id(fig): name for name, fig in self.storages.items()}

    def has_room(self, client: str) -> bool:
        """`admit` would take a request from `client` now."""
        if len(self.active) >= self.max_streams:
            return False
        return not self.max_per_client or self._per_client.get(client, 0) < self.max_per_client

    def admit(self, method: str, path: str, client: str, request_id: str) -> Tracked:
        """Register a request, or count it `rejected` and raise Overloaded (503)."""
        tracked = Tracked(next(self._ids), method, path, client, request_id)
        self.total += 1
        if len(self.active) >= self.max_streams:
            self._reject(tracked, "max_streams reached")
        if self.max_per_client:
            held = self._per_client.get(client, 0)
            if held >= self.max_per_client:
                self._reject(tracked, "max_streams_per_client reached")
            self._per_client[client] = held + 1
        active = self.active
        active[tracked.id] = tracked
        if len(active) > self.peak_active:
            self.peak_active = len(active)
        return tracked

    def _reject(self, tracked: Tracked, reason: str) -> None:
        tracked.outcome = REJECTED
        tracked.status = 503
        self.outcomes[REJECTED] += 1
        self.responses["5xx"] += 1
        raise Overloaded(reason, retry_after_s=RETRY_AFTER_S)

    def attach(self, tracked: Tracked, storage: str, key: str, byte_range: str | None) -> None:
        """Name the storage and key a request reads (it now counts for that storage)."""
        figures = self.storages[storage]
        if tracked.storage is not None:  # re-attached (X-Accel-Redirect): leave the first
            tracked.storage.active -= 1
        figures.active += 1
        figures.total += 1
        tracked.storage = figures
        tracked.key = key
        tracked.range = byte_range
        tracked.state = WAITING_UPSTREAM

    def headers_sent(self, tracked: Tracked) -> None:
        """The response headers are being handed to the client: the stream has started."""
        now = time.monotonic()
        tracked.state = STREAMING
        tracked.first_byte_s = elapsed = now - tracked.started
        tracked.last_progress = now
        self.first_byte.add(elapsed)
        if tracked.storage is not None:
            tracked.storage.first_byte.add(elapsed)

    def finish(self, tracked: Tracked, outcome: str, status: int | None = None) -> bool:
        """Record the outcome once; False (and nothing changes) if it was already recorded."""
        if tracked.outcome is not None:
            return False
        tracked.outcome = outcome
        if status is not None:
            tracked.status = status
            self.responses[_STATUS_CLASS[min(max(status // 100, 2), 5)]] += 1
        del self.active[tracked.id]
        # The request holds its Tracked (request[TRACKED]): dropping the link back leaves no
        # cycle, so the request and all it holds (headers, URL, writer) are freed by their
        # reference counts here, not found later by the cycle collector's pauses.
        tracked.request = None
        self.outcomes[outcome] += 1
        self.finished_bytes += tracked.bytes_sent
        if self.max_per_client:
            held = self._per_client.pop(tracked.client, 1) - 1
            if held > 0:
                self._per_client[tracked.client] = held
        figures = tracked.storage
        if figures is not None:
            figures.active -= 1
            figures.bytes_sent += tracked.bytes_sent
            if outcome == FAILED:
                figures.failed += 1
            elif outcome == TIMED_OUT:
                figures.timed_out += 1
        return True

    # ------------------------------------------------------------------ views for the admin API

    def connections(self) -> dict[str, int]:
        """The outcome counters, `active` and `total`, read in one step (the invariant holds)."""
        return {"active": len(self.active), "total": self.total, **self.outcomes}

    def bytes_sent(self) -> int:
        return self.finished_bytes + sum(t.bytes_sent for t in self.active.values())

    def storage_figures(self, name: str) -> dict[str, Any]:
        figures = self.storages[name]
        live = sum(t.bytes_sent for t in self.active.values() if t.storage is figures)
        return {
            "active": figures.active,
            "total": figures.total,
            "failed": figures.failed,
            "timed_out": figures.timed_out,
            "bytes_sent": figures.bytes_sent + live,
            "first_byte_ms": figures.first_byte.percentiles_ms(),
        }

    def oldest_active_s(self) -> float:
        if not self.active:
            return 0.0
        oldest = min(t.started for t in self.active.values())
        return round(time.monotonic() - oldest, 3)

    def describe_active(self) -> list[dict[str, Any]]:
        """Each active request as /stats/connections shows it, oldest first."""
        now = time.monotonic()
        return [
            {
                "id": t.id,
                "request_id": t.request_id,
                "method": t.method,
                "path": t.path,
                "client": t.client,
                "storage": self._names.get(id(t.storage)) if t.storage else None,
                "key": t.key or None,
                "range": t.range,
                "state": t.state,
                "bytes_sent": t.bytes_sent,
                "age_s": round(now - t.started, 3),
                "idle_s": round(now - t.last_progress, 3),
            }
            for t in sorted(self.active.values(), key=lambda t: t.started)
        ]


_STATUS_CLASS: Final = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
