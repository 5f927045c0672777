"""A stand-in for your application backend: nginx sends it everything but the media paths."""

from __future__ import annotations

import os

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    """Answer with the request id nginx passed on, to show one id end to end."""
    return web.json_response(
        {"message": "hello from the backend", "request_id": request.headers.get("X-Request-ID")}
    )


async def download(request: web.Request) -> web.Response:
    """Authorise, then let the sidecar move the bytes (nginx's X-Accel-Redirect contract).

    A real app checks its session here; the demo wants any `X-Demo-User` header.
    """
    if not request.headers.get("X-Demo-User"):
        return web.json_response({"error": "login required"}, status=401)
    name = request.match_info["name"]
    return web.Response(
        headers={
            "X-Accel-Redirect": f"/protected/{name}",
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "private, max-age=60",
        }
    )


def create_app() -> web.Application:
    """The example app: a hello route, and downloads it authorises."""
    app = web.Application()
    app.router.add_get("/api/hello", hello)
    app.router.add_get("/downloads/{name}", download)
    return app


if __name__ == "__main__":
    web.run_app(
        create_app(),
        host=os.environ.get("HOST", "0.0.0.0"),
        port=int(os.environ.get("PORT", "8000")),
        access_log=None,
    )
