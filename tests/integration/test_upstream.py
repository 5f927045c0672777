"""Upstream routes on a real process: forwarding, X-Accel-Redirect, streaming and failures.

`python -m proxy` forwards `/app/` to the example backend (`tests/upstream_backend.py`, a
real process on a free port) and `/down/` to a port nobody listens on; `/protected/` (disk)
and `/protected-s3/` (S3) are internal routes that only the backend's `X-Accel-Redirect`
reaches; both event loops run everything. Responses are read off raw sockets and parsed
strictly (`rawhttp.parse_response`), so framing, exact bytes and a junk body leaking through
are all visible. After each scenario `/stats` must show the outcome counted once and nothing
left active or held.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import (
    FILES,
    SECRET_BYTES,
    S3Server,
    SidecarProcess,
    free_port,
    make_config,
    stop_process,
    wait_until,
)
from tests.faults.clients import fetch, never_read, wait_peer_gone
from tests.integration.httpclient import request
from tests.integration.rawhttp import RawResponse, parse_byteranges, parse_response
from tests.integration.sidecars import (
    Backend,
    error_lines,
    open_stream,
    quiet,
    running_backend,
    running_sidecar,
    wait_for_stats,
)
from tests.upstream_backend import (
    BIG_BODY,
    CUT_LENGTH,
    CUT_SENT,
    GZIP_BODY,
    HELLO,
    HOP_RESPONSE_HEADERS,
    JUNK,
    serve_in_thread,
    stream_body,
)

RESPONSE_TIMEOUT_S = 1.5
IDLE_S = 2.0
MAX_CONNECTIONS = 4
MAX_BODY = 6 * 1024 * 1024
PROTECTED_CACHE = "private, max-age=60"
VIA = "1.1 media-sidecar"
# How far a backend may run ahead of a client that reads nothing: the kernel's socket
# buffers between the three processes (backend send <= 4 MiB, sidecar receive autotuned up
# to tcp_rmem's 32 MiB, sidecar send <= 4 MiB) and a chunk or two; never the whole body.
MAX_LEAD = 48 * 1024 * 1024
HOP_BY_HOP = (
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
)


# ---------------------------------------------------------------------------- processes


def upstream_config(
    media_root: Path, s3_endpoint: str, backend: Backend, event_loop: str = "asyncio"
) -> dict[str, Any]:
    """make_config() plus the `app` and `down` upstreams and their routes."""
    base = make_config(media_root, s3_endpoint)
    return make_config(
        media_root,
        s3_endpoint,
        server={"host": "127.0.0.1", "port": free_port(), "event_loop": event_loop},
        timeouts={"idle": f"{IDLE_S}s", "upstream_first_byte": "5s"},
        logging={"level": "info", "format": "json"},
        upstreams={
            "app": {
                "url": backend.url,
                "connect_timeout": "1s",
                "response_timeout": f"{RESPONSE_TIMEOUT_S}s",
                "max_connections": MAX_CONNECTIONS,
                "max_body_size": "6MiB",
            },
            "down": {"url": f"http://127.0.0.1:{free_port()}", "connect_timeout": "1s"},
        },
        routes=[
            *base["routes"],
            {"prefix": "/app/", "upstream": "app"},
            {"prefix": "/down/", "upstream": "down"},
            {
                "prefix": "/protected/",
                "storage": "local",
                "internal": True,
                "cache_control": PROTECTED_CACHE,
            },
            {"prefix": "/protected-s3/", "storage": "uploads", "internal": True},
        ],
    )


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    with running_backend(tmp_path_factory.mktemp("backend")) as proc:
        yield proc


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def sidecar(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    media_root: Path,
    s3_server: S3Server,
    backend: Backend,
) -> Iterator[SidecarProcess]:
    """The sidecar in front of the backend, on each event loop."""
    config = upstream_config(media_root, s3_server.endpoint, backend, str(request.param))
    with running_sidecar(config, tmp_path_factory.mktemp(f"upstream-{request.param}")) as proc:
        call(proc.port, "GET", "/app/hello")  # the pool and caches exist before baselines
        call(proc.port, "GET", "/media/one.bin")
        yield proc
        assert not error_lines(proc), error_lines(proc)[:3]


# ---------------------------------------------------------------------------- clients


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    return sock.recv(65536)


def _chunked_done(data: bytes) -> bool:
    """True once `data` holds a whole chunked body (no trailers expected)."""
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return False
        size = int(data[pos:eol].split(b";")[0] or b"0", 16)
        pos = eol + 2
        if size == 0:
            return data.find(b"\r\n", pos) >= 0
        pos += size + 2
        if pos > len(data):
            return False


def read_response(sock: socket.socket, method: str, timeout_s: float = 30.0) -> RawResponse:
    """Read one response by its framing (not to EOF) and parse it strictly."""
    deadline = time.monotonic() + timeout_s
    wire = b""
    while b"\r\n\r\n" not in wire:
        chunk = _recv(sock, deadline)
        assert chunk, f"connection closed before the end of the headers: {wire[:300]!r}"
        wire += chunk
    head, _, body = wire.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    status = int(lines[0].split(" ")[1])
    fields = dict(line.split(":", 1) for line in lines[1:])
    length = fields.get("content-length")
    chunked = "chunked" in fields.get("transfer-encoding", "")
    if method != "HEAD" and status not in (204, 304) and status >= 200:
        while True:
            if chunked and _chunked_done(body):
                break
            if not chunked and length is not None and len(body) >= int(length):
                break
            chunk = _recv(sock, deadline)
            if not chunk:
                break  # close-delimited, or cut: parse_response judges
            body += chunk
            wire += chunk
    return parse_response(wire, head_request=method == "HEAD")


def call(
    port: int,
    method: str,
    target: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    *,
    body: bytes | Iterable[bytes] | None = None,
    host: str = "127.0.0.1",
    connection: str | None = "close",
    timeout_s: float = 30.0,
) -> RawResponse:
    """One request on a fresh connection, written byte for byte; an iterable body is chunked."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    fields = headers.items() if isinstance(headers, Mapping) else headers or []
    lines += [f"{k}: {v}" for k, v in fields]
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}")
    elif body is not None:
        lines.append("Transfer-Encoding: chunked")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if isinstance(body, bytes):
            sock.sendall(body)
        elif body is not None:
            for piece in body:
                if piece:
                    sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")
        return read_response(sock, method, timeout_s)


