"""The soak's clients: one kind of request each, checked against the bytes it must get.

Every action opens its own connection(s) to 127.0.0.1, is bounded by a deadline, and
returns a `Result`: `problem` is None when the answer was exactly what a healthy sidecar
owes (status, bytes, headers, how the body ended), else says what was wrong. Actions whose
answer depends on PostgreSQL or on the backend say so (`depends_on`): the soak stops each
for a while, and judges those answers against that window (test_soak.py).
"""

from __future__ import annotations

import http.client
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import orjson

from proxy.signing import signed_url
from tests.conftest import FILES
from tests.faults import clients
from tests.integration.rawhttp import dechunk, parse_byteranges
from tests.upstream_backend import BIG_BODY, HELLO, stream_body

DEADLINE_S: Final = 10.0  # no answer by then is a hang: always a problem
BIG: Final = "big.bin"
# Every other test file, less the one whose name needs percent-encoding in a request line.
SMALL: Final = tuple(k for k in FILES if k != BIG and " " not in k)
STORAGE_PREFIXES: Final = ("/media/", "/s3/")
# Served from disk after the backend's X-Accel-Redirect (one path segment each).
ACCEL_KEYS: Final = tuple(k for k in SMALL if "/" not in k)
# Lookup routes of the soak's config (test_soak.py) and the files their ids resolve to.
LOOKUPS: Final = (
    ("/api/media/m-hello", "hello.txt"),
    ("/api/media/m-one", "one.bin"),
    ("/api/media/m-hello/nested", "sub/dir/nested.bin"),
    ("/nocache/m-hello", "hello.txt"),
    ("/nocache/m-one", "one.bin"),
    ("/nocache/m-hello/nested", "sub/dir/nested.bin"),
)
HOSTILE_IDS: Final = ("1'%20OR%20'1'='1", "%00", "x" * 10_000, "%C3%A9t%C3%A9", "..%2F..%2Fetc")

# The fake S3's objects (test_soak.py puts them): size, and how each misbehaves. cut.bin is
# bigger than a chunk, so it is streamed and the cut comes after the headers went out.
FAULTY: Final[dict[str, tuple[int, dict[str, object]]]] = {
    "stall.bin": (64 * 1024, {"stall_headers": "both"}),
    "cut.bin": (1024 * 1024, {"cut_after": 300_000}),
    "error.bin": (64 * 1024, {"status": 500}),
    "slow.bin": (64 * 1024, {"rate_bps": 512 * 1024}),
}


@dataclass(frozen=True, slots=True)
class Result:
    kind: str
    status: int
    problem: str | None
    started: float  # time.monotonic()
    elapsed_s: float
    depends_on: str | None = None  # "database" | "backend": may fail while it is away
    error_code: str | None = None  # the JSON body's "error", for error statuses
    ending: str | None = None  # how the body ended (clients.Received.ending)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the sidecar listens, the bytes of the fake S3's objects, the signing key."""

    port: int
    faulty: dict[str, bytes]
    sign_key: bytes
    idle_s: float
    first_byte_s: float


Action = Callable[[Target, random.Random], Result]


def _error_code(body: bytes) -> str | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value.get("error") if isinstance(value, dict) else None


def _expect_whole(got: clients.Received, data: bytes) -> str | None:
    if got.status != 200:
        return f"status {got.status}, not 200"
    if not got.complete:
        return f"body ended {got.ending} after {len(got.body)} of {len(data)} bytes"
    if got.body != data:
        return f"wrong bytes ({len(got.body)} received, {len(data)} expected)"
    return None


def _fetch(target: Target, path: str, **kwargs: object) -> clients.Received:
    return clients.fetch(target.port, path, timeout_s=DEADLINE_S, **kwargs)  # type: ignore[arg-type]


def _result(kind: str, started: float, got: clients.Received, problem: str | None,
            *, depends_on: str | None = None) -> Result:  # fmt: skip
    code = _error_code(got.body) if got.status >= 400 else None
    elapsed = time.monotonic() - started
    return Result(kind, got.status, problem, started, elapsed, depends_on, code, got.ending)


# ---------------------------------------------------------------------------- storages


