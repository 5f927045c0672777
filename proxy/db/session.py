"""One pooled PostgreSQL session: aiopg's connection, driven one round trip at a time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import weakref
from typing import Any, Final

import aiopg

from proxy import turns

Params = dict[str, object]
Values = tuple[object, ...]  # one row as psycopg2 returns it

# A query this short is sent whole by psycopg2's execute: the session is idle, so its
# socket's send buffer is empty (the reply to its last query acknowledged every byte) and
# holds far more than this. aiopg's poll right after it (a recv that finds nothing, 5 µs
# per uncached lookup) is then skipped: aiopg's reader, registered from connect to close,
# hears the reply. Over TLS, or for a longer query, that poll flushes what is left, as
# aiopg does.
SENT_WHOLE_BYTES: Final = 2048


class Connection(aiopg.Connection):
    """aiopg's connection, taking its socket off the event loop as soon as the socket is gone.

    libpq closes its socket itself, inside aiopg's callback, when a connect is refused or
    the server goes away. The loop still watches that number: uvloop even keeps a closed
    poll handle for it when the socket reported an error. The next socket to get the
    number, a client's or an S3 connection's, could then never be watched ("UVPoll
    closed=True", aiopg #856), and Linux hands out the lowest free number at once. So
    right after each callback that left the connection dead, and before closing it, every
    watcher on the number is removed, unless the number is someone else's already.
    """

    def __init__(self, dsn: str, timeout: float, **kwargs: Any) -> None:
        super().__init__(dsn, timeout, **kwargs)
        self._socket_fd: int = self._fileno  # type: ignore[assignment]
        st = os.fstat(self._socket_fd)
        self._socket_id = (st.st_dev, st.st_ino)

    @staticmethod
    def _ready(weak_self: weakref.ref[Any]) -> None:
        aiopg.Connection._ready(weak_self)
        self = weak_self()
        # aiopg forgets the number once libpq closed it; psycopg2 marks a lost connection.
        # Still inside the callback in which libpq closed it: no other code on the loop
        # can have taken the number yet, so its watchers go whoever's socket it is now.
        if self is not None and (self._fileno is None or self._conn.closed):
            self._drop_watchers()

    def abandon(self) -> None:
        """Close a connection whose connect failed, now rather than when the collector
        finds it (aiopg would then log "Unclosed connection" and an unretrieved future)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()  # the connect's own future: nobody awaits it any more
        self.close()

    def _close(self) -> None:
        """Watchers off while the socket is still ours, then psycopg2's close; idempotent."""
        if self._socket_fd >= 0:
            try:
                st = os.fstat(self._socket_fd)
            except OSError:
                self._drop_watchers()  # closed: the number is nobody's, clear what is left
            else:
                if (st.st_dev, st.st_ino) == self._socket_id:
                    self._drop_watchers()
                else:  # reused already (a file another thread opened): not ours to touch
                    self._socket_fd, self._fileno = -1, None
        super()._close()

    def _drop_watchers(self) -> None:
        """Remove the loop's reader and writer of our socket's number, once."""
        fd, self._socket_fd = self._socket_fd, -1
        if fd < 0:
            return
        for remove in (self._loop.remove_reader, self._loop.remove_writer):
            with contextlib.suppress(Exception):  # a closed fd may raise (selector loops)
                remove(fd)
        self._fileno = None  # aiopg must not touch the number again
        self._writing = False


class Session:
    """One pooled session: aiopg's connection (Connection), a cursor used for every query,
    the statements prepared on it, and the label of whoever holds it now.

    `guard_s` bounds each query on the client side: the pool's watchdog, which runs while
    any session is leased, abandons a query still waiting past `expires`.
    """

    __slots__ = (
        "aio",
        "cursor",
        "expires",
        "guard_s",
        "label",
        "loop",
        "prepared",
        "raw",
        "sends_whole",
        "since",
        "waiter",
    )

    def __init__(self, aio: Connection, loop: asyncio.AbstractEventLoop, *, guard_s: float) -> None:
        self.aio = aio
        self.raw: Any = aio.raw  # psycopg2's connection: `closed` without aiopg's property
        self.loop = loop
        self.guard_s = guard_s
        self.cursor: Any = self.raw.cursor()
        self.sends_whole = not self.raw.info.ssl_in_use  # see SENT_WHOLE_BYTES
        self.prepared: set[str] = set()
        self.label = ""
        self.since = 0.0
        self.waiter: asyncio.Future[None] | None = None  # the query in flight
        self.expires = 0.0  # time.monotonic() past which it is abandoned

    @property
    def closed(self) -> bool:
        return bool(self.raw.closed)  # 1 closed by us, 2 lost

    async def roundtrip(self, sql: str, params: Params | None) -> tuple[Any, Values | None]:
        """Send one statement and wait for it: its description (None if it returns no rows)
        and its first row, with no aiopg cursor in between.

        aiopg's Cursor.execute costs a cursor, a context manager and a wait_for (another
        future, a timer, a callback hop) per query, and its _poll turns the server's
        cancel into CancelledError (pitfalls P8). Here: one reused psycopg2 cursor, aiopg's
        own reader (`_ready`) completes our waiter, the pool's watchdog guards it. aiopg
        1.4 is pinned (constraints.txt) and unmaintained, so these private names hold still.
        """
        aio = self.aio
        if aio._waiter is not None:  # aiopg's _create_waiter, less a call: never for a pooled one
            raise RuntimeError("a query is already waiting on this session")
        aio._waiter = waiter = self.loop.create_future()
        cursor = self.cursor
        try:
            cursor.execute(sql, params)
        except BaseException:
            aio._waiter = None
            raise
        if not (self.sends_whole and len(cursor.query) <= SENT_WHOLE_BYTES):
            aio._ready(aio._weakref)  # flush the rest; later results arrive via the reader
        self.waiter, self.expires = waiter, time.monotonic() + self.guard_s
        turns.awaited += 1  # bodies go out in slices meanwhile (proxy.turns)
        try:
            await waiter
        except (asyncio.CancelledError, TimeoutError):
            # Cancelled (client gone) or unanswered: the query may still run, so the
            # session is busy: close it (it leaves the pool) rather than reuse it (P9).
            aio.close()
            raise
        finally:
            turns.awaited -= 1
            self.waiter = aio._waiter = None
        description = cursor.description
        if not description:
            return None, None
        return description, cursor.fetchone()


def reason(exc: BaseException) -> str:
    """The first line of a driver error, for messages (libpq messages hold no password)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
