"""Misbehaving HTTP/1.1 clients on raw loopback sockets, for disconnect and backpressure tests.

Synchronous and bounded: every call has a deadline, and every socket is closed unless it
is handed back to the caller. Use them against the sidecar subprocess directly; against a
server in the test's own event loop, call them through `asyncio.to_thread`.

`peer_state` reads the kernel's TCP state (Linux `TCP_INFO`) instead of the socket, because
reading from a client that "never reads" would unblock the very server under test.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

HOST: Final = "127.0.0.1"
_MAX_HEAD: Final = 64 * 1024
_RECV: Final = 64 * 1024
_TICK_S: Final = 0.05
# Linux tcp_states.h: what TCP_INFO's first byte says about the peer.
_TCP_ESTABLISHED: Final = 1
_TCP_CLOSE: Final = 7
_TCP_CLOSE_WAIT: Final = 8

Ending = Literal["complete", "eof", "reset", "timeout"]
PeerState = Literal["open", "fin", "reset"]


@dataclass
class Received:
    """What a client got: `ending` says how the body ended.

    "complete": the framing was honoured (all of Content-Length, or the last chunk);
    "eof" / "reset": the server closed (FIN) or reset (RST) before the end;
    "timeout": nothing more arrived before the deadline (a hung response, pitfall P1).
    """

    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes  # payload bytes as received (chunk framing left in place)
    ending: Ending

    @property
    def complete(self) -> bool:
        return self.ending == "complete"


def connect(port: int, *, rcvbuf: int | None = None, timeout_s: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:port; `rcvbuf` is set before connecting, to take effect."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout_s)
        sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


def send_request(
    sock: socket.socket,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    keep_alive: bool = False,
) -> None:
    """Write one request; `path` goes out byte for byte."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if not keep_alive:
        lines.append("Connection: close")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def fetch(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    keep_alive: bool = True,
    timeout_s: float = 10.0,
) -> Received:
    """Read one whole response and say whether it was complete or cut (`Received.ending`).

    With `keep_alive` (the default) the end is found from the framing alone, so a server
    that sends a short body and then keeps the connection open is caught as "timeout".
    A body delimited by close counts as complete at EOF: such a cut cannot be seen.
    """
    with connect(port, timeout_s=timeout_s) as sock:
        send_request(sock, path, method=method, headers=headers, keep_alive=keep_alive)
        return _receive(sock, method, time.monotonic() + timeout_s)


def send_raw(port: int, data: bytes, *, timeout_s: float = 10.0) -> Received:
    """Write `data` as it is (a malformed request, say) and read the response to it."""
    with connect(port, timeout_s=timeout_s) as sock:
        sock.sendall(data)
        return _receive(sock, "GET", time.monotonic() + timeout_s)


def read_then_vanish(
    port: int,
    path: str,
    body_bytes: int,
    *,
    close: Literal["fin", "rst"] = "fin",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
) -> Received:
    """Read the head and at most `body_bytes` bytes after it, then go away.

    "fin": shutdown(SHUT_WR), then close: the server first sees EOF. Linux still answers
    bytes it had not read with an RST, as for a browser tab closed mid-download.
    "rst": SO_LINGER 0, then close: the server sees ECONNRESET, never a FIN.
    Returns what was read, with `ending` "timeout" when fewer bytes came in time
    (or "eof"/"reset" if the server went first).
    """
    deadline = time.monotonic() + timeout_s
    sock = connect(port, timeout_s=timeout_s)
    try:
        send_request(sock, path, headers=headers)
        status, head, _ = _read_head(sock, deadline, exact=True)
        body, ending = _read_n(sock, body_bytes, deadline)
        return Received(status, head, body, ending)
    finally:
        if close == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already reset by the server
        sock.close()