def whole_file(target: Target, rng: random.Random) -> Result:
    key = rng.choice(SMALL)
    started = time.monotonic()
    got = _fetch(target, rng.choice(STORAGE_PREFIXES) + key)
    return _result("whole", started, got, _expect_whole(got, FILES[key]))


def big_file(target: Target, rng: random.Random) -> Result:
    started = time.monotonic()
    got = _fetch(target, rng.choice(STORAGE_PREFIXES) + BIG)
    return _result("big", started, got, _expect_whole(got, FILES[BIG]))


def one_range(target: Target, rng: random.Random) -> Result:
    data = FILES[BIG]
    first = rng.randrange(len(data))
    last = min(len(data) - 1, first + rng.choice((0, 1, 100, 70_000, 300_000)))
    started = time.monotonic()
    got = _fetch(
        target, rng.choice(STORAGE_PREFIXES) + BIG, headers={"Range": f"bytes={first}-{last}"}
    )
    problem = None
    if got.status != 206 or not got.complete:
        problem = f"status {got.status} ({got.ending}), not a complete 206"
    elif got.headers.get("content-range") != f"bytes {first}-{last}/{len(data)}":
        problem = f"Content-Range {got.headers.get('content-range')!r} for {first}-{last}"
    elif got.body != data[first : last + 1]:
        problem = f"wrong bytes for {first}-{last}"
    return _result("range", started, got, problem)


