"""S3 GETs and HEADs through presigned URLs: the SDK's per-call cost paid once per key.

botocore spends ~2 ms of CPU on every call here (validating, serialising and signing the
request, parsing the answer into a dict): most of a small object's cost, and of the time
before a large object's first byte. A presigned URL sent with aiohttp costs ~0.35 ms. The
URL is signed by the same client (its credentials, region, endpoint and addressing
style), for one method and key, and reused for URL_REUSE_S; `Range` and `If-Match` are
ordinary headers beside it.

Only the plain answers are handled here: 200 and 206, 404 NoSuchKey, 412 and 416. Any
other (a redirect to another region, throttling, 5xx, expired credentials, a server that
refuses query-string authentication) or a failed connection returns a Fallback, and the
caller sends the request again through botocore, which retries, follows and names the
error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import aiohttp
from aiobotocore.response import AioStreamingBody
from botocore.exceptions import BotoCoreError
from yarl import URL

from proxy.conditional import parse_http_date
from proxy.errors import NotFound, ObjectChanged, StorageError
from proxy.log import log_event

URL_EXPIRES_S: Final = 900  # what S3 is told
URL_REUSE_S: Final = 600  # what we use: the rest is margin for skewed clocks and slow sends
MAX_URLS: Final = 4096  # cached (method, key) pairs; the oldest goes first
# This many refusals (400, 403) that botocore then got served, in a row, mean the server
# does not take presigned URLs (or not ours): stop trying until restart, say so once. A
# refusal botocore gets too (AccessDenied for a key, say) says nothing about presigning.
REFUSALS_TO_GIVE_UP: Final = 8
_ERROR_BODY_MAX: Final = 4096  # an S3 error document is a few hundred bytes
log = logging.getLogger("proxy.storage")


class RangeUnsatisfiable(StorageError):
    """S3 answered 416 to a Range: the object is shorter than the range's first byte."""


class Fallback(NamedTuple):
    """Not answered here: send the request through botocore."""

    refused: bool  # S3 answered 400 or 403 to the presigned URL


_FAILED: Final = Fallback(refused=False)
_REFUSED: Final = Fallback(refused=True)


class SignedRequests:
    """Presigned GET and HEAD for one bucket, sent on the SDK's own connection pool.

    `client` is the storage's aiobotocore client; its HTTP session (and so its pool,
    timeouts, TLS settings and gauges) carries these requests too. `answered_total` counts
    requests answered here, `fallbacks_total` those handed back to botocore.
    """

    def __init__(self, client: Any, bucket: str, storage: str) -> None:
        self._client = client
        self._bucket = bucket
        self._storage = storage
        self._urls: dict[tuple[str, str], tuple[str, float]] = {}
        self._refusals = 0
        self.enabled = True
        self.answered_total = 0
        self.fallbacks_total = 0

    async def request(
        self, method: str, key: str, headers: dict[str, str]
    ) -> dict[str, Any] | Fallback:
        """The answer as botocore would parse it (`Body` open for a GET), or a Fallback.

        Raises NotFound, ObjectChanged or RangeUnsatisfiable for S3's plain refusals.
        """
        if not self.enabled:
            return _FAILED
        try:
            url = await self._url(method, key)
        except BotoCoreError:  # no credentials, say: botocore's own call will name it
            return self._fall_back(method, key, _FAILED)
        if url is None:
            self.enabled = False  # an HTTP proxy is configured: botocore knows how to use it
            return _FAILED
        try:
            session = await self._client._endpoint.http_session._get_session(None)
            response = await session.request(
                method,
                URL(url, encoded=True),
                headers={**headers, "Accept-Encoding": "identity"},
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            return self._fall_back(method, key, _FAILED)
        try:
            return await self._answer(method, key, response)
        except BaseException:
            response.close()
            raise

    def _answered(self) -> None:
        self._refusals = 0  # S3 takes our URLs
        self.answered_total += 1

    def refused_where_botocore_was_served(self) -> None:
        """A presigned URL was refused and the same request through botocore was answered."""
        self._refusals += 1
        if self._refusals >= REFUSALS_TO_GIVE_UP and self.enabled:
            self.enabled = False
            log_event(log, "s3.presigned_refused", logging.WARNING, storage=self._storage,
                      refusals=self._refusals)  # fmt: skip

    async def _answer(
        self, method: str, key: str, response: aiohttp.ClientResponse
    ) -> dict[str, Any] | Fallback:
        status = response.status
        if status in (200, 206):
            self._answered()
            return _parsed(method, response)
        if status == 404 and (method == "HEAD" or await _error_code(response) == "NoSuchKey"):
            response.release()
            self._answered()
            raise NotFound("no such key")
        if status == 412:
            response.release()
            self._answered()
            raise ObjectChanged("object changed", storage=self._storage, key=key)
        if status == 416:
            response.release()
            self._answered()
            raise RangeUnsatisfiable("S3 GET: range not satisfiable", storage=self._storage)
        response.close()  # an unread error body: the connection is not reused
        return self._fall_back(method, key, _REFUSED if status in (400, 403) else _FAILED)

    def _fall_back(self, method: str, key: str, fallback: Fallback) -> Fallback:
        self._urls.pop((method, key), None)  # signed with expired credentials, perhaps
        self.fallbacks_total += 1
        return fallback

    async def _url(self, method: str, key: str) -> str | None:
        """A presigned URL for `method` on `key`, reused while fresh; None behind a proxy."""
        now = time.monotonic()
        cached = self._urls.get((method, key))
        if cached is not None and cached[1] > now:
            return cached[0]
        url: str = await self._client.generate_presigned_url(
            "get_object" if method == "GET" else "head_object",
            Params={"Bucket": self._bucket, "Key": key},
            ExpiresIn=URL_EXPIRES_S,
        )
        http_session = self._client._endpoint.http_session
        if http_session._proxy_config.proxy_url_for(url):
            return None
        urls = self._urls
        if len(urls) >= MAX_URLS and (method, key) not in urls:
            del urls[next(iter(urls))]
        urls[(method, key)] = (url, now + URL_REUSE_S)
        return url


def _parsed(method: str, response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The fields of botocore's get_object/head_object answer that the storage reads."""
    headers = response.headers
    parsed: dict[str, Any] = {}
    if (length := headers.get("Content-Length")) is not None:
        parsed["ContentLength"] = int(length) if length.isascii() and length.isdigit() else -1
    for field, header in (("ContentRange", "Content-Range"), ("ETag", "ETag"),
                          ("ContentType", "Content-Type")):  # fmt: skip
        if (value := headers.get(header)) is not None:
            parsed[field] = value
    if (date := headers.get("Last-Modified")) is not None:
        epoch = parse_http_date(date)
        if epoch is not None:
            parsed["LastModified"] = datetime.fromtimestamp(epoch, UTC)
    if method == "GET":
        parsed["Body"] = AioStreamingBody(response, parsed.get("ContentLength"))
    else:
        response.release()
    return parsed


async def _error_code(response: aiohttp.ClientResponse) -> str:
    """The `<Code>` of an S3 error document, or "" (a long or odd body is not read)."""
    if (response.content_length or 0) > _ERROR_BODY_MAX:
        return ""
    data = b""
    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
        while len(data) < _ERROR_BODY_MAX and (more := await response.content.read(4096)):
            data += more  # chunked, or in several packets: AWS sends both
        text = data.decode("utf-8", "replace")
        start = text.find("<Code>")
        end = text.find("</Code>", start)
        if start >= 0 and end > start:
            return text[start + len("<Code>") : end].strip()
    return ""
