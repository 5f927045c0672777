"""A stand-in for your application backend: nginx sends it everything but the media paths."""

from __future__ import annotations

import os

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    """Answer with the request id nginx passed on, to show one id end to end."""
    return web.json_response(
        {"message": "hello from the backend", "request_id": request.headers.get("X-Request-ID")}
    )


def create_app() -> web.Application:
    """The example app: one route."""
    app = web.Application()
    app.router.add_get("/api/hello", hello)
    return app


if __name__ == "__main__":
    web.run_app(
        create_app(),
        host=os.environ.get("HOST", "0.0.0.0"),
        port=int(os.environ.get("PORT", "8000")),
        access_log=None,
    )
