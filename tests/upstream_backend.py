"""An example web backend for upstream routes: the app the sidecar forwards `/app/` to.

Run it as a process (`python -m tests.upstream_backend --port N`) or in a thread
(`serve_in_thread(port)`). Every body is deterministic, so tests compare bytes exactly:

- `/app/hello`: 200 text (`HELLO`); `?delay=S` answers after S seconds.
- `/app/echo[/anything]` (any method): JSON of what arrived (method, raw path, query,
  headers in order, body length). Its response carries hop-by-hop headers that a proxy
  must drop (`HOP_RESPONSE_HEADERS`), an end-to-end one it must keep (`X-Backend-Kept`)
  and two `Set-Cookie` lines.
- `/app/stream?size=N`: `stream_body(N)` in `chunk`-byte pieces, chunked (no
  Content-Length); `cut=M` closes the connection after M bytes (no last chunk), `stall=M`
  stops sending after M bytes for `stall_s` seconds.
- `/app/big`: `BIG_BODY` (5 MiB) with Content-Length, written in 64 KiB pieces.
- `/app/cut`: announces `CUT_LENGTH`, sends `CUT_SENT` bytes, then closes (FIN, or RST
  with `?rst=1`).
- `/app/slow-headers?delay=S`: sends nothing for S seconds (default 10), then 200.
- `/app/deny`: 403 `{"denied": true}`; `/app/status/<code>`: that status, JSON body.
- `/app/redirect`: 302 to `/app/hello` (a proxy must not follow it).
- `/app/gzip`: `GZIP_PLAIN` gzip-encoded (`Content-Encoding: gzip`), sent as is.
- `/app/accel/<key>`: 200 with `X-Accel-Redirect: /protected/<key>` (`?prefix=` for
  another location) and a `JUNK` body that must never reach a client; `content_type`,
  `disposition` and `cache_control` query parameters add those headers, otherwise the
  response has none of them.
- `/app/accel-bad`: `X-Accel-Redirect` to `/media/hello.txt` (or to `?to=`).
- `/app/upload` (POST, PUT): reads the body; JSON `{"length", "sha256"}`.
- `/_backend/stats`: requests in flight, their peak, and the bytes `/app/stream` has written
  so far (`streamed`, how far a backend got ahead of a slow client); `POST /_backend/reset`
  restarts the peak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import random
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Final
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler

HELLO: Final = b"hello from the backend\n"
BIG_BODY: Final = random.Random("upstream-big").randbytes(5 * 1024 * 1024)
CUT_LENGTH: Final = 1024 * 1024
CUT_SENT: Final = 100 * 1024
JUNK: Final = b"JUNK-BODY-FROM-THE-BACKEND-MUST-NOT-LEAK\n"
JUNK_REPEAT: Final = 1000
GZIP_PLAIN: Final = b"".join(b"%05d compressible line\n" % i for i in range(2000))
GZIP_BODY: Final = gzip.compress(GZIP_PLAIN, mtime=0)
# Sent with every /app/echo response; none of them may reach the sidecar's client.
HOP_RESPONSE_HEADERS: Final = (
    ("Connection", "X-Backend-Hop"),
    ("X-Backend-Hop", "dropped"),
    ("Keep-Alive", "timeout=5, max=100"),
    ("Proxy-Connection", "keep-alive"),
    ("Trailer", "X-Backend-Trailer"),
    ("Upgrade", "h2c"),
)
_PIECE: Final = 64 * 1024
_BLOCK: Final = 64 * 1024
_STREAM_BASE: Final = random.Random("upstream-stream").randbytes(_BLOCK)
_OMIT_TYPE: Final = web.RequestKey("omit_content_type", bool)


def _block(size: int, index: int) -> bytes:
    """Block `index` of a stream of `size` bytes: its own 16-byte header, then random bytes."""
    return size.to_bytes(8, "big") + index.to_bytes(8, "big") + _STREAM_BASE[16:]


def stream_body(size: int, start: int = 0, end: int | None = None) -> bytes:
    """Bytes [start, end) of what `/app/stream?size=size` sends, made 64 KiB at a time."""
    end = size if end is None else end
    out = bytearray()
    for index in range(start // _BLOCK, (end + _BLOCK - 1) // _BLOCK):
        base = index * _BLOCK
        out += _block(size, index)[max(start - base, 0) : min(end - base, _BLOCK)]
    return bytes(out)


class _Counters:
    """Requests in flight, their peak, and bytes /app/stream wrote (see /_backend/stats)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.requests = 0
        self.streamed = 0


