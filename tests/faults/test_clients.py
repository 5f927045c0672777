"""The misbehaving clients against a tiny threaded server that reports what it saw."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import pytest

from tests.faults import clients

BODY = bytes(range(256)) * 400  # 102,400 bytes
SMALL = BODY[:20_000]  # fits in loopback buffers: the server is never blocked by it
FLOOD_BYTES = 1 << 30


@dataclass
class TinyServer:
    """One thread per connection; each path picks a behaviour, `seen` logs the outcomes."""

    port: int = 0
    seen: list[str] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # bytes the never-read route got out
    _listener: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> TinyServer:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        assert self._listener is not None
        self._listener.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(3)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            path = request.split(b" ")[1].decode()
            getattr(self, "_" + path.strip("/").replace("-", "_"))(conn)

    @staticmethod
    def _head(conn: socket.socket, length: int) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)

    def _full(self, conn: socket.socket) -> None:
        self._head(conn, len(BODY))
        conn.sendall(BODY)

    def _chunked(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

    def _chunked_cut(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

    def _short_fin(self, conn: socket.socket) -> None:
        self._head(conn, len(BODY))
        conn.sendall(BODY[:1000])

    def _short_rst(self, conn: socket.socket) -> None:
        self._short_fin(conn)
        time.sleep(0.1)  # let the bytes arrive before the reset
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _short_hang(self, conn: socket.socket) -> None:
        self._short_fin(conn)  # then keep the connection open, as a keep-alive server would
        self._stop.wait(2)

    def _small(self, conn: socket.socket) -> None:
        """Send SMALL whole, then report how the client went away: "eof" or "reset"."""
        self._head(conn, len(SMALL))
        conn.sendall(SMALL)
        try:
            self.seen.append("eof" if conn.recv(1) == b"" else "data")
        except ConnectionResetError:
            self.seen.append("reset")

    def _flood_abort(self, conn: socket.socket) -> None:
        self._flood(conn, abort=True)

    def _flood_close(self, conn: socket.socket) -> None:
        self._flood(conn, abort=False)

    def _flood(self, conn: socket.socket, *, abort: bool) -> None:
        """Write until the client's window is shut for 0.3 s, then abort or close politely."""
        # A small send buffer, so what gets out is bounded by the client's receive buffer.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        self._head(conn, FLOOD_BYTES)
        conn.settimeout(0.3)
        sent = 0
        try:
            while True:
                sent += conn.send(BODY)
        except TimeoutError:
            pass
        self.sent.append(sent)
        if abort:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture
def server() -> Iterator[TinyServer]:
    tiny = TinyServer().start()
    yield tiny
    tiny.stop()


def wait_for(predicate: Callable[[], object], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("path", "ending", "body"),
    [
        ("/full", "complete", BODY),
        ("/chunked", "complete", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        ("/chunked-cut", "eof", b"5\r\nhello\r\n"),
        ("/short-fin", "eof", BODY[:1000]),
        ("/short-rst", "reset", BODY[:1000]),
    ],
)
def test_fetch_tells_complete_from_cut(
    server: TinyServer, path: str, ending: str, body: bytes
) -> None:
    got = clients.fetch(server.port, path, timeout_s=3)
    assert (got.status, got.ending, got.body) == (200, ending, body)
    assert got.complete is (ending == "complete")


def test_fetch_catches_a_short_body_left_open(server: TinyServer) -> None:
    started = time.monotonic()
    got = clients.fetch(server.port, "/short-hang", timeout_s=0.5)
    assert (got.ending, got.body) == ("timeout", BODY[:1000])
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(("close", "server_sees"), [("fin", "eof"), ("rst", "reset")])
def test_read_then_vanish(
    server: TinyServer, close: Literal["fin", "rst"], server_sees: str
) -> None:
    got = clients.read_then_vanish(server.port, "/small", 777, close=close)
    assert (got.status, got.body, got.ending) == (200, SMALL[:777], "complete")
    wait_for(lambda: server.seen)
    assert server.seen == [server_sees]


def test_never_read_holds_the_server_until_it_aborts(server: TinyServer) -> None:
    with clients.never_read(server.port, "/flood-abort") as sock:
        assert clients.peer_state(sock) == "open"
        assert clients.wait_peer_gone(sock, 3.0) == "reset"
        assert clients.drain(sock, 1.0)[0] == "reset"
    # The tiny receive buffer held the server back (default buffers take 100+ KiB).
    assert server.sent and server.sent[0] < 64 * 1024


def test_never_read_sees_a_polite_close_as_still_open(server: TinyServer) -> None:
    # Pitfall P2: the FIN waits behind unsent bytes, so the connection stays established.
    with clients.never_read(server.port, "/flood-close") as sock:
        wait_for(lambda: server.sent)
        assert clients.wait_peer_gone(sock, 0.5) == "open"
        # Reading lets the data and then the FIN through.
        assert clients.drain(sock, 10.0)[0] == "eof"
        assert clients.peer_state(sock) == "fin"


def test_read_slowly_keeps_its_pace(server: TinyServer) -> None:
    started = time.monotonic()
    got = clients.read_slowly(server.port, "/full", 200_000, timeout_s=5)
    elapsed = time.monotonic() - started
    assert got.complete and got.body == BODY
    assert 0.4 <= elapsed < 2.0, elapsed  # 102,400 bytes at 200 kB/s: about 0.5 s


def test_read_slowly_gives_up_at_its_deadline(server: TinyServer) -> None:
    got = clients.read_slowly(server.port, "/full", 20_000, timeout_s=0.5)
    assert got.ending == "timeout" and 0 < len(got.body) < len(BODY)
