"""A fault-injecting S3 stand-in: real HTTP/1.1 on a loopback socket, faults chosen per key.

SeaweedFS cannot be told to stall or cut a body halfway, so fault tests point the sidecar
(in-process or a subprocess) at this server instead. It speaks the part of S3's REST API
that aiobotocore uses for reads, path-style: HEAD bucket, HEAD/GET object with `Range`,
`If-Match`, `If-None-Match`; it checks no signature. It runs on its own event loop in a
daemon thread, so sync tests, async tests and other processes can all reach it.

Counters are read from the test thread while the server thread updates them: plain ints
and list appends are atomic under the GIL, and a test polls them (`wait_until`) anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Final, Literal

from tests.faults.s3_rules import (
    REASONS,
    Request,
    StoredObject,
    error_code,
    error_xml,
    object_response,
    parse_request,
)

BUCKET: Final = "media"
_WRITE_SLICE: Final = 64 * 1024
_MAX_HEAD: Final = 64 * 1024
_RATE_TICK_S: Final = 0.02
_FLUSH_WAIT_S: Final = 1.0
_STOP_TIMEOUT_S: Final = 5.0

StallOn = Literal["GET", "HEAD", "both"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """How requests for one key misbehave; the default is none.

    - `stall_headers`: send nothing for "GET", "HEAD" or "both" requests.
    - `stall_after`: send headers and this many body bytes, then nothing.
    - `cut_after`: send headers and this many body bytes, then close: FIN, or RST if `rst`.
    - `rate_bps`: send the body at this many bytes per second.
    - `status`: answer with this S3 error status (e.g. 500, 503) instead of the object.
    - `stall_s`: how long a stall lasts; None = until the client or `stop()` closes it.
    - `times`: apply to this many requests it changes (see `applies_to`), then serve normally.

    Byte counts are relative to the body of each response, i.e. to the requested range.
    """

    stall_headers: StallOn | None = None
    stall_after: int | None = None
    cut_after: int | None = None
    rst: bool = False
    rate_bps: int | None = None
    status: int | None = None
    stall_s: float | None = None
    times: int | None = None

    def __post_init__(self) -> None:
        if self.stall_after is not None and self.cut_after is not None:
            raise ValueError("stall_after and cut_after exclude each other")
        if self.rst and self.cut_after is None:
            raise ValueError("rst only applies to cut_after")
        for name in ("stall_after", "cut_after", "rate_bps", "times"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.rate_bps == 0:
            raise ValueError("rate_bps must be > 0 (use stall_after=0 for no bytes)")

    def stalls_headers(self, method: str) -> bool:
        """True when a `method` request gets no response headers."""
        return self.stall_headers in (method, "both")

    def applies_to(self, method: str) -> bool:
        """True when it changes a `method` request: HEAD has no body to stall, cut or pace."""
        body = (self.stall_after, self.cut_after, self.rate_bps) != (None, None, None)
        return self.stalls_headers(method) or self.status is not None or (method == "GET" and body)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the fake received it (header names lower-cased)."""

    method: str
    bucket: str
    key: str
    headers: dict[str, str]
    connection: int  # sequence number of its TCP connection: equal means reused
    fault: Fault | None  # the fault applied to it, if any


@dataclass
class _Plan:
    fault: Fault
    left: int | None = field(default=None)