def never_read(
    port: int,
    path: str,
    *,
    rcvbuf: int = 4096,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> socket.socket:
    """Send a request on a socket with a tiny SO_RCVBUF and never read from it.

    The server's writes soon block (zero window). The caller owns and must close the
    socket (it is a context manager); check meanwhile with `peer_state` or
    `wait_peer_gone` whether the server aborted it (pitfall P2: a graceful close
    leaves it open, since the FIN waits behind unsent bytes).
    """
    sock = connect(port, rcvbuf=rcvbuf, timeout_s=timeout_s)
    try:
        send_request(sock, path, headers=headers)
    except BaseException:
        sock.close()
        raise
    return sock


def read_slowly(
    port: int,
    path: str,
    rate_bps: int,
    *,
    rcvbuf: int = 8192,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Received:
    """Read a whole response at about `rate_bps` bytes per second.

    A small `rcvbuf` keeps the kernel from absorbing the body, so the server really
    sees a slow client. Stops with "timeout" at `timeout_s`.
    """
    with connect(port, rcvbuf=rcvbuf, timeout_s=timeout_s) as sock:
        send_request(sock, path, headers=headers)
        return _receive(sock, "GET", time.monotonic() + timeout_s, rate_bps=rate_bps)


def peer_state(sock: socket.socket) -> PeerState:
    """How the server left the connection, without reading: "open", "fin" or "reset"."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    state = info[0]
    if state == _TCP_CLOSE_WAIT:
        return "fin"
    if state == _TCP_CLOSE:
        return "reset"
    return "open"


def wait_peer_gone(sock: socket.socket, timeout_s: float) -> PeerState:
    """Poll `peer_state` until it is not "open" or `timeout_s` passed; return the last one."""
    deadline = time.monotonic() + timeout_s
    while (state := peer_state(sock)) == "open" and time.monotonic() < deadline:
        time.sleep(0.02)
    return state


def drain(sock: socket.socket, timeout_s: float) -> tuple[Ending, int]:
    """Read and discard until EOF, RST or `timeout_s`; return how it ended and the byte count."""
    deadline = time.monotonic() + timeout_s
    total = 0
    while True:
        chunk, ending = _recv(sock, _RECV, deadline)
        if ending is not None:
            return ending, total
        total += len(chunk)


# ---------------------------------------------------------------------- reading


def _recv(sock: socket.socket, n: int, deadline: float) -> tuple[bytes, Ending | None]:
    """One recv bounded by `deadline`: data, or an ending ("eof", "reset", "timeout")."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return b"", "timeout"
    sock.settimeout(remaining)
    try:
        data = sock.recv(n)
    except TimeoutError:
        return b"", "timeout"
    except ConnectionResetError:
        return b"", "reset"
    return (data, None) if data else (b"", "eof")


def _read_head(
    sock: socket.socket, deadline: float, *, exact: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and any body bytes read past the head; `exact` reads none past it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > _MAX_HEAD:
            raise AssertionError(f"no end of headers in {buf[:200]!r}")
        chunk, ending = _recv(sock, 1 if exact else _RECV, deadline)
        if ending is not None:
            raise AssertionError(f"{ending} before the end of the headers: {buf[:200]!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, _, status = lines[0].partition(" ")
    assert version.startswith("HTTP/1."), f"bad status line {lines[0]!r}"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        assert colon, f"malformed header line {line!r}"
        headers[name.strip().lower()] = value.strip()
    return int(status[:3]), headers, rest


def _read_n(sock: socket.socket, n: int, deadline: float) -> tuple[bytes, Ending]:
    body = bytearray()
    while len(body) < n:
        chunk, ending = _recv(sock, min(_RECV, n - len(body)), deadline)
        if ending is not None:
            return bytes(body), ending
        body += chunk
    return bytes(body), "complete"


def _receive(
    sock: socket.socket, method: str, deadline: float, *, rate_bps: int | None = None
) -> Received:
    status, headers, body = _read_head(sock, deadline)
    if method == "HEAD" or status in (204, 304) or status < 200:
        return Received(status, headers, b"", "complete")
    length = headers.get("content-length")
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    data = bytearray(body)
    step = max(1, int(rate_bps * _TICK_S)) if rate_bps else _RECV
    started = time.monotonic()
    while True:
        if length is not None and not chunked and len(data) >= int(length):
            return Received(status, headers, bytes(data), "complete")
        if chunked and _chunked_done(data):
            return Received(status, headers, bytes(data), "complete")
        if rate_bps:
            time.sleep(max(0.0, started + len(data) / rate_bps - time.monotonic()))
        chunk, ending = _recv(sock, step, deadline)
        if ending is not None:
            if ending == "eof" and length is None and not chunked:
                ending = "complete"  # delimited by close (RFC 9112 §6.3, rule 8)
            return Received(status, headers, bytes(data), ending)
        data += chunk


def _chunked_done(data: bytearray) -> bool:
    """True once `data` holds a whole chunked body, last chunk and final CRLF included."""
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return False
        size = int(bytes(data[pos:eol]).split(b";")[0].strip() or b"0", 16)
        pos = eol + 2
        if size == 0:  # then trailer lines, if any, and an empty line
            return data[pos : pos + 2] == b"\r\n" or data.find(b"\r\n\r\n", pos) >= 0
        pos += size + 2
        if pos > len(data):
            return False
