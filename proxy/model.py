"""Value types shared by storages, the HTTP decision logic and the streaming engine."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from proxy.errors import StorageError

# Per-request values are NamedTuples: immutable like frozen dataclasses, but built
# several times faster, which shows on small-file throughput.


class ByteRange(NamedTuple):
    """An inclusive byte range `start..end` of a representation."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class ObjectMeta(NamedTuple):
    """What a storage knows about one object before reading it."""

    key: str
    size: int
    etag: str  # quoted entity tag as sent on the wire: '"abc"' or 'W/"abc"'
    last_modified: int | None  # seconds since the epoch
    content_type: str | None  # from the storage's own metadata, None when it has none
    token: Any = None  # storage-private identity (disk: path and inode), opaque to callers


class Opened(NamedTuple):
    """A GET sent before the object's metadata was known, and what its answer told."""

    meta: ObjectMeta  # from the GET's own headers (size from Content-Range)
    byte_range: ByteRange  # the bytes `body` holds
    body: Body


class Body(Protocol):
    """The bytes of one byte range, read in pieces; `close` is synchronous and idempotent."""

    async def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


async def read_exactly(body: Body, length: int, *, storage: str = "", key: str = "") -> bytes:
    """All `length` bytes of a small body; a body that ends early is a storage failure."""
    parts = []
    while length > 0:
        chunk = await body.read(length)
        if not chunk:
            raise StorageError("storage body ended early", storage=storage, key=key)
        parts.append(chunk)
        length -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class SocketBody(Body, Protocol):
    """A body whose remaining bytes can be taken straight off its plain TCP socket (splice).

    After `handover()` returned a socket, nothing reads the body through its client any
    more: the caller pulls the bytes itself, reports them with `spliced(n)`, and either
    pulls all of them or calls `let_go()`, after which `read()` fetches the rest anew.
    """

    remaining: int

    def handover(self) -> tuple[int, bytes] | None:
        """(a duplicate of the socket's descriptor, bytes already buffered), or None."""
        ...

    def spliced(self, n: int) -> None: ...

    def let_go(self) -> None: ...

    @property
    def stall_s(self) -> float:
        """How long a client may stall before `let_go()` is worth its cost (0: never)."""
        ...


class FileBody:
    """A byte range of an open local file: read in pieces, or handed to `sendfile`."""

    __slots__ = ("_on_close", "fd", "offset", "remaining")

    def __init__(
        self, fd: int, offset: int, length: int, on_close: Callable[[], None] | None = None
    ) -> None:
        self.fd = fd  # owned: closed by close()
        self.offset = offset
        self.remaining = length
        self._on_close = on_close  # the storage's count of open bodies (/stats)

    async def read(self, n: int) -> bytes:
        """Read up to `n` bytes of the range (page-cache reads; see storage/disk.py)."""
        if self.remaining <= 0:
            return b""
        try:
            data = os.pread(self.fd, min(n, self.remaining), self.offset)
        except OSError as exc:  # EIO and friends: the storage failed, not the request
            raise StorageError(f"read failed: {exc.strerror}") from exc
        self.offset += len(data)
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        """Close the descriptor; safe to call twice."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
            if self._on_close is not None:
                self._on_close()


class Source(Protocol):
    """Anything bytes come from, as /stats and /health see it: a storage or an upstream."""

    name: str
    kind: str

    def in_use(self) -> int:
        """Upstream resources held by open bodies now (S3 connections, open files)."""
        ...

    def idle(self) -> int:
        """Upstream resources kept for reuse (S3 keep-alive connections, cached descriptors)."""
        ...

    def figures(self) -> dict[str, int]:
        """Counters of this kind of source for /stats (S3: detach and resume counts)."""
        ...

    async def probe(self) -> None:
        """Check it is reachable (root readable, bucket answers); raise StorageError."""
        ...

    async def close(self) -> None:
        """Release clients and pools."""
        ...


class Storage(Source, Protocol):
    """A place objects are read from: a disk directory or an S3 bucket."""

    # True when stat/open never wait on the network (disk): a timeout cannot interrupt
    # them anyway, so the first-byte timer is skipped on the hot path.
    inline_io: bool

    async def stat(self, key: str) -> ObjectMeta:
        """Return the object's metadata; raise NotFound, StorageError or StorageTimeout."""
        ...

    async def open(self, meta: ObjectMeta, byte_range: ByteRange) -> Body:
        """Open one byte range of the object `stat` described; raise ObjectChanged if it changed."""
        ...

    async def read(self, meta: ObjectMeta, byte_range: ByteRange) -> bytes:
        """Read a small byte range whole (at most `limits.chunk_size` bytes)."""
        ...

    async def open_unseen(self, key: str, range_spec: str | None) -> Opened | None:
        """GET without a HEAD first: the whole object, or `range_spec` (`bytes=…`, one range).

        One round trip instead of two where metadata costs one (S3). None when the storage
        gains nothing by it (disk) or finds the range unsatisfiable: the caller stats.
        """
        ...