class FakeS3:
    """An S3 endpoint on 127.0.0.1 holding objects of one bucket in memory.

    Use as a context manager, or `start()` / `stop()`. `endpoint` is the `endpoint_url`.
    `requests` logs every request (`len()` counts them). `open_connections` counts TCP
    connections, idle keep-alive ones included; `in_flight` counts requests whose response
    is not finished (stalled ones included): that one returns to 0 once a client has
    released every body it opened, even while its pool keeps idle connections.
    """

    def __init__(self, *, port: int = 0, bucket: str = BUCKET) -> None:
        self.bucket = bucket
        self.port = port
        self.requests: list[RequestRecord] = []
        self.open_connections = 0
        self.connections_total = 0
        self.in_flight = 0
        self.errors: list[BaseException] = []  # bugs of the fake itself: tests assert empty
        self._objects: dict[str, StoredObject] = {}
        self._plans: dict[str, _Plan] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ test-facing API

    @property
    def endpoint(self) -> str:
        """The `endpoint_url` for aiobotocore or the sidecar's storage config."""
        return f"http://127.0.0.1:{self.port}"

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Store `data` under `key` (the whole S3 key, prefix included); return its ETag."""
        etag = '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'
        obj = StoredObject(data, content_type or "binary/octet-stream", etag, time.time())
        with self._lock:
            self._objects[key] = obj
        return etag

    def delete(self, key: str) -> None:
        """Remove `key`; later requests get 404."""
        with self._lock:
            self._objects.pop(key, None)

    def fault(self, key: str, fault: Fault | None = None, /, **kwargs: Any) -> Fault:
        """Make requests for `key` misbehave: `fault(key, cut_after=100)` or a `Fault`."""
        plan = fault if fault is not None else Fault(**kwargs)
        with self._lock:
            self._plans[key] = _Plan(plan, plan.times)
        return plan

    def clear_fault(self, key: str) -> None:
        """Serve `key` normally again."""
        with self._lock:
            self._plans.pop(key, None)

    def reset(self) -> None:
        """Forget objects, faults and the request log (counters of open sockets stay true)."""
        with self._lock:
            self._objects.clear()
            self._plans.clear()
            self.requests.clear()

    def requests_for(self, key: str, method: str | None = None) -> list[RequestRecord]:
        """The logged requests for `key` (and `method`), in arrival order."""
        return [r for r in self.requests if r.key == key and method in (None, r.method)]

    def start(self) -> FakeS3:
        """Bind and serve in a daemon thread; return once the port accepts connections."""
        self._thread = threading.Thread(target=self._run, name="fake-s3", daemon=True)
        self._thread.start()
        if not self._ready.wait(_STOP_TIMEOUT_S):
            raise RuntimeError("fake S3 did not start")
        if self._start_error is not None:
            raise self._start_error
        return self

    def stop(self) -> None:
        """Close the listener and every client socket (RST), then end the thread."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stopping.set)
        thread.join(_STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError("fake S3 thread did not stop")
        self._loop = None

    def __enter__(self) -> FakeS3:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ server thread

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._start_error = exc  # raised by start() if it happened while binding
            self.errors.append(exc)
        finally:
            self._ready.set()  # never leave start() waiting
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, limit=_MAX_HEAD, reuse_address=True
        )
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for writer in list(self._writers):
                _abort(writer)
            # Stalled handlers sleep on a timer: cancel them and let their `finally` count.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        conn_id = self.connections_total
        self.open_connections += 1
        self._writers.add(writer)
        try:
            while await self._serve_one(reader, writer, conn_id):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception as exc:  # a bug in the fake: record it for the test to see
            self.errors.append(exc)
        finally:
            self._writers.discard(writer)
            writer.close()  # FIN after what is queued; a no-op after an abort
            self.open_connections -= 1

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_id: int
    ) -> bool:
        """Answer one request; False when the connection must end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed between requests
        req = parse_request(head)
        if req is None:
            await self._send(writer, 400, {}, error_xml("BadRequest", "malformed request"))
            return False
        length = int(req.headers.get("content-length", "0") or 0)
        if length:
            await reader.readexactly(length)  # no writes supported: discard any body
        fault = self._take_fault(req)
        self.requests.append(
            RequestRecord(req.method, req.bucket, req.key, req.headers, conn_id, fault)
        )
        self.in_flight += 1
        try:
            return await self._respond(req, fault, reader, writer)
        finally:
            self.in_flight -= 1

    def _take_fault(self, req: Request) -> Fault | None:
        with self._lock:
            plan = self._plans.get(req.key) if req.key else None
            if plan is None or plan.left == 0 or not plan.fault.applies_to(req.method):
                return None
            if plan.left is not None:
                plan.left -= 1
            return plan.fault

    async def _respond(
        self,
        req: Request,
        fault: Fault | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        keep = req.headers.get("connection", "").lower() != "close"
        if req.method not in ("GET", "HEAD"):
            body = error_xml("NotImplemented", f"{req.method} is not supported by the fake")
            await self._send(writer, 501, {}, body)
            return False
        if fault is not None and fault.stalls_headers(req.method):
            if not await _stall(reader, fault.stall_s):
                return False
        if req.bucket != self.bucket:
            await self._error(writer, req, 404, "NoSuchBucket", "The bucket does not exist")
            return keep
        if not req.key:
            if req.method == "GET":  # ListObjects: not faked, so say so rather than lie
                await self._error(writer, req, 501, "NotImplemented", "listing is not faked")
                return keep
            await self._send(writer, 200, {"x-amz-bucket-region": "us-east-1"}, b"", head=True)
            return keep  # HEAD bucket: the health probe
        if fault is not None and fault.status is not None:
            await self._error(writer, req, fault.status, error_code(fault.status), "injected")
            return keep
        with self._lock:
            obj = self._objects.get(req.key)
        if obj is None:
            await self._error(writer, req, 404, "NoSuchKey", "The key does not exist")
            return keep
        status, headers, body = object_response(req, obj)
        if status >= 400:
            code = {412: "PreconditionFailed", 416: "InvalidRange"}[status]
            await self._error(writer, req, status, code, "condition not met", headers)
            return keep
        if req.method == "HEAD" or status == 304:
            await self._send(writer, status, headers, b"", head=True, length=len(body))
            return keep
        await self._send_head(writer, status, headers, len(body))
        return await self._send_body(reader, writer, body, fault) and keep

    async def _send_body(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        body: bytes,
        fault: Fault | None,
    ) -> bool:
        """Send `body` as the fault says; False when the connection must end."""
        limit = len(body)
        if fault is not None:
            for n in (fault.stall_after, fault.cut_after):
                if n is not None:
                    limit = min(limit, n)
        rate = fault.rate_bps if fault is not None else None
        await _write_paced(writer, body[:limit], rate)
        if limit == len(body):
            return True
        assert fault is not None
        if fault.cut_after is not None:
            if fault.rst:
                await _flushed(writer)
                _abort(writer)
            return False  # the caller closes: FIN once the bytes are out
        # A finite stall_after pauses, then the rest follows; an endless one waits for close.
        if not await _stall(reader, fault.stall_s):
            return False
        await _write_paced(writer, body[limit:], rate)
        return True

    async def _error(
        self,
        writer: asyncio.StreamWriter,
        req: Request,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        # S3 sends no body for HEAD errors; botocore then uses the status as the code.
        body = error_xml(code, message, req.key)
        await self._send(writer, status, headers or {}, body, head=req.method == "HEAD")

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        headers: dict[str, str],
        body: bytes,
        *,
        head: bool = False,
        length: int | None = None,
    ) -> None:
        if body and "content-type" not in headers:
            headers = {**headers, "content-type": "application/xml"}
        await self._send_head(writer, status, headers, len(body) if length is None else length)
        if not head:
            writer.write(body)
            await writer.drain()

    async def _send_head(
        self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str], length: int
    ) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines += [
            f"content-length: {length}",
            f"date: {formatdate(usegmt=True)}",
            "server: FakeS3",
            "x-amz-request-id: fake",
            "",
            "",
        ]
        writer.write("\r\n".join(lines).encode("latin-1"))
        await writer.drain()


# ---------------------------------------------------------------------- socket helpers


async def _write_paced(writer: asyncio.StreamWriter, data: bytes, rate_bps: int | None) -> None:
    """Write `data`, at most `rate_bps` bytes per second when given."""
    if rate_bps is None:
        for pos in range(0, len(data), _WRITE_SLICE):
            writer.write(data[pos : pos + _WRITE_SLICE])
            await writer.drain()
        return
    started, sent = time.monotonic(), 0
    step = max(1, int(rate_bps * _RATE_TICK_S))
    while sent < len(data):
        writer.write(data[sent : sent + step])
        await writer.drain()
        sent += min(step, len(data) - sent)
        # Sleep until the schedule allows the bytes sent so far.
        await asyncio.sleep(max(0.0, started + sent / rate_bps - time.monotonic()))


async def _stall(reader: asyncio.StreamReader, stall_s: float | None) -> bool:
    """Send nothing for `stall_s` (None: forever); False if the client closed meanwhile."""
    try:
        async with asyncio.timeout(stall_s):
            while await reader.read(_WRITE_SLICE):
                pass  # ignore anything sent meanwhile; EOF means the client gave up
        return False
    except TimeoutError:
        return True


async def _flushed(writer: asyncio.StreamWriter) -> None:
    """Wait (briefly) until the kernel sent what was written, so an RST comes after it."""
    sock = writer.transport.get_extra_info("socket")
    deadline = time.monotonic() + _FLUSH_WAIT_S
    buf = bytearray(4)
    while time.monotonic() < deadline:
        if writer.transport.get_write_buffer_size() == 0:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
            if struct.unpack("i", buf)[0] == 0:
                return
        await asyncio.sleep(0.005)


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        sock = writer.transport.get_extra_info("socket")
        if sock is not None and sock.fileno() >= 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
