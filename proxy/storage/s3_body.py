"""One ranged GET's body from S3: reads that follow the client, detach-on-stall, handover.

Kept apart from the storage (s3.py), which opens bodies and owns the client and its pool.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import contextlib
import os
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from botocore.exceptions import BotoCoreError, ReadTimeoutError

from proxy.errors import NotFound, ObjectChanged, StorageError, StorageTimeout
from proxy.model import ByteRange, ObjectMeta

if TYPE_CHECKING:
    from proxy.storage.s3 import S3Storage

_SELECTOR_TRANSPORT: Final[type[Any]] = getattr(
    asyncio.selector_events, "_SelectorSocketTransport", type(None)
)
# aiohttp's client reader buffers up to 2x this before pausing the socket (256 KiB by
# default: ~730 KiB RSS per stalled stream here, pitfalls P12). Each read(n) raises the
# mark to n, so a reading client keeps its own chunk size: 16 KiB measured as fast as the
# default for 64 KiB reads, and half the memory of a stalled stream before it detaches.
READ_BUFSIZE: Final = 16 * 1024
FAST_READ: Final = 64 * 1024  # the engine's full chunk (limits.chunk_size default)
FAST_SOCKET_READ: Final = 256 * 1024  # asyncio's own max_size
# Big socket reads only once a body has delivered this much: at the start every client
# looks fast (kernel buffers take its first chunks), and 256 KiB recvs for hundreds of
# streams starting at once were most of the per-stream peak (P12; 219 → 167 to 179 KiB at N=200).
FAST_AFTER: Final = 4 * 1024 * 1024


class S3Body:
    """One ranged GET's body; detaches from S3 while the client stalls (pitfalls P11, P12).

    After each read a timer is armed; if the next read has not started when it fires, the
    S3 body is closed and dropped (its connection and buffered bytes are freed), and the
    next read re-GETs the rest with If-Match, so two versions are never spliced. Each
    resume doubles this body's delay up to `detach_max_s`: a client that is merely slow
    stops paying a GET per chunk, and one that really stalls still lets go within the cap.
    """

    __slots__ = (
        "_body",
        "_closed",
        "_detach_s",
        "_end",
        "_fast_below",
        "_handed",
        "_meta",
        "_storage",
        "_timer",
        "remaining",
    )

    def __init__(self, storage: S3Storage, meta: ObjectMeta, byte_range: ByteRange, body: Any):
        self._storage = storage
        self._meta = meta
        self._end = byte_range.end
        self._body: Any = body  # None while detached
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._handed = False  # the socket's bytes are pulled by the engine (handover)
        # Without an ETag a resume could not be pinned to this version: never detach.
        self._detach_s = storage.detach_after_s if meta.etag != '""' else 0.0
        self.remaining = byte_range.length
        self._fast_below = byte_range.length - FAST_AFTER  # big reads once `remaining` is below

    async def read(self, n: int) -> bytes:
        """Read up to `n` bytes; b"" only once the whole range was read."""
        if self.remaining <= 0:
            return b""
        storage = self._storage
        if self._handed:  # the engine owns the socket until let_go()
            raise StorageError("S3 body read while handed over", storage=storage.name)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        body = self._body
        if body is None:
            body = await self._resume()
            if self._closed:  # closed by another task while the GET was in flight
                body.close()
                raise StorageError("S3 body closed during a read", storage=storage.name)
            self._body = body
            storage.detached_active -= 1
            storage.resumed_total += 1
            self._detach_s = min(self._detach_s * 2, storage.detach_max_s)
        try:
            data: bytes = await body.read(min(n, self.remaining))
        except (TimeoutError, ReadTimeoutError) as exc:
            raise StorageTimeout("S3 body read timed out", storage=storage.name) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise StorageError(f"S3 body failed: {exc}", storage=storage.name) from exc
        if not data:
            raise StorageError("S3 body ended early", storage=storage.name)
        self.remaining -= len(data)
        lower_read_marks(body, max(n, READ_BUFSIZE))
        # Small reads mean a slow client (the engine shrinks them): recv no more than that.
        # Full-size reads past FAST_AFTER mean a fast one: let the transport read in big
        # gulps again.
        fast = n >= FAST_READ and self.remaining <= self._fast_below
        cap_socket_reads(body, FAST_SOCKET_READ if fast else max(n, READ_BUFSIZE))
        if self.remaining > 0 and self._detach_s > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._detach_s, self._detach)
        return data

    @property
    def stall_s(self) -> float:
        """How long a client may stall before this body lets go of S3 (0: never)."""
        return self._detach_s

    def handover(self) -> tuple[int, bytes] | None:
        """Hand the rest of the body over as (a dup of the S3 socket, bytes already read).

        Only for a plain-TCP, Content-Length body still on its socket: its remaining bytes
        are then exactly the socket's next bytes. aiohttp's reader is drained and its
        reading paused for good; the connection is closed, never reused, by close() or
        let_go(). The caller reports what it pulls with spliced(). OSError (out of
        descriptors) leaves the body as it was.
        """
        body = self._body
        if body is None or self._closed or self._handed:
            return None
        try:
            response = body.raw_stream
            connection = response.connection
            content = response.content
            transport: Any = connection.transport if connection is not None else None
            protocol: Any = connection.protocol if connection is not None else None
        except AttributeError:
            return None
        if transport is None or protocol is None or transport.is_closing():
            return None
        if transport.get_extra_info("sslcontext") is not None:  # TLS records on the socket
            return None
        if "Transfer-Encoding" in response.headers:  # chunk framing on the socket
            return None
        sock = transport.get_extra_info("socket")
        if sock is None or content.is_eof() or content.exception() is not None:
            return None  # everything already read, or a failed body: the read path decides
        fd = os.dup(sock.fileno())  # first: EMFILE raises here, with nothing changed yet
        buffered: bytes = content.read_nowait(-1)  # may resume reading: paused just below
        protocol.pause_reading()  # aiohttp's flag too, so nothing resumes it behind us
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._handed = True
        self.remaining -= len(buffered)
        self._storage.handovers_total += 1
        return fd, buffered

    def spliced(self, n: int) -> None:
        """`n` more bytes were taken off the handed-over socket."""
        self.remaining -= n
        self._storage.spliced_bytes_total += n

    def let_go(self) -> None:
        """Give the S3 connection back while the client stalls; read() re-GETs the rest."""
        self._handed = False
        self._detach()

    def close(self) -> None:
        """Release the connection: back to the pool when fully read, else closed (P7)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        body, self._body = self._body, None
        if body is not None:
            body.close()
            self._storage.released()
        else:  # detached: nothing is held any more
            self._storage.detached_active -= 1

    def _detach(self) -> None:
        self._timer = None
        body, self._body = self._body, None  # close() alone keeps the reader's bytes alive
        if body is not None and not self._closed:
            body.close()
            self._storage.detached_total += 1
            self._storage.detached_active += 1
            self._storage.released()

    async def _resume(self) -> Any:
        """Re-GET the rest of the range, pinned to the same ETag, under a first-byte timeout."""
        storage, meta = self._storage, self._meta
        if self._closed:
            raise StorageError("S3 body read after close", storage=storage.name)
        start = self._end - self.remaining + 1
        try:
            async with asyncio.timeout(storage.first_byte_timeout_s):
                if storage.resume_gate.locked():
                    storage.resume_queued_total += 1
                async with storage.resume_gate:  # waiting counts against the timeout
                    return await storage.fetch(meta, start, self._end)
        except ObjectChanged:  # mid-body: the client already has the old version's bytes
            raise StorageError(
                "S3 object changed during the stream", storage=storage.name, key=meta.key
            ) from None
        except NotFound:
            raise StorageError(
                "S3 object vanished during the stream", storage=storage.name, key=meta.key
            ) from None
        except TimeoutError as exc:  # StorageTimeout included
            storage.resume_timed_out_total += 1
            raise StorageTimeout("S3 resume timed out", storage=storage.name, key=meta.key) from exc


def cap_socket_reads(body: Any, max_size: int) -> bool:
    """Make each recv() of the body's connection read at most `max_size`; False if it cannot.

    Only asyncio's selector transport has the knob (a private attribute, read on every
    recv). uvloop reads into one 256,000-byte buffer per loop and copies what arrived, so
    there only SO_RCVBUF would bound a read.
    """
    with contextlib.suppress(AttributeError):
        connection = body.raw_stream.connection
        transport: Any = connection.transport if connection is not None else None
        if isinstance(transport, _SELECTOR_TRANSPORT):
            transport.max_size = max_size
            return True
    return False


def lower_read_marks(body: Any, n: int) -> None:
    """Let the S3-side reader buffer 2n again after a bigger read raised its marks.

    aiohttp's `read(n)` only ever raises them (`set_read_chunk_size`), so once a fast
    start read 64 KiB, a client that slowed to 16 KiB chunks would keep 128 KiB buffered.
    """
    with contextlib.suppress(AttributeError):
        content = body.raw_stream.content
        if content._low_water > n:
            content._low_water, content._high_water = n, 2 * n
