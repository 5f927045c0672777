"""One pooled PostgreSQL session: aiopg's connection, driven one round trip at a time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any, Final

import aiopg

from proxy import turns

Params = dict[str, object]

# A query this short is sent whole by psycopg2's execute: the session is idle, so its
# socket's send buffer is empty (the reply to its last query acknowledged every byte) and
# holds far more than this. aiopg's poll right after it (a recv that finds nothing, 5 µs
# per uncached lookup) is then skipped: aiopg's reader, registered from connect to close,
# hears the reply. Over TLS, or for a longer query, that poll flushes what is left, as
# aiopg does.
SENT_WHOLE_BYTES: Final = 2048


class Session:
    """One pooled session: aiopg's connection, its socket number, a cursor used for every
    query, the statements prepared on it, and the label of whoever holds it now.

    `guard_s` bounds each query on the client side; `watch` is called with the session
    when a query starts waiting, so the pool's watchdog looks at `expires`.
    """

    __slots__ = (
        "aio",
        "cursor",
        "expires",
        "fd",
        "guard_s",
        "label",
        "loop",
        "prepared",
        "sends_whole",
        "since",
        "waiter",
        "watch",
    )

    def __init__(
        self,
        aio: aiopg.Connection,
        fd: int,
        loop: asyncio.AbstractEventLoop,
        *,
        guard_s: float,
        watch: Callable[[Session], None],
    ) -> None:
        self.aio = aio
        self.fd = fd
        self.loop = loop
        self.guard_s = guard_s
        self.watch = watch
        self.cursor: Any = aio.raw.cursor()
        self.sends_whole = not aio.raw.info.ssl_in_use  # see SENT_WHOLE_BYTES
        self.prepared: set[str] = set()
        self.label = ""
        self.since = 0.0
        self.waiter: asyncio.Future[None] | None = None  # the query in flight
        self.expires = 0.0  # time.monotonic() past which it is abandoned

    @property
    def closed(self) -> bool:
        return bool(self.aio.closed)

    async def roundtrip(
        self, sql: str, params: Params | None
    ) -> tuple[list[str], tuple[object, ...] | None]:
        """Send one statement and wait for its first row, with no aiopg cursor in between.

        aiopg's Cursor.execute costs a cursor, a context manager and a wait_for (another
        future, a timer, a callback hop) per query, and its _poll turns the server's
        cancel into CancelledError (pitfalls P8). Here: one reused psycopg2 cursor, aiopg's
        own reader (`_ready`) completes our waiter, the pool's watchdog guards it. aiopg
        1.4 is pinned (constraints.txt) and unmaintained, so these private names hold still.
        """
        aio = self.aio
        waiter = aio._create_waiter("execute")  # raises if busy: a pooled conn never is
        cursor = self.cursor
        try:
            cursor.execute(sql, params)
        except BaseException:
            aio._waiter = None
            raise
        if not (self.sends_whole and len(cursor.query) <= SENT_WHOLE_BYTES):
            aio._ready(aio._weakref)  # flush the rest; later results arrive via the reader
        self.waiter, self.expires = waiter, time.monotonic() + self.guard_s
        self.watch(self)
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
            return [], None
        return [col.name for col in description], cursor.fetchone()


def forget_fd(fd: int) -> None:
    """Drop loop watchers left on a socket libpq closed under them (aiopg #856).

    When a connect fails, libpq closes the socket before aiopg removes its writer; uvloop
    then keeps a dead poll handle for that fd number, and every later connection that
    gets the number fails in add_reader with "UVPoll closed=True": the sidecar would never
    recover from an outage. Only a closed fd is touched, so a reused number is left alone.
    """
    try:
        os.fstat(fd)
        return  # open again: someone else's now
    except OSError:
        pass
    loop = asyncio.get_running_loop()
    for remove in (loop.remove_writer, loop.remove_reader):
        with contextlib.suppress(Exception):
            remove(fd)


def reason(exc: BaseException) -> str:
    """The first line of a driver error, for messages (libpq messages hold no password)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
