"""S3 GETs and HEADs through presigned URLs, against SeaweedFS; botocore only as the fallback.

Every plain answer (200, 206, 404 NoSuchKey, 412, 416) must be handled on the presigned
path with the same bytes, metadata and errors as botocore gives, and every other answer
must reach botocore once, with the pool back to zero connections in use either way.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import pytest_asyncio

from proxy.config import S3StorageConfig, parse_config
from proxy.errors import NotFound, ObjectChanged, StorageError
from proxy.model import ByteRange, ObjectMeta
from proxy.storage import s3_signed
from proxy.storage.s3 import S3Storage
from proxy.storage.s3_signed import Fallback, SignedRequests
from tests.conftest import BUCKET, FILES, S3_PREFIX, S3Server

pytestmark = pytest.mark.asyncio(loop_scope="session")

BIG = FILES["big.bin"]
HELLO = FILES["hello.txt"]


@pytest_asyncio.fixture(loop_scope="session")
async def s3(sidecar_config: dict[str, Any]) -> AsyncIterator[S3Storage]:
    """A fresh `uploads` storage per test: its URL cache and counters start empty."""
    cfg = parse_config(sidecar_config, "<tests>").storages["uploads"]
    assert isinstance(cfg, S3StorageConfig)
    storage = S3Storage(cfg, max_streams=4)
    await storage.start()
    try:
        yield storage
    finally:
        await storage.close()


def counts(s3: S3Storage) -> tuple[int, int]:
    figures = s3.figures()
    return figures["presigned_total"], figures["presigned_fallbacks_total"]


def signed(s3: S3Storage) -> SignedRequests:
    assert s3._signed is not None
    return s3._signed


async def released(s3: S3Storage) -> None:
    for _ in range(50):  # a closed transport reports connection_lost a loop turn later
        if s3.connections_in_use() == 0:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{s3.connections_in_use()} S3 connections still checked out")


def tamper(url: str) -> str:
    """The same URL with a signature S3 must refuse (403)."""
    parts = urlsplit(url)
    query = [
        (k, "0" * len(v) if k in ("X-Amz-Signature", "Signature") else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    assert any(k in ("X-Amz-Signature", "Signature") for k, _ in query), url
    return urlunsplit(parts._replace(query=urlencode(query)))


def rewrite_urls(monkeypatch: pytest.MonkeyPatch, rewrite: Callable[[str], str]) -> None:
    """Every presigned URL goes out rewritten (signed as usual, then changed)."""
    sign = SignedRequests._url

    async def rewritten(self: SignedRequests, method: str, key: str) -> str | None:
        url = await sign(self, method, key)
        return None if url is None else rewrite(url)

    monkeypatch.setattr(SignedRequests, "_url", rewritten)


async def test_head_and_ranges_are_answered_presigned(s3: S3Storage) -> None:
    meta = await s3.stat("big.bin")
    assert (meta.size, meta.etag.startswith('"')) == (len(BIG), True)
    assert meta.last_modified is not None and meta.last_modified > 1_600_000_000
    body = await s3.open(meta, ByteRange(1000, 1999))
    try:
        assert await body.read(4096) == BIG[1000:2000]
    finally:
        body.close()
    assert await s3.read(meta, ByteRange(0, 9)) == BIG[:10]
    assert counts(s3) == (3, 0)
    url, _ = signed(s3)._urls[("GET", S3_PREFIX + "big.bin")]
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url, "SigV4: SigV2 is refused by new buckets"
    await released(s3)


async def test_unseen_get_metadata_matches_botocore(s3: S3Storage) -> None:
    """The presigned answer's headers give the same ObjectMeta as botocore's HEAD."""
    opened = await s3.open_unseen("hello.txt", "bytes=-5")
    assert opened is not None
    try:
        assert opened.byte_range == ByteRange(len(HELLO) - 5, len(HELLO) - 1)
        assert await opened.body.read(100) == HELLO[-5:]
    finally:
        opened.body.close()
    head = await s3._call("head_object", "hello.txt", Bucket=BUCKET, Key=S3_PREFIX + "hello.txt")
    assert opened.meta == s3._meta("hello.txt", head, int(head["ContentLength"]))
    assert counts(s3) == (1, 0)
    await released(s3)


@pytest.mark.parametrize("suffix", ["with space.txt", "odd +%&=?#é name.bin"])
async def test_keys_that_need_quoting(s3: S3Storage, s3_server: S3Server, suffix: str) -> None:
    name = f"presigned/{uuid.uuid4().hex[:8]} {suffix}"
    data = name.encode() * 3
    await asyncio.to_thread(
        s3_server.client.put_object, Bucket=BUCKET, Key=S3_PREFIX + name, Body=data
    )
    try:
        meta = await s3.stat(name)
        assert meta.size == len(data)
        assert await s3.read(meta, ByteRange(1, len(data) - 1)) == data[1:]
    finally:
        await asyncio.to_thread(s3_server.client.delete_object, Bucket=BUCKET, Key=S3_PREFIX + name)
    assert counts(s3) == (2, 0)
    await released(s3)


async def test_missing_key_is_not_found_on_both_methods(s3: S3Storage) -> None:
    with pytest.raises(NotFound):
        await s3.stat("no/such/key.bin")
    with pytest.raises(NotFound):
        await s3.open_unseen("no/such/key.bin", None)
    assert counts(s3) == (2, 0), "S3's 404 NoSuchKey needs no second opinion"
    await released(s3)


async def test_unsatisfiable_range_and_changed_etag(s3: S3Storage) -> None:
    assert await s3.open_unseen("hello.txt", "bytes=999999-") is None  # 416
    meta = await s3.stat("hello.txt")
    stale = ObjectMeta(meta.key, meta.size, '"0123456789abcdef"', meta.last_modified, None)
    with pytest.raises(ObjectChanged):
        await s3.fetch(stale, 0, 4)  # If-Match: 412
    assert counts(s3) == (3, 0)
    await released(s3)


async def test_refused_url_falls_back_to_botocore_once_and_is_signed_again(
    s3: S3Storage,
) -> None:
    meta = await s3.stat("hello.txt")
    urls = signed(s3)._urls
    (url, until) = urls[("HEAD", S3_PREFIX + "hello.txt")]
    urls[("HEAD", S3_PREFIX + "hello.txt")] = (tamper(url), until)
    assert await s3.stat("hello.txt") == meta  # 403, then botocore's HEAD
    assert counts(s3) == (1, 1)
    assert ("HEAD", S3_PREFIX + "hello.txt") not in urls, "the refused URL is forgotten"
    assert await s3.stat("hello.txt") == meta
    assert counts(s3) == (2, 1), "signed anew, and accepted"
    assert signed(s3).enabled
    await released(s3)


async def test_refused_get_body_falls_back_with_the_same_bytes(s3: S3Storage) -> None:
    key = S3_PREFIX + "big.bin"
    first = await s3.open_unseen("big.bin", "bytes=100-199")
    assert first is not None
    first.body.close()
    urls = signed(s3)._urls
    url, until = urls[("GET", key)]
    urls[("GET", key)] = (tamper(url), until)
    opened = await s3.open_unseen("big.bin", "bytes=100-199")
    assert opened is not None
    try:
        assert await opened.body.read(1000) == BIG[100:200]
    finally:
        opened.body.close()
    assert counts(s3) == (1, 1)
    await released(s3)


async def test_a_server_refusing_presigned_urls_is_given_up(
    s3: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After REFUSALS_TO_GIVE_UP refusals in a row, every request goes to botocore only."""
    rewrite_urls(monkeypatch, tamper)
    meta = await s3.stat("hello.txt")
    for _ in range(s3_signed.REFUSALS_TO_GIVE_UP + 3):
        assert await s3.read(meta, ByteRange(0, len(HELLO) - 1)) == HELLO
    assert not signed(s3).enabled
    assert counts(s3) == (0, s3_signed.REFUSALS_TO_GIVE_UP)
    await released(s3)