_COUNTERS: Final = web.AppKey("counters", _Counters)


@web.middleware
async def _count(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/_backend/"):
        return await handler(request)
    counters = request.app[_COUNTERS]
    counters.requests += 1
    counters.in_flight += 1
    counters.peak = max(counters.peak, counters.in_flight)
    try:
        return await handler(request)
    finally:
        counters.in_flight -= 1


async def _omit_defaults(request: web.Request, response: web.StreamResponse) -> None:
    """Drop the Content-Type aiohttp adds by default, for responses that asked for none."""
    if request.get(_OMIT_TYPE):
        response.headers.popall("Content-Type", None)


def _int(request: web.Request, name: str, default: int) -> int:
    return int(request.query.get(name, default))


async def _flushed(request: web.Request) -> None:
    """Wait until the transport has handed every buffered byte to the kernel."""
    transport = request.transport
    while transport is not None and transport.get_write_buffer_size() > 0:  # noqa: ASYNC110
        await asyncio.sleep(0.005)  # no event says "buffer empty"; poll briefly


def _close(request: web.Request, rst: bool) -> None:
    """Close the client connection now: FIN, or RST (SO_LINGER 0)."""
    transport = request.transport
    if transport is None:
        return
    if rst:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


async def hello(request: web.Request) -> web.Response:
    delay = float(request.query.get("delay", 0))
    if delay:
        await asyncio.sleep(delay)
    return web.Response(body=HELLO, content_type="text/plain")


async def echo(request: web.Request) -> web.Response:
    length = 0
    async for chunk in request.content.iter_any():
        length += len(chunk)
    peer = request.transport.get_extra_info("peername") if request.transport else None
    data = {
        "method": request.method,
        "raw_path": request.raw_path,
        "path": request.raw_path.partition("?")[0],
        "query": request.raw_path.partition("?")[2],
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_length": length,
        "peer": peer[0] if peer else None,
    }
    response = web.json_response(data)
    for name, value in HOP_RESPONSE_HEADERS:
        response.headers.add(name, value)
    response.headers["X-Backend-Kept"] = "kept"
    response.headers.add("Set-Cookie", "sid=backend-secret; Path=/; HttpOnly")
    response.headers.add("Set-Cookie", "theme=dark; Path=/")
    return response


async def stream(request: web.Request) -> web.StreamResponse:
    size = _int(request, "size", 1024 * 1024)
    piece = _int(request, "chunk", 16 * 1024)
    cut = _int(request, "cut", -1)
    stall = _int(request, "stall", -1)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    sent = 0
    while sent < size:
        end = min(size, sent + piece)
        for limit in (cut, stall):
            if sent < limit < end:
                end = limit
        await response.write(stream_body(size, sent, end))  # generated as it goes
        request.app[_COUNTERS].streamed += end - sent
        sent = end
        if sent == cut:
            await _flushed(request)
            _close(request, rst=False)
            raise asyncio.CancelledError  # aiohttp drops the request quietly
        if sent == stall:
            await asyncio.sleep(float(request.query.get("stall_s", 30)))
    await response.write_eof()
    return response


async def big(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = len(BIG_BODY)
    await response.prepare(request)
    for offset in range(0, len(BIG_BODY), _PIECE):
        await response.write(BIG_BODY[offset : offset + _PIECE])
    await response.write_eof()
    return response


async def cut(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = CUT_LENGTH
    await response.prepare(request)
    await response.write(BIG_BODY[:CUT_SENT])
    await _flushed(request)
    _close(request, rst=request.query.get("rst") == "1")
    raise asyncio.CancelledError  # aiohttp drops the request quietly


async def slow_headers(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", 10)))
    return web.Response(body=HELLO, content_type="text/plain")


async def deny(request: web.Request) -> web.Response:
    return web.json_response({"denied": True}, status=403)


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    headers = {"WWW-Authenticate": 'Bearer realm="app"'} if code == 401 else None
    return web.json_response({"status": code, "from": "backend"}, status=code, headers=headers)


async def redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/app/hello"}, text="moved\n")


async def gzipped(request: web.Request) -> web.Response:
    return web.Response(
        body=GZIP_BODY,
        headers={
            "Content-Encoding": "gzip",
            "Content-Type": "text/plain",
            "Vary": "Accept-Encoding",
        },
    )


async def accel(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    prefix = request.query.get("prefix", "/protected/")
    headers = {"X-Accel-Redirect": prefix + quote(key, safe="/")}
    for param, header in (
        ("content_type", "Content-Type"),
        ("disposition", "Content-Disposition"),
        ("cache_control", "Cache-Control"),
    ):
        if param in request.query:
            headers[header] = request.query[param]
    if "Content-Type" not in headers:
        request[_OMIT_TYPE] = True
    return web.Response(body=JUNK * JUNK_REPEAT, headers=headers)


async def accel_bad(request: web.Request) -> web.Response:
    target = request.query.get("to", "/media/hello.txt")
    request[_OMIT_TYPE] = True
    return web.Response(body=JUNK * JUNK_REPEAT, headers={"X-Accel-Redirect": target})


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return web.json_response({"length": length, "sha256": digest.hexdigest()})


async def backend_stats(request: web.Request) -> web.Response:
    c = request.app[_COUNTERS]
    figures = {"in_flight": c.in_flight, "peak": c.peak, "requests": c.requests}
    return web.json_response({**figures, "streamed": c.streamed})


async def backend_reset(request: web.Request) -> web.Response:
    c = request.app[_COUNTERS]
    c.peak, c.requests = c.in_flight, 0
    return web.json_response({"reset": True})


def make_app() -> web.Application:
    """The backend's aiohttp application."""
    app = web.Application(middlewares=[_count])
    app[_COUNTERS] = _Counters()
    app.on_response_prepare.append(_omit_defaults)
    app.router.add_get("/app/hello", hello)
    app.router.add_route("*", "/app/echo{tail:.*}", echo)
    app.router.add_get("/app/stream", stream)
    app.router.add_get("/app/big", big)
    app.router.add_get("/app/cut", cut)
    app.router.add_get("/app/slow-headers", slow_headers)
    app.router.add_get("/app/deny", deny)
    app.router.add_get(r"/app/status/{code:\d{3}}", status)
    app.router.add_get("/app/redirect", redirect)
    app.router.add_get("/app/gzip", gzipped)
    app.router.add_get("/app/accel/{key:.+}", accel)
    app.router.add_get("/app/accel-bad", accel_bad)
    app.router.add_post("/app/upload", upload)
    app.router.add_put("/app/upload", upload)
    app.router.add_get("/_backend/stats", backend_stats)
    app.router.add_post("/_backend/reset", backend_reset)
    return app


@contextlib.contextmanager
def serve_in_thread(port: int, host: str = "127.0.0.1") -> Iterator[None]:
    """Run the backend on host:port in a daemon thread with its own event loop."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(
        make_app(), access_log=None, shutdown_timeout=1.0, handler_cancellation=True
    )
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, host, port).start())
    thread = threading.Thread(target=loop.run_forever, name="upstream-backend", daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.upstream_backend --port N`: serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
        handler_cancellation=True,  # a handler stops when its client (the sidecar) leaves
    )


if __name__ == "__main__":
    main()
