"""The connection registry: one outcome per request, admission limits, the invariant."""

from __future__ import annotations

import random

import pytest

from proxy.errors import Overloaded
from proxy.registry import (
    CLIENT_DISCONNECTED,
    COMPLETED,
    FAILED,
    OUTCOMES,
    STREAMING,
    TIMED_OUT,
    WAITING_UPSTREAM,
    LatencyWindow,
    Registry,
)


def registry(max_streams: int = 10, per_client: int = 0) -> Registry:
    return Registry(["disk", "s3"], max_streams=max_streams, max_per_client=per_client)


def invariant_holds(reg: Registry) -> bool:
    c = reg.connections()
    return c["total"] == c["active"] + sum(c[o] for o in OUTCOMES)


def test_outcome_is_recorded_once_and_never_goes_negative() -> None:
    reg = registry()
    t = reg.admit("GET", "/media/a", "10.0.0.1", "r1")
    assert reg.connections()["active"] == 1
    assert reg.finish(t, COMPLETED, 200) is True
    assert reg.finish(t, FAILED, 500) is False  # second cleanup is a no-op
    assert reg.finish(t, CLIENT_DISCONNECTED) is False
    c = reg.connections()
    assert (c["active"], c["completed"], c["failed"], c["client_disconnected"]) == (0, 1, 0, 0)
    assert reg.responses == {"2xx": 1, "3xx": 0, "4xx": 0, "5xx": 0}


def test_max_streams_rejects_with_retry_after_and_counts() -> None:
    reg = registry(max_streams=2)
    held = [reg.admit("GET", "/m", "c", f"r{i}") for i in range(2)]
    with pytest.raises(Overloaded) as info:
        reg.admit("GET", "/m", "c", "r3")
    assert info.value.status == 503 and info.value.retry_after_s >= 1
    c = reg.connections()
    assert (c["total"], c["active"], c["rejected"]) == (3, 2, 1)
    assert reg.responses["5xx"] == 1
    reg.finish(held[0], COMPLETED, 200)
    reg.admit("GET", "/m", "c", "r4")  # a freed slot admits again
    assert invariant_holds(reg)


def test_per_client_cap_counts_each_client_separately() -> None:
    reg = registry(max_streams=100, per_client=2)
    a = [reg.admit("GET", "/m", "10.0.0.1", "r") for _ in range(2)]
    with pytest.raises(Overloaded):
        reg.admit("GET", "/m", "10.0.0.1", "r")
    reg.admit("GET", "/m", "10.0.0.2", "r")  # another client is not affected
    reg.finish(a[0], CLIENT_DISCONNECTED)
    reg.finish(a[0], COMPLETED, 200)  # idempotent: must not free a second slot
    reg.admit("GET", "/m", "10.0.0.1", "r")
    with pytest.raises(Overloaded):
        reg.admit("GET", "/m", "10.0.0.1", "r")
    assert invariant_holds(reg)


def test_storage_figures_and_connection_view() -> None:
    reg = registry()
    t = reg.admit("GET", "/s3/big.bin", "127.0.0.1", "rid-1")
    reg.attach(t, "s3", "big.bin", "bytes=0-9")
    assert reg.describe_active()[0]["state"] == WAITING_UPSTREAM
    reg.headers_sent(t)
    t.sent(10)
    view = reg.describe_active()[0]
    assert view["state"] == STREAMING
    assert (view["storage"], view["key"], view["range"], view["bytes_sent"]) == (
        "s3",
        "big.bin",
        "bytes=0-9",
        10,
    )
    assert reg.storage_figures("s3")["active"] == 1
    assert reg.bytes_sent() == 10  # live bytes count before the end
    reg.finish(t, TIMED_OUT)
    figures = reg.storage_figures("s3")
    assert (figures["active"], figures["total"], figures["timed_out"]) == (0, 1, 1)
    assert figures["bytes_sent"] == 10 and reg.bytes_sent() == 10
    assert reg.storage_figures("disk")["total"] == 0


def test_invariant_holds_at_every_step_of_a_random_history() -> None:
    rng = random.Random(7)
    reg = registry(max_streams=20, per_client=5)
    live = []
    for step in range(5000):
        if live and rng.random() < 0.5:
            t = live.pop(rng.randrange(len(live)))
            reg.finish(t, rng.choice(OUTCOMES[:4]), rng.choice((200, 206, 404, 502, None)))
            if rng.random() < 0.3:
                reg.finish(t, COMPLETED, 200)  # double cleanup
        else:
            try:
                live.append(reg.admit("GET", "/m", f"c{rng.randrange(8)}", str(step)))
            except Overloaded:
                pass
        assert invariant_holds(reg)
    for t in live:
        reg.finish(t, COMPLETED, 200)
    assert reg.connections()["active"] == 0 and invariant_holds(reg)
    assert reg._per_client == {}  # no client keeps a phantom slot


def test_latency_percentiles_use_a_bounded_window() -> None:
    window = LatencyWindow(size=100)
    assert window.percentiles_ms() == {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    for i in range(1, 1001):  # only the last 100 (0.901 s .. 1.000 s) remain
        window.add(i / 1000)
    p = window.percentiles_ms()
    assert p["p50"] == pytest.approx(951.0) and p["p99"] == pytest.approx(1000.0)