def pieces(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def echo(port: int, target: str = "/app/echo", **kwargs: Any) -> tuple[RawResponse, Any]:
    """A request to the backend's echo endpoint; the reply and what the backend received."""
    reply = call(port, kwargs.pop("method", "GET"), target, **kwargs)
    assert reply.status == 200, (reply.status, reply.body[:300])
    return reply, orjson.loads(reply.body)


def received(seen: Any, name: str) -> list[str]:
    """Every value of header `name` the backend received, in order."""
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


def error_body(reply: RawResponse) -> Any:
    assert (reply.header("Content-Type") or "").startswith("application/json"), reply.headers
    return orjson.loads(reply.body)


def grew(before: Any, after: Any, *path: str) -> int:
    """How much the /stats figure at `path` grew between two readings."""
    a, b = before, after
    for key in path:
        a, b = a[key], b[key]
    return int(b) - int(a)


def backend_stats(backend: Backend) -> Any:
    reply = request(backend.port, "GET", "/_backend/stats")
    assert reply.status == 200
    return orjson.loads(reply.body)


# ---------------------------------------------------------------------------- the backend alone


@pytest.fixture(params=["process", "thread"])
def backend_port(request: pytest.FixtureRequest, backend: Backend) -> Iterator[int]:
    """The example backend as the module's process, or in a thread of this process."""
    if request.param == "process":
        yield backend.port
    else:
        port = free_port()
        with serve_in_thread(port):
            yield port


def test_backend_serves_its_contract(backend_port: int) -> None:
    """The oracle first: the example backend, asked directly, does what the tests assume."""
    hello = call(backend_port, "GET", "/app/hello")
    assert (hello.status, hello.body, hello.header("Content-Length")) == (200, HELLO, "23")
    streamed = call(backend_port, "GET", "/app/stream?size=300000")
    assert streamed.header("Transfer-Encoding") == "chunked"
    assert streamed.header("Content-Length") is None
    assert streamed.body == stream_body(300_000)
    big = call(backend_port, "GET", "/app/big")
    assert big.header("Content-Length") == str(len(BIG_BODY)) and big.body == BIG_BODY
    for path in ("/app/cut", "/app/cut?rst=1", "/app/stream?size=300000&cut=100000"):
        got = fetch(backend_port, path)
        assert not got.complete and got.ending in ("eof", "reset"), (path, got.ending)
    assert len(fetch(backend_port, "/app/cut").body) == CUT_SENT < CUT_LENGTH
    accel = call(backend_port, "GET", "/app/accel/hello.txt")
    assert accel.header("X-Accel-Redirect") == "/protected/hello.txt"
    assert accel.header("Content-Type") is None and JUNK in accel.body
    typed = call(backend_port, "GET", "/app/accel/x?content_type=a/b&cache_control=no-store")
    assert typed.header("Content-Type") == "a/b" and typed.header("Cache-Control") == "no-store"
    upload = call(backend_port, "POST", "/app/upload", body=BIG_BODY[:100_000])
    assert orjson.loads(upload.body) == {
        "length": 100_000,
        "sha256": hashlib.sha256(BIG_BODY[:100_000]).hexdigest(),
    }
    started = time.monotonic()
    slow = call(backend_port, "GET", "/app/slow-headers?delay=0.3")
    assert slow.status == 200 and time.monotonic() - started >= 0.3


# ---------------------------------------------------------------------------- forwarding


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
def test_method_raw_path_query_and_body_are_forwarded(sidecar: SidecarProcess, method: str) -> None:
    target = "/app/echo/a%2Fb%20c/%C3%A9?b=2&a=1&a=3&enc=%2F%20x&empty=&flag"
    body = b"payload-" * 100 if method in ("POST", "PUT", "PATCH") else None
    _, seen = echo(sidecar.port, target, method=method, body=body)
    assert seen["method"] == method
    assert seen["raw_path"] == target  # byte for byte: no decoding, no re-encoding
    assert seen["body_length"] == (len(body) if body else 0)


def test_forwarding_headers_are_added(sidecar: SidecarProcess) -> None:
    reply, seen = echo(
        sidecar.port,
        headers={
            "X-Forwarded-For": "203.0.113.7",
            "X-Request-ID": "upstream-fwd-1",
            "User-Agent": "upstream-tests/1",
            "Authorization": "Bearer end-to-end",
        },
        host="media.example.test:8443",
    )
    assert received(seen, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert received(seen, "X-Forwarded-Proto") == ["http"]
    assert received(seen, "X-Forwarded-Host") == ["media.example.test:8443"]
    assert received(seen, "X-Request-ID") == ["upstream-fwd-1"]
    assert reply.header("X-Request-ID") == "upstream-fwd-1"
    assert received(seen, "Via") == [VIA]
    # End-to-end headers arrive unchanged.
    assert received(seen, "User-Agent") == ["upstream-tests/1"]
    assert received(seen, "Authorization") == ["Bearer end-to-end"]


@pytest.mark.parametrize(
    "names", [("X-Multi", "X-Multi", "X-Multi"), ("X-Multi", "x-multi", "X-MULTI")]
)
def test_repeated_request_headers_all_arrive_in_order(
    sidecar: SidecarProcess, names: tuple[str, ...]
) -> None:
    """Field names are case-insensitive: differently spelled repeats are one field too."""
    values = ["one", "two", "three"]
    _, seen = echo(sidecar.port, headers=list(zip(names, values, strict=True)))
    assert received(seen, "X-Multi") == values


def test_generated_request_id_and_first_forwarded_for(sidecar: SidecarProcess) -> None:
    reply, seen = echo(sidecar.port)
    generated = reply.header("X-Request-ID")
    assert generated and received(seen, "X-Request-ID") == [generated]
    assert received(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert received(seen, "X-Forwarded-Host") == ["127.0.0.1"]


def test_no_headers_of_the_proxys_own_making(sidecar: SidecarProcess) -> None:
    """Only the contract's headers are added: no User-Agent, Accept or Accept-Encoding."""
    _, seen = echo(sidecar.port, headers={"X-Only": "1"})
    added = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "via"}
    transport = {"host", "connection", "content-length"}
    names = {k.lower() for k, _ in seen["headers"]}
    assert names - added - transport == {"x-only"}, seen["headers"]
    assert received(seen, "Content-Length") in ([], ["0"])


def test_hop_by_hop_request_headers_are_dropped(sidecar: SidecarProcess) -> None:
    _, seen = echo(
        sidecar.port,
        headers={
            "X-Client-Hop": "listed in Connection",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Trailer": "X-Client-Trailer",
            "Upgrade": "h2c",
            "X-Client-Kept": "end-to-end",
        },
        connection="keep-alive, X-Client-Hop",
    )
    names = {k.lower() for k, _ in seen["headers"]}
    leaked = names & {*HOP_BY_HOP, "x-client-hop"} - {"connection"}
    assert not leaked, seen["headers"]
    for value in received(seen, "Connection"):  # the sidecar's own hop, if any
        assert "x-client-hop" not in value.lower(), value
    assert received(seen, "X-Client-Kept") == ["end-to-end"]


def test_hop_by_hop_response_headers_are_dropped(sidecar: SidecarProcess) -> None:
    reply, _ = echo(sidecar.port)
    names = {k.lower() for k, _ in reply.headers}
    backend_hops = {name.lower() for name, _ in HOP_RESPONSE_HEADERS} - {"connection"}
    assert not names & backend_hops, reply.headers
    for value in reply.all("Connection"):
        assert "x-backend-hop" not in value.lower(), value
    assert reply.header("X-Backend-Kept") == "kept"
    assert reply.all("Set-Cookie") == [
        "sid=backend-secret; Path=/; HttpOnly",
        "theme=dark; Path=/",
    ]


def test_backend_cookies_never_reach_another_client(sidecar: SidecarProcess) -> None:
    """A shared client session must keep no cookie jar: one user's session is not another's."""
    echo(sidecar.port)  # the backend sets `sid`
    _, seen = echo(sidecar.port)
    assert received(seen, "Cookie") == []
    _, seen = echo(sidecar.port, headers={"Cookie": "mine=1"})
    assert received(seen, "Cookie") == ["mine=1"]


def test_redirects_are_passed_through_not_followed(sidecar: SidecarProcess) -> None:
    reply = call(sidecar.port, "GET", "/app/redirect")
    assert reply.status == 302
    assert reply.header("Location") == "/app/hello"
    assert reply.body == b"moved\n"


def test_content_encoding_passes_through_untouched(sidecar: SidecarProcess) -> None:
    reply = call(sidecar.port, "GET", "/app/gzip", {"Accept-Encoding": "gzip"})
    assert reply.status == 200
    assert reply.header("Content-Encoding") == "gzip"
    assert reply.body == GZIP_BODY  # not decompressed on the way


def test_backend_denial_passes_through(sidecar: SidecarProcess) -> None:
    before = quiet(sidecar)
    reply = call(sidecar.port, "GET", "/app/deny")
    assert reply.status == 403
    assert orjson.loads(reply.body) == {"denied": True}
    assert reply.header("Content-Length") == str(len(reply.body))
    after = quiet(sidecar)
    assert grew(before, after, "connections", "completed") == 1
    assert grew(before, after, "responses", "4xx") == 1


@pytest.mark.parametrize("code", [401, 404, 500, 503])
def test_backend_statuses_pass_through_with_their_body(sidecar: SidecarProcess, code: int) -> None:
    reply = call(sidecar.port, "GET", f"/app/status/{code}")
    assert reply.status == code
    assert orjson.loads(reply.body) == {"status": code, "from": "backend"}
    if code == 401:
        assert reply.header("WWW-Authenticate") == 'Bearer realm="app"'
    quiet(sidecar)


# ---------------------------------------------------------------------------- plain responses


def test_plain_response_streams_byte_exact(sidecar: SidecarProcess) -> None:
    before = quiet(sidecar)
    hello = call(sidecar.port, "GET", "/app/hello")
    assert (hello.status, hello.body) == (200, HELLO)
    assert hello.header("Content-Length") == str(len(HELLO))
    assert hello.header("Content-Type") == "text/plain"
    big = call(sidecar.port, "GET", "/app/big")
    assert big.status == 200
    assert big.header("Content-Length") == str(len(BIG_BODY))
    assert big.header("Transfer-Encoding") is None
    assert big.body == BIG_BODY
    after = quiet(sidecar)
    assert grew(before, after, "connections", "completed") == 2
    assert grew(before, after, "storages", "app", "total") == 2
    assert grew(before, after, "storages", "app", "bytes_sent") == len(HELLO) + len(BIG_BODY)


def test_head_passes_through_without_a_body(sidecar: SidecarProcess) -> None:
    reply = call(sidecar.port, "HEAD", "/app/hello")
    assert reply.status == 200
    assert reply.header("Content-Length") == str(len(HELLO))
    assert reply.body == b""
    assert call(sidecar.port, "GET", "/app/hello").body == HELLO  # the connection pool is fine


@pytest.mark.parametrize("size", [0, 1, 100_000, 3 * 1024 * 1024 + 7])
def test_chunked_response_streams_byte_exact(sidecar: SidecarProcess, size: int) -> None:
    reply = call(sidecar.port, "GET", f"/app/stream?size={size}")
    assert reply.status == 200
    assert reply.header("Content-Length") is None
    assert reply.header("Transfer-Encoding") == "chunked"
    assert reply.body == stream_body(size)
    quiet(sidecar)


def test_keep_alive_client_gets_several_upstream_responses(sidecar: SidecarProcess) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        for target, expected in [
            ("/app/hello", HELLO),
            ("/app/stream?size=70000", stream_body(70_000)),
            ("/media/hello.txt", FILES["hello.txt"]),
            ("/app/hello", HELLO),
        ]:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            reply = read_response(sock, "GET")
            assert (reply.status, reply.body) == (200, expected), target


def test_connection_pool_is_bounded(sidecar: SidecarProcess, backend: Backend) -> None:
    """More concurrent requests than `max_connections`: all served, never more in flight."""
    quiet(sidecar)
    request(backend.port, "POST", "/_backend/reset")
    with ThreadPoolExecutor(max_workers=12) as pool:
        replies = list(
            pool.map(lambda _: call(sidecar.port, "GET", "/app/hello?delay=0.2"), range(12))
        )
    assert [(r.status, r.body) for r in replies] == [(200, HELLO)] * 12
    assert 1 <= backend_stats(backend)["peak"] <= MAX_CONNECTIONS
    quiet(sidecar)


# ---------------------------------------------------------------------------- request bodies


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_request_body_is_streamed_whole(sidecar: SidecarProcess, framing: str) -> None:
    data = BIG_BODY  # 5 MiB, under max_body_size
    body = data if framing == "content-length" else pieces(data, 100_000)
    reply = call(sidecar.port, "POST", "/app/upload", body=body)
    assert reply.status == 200, reply.body[:300]
    assert orjson.loads(reply.body) == {
        "length": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    quiet(sidecar)


def post_too_large(port: int, size: int, chunked: bool) -> RawResponse:
    """POST `size` bytes to /app/upload while reading the answer (which may come early)."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = f"POST /app/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\nConnection: close\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def pump() -> None:
        try:
            for piece in pieces(b"\x00" * size, 256 * 1024):
                sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the sidecar stopped reading or closed: expected once it refused

    writer = threading.Thread(target=pump, daemon=True)
    try:
        sock.sendall(head.encode())
        writer.start()
        return read_response(sock, "POST", timeout_s=10)
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked sendall
        if writer.is_alive():
            writer.join(10)
        sock.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_request_body_over_the_limit_is_413(sidecar: SidecarProcess, chunked: bool) -> None:
    reply = post_too_large(sidecar.port, MAX_BODY + 1024 * 1024, chunked)
    assert reply.status == 413, reply.body[:300]
    assert error_body(reply) == {"error": "request_too_large"}
    quiet(sidecar)
    assert call(sidecar.port, "GET", "/app/hello").body == HELLO


# ---------------------------------------------------------------------------- X-Accel-Redirect


def direct(sidecar: SidecarProcess, key: str, headers: Mapping[str, str] | None = None) -> Any:
    """The same object asked for on the public disk route: what an accel answer must match."""
    return call(sidecar.port, "GET", f"/media/{key}", headers)


def assert_no_junk(reply: RawResponse) -> None:
    assert JUNK not in reply.wire, "the backend's body leaked to the client"
    assert reply.header("X-Accel-Redirect") is None


@pytest.mark.parametrize("key", ["hello.txt", "big.bin", "sub/dir/nested.bin", "empty.bin"])
def test_accel_redirect_serves_the_object(sidecar: SidecarProcess, key: str) -> None:
    before = quiet(sidecar)
    reply = call(sidecar.port, "GET", f"/app/accel/{key}")
    assert reply.status == 200, reply.body[:300]
    assert reply.body == FILES[key]
    assert_no_junk(reply)
    ref = direct(sidecar, key)
    for name in ("Content-Length", "Content-Type", "ETag", "Last-Modified", "Accept-Ranges"):
        assert reply.header(name) == ref.header(name), name
    assert reply.header("Cache-Control") == PROTECTED_CACHE  # the internal route's
    after = quiet(sidecar)
    assert grew(before, after, "connections", "completed") == 2  # accel + direct


@pytest.mark.parametrize(
    "byte_range", ["bytes=0-99", "bytes=100-", "bytes=-50", "bytes=3000-999999", "bytes=5-5"]
)
def test_accel_redirect_honours_the_clients_range(sidecar: SidecarProcess, byte_range: str) -> None:
    reply = call(sidecar.port, "GET", "/app/accel/hello.txt", {"Range": byte_range})
    ref = direct(sidecar, "hello.txt", {"Range": byte_range})
    assert ref.status == 206
    assert reply.status == 206, reply.body[:300]
    assert reply.header("Content-Range") == ref.header("Content-Range")
    assert reply.body == ref.body
    assert_no_junk(reply)


def test_accel_redirect_multi_range(sidecar: SidecarProcess) -> None:
    data = FILES["big.bin"]
    spans = [(0, 9), (100_000, 100_099), (len(data) - 10, len(data) - 1)]
    header = "bytes=" + ",".join(f"{a}-{b}" for a, b in spans)
    reply = call(sidecar.port, "GET", "/app/accel/big.bin", {"Range": header})
    assert reply.status == 206, reply.body[:300]
    assert_no_junk(reply)
    parts = parse_byteranges(reply.header("Content-Type") or "", reply.body)
    assert [(p.first, p.last, p.complete_length) for p in parts] == [
        (a, b, len(data)) for a, b in spans
    ]
    assert [p.body for p in parts] == [data[a : b + 1] for a, b in spans]


@pytest.mark.parametrize("byte_range", [None, "bytes=10-99", "bytes=0-0,3000-3099"])
@pytest.mark.parametrize("key", ["hello.txt", "big.bin"])
def test_accel_redirect_to_an_internal_s3_route(
    sidecar: SidecarProcess, key: str, byte_range: str | None
) -> None:
    headers = {"Range": byte_range} if byte_range else None
    reply = call(sidecar.port, "GET", f"/app/accel/{key}?prefix=/protected-s3/", headers)
    ref = call(sidecar.port, "GET", f"/s3/{key}", headers)
    assert reply.status == ref.status == (206 if byte_range else 200), reply.body[:300]
    assert_no_junk(reply)
    if byte_range and "," in byte_range:
        got = parse_byteranges(reply.header("Content-Type") or "", reply.body)
        want = parse_byteranges(ref.header("Content-Type") or "", ref.body)
        assert [(p.first, p.last, p.body) for p in got] == [(p.first, p.last, p.body) for p in want]
        assert len(got) == 2
    else:
        assert reply.body == ref.body
        assert reply.header("Content-Range") == ref.header("Content-Range")
        assert reply.header("Content-Type") == ref.header("Content-Type")
    for name in ("ETag", "Last-Modified"):
        assert reply.header(name) == ref.header(name), name
    quiet(sidecar)


def test_accel_redirect_conditionals(sidecar: SidecarProcess) -> None:
    ref = direct(sidecar, "hello.txt")
    etag, modified = ref.header("ETag"), ref.header("Last-Modified")
    assert etag and modified
    size = len(FILES["hello.txt"])
    cases: list[tuple[dict[str, str], int]] = [
        ({"If-None-Match": etag}, 304),
        ({"If-None-Match": f'"other", {etag}'}, 304),
        ({"If-Modified-Since": modified}, 304),
        ({"If-None-Match": '"other"'}, 200),
        ({"If-Match": '"other"'}, 412),
        ({"Range": f"bytes={size}-"}, 416),
        ({"Range": "bytes=0-9", "If-Range": '"other"'}, 200),
        ({"Range": "bytes=0-9", "If-Range": etag}, 206),
    ]
    for headers, expected in cases:
        reply = call(sidecar.port, "GET", "/app/accel/hello.txt", headers)
        assert reply.status == expected, (headers, reply.status, reply.body[:200])
        assert reply.status == direct(sidecar, "hello.txt", headers).status, headers
        assert_no_junk(reply)
        if expected == 304:
            assert reply.body == b"" and reply.header("ETag") == etag
        if expected == 416:
            assert reply.header("Content-Range") == f"bytes */{size}"
        if expected == 200:
            assert reply.body == FILES["hello.txt"]


def test_accel_redirect_backend_headers_win(sidecar: SidecarProcess) -> None:
    reply = call(
        sidecar.port,
        "GET",
        "/app/accel/hello.txt?content_type=application/x-report"
        "&disposition=attachment%3B%20filename%3D%22report.txt%22&cache_control=no-store",
    )
    assert reply.status == 200, reply.body[:300]
    assert reply.body == FILES["hello.txt"]
    assert_no_junk(reply)
    assert reply.header("Content-Type") == "application/x-report"
    assert reply.header("Content-Disposition") == 'attachment; filename="report.txt"'
    assert reply.header("Cache-Control") == "no-store"
    ranged = call(
        sidecar.port,
        "GET",
        "/app/accel/hello.txt?content_type=application/x-report",
        {"Range": "bytes=0-9"},
    )
    assert ranged.status == 206 and ranged.body == FILES["hello.txt"][:10]
    assert ranged.header("Content-Type") == "application/x-report"


def test_accel_redirect_head(sidecar: SidecarProcess) -> None:
    reply = call(sidecar.port, "HEAD", "/app/accel/big.bin")
    assert reply.status == 200
    assert reply.header("Content-Length") == str(len(FILES["big.bin"]))
    assert reply.body == b""


def test_accel_redirect_to_a_missing_object_is_404(sidecar: SidecarProcess) -> None:
    reply = call(sidecar.port, "GET", "/app/accel/no-such-file.bin")
    assert reply.status == 404
    assert error_body(reply) == {"error": "not_found"}
    assert_no_junk(reply)


@pytest.mark.parametrize(
    "target",
    ["/media/hello.txt", "/nowhere/hello.txt", "/app/hello", "/s3/hello.txt"],
)
def test_accel_redirect_outside_internal_routes_is_refused(
    sidecar: SidecarProcess, target: str
) -> None:
    path = "/app/accel-bad" if target == "/media/hello.txt" else f"/app/accel-bad?to={target}"
    reply = call(sidecar.port, "GET", path)
    assert reply.status in (404, 502), (reply.status, reply.body[:300])
    assert isinstance(error_body(reply), dict)
    assert_no_junk(reply)
    assert FILES["hello.txt"][:40] not in reply.body and HELLO not in reply.body
    quiet(sidecar)


@pytest.mark.parametrize(
    "target",
    ["/protected/../../secret.txt", "/protected/escape.txt", "/protected/%2e%2e/secret.txt"],
)
def test_accel_redirect_is_confined_like_a_key(sidecar: SidecarProcess, target: str) -> None:
    reply = call(sidecar.port, "GET", f"/app/accel-bad?to={target.replace('%', '%25')}")
    assert reply.status in (400, 404, 502), (reply.status, reply.body[:300])
    assert SECRET_BYTES not in reply.wire
    assert_no_junk(reply)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("key", ["hello.txt", "big.bin", "no-such-file.bin"])
def test_internal_route_is_404_to_clients(sidecar: SidecarProcess, method: str, key: str) -> None:
    reply = call(sidecar.port, method, f"/protected/{key}", {"Range": "bytes=0-9"})
    assert reply.status == 404
    if method == "GET":
        assert error_body(reply) == {"error": "not_found"}
        assert FILES["hello.txt"][:10] not in reply.body


# ---------------------------------------------------------------------------- failures


def test_backend_down_is_502_fast(sidecar: SidecarProcess) -> None:
    before = quiet(sidecar)
    started = time.monotonic()
    reply = call(sidecar.port, "GET", "/down/anything")
    elapsed = time.monotonic() - started
    assert reply.status == 502
    assert error_body(reply) == {"error": "upstream_unavailable"}
    assert elapsed < 1.0, elapsed
    after = quiet(sidecar)
    assert grew(before, after, "connections", "failed") == 1
    assert grew(before, after, "storages", "down", "failed") == 1


def test_slow_backend_headers_are_504_after_response_timeout(sidecar: SidecarProcess) -> None:
    before = quiet(sidecar)
    started = time.monotonic()
    reply = call(sidecar.port, "GET", "/app/slow-headers?delay=10")
    elapsed = time.monotonic() - started
    assert reply.status == 504
    assert error_body(reply) == {"error": "upstream_timeout"}
    assert RESPONSE_TIMEOUT_S * 0.9 <= elapsed < RESPONSE_TIMEOUT_S + 1.0, elapsed
    after = quiet(sidecar)
    assert grew(before, after, "connections", "timed_out") == 1
    assert grew(before, after, "storages", "app", "timed_out") == 1
    assert call(sidecar.port, "GET", "/app/hello").body == HELLO


@pytest.mark.parametrize(
    "path", ["/app/cut", "/app/cut?rst=1", "/app/stream?size=1048576&cut=200000"]
)
def test_backend_cutting_its_body_short_aborts_the_client(
    sidecar: SidecarProcess, path: str
) -> None:
    before = quiet(sidecar)
    got = fetch(sidecar.port, path, timeout_s=10)
    assert got.status == 200
    assert not got.complete, f"a cut body looked complete ({got.ending})"
    assert got.ending in ("eof", "reset"), got.ending  # aborted, not left hanging
    wait_for_stats(
        sidecar,
        lambda s: s["connections"]["failed"] == before["connections"]["failed"] + 1,
        5,
        "failed counted",
    )
    after = quiet(sidecar)
    assert grew(before, after, "connections", "failed") == 1
    assert grew(before, after, "storages", "app", "failed") == 1
    assert grew(before, after, "connections", "completed") == 0


def test_backend_stalling_mid_body_hits_the_idle_timeout(sidecar: SidecarProcess) -> None:
    before = quiet(sidecar)
    started = time.monotonic()
    got = fetch(sidecar.port, "/app/stream?size=1048576&stall=65536&stall_s=8", timeout_s=10)
    elapsed = time.monotonic() - started
    assert got.status == 200 and not got.complete
    assert got.ending in ("eof", "reset"), got.ending
    assert IDLE_S * 0.9 <= elapsed < IDLE_S + 2.0, elapsed
    after = quiet(sidecar)
    assert grew(before, after, "connections", "timed_out") == 1
    assert grew(before, after, "storages", "app", "timed_out") == 1


def test_client_that_never_reads_holds_the_backend_back(
    sidecar: SidecarProcess, backend: Backend
) -> None:
    """Backpressure: the backend gets only kernel buffers ahead; then the idle timeout hits."""
    size = 256 * 1024 * 1024  # a sidecar without backpressure pulls it in about a second
    before = quiet(sidecar)
    start = backend_stats(backend)["streamed"]
    path = f"/app/stream?size={size}&chunk=65536"
    with never_read(sidecar.port, path, rcvbuf=4096) as client:
        time.sleep(IDLE_S * 0.75)
        lead = backend_stats(backend)["streamed"] - start
        assert 0 < lead <= MAX_LEAD, f"the backend ran {lead} bytes ahead of the client"
        wait_for_stats(
            sidecar,
            lambda s: s["connections"]["timed_out"] == before["connections"]["timed_out"] + 1,
            IDLE_S + 3,
            "timed_out counted",
        )
        assert wait_peer_gone(client, 2) == "reset"  # nothing left queued for it
    after = quiet(sidecar)
    assert grew(before, after, "storages", "app", "timed_out") == 1
    assert backend_stats(backend)["streamed"] - start < size
    wait_until(lambda: backend_stats(backend)["in_flight"] == 0, 5, "backend idle")


@pytest.mark.parametrize("path", ["/app/big", "/app/stream?size=5242880"])
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_client_gone_mid_upstream_body_releases_everything(
    sidecar: SidecarProcess, backend: Backend, path: str, how: str
) -> None:
    before = quiet(sidecar)
    client = open_stream(sidecar.port, path)
    client.recv(30_000)
    wait_for_stats(sidecar, lambda s: s["connections"]["active"] == 1, 5, "the stream is active")
    if how == "rst":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        client.shutdown(socket.SHUT_WR)
    client.close()
    gone_at = time.monotonic()
    wait_for_stats(
        sidecar,
        lambda s: (
            s["connections"]["client_disconnected"]
            == before["connections"]["client_disconnected"] + 1
        ),
        IDLE_S * 0.9,  # seen as a disconnect, not as an idle timeout
        "client_disconnected counted",
    )
    assert time.monotonic() - gone_at < 1.0
    after = quiet(sidecar)
    assert after["connections"]["active"] == 0
    assert after["storages"]["app"]["upstream_in_use"] == 0
    for outcome in ("completed", "failed", "timed_out", "rejected"):
        assert grew(before, after, "connections", outcome) == 0, outcome
    assert grew(before, after, "storages", "app", "bytes_sent") > 0
    # The backend's handler ended too: the upstream response was closed, not left pending.
    wait_until(lambda: backend_stats(backend)["in_flight"] == 0, 5, "backend idle")


# ---------------------------------------------------------------------------- admin


def test_stats_list_upstreams_as_storages(sidecar: SidecarProcess) -> None:
    figures = quiet(sidecar)["storages"]
    for name in ("app", "down"):
        assert figures[name]["type"] == "upstream", figures[name]
        for key in ("active", "total", "failed", "timed_out", "bytes_sent", "upstream_in_use"):
            assert isinstance(figures[name][key], int), (name, key)
    assert figures["local"]["type"] == "disk"
    assert "protected" not in figures  # routes are not storages


def test_upstream_survives_a_backend_restart(
    tmp_path: Path, media_root: Path, s3_server: S3Server
) -> None:
    """Pooled connections to a backend that died give 502 fast, then recover on their own."""
    port = free_port()
    with running_backend(tmp_path, port) as first:
        config = upstream_config(media_root, s3_server.endpoint, first)
        with running_sidecar(config, tmp_path) as sidecar:
            assert call(sidecar.port, "GET", "/app/hello").body == HELLO  # a pooled connection
            stop_process(first.proc)
            started = time.monotonic()
            reply = call(sidecar.port, "GET", "/app/hello")
            assert reply.status == 502, reply.body[:300]
            assert error_body(reply) == {"error": "upstream_unavailable"}
            assert time.monotonic() - started < 1.0
            with running_backend(tmp_path, port):
                assert call(sidecar.port, "GET", "/app/hello").body == HELLO
            quiet(sidecar)
            assert not error_lines(sidecar), error_lines(sidecar)[:3]