def two_ranges(target: Target, rng: random.Random) -> Result:
    data = FILES["hello.txt"]
    a = rng.randrange(0, len(data) // 2 - 10)
    b = rng.randrange(len(data) // 2, len(data) - 10)
    spans = [(a, a + rng.randrange(10)), (b, b + rng.randrange(10))]
    spec = ",".join(f"{x}-{y}" for x, y in spans)
    started = time.monotonic()
    got = _fetch(
        target, rng.choice(STORAGE_PREFIXES) + "hello.txt", headers={"Range": f"bytes={spec}"}
    )
    problem = None
    if got.status != 206 or not got.complete:
        problem = f"status {got.status} ({got.ending}), not a complete 206"
    else:
        body = got.body
        if "chunked" in got.headers.get("transfer-encoding", ""):
            body = dechunk(body)
        try:
            parts = parse_byteranges(got.headers.get("content-type", ""), body)
        except AssertionError as exc:
            problem = f"bad multipart body: {exc}"
        else:
            want = [data[x : y + 1] for x, y in spans]
            if [p.body for p in parts] != want:
                problem = f"wrong parts for {spec}"
    return _result("multirange", started, got, problem)


def conditional(target: Target, rng: random.Random) -> Result:
    path = rng.choice(STORAGE_PREFIXES) + rng.choice(SMALL)
    started = time.monotonic()
    first = _fetch(target, path, method="HEAD")
    etag = first.headers.get("etag")
    if first.status != 200 or not etag:
        return _result("conditional", started, first, f"HEAD: status {first.status}, ETag {etag!r}")
    got = _fetch(target, path, headers={"If-None-Match": etag})
    problem = None if got.status == 304 else f"status {got.status} for a matching ETag, not 304"
    return _result("conditional", started, got, problem)


def head(target: Target, rng: random.Random) -> Result:
    key = rng.choice(SMALL)
    started = time.monotonic()
    got = _fetch(target, rng.choice(STORAGE_PREFIXES) + key, method="HEAD")
    length = got.headers.get("content-length")
    problem = None
    if got.status != 200 or length != str(len(FILES[key])):
        problem = f"status {got.status}, Content-Length {length!r} for {len(FILES[key])} bytes"
    return _result("head", started, got, problem)


def keep_alive(target: Target, rng: random.Random) -> Result:
    """Several requests on one connection, as browsers and nginx's upstream keepalive send."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=DEADLINE_S)
    status, problem = 0, None
    try:
        for _ in range(rng.randrange(2, 6)):
            key = rng.choice(SMALL)
            conn.request("GET", rng.choice(STORAGE_PREFIXES) + key)
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
            if status != 200 or body != FILES[key]:
                problem = f"keep-alive request for {key}: status {status}, {len(body)} bytes"
                break
    except (OSError, http.client.HTTPException) as exc:
        problem = f"keep-alive connection failed: {exc!r}"
    finally:
        conn.close()
    return Result("keep-alive", status, problem, started, time.monotonic() - started)


# ---------------------------------------------------------------------------- lookups


def lookup(target: Target, rng: random.Random) -> Result:
    path, key = rng.choice(LOOKUPS)
    started = time.monotonic()
    got = _fetch(target, path)
    return _result("lookup", started, got, _expect_whole(got, FILES[key]), depends_on="database")


def lookup_refused(target: Target, rng: random.Random) -> Result:
    """Unknown ids, a row not ready, hostile ids: 404 or 400 with a JSON error, never a 500."""
    choice = rng.randrange(3)
    if choice == 0:
        path, want = f"/nocache/no-such-{rng.randrange(10**9)}", {404}
    elif choice == 1:
        path, want = "/api/media/m-pending", {404}
    else:
        path, want = "/nocache/" + rng.choice(HOSTILE_IDS), {400, 404}
    started = time.monotonic()
    got = _fetch(target, path)
    problem = None if got.status in want else f"status {got.status} for {path[:40]!r}, not {want}"
    if problem is None and _error_code(got.body) is None:
        problem = f"no JSON error body for {path[:40]!r}"
    return _result("lookup-refused", started, got, problem, depends_on="database")


def signed(target: Target, rng: random.Random) -> Result:
    path = "/signed/m-pic"
    url = signed_url(path, target.sign_key, expires_in_s=60)
    forged = rng.random() < 0.5
    if forged:
        url = url[:-4] + ("AAAA" if not url.endswith("AAAA") else "BBBB")
    started = time.monotonic()
    got = _fetch(target, url)
    if forged:
        problem = None
        if got.status != 403 or b'"reason":"bad_signature"' not in got.body:
            problem = f"forged signature: status {got.status} {got.body[:80]!r}, not 403"
    else:
        problem = _expect_whole(got, FILES["pic.png"])
    return _result("signed", started, got, problem, depends_on="database")


# ---------------------------------------------------------------------------- the backend


def upstream(target: Target, rng: random.Random) -> Result:
    """Through the backend (upstream route): its bodies, chunked ones, an X-Accel-Redirect
    served from disk, and its own 404, each byte for byte."""
    choice = rng.randrange(5)
    if choice == 0:
        path, status, want = "/app/hello", 200, HELLO
    elif choice == 1:
        path, status, want = "/app/big", 200, BIG_BODY
    elif choice == 2:
        size = rng.choice((0, 1, 1000, 200_000))
        path, status, want = f"/app/stream?size={size}", 200, stream_body(size)
    elif choice == 3:
        key = rng.choice(ACCEL_KEYS)
        path, status, want = f"/app/accel/{key}", 200, FILES[key]
    else:
        path, status, want = "/app/status/404", 404, None
    started = time.monotonic()
    got = _fetch(target, path)
    body = got.body
    if got.complete and "chunked" in got.headers.get("transfer-encoding", ""):
        body = dechunk(body)
    problem = None
    if got.status != status or not got.complete:
        problem = f"{path}: status {got.status} ({got.ending}), not a complete {status}"
    elif want is not None and body != want:
        problem = f"{path}: wrong bytes ({len(body)} received, {len(want)} expected)"
    return _result("upstream", started, got, problem, depends_on="backend")


# ---------------------------------------------------------------------------- clients


def vanish(target: Target, rng: random.Random) -> Result:
    """Read part of a big body, then close (FIN) or reset (RST), like a closed browser tab."""
    started = time.monotonic()
    got = clients.read_then_vanish(
        target.port,
        rng.choice(STORAGE_PREFIXES) + BIG,
        rng.randrange(0, 400_000),
        close=rng.choice(("fin", "rst")),
        timeout_s=DEADLINE_S,
    )
    problem = None if got.status == 200 and got.ending != "timeout" else (
        f"status {got.status}, ending {got.ending} before the client left"
    )  # fmt: skip
    return Result("vanish", got.status, problem, started, time.monotonic() - started)


def stalled_reader(target: Target, rng: random.Random) -> Result:
    """Never read: the sidecar must reset the connection once `idle` passes (pitfall P2)."""
    started = time.monotonic()
    with clients.never_read(target.port, rng.choice(STORAGE_PREFIXES) + BIG) as sock:
        state = clients.wait_peer_gone(sock, target.idle_s + 5)
    problem = None if state == "reset" else f"a client that never reads was left {state}"
    return Result("stalled-reader", 0, problem, started, time.monotonic() - started)


def slow_reader(target: Target, rng: random.Random) -> Result:
    key = rng.choice(("hello.txt", "pic.png", "custom.dat"))
    started = time.monotonic()
    got = clients.read_slowly(
        target.port, rng.choice(STORAGE_PREFIXES) + key, 40_000, timeout_s=DEADLINE_S
    )
    return _result("slow-reader", started, got, _expect_whole(got, FILES[key]))


def bad_request(target: Target, rng: random.Random) -> Result:
    """Garbage on the wire, or a path that leaves the root: 400/404 with JSON, never a 500."""
    started = time.monotonic()
    if rng.random() < 0.5:
        got = _fetch(
            target, rng.choice(("/media/../secret", "/s3/%2e%2e/secret.txt", "/media/%00"))
        )
        want = {400, 404}
    else:
        garbage = b"GET /media/one.bin HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n"
        got = clients.send_raw(target.port, garbage, timeout_s=DEADLINE_S)
        want = {400}
    problem = None if got.status in want else f"status {got.status}, not {want}"
    if problem is None and _error_code(got.body) is None:
        problem = "no JSON error body"
    return _result("bad-request", started, got, problem)


# ---------------------------------------------------------------------------- a faulty S3


def faulty_storage(target: Target, rng: random.Random) -> Result:
    """The fake S3 stalls, cuts, fails or trickles: 504, a cut body, 502, the whole body."""
    key = rng.choice(sorted(FAULTY))
    started = time.monotonic()
    got = _fetch(target, "/faulty/" + key)
    elapsed = time.monotonic() - started
    problem = None
    if key == "stall.bin":
        if got.status != 504 or elapsed > target.first_byte_s + 2:
            problem = f"stalled storage: status {got.status} after {elapsed:.1f} s, not a fast 504"
    elif key == "cut.bin":
        if got.status != 200 or got.ending not in ("eof", "reset"):
            problem = f"cut storage body: status {got.status}, ending {got.ending}"
        elif got.body != target.faulty[key][: len(got.body)]:
            problem = "cut storage body: wrong bytes before the cut"
    elif key == "error.bin":
        if got.status != 502 or elapsed > 2:
            problem = f"failing storage: status {got.status} after {elapsed:.1f} s, not a fast 502"
    else:
        problem = _expect_whole(got, target.faulty[key])
    return _result(f"faulty-{key.removesuffix('.bin')}", started, got, problem)


# (weight, action): mostly good traffic, some of every kind of trouble.
MIX: Final[tuple[tuple[int, Action], ...]] = (
    (12, whole_file),
    (1, big_file),
    (8, one_range),
    (3, two_ranges),
    (3, conditional),
    (3, head),
    (3, keep_alive),
    (10, lookup),
    (3, lookup_refused),
    (2, signed),
    (3, vanish),
    (1, stalled_reader),
    (1, slow_reader),
    (1, bad_request),
    (3, faulty_storage),
    (5, upstream),
)
ALL_ACTIONS: Final = tuple(action for _, action in MIX)
# Every kind of Result the actions produce: a soak must see each answered right at least once.
KINDS: Final = (
    "whole", "big", "range", "multirange", "conditional", "head", "keep-alive", "lookup",
    "lookup-refused", "signed", "upstream", "vanish", "stalled-reader", "slow-reader",
    "bad-request",
    *(f"faulty-{key.removesuffix('.bin')}" for key in FAULTY),
)  # fmt: skip


def pick(rng: random.Random) -> Action:
    return rng.choices([a for _, a in MIX], weights=[w for w, _ in MIX])[0]