async def test_refusals_botocore_shares_do_not_give_up_presigning(
    s3: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """403 to both (AccessDenied for a key, as AWS answers without s3:ListBucket)."""

    async def access_denied(op: str, key: str, **kwargs: Any) -> Any:
        raise StorageError(f"S3 {op} refused: AccessDenied", storage="uploads", key=key)

    rewrite_urls(monkeypatch, tamper)
    monkeypatch.setattr(s3, "_call", access_denied)
    for _ in range(s3_signed.REFUSALS_TO_GIVE_UP + 3):
        with pytest.raises(StorageError, match="AccessDenied"):
            await s3.stat("hello.txt")
    assert signed(s3).enabled
    assert counts(s3) == (0, s3_signed.REFUSALS_TO_GIVE_UP + 3)
    await released(s3)


async def test_missing_bucket_is_botocores_error(s3: S3Storage, s3_server: S3Server) -> None:
    """404 NoSuchBucket is not 'no such key': botocore names it, as a storage error."""
    requests = SignedRequests(s3._client, f"no-such-bucket-{uuid.uuid4().hex[:8]}", "uploads")
    assert await requests.request("GET", "hello.txt", {}) == Fallback(refused=False)
    assert (requests.answered_total, requests.fallbacks_total) == (0, 1)
    assert requests.enabled, "a 404 is not a refusal of presigned URLs"
    with pytest.raises(StorageError) as caught:
        await s3._call("get_object", "x", Bucket="no-such-bucket-x", Key="x")
    assert not isinstance(caught.value, NotFound)
    await released(s3)


async def test_unreachable_server_falls_back(
    s3: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that fails on the presigned path is botocore's to retry and report."""

    def to_a_closed_port(url: str) -> str:
        return urlunsplit(urlsplit(url)._replace(netloc="127.0.0.1:9"))  # discard: refused

    rewrite_urls(monkeypatch, to_a_closed_port)
    assert (await s3.stat("hello.txt")).size == len(HELLO)
    assert counts(s3) == (0, 1)
    await released(s3)


async def test_cache_is_bounded_and_urls_expire(
    s3: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_signed, "MAX_URLS", 3)
    for name in ("hello.txt", "big.bin", "pic.png", "hello.txt"):
        await s3.stat(name)
    urls = signed(s3)._urls
    assert len(urls) == 3
    key = ("HEAD", S3_PREFIX + "hello.txt")
    urls[key] = (urls[key][0], 0.0)  # past its reuse time
    await s3.stat("hello.txt")
    assert urls[key][1] > 0.0, "an expired URL is signed again"
    assert counts(s3) == (5, 0)
