"""Whole responses written in one piece, and small files answered from their templates.

A small file's first 200 leaves a template (headers serialized once); later plain GETs and
HEADs of the same path are answered from it after one lstat. These tests make sure that
path is the same product as the full one: bytes, headers, counters, admission, files that
change under it, framing on keep-alive, pipelined and HTTP/1.0 connections, and clients
that never read.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import FILES, S3Server, SidecarProcess, free_port, make_config
from tests.integration.httpclient import request
from tests.integration.sidecars import (
    error_lines,
    logged_events,
    quiet,
    read_until_closed,
    running_sidecar,
    stats,
    wait_for_stats,
)
from tests.pg import PgServer

IDLE_S = 1.5
BIG = 6 * 1024 * 1024 + 7  # whole (chunk_size 8 MiB), far more than the socket buffers


@pytest.fixture(scope="module")
def own_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own-media")
    (root / "small.txt").write_bytes(b"a small file\n" * 10)
    (root / "other.bin").write_bytes(os.urandom(3000))
    (root / "big.bin").write_bytes(os.urandom(BIG))
    (root / "big2.bin").write_bytes(os.urandom(BIG))
    return root


@pytest.fixture(scope="module")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory,
    media_root: Path,
    own_root: Path,
    s3_server: S3Server,
) -> Iterator[SidecarProcess]:
    config = make_config(
        media_root,
        s3_server.endpoint,
        limits={"max_streams": 2, "chunk_size": "8MiB"},
        timeouts={"idle": f"{IDLE_S}s", "upstream_first_byte": "5s"},
        logging={"level": "info", "format": "json"},
    )
    config["storages"]["own"] = {"type": "disk", "root": str(own_root)}
    config["routes"].append({"prefix": "/own/", "storage": "own", "cache_control": "no-cache"})
    with running_sidecar(config, tmp_path_factory.mktemp("whole")) as proc:
        yield proc
        assert not error_lines(proc), error_lines(proc)[:3]


# ------------------------------------------------------------------------- raw HTTP/1.x


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


class Responses:
    """Read responses one after the other from one connection (Content-Length framing)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def next(self, head_request: bool = False) -> tuple[bytes, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"closed before the headers: {self.buf[:200]!r}"
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.decode("latin-1").partition(": ")
            assert name.lower() not in headers, f"{name} twice"
            headers[name.lower()] = value
        length = 0 if head_request else int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            assert self._fill(), "closed inside the body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self) -> bool:
        """The server closed the connection, with nothing more sent."""
        try:
            return not self._fill() and not self.buf
        except ConnectionResetError:
            return True


def get(path: str, extra: str = "", method: str = "GET", version: str = "1.1") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nHost: t\r\n{extra}\r\n".encode()


def fetch(sidecar: SidecarProcess, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    reply = request(sidecar.port, "GET", path, {k.replace("_", "-"): v for k, v in headers.items()})
    return reply.status, reply.headers, reply.body


VARYING = {"x-request-id", "date"}


# ------------------------------------------------------------------------------ tests


def test_repeated_gets_get_the_same_bytes_and_headers_and_are_counted(
    sidecar: SidecarProcess, own_root: Path
) -> None:
    base = quiet(sidecar)
    sock = connect(sidecar.port)
    try:
        sock.sendall(get("/own/small.txt"))
        reader = Responses(sock)
        first = reader.next()
        for _ in range(4):  # the template answers these
            sock.sendall(get("/own/small.txt"))
            again = reader.next()
            assert again[0] == first[0] == b"HTTP/1.1 200 OK"
            assert again[2] == first[2] == (own_root / "small.txt").read_bytes()
            same = {k: v for k, v in again[1].items() if k not in VARYING}
            assert same == {k: v for k, v in first[1].items() if k not in VARYING}
            assert again[1]["x-request-id"] != first[1]["x-request-id"]
    finally:
        sock.close()
    headers = first[1]
    assert headers["content-type"].startswith("text/plain")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-length"] == "130" and "etag" in headers and "last-modified" in headers
    after = quiet(sidecar)
    c0, c1 = base["connections"], after["connections"]
    assert c1["completed"] - c0["completed"] == 5 and c1["total"] - c0["total"] == 5
    s0, s1 = base["storages"]["own"], after["storages"]["own"]
    assert s1["total"] - s0["total"] == 5
    assert s1["bytes_sent"] - s0["bytes_sent"] == 5 * 130
    assert after["responses"]["2xx"] - base["responses"]["2xx"] == 5


def test_a_client_request_id_is_kept_on_the_template_path(sidecar: SidecarProcess) -> None:
    for _ in range(2):
        status, headers, _ = fetch(sidecar, "/own/other.bin", X_Request_ID="trace-123")
        assert status == 200 and headers["x-request-id"] == "trace-123"
    lines = logged_events(sidecar, '"trace-123"', "http.request", 2)
    assert [line["status"] for line in lines if line["event"] == "http.request"] == [200, 200]


def test_the_template_follows_the_file(sidecar: SidecarProcess, own_root: Path) -> None:
    path = own_root / "changing.txt"
    path.write_bytes(b"version one")
    for _ in range(2):
        status, headers, body = fetch(sidecar, "/own/changing.txt")
        assert (status, body) == (200, b"version one")
    etag_one = headers["etag"]
    # Replaced by a new file (another inode), then rewritten in place (same size).
    tmp = own_root / "changing.tmp"
    tmp.write_bytes(b"version two, longer")
    tmp.replace(path)
    status, headers, body = fetch(sidecar, "/own/changing.txt")
    assert (status, body) == (200, b"version two, longer") and headers["etag"] != etag_one
    etag_two = headers["etag"]
    time.sleep(0.01)
    path.write_bytes(b"version 3, a longer")  # same length: mtime tells
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    status, headers, body = fetch(sidecar, "/own/changing.txt")
    assert (status, body) == (200, b"version 3, a longer") and headers["etag"] != etag_two
    # A symlink out of the root in its place is refused, as on the full path.
    outside = own_root.parent / "outside-secret.txt"
    outside.write_bytes(b"secret")
    path.unlink()
    path.symlink_to(outside)
    assert fetch(sidecar, "/own/changing.txt")[0] == 404
    path.unlink()
    assert fetch(sidecar, "/own/changing.txt")[0] == 404
    path.write_bytes(b"back")
    assert fetch(sidecar, "/own/changing.txt")[::2] == (200, b"back")


def test_ranges_and_preconditions_still_decide(sidecar: SidecarProcess, own_root: Path) -> None:
    data = (own_root / "other.bin").read_bytes()
    status, headers, _ = fetch(sidecar, "/own/other.bin")  # the template exists now
    etag = headers["etag"]
    assert fetch(sidecar, "/own/other.bin", If_None_Match=etag)[:1] == (304,)
    assert fetch(sidecar, "/own/other.bin", If_Modified_Since=headers["last-modified"])[0] == 304
    assert fetch(sidecar, "/own/other.bin", If_Match='"other"')[0] == 412
    assert (
        fetch(sidecar, "/own/other.bin", If_Unmodified_Since="Sun, 06 Nov 1994 08:49:37 GMT")[0]
        == 412
    )
    status, headers, body = fetch(sidecar, "/own/other.bin", Range="bytes=10-19")
    assert (status, body, headers["content-range"]) == (206, data[10:20], "bytes 10-19/3000")
    assert fetch(sidecar, "/own/other.bin", Range="bytes=5000-")[0] == 416
    assert fetch(sidecar, "/own/other.bin", If_None_Match='"nope"')[::2] == (200, data)


def test_head_then_get_on_one_connection_keeps_the_framing(
    sidecar: SidecarProcess, own_root: Path
) -> None:
    small = (own_root / "small.txt").read_bytes()
    sock = connect(sidecar.port)
    try:
        reader = Responses(sock)
        for _ in range(2):
            sock.sendall(get("/own/small.txt", method="HEAD"))
            status, headers, _ = reader.next(head_request=True)
            assert status == b"HTTP/1.1 200 OK" and headers["content-length"] == str(len(small))
            sock.sendall(get("/own/small.txt"))  # a body after the HEAD would land here
            status, _, body = reader.next()
            assert status == b"HTTP/1.1 200 OK" and body == small
    finally:
        sock.close()


def test_pipelined_requests_are_answered_in_order(sidecar: SidecarProcess, own_root: Path) -> None:
    small, other = (own_root / "small.txt").read_bytes(), (own_root / "other.bin").read_bytes()
    sock = connect(sidecar.port)
    try:
        sock.sendall(
            get("/own/small.txt")
            + get("/own/other.bin")
            + get("/own/small.txt", method="HEAD")
            + get("/own/missing.bin")
            + get("/own/small.txt", "Range: bytes=0-1\r\n")
        )
        reader = Responses(sock)
        assert reader.next()[2] == small
        assert reader.next()[2] == other
        assert reader.next(head_request=True)[1]["content-length"] == str(len(small))
        status, _, body = reader.next()
        assert status.startswith(b"HTTP/1.1 404") and orjson.loads(body) == {"error": "not_found"}
        status, _, body = reader.next()
        assert status.startswith(b"HTTP/1.1 206") and body == small[:2]
    finally:
        sock.close()


@pytest.mark.parametrize("path", ["/own/small.txt", "/own/missing.bin"])
def test_http_1_0_and_connection_close(sidecar: SidecarProcess, path: str) -> None:
    fetch(sidecar, path)  # a template for the small file
    # HTTP/1.0: the answer is HTTP/1.0 and the connection ends after it.
    sock = connect(sidecar.port)
    try:
        sock.sendall(get(path, version="1.0"))
        reader = Responses(sock)
        status, headers, _ = reader.next()
        assert status.startswith(b"HTTP/1.0 ") and "connection" not in headers
        assert reader.closed()
    finally:
        sock.close()
    # HTTP/1.0 asking for keep-alive gets it, and a second answer on the same connection.
    sock = connect(sidecar.port)
    try:
        reader = Responses(sock)
        for _ in range(2):
            sock.sendall(get(path, "Connection: keep-alive\r\n", version="1.0"))
            status, headers, _ = reader.next()
            assert status.startswith(b"HTTP/1.0 ") and headers["connection"] == "keep-alive"
    finally:
        sock.close()
    # HTTP/1.1 with Connection: close: said so, and closed.
    sock = connect(sidecar.port)
    try:
        sock.sendall(get(path, "Connection: close\r\n"))
        reader = Responses(sock)
        status, headers, _ = reader.next()
        assert status.startswith(b"HTTP/1.1 ") and headers["connection"] == "close"
        assert reader.closed()
    finally:
        sock.close()


def stalled_whole(sidecar: SidecarProcess, path: str) -> socket.socket:
    """Ask for a whole response bigger than every buffer and never read it."""
    sock = connect(sidecar.port, rcvbuf=4096)
    sock.sendall(get(path))
    return sock


@pytest.mark.parametrize(
    "path", ["/own/big.bin", "/own/big2.bin", "/s3/big.bin"], ids=["template", "full", "s3"]
)
def test_a_client_that_never_reads_a_whole_response_is_timed_out(
    sidecar: SidecarProcess, path: str
) -> None:
    if path == "/own/big.bin":  # read once in full, so the template answers the stalled one
        status, _, body = fetch(sidecar, path)
        assert status == 200 and len(body) == BIG
    base = quiet(sidecar)
    sock = stalled_whole(sidecar, path)
    started = time.monotonic()
    try:
        wait_for_stats(
            sidecar,
            lambda s: s["connections"]["timed_out"] == base["connections"]["timed_out"] + 1,
            IDLE_S + 5,
            "timed_out counted",
        )
        assert time.monotonic() - started >= IDLE_S * 0.9
        got, end = read_until_closed(sock, 5)
        assert end == "reset" and got < BIG  # RST: the rest was dropped, never "completed"
    finally:
        sock.close()
    after = quiet(sidecar)
    assert after["connections"]["completed"] == base["connections"]["completed"]
    assert held_fds(after) <= held_fds(base)


def held_fds(s: dict[str, Any]) -> int:
    """Open descriptors, less those kept on purpose: the small-file cache, idle S3
    connections."""
    return int(s["process"]["open_fds"]) - sum(
        int(v.get("upstream_idle", 0)) for v in s["storages"].values()
    )


def test_admission_applies_to_template_requests(sidecar: SidecarProcess) -> None:
    fetch(sidecar, "/own/small.txt")
    base = quiet(sidecar)
    stalled = [stalled_whole(sidecar, "/own/big2.bin") for _ in range(2)]  # max_streams: 2
    try:
        wait_for_stats(sidecar, lambda s: s["connections"]["active"] == 2, 5, "two active")
        status, headers, body = fetch(sidecar, "/own/small.txt")
        assert status == 503 and headers["retry-after"] == "1"
        assert orjson.loads(body) == {"error": "over_capacity"}
    finally:
        for sock in stalled:
            sock.close()
    after = quiet(sidecar)
    assert after["connections"]["rejected"] == base["connections"]["rejected"] + 1
    assert fetch(sidecar, "/own/small.txt")[0] == 200


# ------------------------------------------------------------- lookup routes (PostgreSQL)

DSN_ENV = "TEST_DATABASE_URL"
LOOKUP = "SELECT storage, key, content_type, filename FROM media WHERE id = %(id)s"


@pytest.fixture(scope="module")
def lookup_sidecar(
    tmp_path_factory: pytest.TempPathFactory,
    media_root: Path,
    s3_server: S3Server,
    pg_server: PgServer,
) -> Iterator[tuple[SidecarProcess, PgServer]]:
    pg_server.admin(
        "INSERT INTO media (id, storage, key, content_type, filename) VALUES"
        " ('w-evil', 'local', 'hello.txt', E'text/plain\\r\\nSet-Cookie: stolen=1', NULL),"
        " ('w-evil-name', 'local', 'hello.txt', NULL, E'a\\r\\nb.txt'),"
        " ('w-cached', 'local', 'hello.txt', 'text/x-first', 'first.txt'),"
        " ('w-uncached', 'local', 'hello.txt', 'text/x-first', 'first.txt'),"
        " ('w-uncached-2', 'local', 'hello.txt', 'text/x-first', NULL)"
        " ON CONFLICT (id) DO NOTHING"
    )
    config = make_config(
        media_root,
        s3_server.endpoint,
        server={"host": "127.0.0.1", "port": free_port()},
        database={"dsn_env": DSN_ENV, "pool_max": 2},
        logging={"level": "info", "format": "json"},
    )
    config["routes"] = [
        {"prefix": "/ids/", "lookup": {"query": LOOKUP, "cache_ttl": "600ms"}},
        {"prefix": "/nocache-ids/", "lookup": {"query": LOOKUP, "cache_ttl": 0}},
        *config["routes"],
    ]
    with running_sidecar(
        config, tmp_path_factory.mktemp("whole-db"), {DSN_ENV: pg_server.dsn}
    ) as proc:
        yield proc, pg_server
        assert not error_lines(proc), error_lines(proc)[:3]


def test_a_newline_in_a_database_column_is_a_500_never_a_split_header(
    lookup_sidecar: tuple[SidecarProcess, PgServer],
) -> None:
    sidecar, _ = lookup_sidecar
    for media_id in ("w-evil", "w-evil-name"):
        sock = connect(sidecar.port)
        try:
            sock.sendall(get(f"/ids/{media_id}"))
            status, headers, body = Responses(sock).next()
        finally:
            sock.close()
        assert status.startswith(b"HTTP/1.1 "), status
        assert "set-cookie" not in headers
        if media_id == "w-evil":
            assert status.startswith(b"HTTP/1.1 500") and orjson.loads(body) == {
                "error": "internal_error"
            }
        else:  # the filename is percent-encoded into Content-Disposition: harmless
            assert status.startswith(b"HTTP/1.1 200")
            assert "\r" not in headers["content-disposition"]
    log = sidecar.log.read_text()
    assert '"error":"bad_header"' in log


def test_a_cached_lookup_answers_from_its_template_until_the_row_expires(
    lookup_sidecar: tuple[SidecarProcess, PgServer],
) -> None:
    sidecar, pg = lookup_sidecar
    hello = FILES["hello.txt"]
    before = stats(sidecar)["database"]["cache"]["/ids/"]
    for _ in range(3):
        status, headers, body = fetch(sidecar, "/ids/w-cached")
        assert (status, body, headers["content-type"]) == (200, hello, "text/x-first")
        assert headers["content-disposition"].startswith('inline; filename="first.txt"')
    cache = stats(sidecar)["database"]["cache"]["/ids/"]
    assert cache["misses"] - before["misses"] == 1 and cache["hits"] - before["hits"] == 2
    pg.admin(
        "UPDATE media SET content_type = 'text/x-second', filename = 'second.txt'"
        " WHERE id = 'w-cached'"
    )
    time.sleep(0.8)  # past cache_ttl: the template must not outlive its row
    status, headers, body = fetch(sidecar, "/ids/w-cached")
    assert (status, body, headers["content-type"]) == (200, hello, "text/x-second")
    assert headers["content-disposition"].startswith('inline; filename="second.txt"')
    assert stats(sidecar)["database"]["cache"]["/ids/"]["misses"] - before["misses"] == 2


def uncached_cache(figures: Any) -> Any:
    """The /nocache-ids/ route's cache counters in /stats: its misses count its queries."""
    return figures["database"]["cache"]["/nocache-ids/"]


def test_an_uncached_lookup_reuses_its_template_only_for_the_same_row(
    lookup_sidecar: tuple[SidecarProcess, PgServer],
) -> None:
    """cache_ttl 0: every request queries; the template answers only when the row it was
    made from comes back unchanged, so an edited row shows on the very next request."""
    sidecar, pg = lookup_sidecar
    hello, path = FILES["hello.txt"], "/nocache-ids/w-uncached"
    base = quiet(sidecar)
    sock = connect(sidecar.port)
    try:
        reader = Responses(sock)
        for method in ("GET", "GET", "HEAD", "GET"):  # one connection: framing kept
            sock.sendall(get(path, method=method))
            status, headers, body = reader.next(head_request=method == "HEAD")
            assert status == b"HTTP/1.1 200 OK"
            assert body == (hello if method == "GET" else b"")
            assert headers["content-length"] == str(len(hello))
            assert headers["content-type"] == "text/x-first"
            assert headers["content-disposition"].startswith('inline; filename="first.txt"')
        pg.admin(
            "UPDATE media SET content_type = 'text/x-second', filename = 'second.txt'"
            " WHERE id = 'w-uncached'"
        )
        sock.sendall(get(path))  # no wait: nothing may keep the old row
        status, headers, body = reader.next()
        assert (status, body, headers["content-type"]) == (
            b"HTTP/1.1 200 OK",
            hello,
            "text/x-second",
        )
        assert headers["content-disposition"].startswith('inline; filename="second.txt"')
        pg.admin("UPDATE media SET key = 'one.bin' WHERE id = 'w-uncached'")
        sock.sendall(get(path))
        status, headers, body = reader.next()
        assert (status, body) == (b"HTTP/1.1 200 OK", FILES["one.bin"])
    finally:
        sock.close()
    after = quiet(sidecar)
    cache0, cache1 = uncached_cache(base), uncached_cache(after)
    assert cache1["misses"] - cache0["misses"] == 6 and cache1["hits"] == cache0["hits"] == 0
    c0, c1 = base["connections"], after["connections"]
    assert c1["completed"] - c0["completed"] == 6 and c1["total"] - c0["total"] == 6
    assert after["responses"]["2xx"] - base["responses"]["2xx"] == 6
    sent = after["storages"]["local"]["bytes_sent"] - base["storages"]["local"]["bytes_sent"]
    assert sent == 4 * len(hello) + len(FILES["one.bin"])


def test_an_uncached_template_leaves_ranges_methods_and_errors_to_the_full_path(
    lookup_sidecar: tuple[SidecarProcess, PgServer],
) -> None:
    """Once an uncached lookup's path has a template, a GET or HEAD runs its query before
    anything else; a Range still gets its 206, another method its 405 without a query,
    and a row that is gone its 404: one query per GET or HEAD, none for the POST."""
    sidecar, pg = lookup_sidecar
    hello, path = FILES["hello.txt"], "/nocache-ids/w-uncached-2"
    base = quiet(sidecar)
    sock = connect(sidecar.port)
    try:
        reader = Responses(sock)
        sock.sendall(get(path))  # makes the template
        assert reader.next()[::2] == (b"HTTP/1.1 200 OK", hello)
        sock.sendall(get(path, "Range: bytes=1-3\r\n"))
        status, headers, body = reader.next()
        assert (status, body) == (b"HTTP/1.1 206 Partial Content", hello[1:4])
        assert headers["content-range"] == f"bytes 1-3/{len(hello)}"
        sock.sendall(get(path, "Content-Length: 0\r\n", method="POST"))
        status, headers, body = reader.next()
        assert status == b"HTTP/1.1 405 Method Not Allowed" and headers["allow"] == "GET, HEAD"
        assert orjson.loads(body) == {"error": "method_not_allowed"}
        sock.sendall(get(path, method="HEAD"))  # the template, after its query
        status, headers, body = reader.next(head_request=True)
        assert (status, body) == (b"HTTP/1.1 200 OK", b"")
        assert headers["content-length"] == str(len(hello))
        pg.admin("DELETE FROM media WHERE id = 'w-uncached-2'")
        sock.sendall(get(path))
        status, headers, body = reader.next()
        assert status == b"HTTP/1.1 404 Not Found", status
        assert headers["content-type"] == "application/json"
        assert orjson.loads(body) == {"error": "not_found"}
    finally:
        sock.close()
    after = quiet(sidecar)
    cache0, cache1 = uncached_cache(base), uncached_cache(after)
    assert cache1["misses"] - cache0["misses"] == 4  # GET, Range, HEAD, GET: not the POST
    c0, c1 = base["connections"], after["connections"]
    assert c1["total"] - c0["total"] == 5
    assert after["responses"]["2xx"] - base["responses"]["2xx"] == 3
    assert after["responses"]["4xx"] - base["responses"]["4xx"] == 2
