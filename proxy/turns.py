"""Replies the event loop should read soon: a count the streaming engine takes turns by.

A database reply holds a pooled connection, and the request behind it, until the loop reads
it. A ready client takes a whole warm file in one `sendfile` (1 MiB or more over loopback),
so with 16 such clients in one turn of the loop a reply could wait for all their bodies,
several ms. While replies are awaited, proxy.stream sends bodies in slices with a turn of
the loop between them: a reply then waits for one slice per ready client, as nginx's
`sendfile_max_chunk` does for its own events. No reply awaited, no slicing, no cost.
"""

from __future__ import annotations

awaited = 0  # database replies being waited for now (proxy.db.session counts them)
