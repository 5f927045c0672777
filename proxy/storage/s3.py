"""An S3 bucket (AWS, SeaweedFS, MinIO…) as a storage, through one long-lived aiobotocore client.

GETs and HEADs go out on the client's presigned URLs first (s3_signed.py), botocore's own
calls when those are not answered plainly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, Final

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    ReadTimeoutError,
)

from proxy import heap
from proxy.config import S3StorageConfig
from proxy.errors import NotFound, ObjectChanged, StorageError, StorageTimeout
from proxy.model import ByteRange, ObjectMeta, Opened, read_exactly
from proxy.storage.s3_body import READ_BUFSIZE, S3Body, cap_socket_reads
from proxy.storage.s3_signed import Fallback, RangeUnsatisfiable, SignedRequests

# S3's default when the uploader set no type: treat it as "no metadata" (SPEC §3).
_GENERIC_TYPES: Final = frozenset({"", "binary/octet-stream"})
_NOT_FOUND_CODES: Final = frozenset({"404", "NoSuchKey", "NotFound"})
_CHANGED_CODES: Final = frozenset({"412", "PreconditionFailed"})
_UNSATISFIABLE_CODES: Final = frozenset({"416", "InvalidRange"})
_POOL_HEADROOM: Final = 16
# A client that has not asked for the next chunk for this long is not draining: give the
# S3 connection back and re-GET the rest when it asks again (pitfalls P12, detach-on-stall).
DETACH_AFTER_S: Final = 0.1
# One recv() of an asyncio socket transport takes up to 256 KiB (`max_size`), whatever
# READ_BUFSIZE says: ~300 KiB per attached stream while 200 of them start at once (P12).
SOCKET_READ_MAX: Final = 32 * 1024
# Each resume doubles that body's delay up to this cap: a steady slow reader (one write
# every 0.25 s at 64 KiB/s) stays attached, while a client that really stalls still gives
# its S3 connection back within the cap.
DETACH_MAX_S: Final = 1.6
# glibc keeps freed heap pages in RSS; give them back this long after bodies were released.
TRIM_AFTER_S: Final = 1.0
# Re-GETs in flight at once. Clients that read at the same pace wake together: 1000
# simultaneous re-GETs (new connection, request, response objects) cost ~130 KiB each.
MAX_RESUMING: Final = 32


class _SmallBufferSession(AIOHTTPSession):  # type: ignore[misc]  # aiobotocore is untyped
    """aiobotocore's aiohttp session, with a small `read_bufsize` and pool gauges.

    AioConfig cannot pass `read_bufsize`, so this repeats aiobotocore 3.10's `_get_session`
    (pinned, see the notes) with that one argument added; a test checks it still applies.
    """

    async def _get_session(self, proxy_url: str | None) -> aiohttp.ClientSession:
        session: aiohttp.ClientSession | None = self._sessions.get(proxy_url)
        if session is None:
            async with self._sessions_lock:
                session = self._sessions.get(proxy_url)
                if session is None:
                    connector = await self._create_connector(proxy_url)
                    session = await self._exit_stack.enter_async_context(
                        aiohttp.ClientSession(
                            connector=connector,
                            timeout=self._timeout,
                            skip_auto_headers={"CONTENT-TYPE"},
                            auto_decompress=False,
                            read_bufsize=READ_BUFSIZE,
                        )
                    )
                    self._sessions[proxy_url] = session
        return session

    def connections_in_use(self) -> int:
        """Connections checked out of the pools (aiohttp has no public gauge for it)."""
        return sum(len(s.connector._acquired) for s in (self._sessions or {}).values())

    def connections_idle(self) -> int:
        """Keep-alive connections waiting in the pools for reuse."""
        return sum(
            len(conns)
            for s in (self._sessions or {}).values()
            for conns in s.connector._conns.values()
        )


class S3Storage:
    """Objects under `prefix` in one bucket; keys can never leave the prefix.

    `first_byte_timeout_s` bounds a detached body's re-GET, waiting for one of the
    `max_resuming` slots included (default: connect + read timeout); `detach_after_s` is how
    long a body first waits for its next read before detaching (0: never).
    Figures for /stats: `detached_total`, `resumed_total`, the gauge `detached_active`,
    `resume_queued_total` (re-GETs that waited for a slot), `resume_timed_out_total`,
    `uncapped_total` (GETs whose socket reads could not be capped: not an asyncio selector
    loop) and `trims_total`.
    """

    kind = "s3"
    inline_io = False

    def __init__(
        self,
        cfg: S3StorageConfig,
        *,
        max_streams: int,
        first_byte_timeout_s: float | None = None,
        detach_after_s: float = DETACH_AFTER_S,
        max_resuming: int = MAX_RESUMING,
    ) -> None:
        self.name = cfg.name
        self._cfg = cfg
        self._bucket = cfg.bucket
        self._prefix = cfg.prefix
        self._pool_size = max_streams + _POOL_HEADROOM  # a slot per stream (P7)
        self.first_byte_timeout_s = (
            cfg.connect_timeout + cfg.read_timeout
            if first_byte_timeout_s is None
            else first_byte_timeout_s
        )
        self.detach_after_s = detach_after_s
        self.detach_max_s = max(DETACH_MAX_S, detach_after_s)
        self.socket_read_max = SOCKET_READ_MAX
        self.resume_gate = asyncio.Semaphore(max_resuming)
        self._trim_handle: asyncio.TimerHandle | None = None
        self.detached_total = 0
        self.resumed_total = 0
        self.detached_active = 0
        self.resume_queued_total = 0
        self.resume_timed_out_total = 0
        self.uncapped_total = 0
        self.trims_total = 0
        self.handovers_total = 0
        self.spliced_bytes_total = 0
        self.heads_total = 0
        self.unseen_gets_total = 0
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._signed: SignedRequests | None = None

    async def start(self) -> None:
        """Create the client; credentials come from `_env` keys or botocore's default chain."""
        cfg = self._cfg
        creds: dict[str, str] = {}
        if cfg.access_key_id_env and cfg.secret_access_key_env:
            creds["aws_access_key_id"] = _require_env(cfg.access_key_id_env, cfg.name)
            creds["aws_secret_access_key"] = _require_env(cfg.secret_access_key_env, cfg.name)
            if cfg.session_token_env:
                creds["aws_session_token"] = _require_env(cfg.session_token_env, cfg.name)
        config = AioConfig(
            s3={"addressing_style": cfg.addressing_style},
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            # botocore's own "max_attempts" counts retries; ours is the total, as documented.
            retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
            max_pool_connections=self._pool_size,
            # Checksums are validated only at EOF of a whole object: useless for ranges.
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
            http_session_cls=_SmallBufferSession,
            # SigV4 for presigned URLs too (botocore may pick SigV2 for them in us-east-1,
            # which buckets made since 2020 refuse); requests were SigV4 already.
            signature_version="s3v4",
        )
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3", region_name=cfg.region, endpoint_url=cfg.endpoint_url, config=config, **creds
            )
        )
        self._signed = SignedRequests(self._client, self._bucket, self.name)

    async def stat(self, key: str) -> ObjectMeta:
        """HEAD the object."""
        self.heads_total += 1
        head = await self._object("head_object", key, {})
        return self._meta(key, head, int(head["ContentLength"]))

    async def open_unseen(self, key: str, range_spec: str | None) -> Opened | None:
        """GET with no HEAD before it: the answer's headers are the metadata.

        A HEAD then a GET cost two round trips before the first byte: 10 ms of 15 against
        SeaweedFS. Not pinned with If-Match: this body defines the version, and its ETag
        pins every later re-GET. None when S3 finds the range unsatisfiable (416).
        """
        self.unseen_gets_total += 1
        try:
            obj = await self._object("get_object", key, {"Range": range_spec} if range_spec else {})
        except RangeUnsatisfiable:
            return None
        body = obj["Body"]
        if not cap_socket_reads(body, self.socket_read_max):
            self.uncapped_total += 1
        length = int(obj.get("ContentLength", -1))
        content_range = obj.get("ContentRange")
        if content_range:  # "bytes first-last/complete-length"
            got = _parse_content_range(content_range)
            if got is None:  # "*" for the length, or garbage: ask the size with a HEAD
                body.close()
                return None
            byte_range, size = got
        else:
            byte_range, size = ByteRange(0, length - 1), length
        if length != byte_range.length:
            body.close()
            raise StorageError("S3 answered another length than its range", storage=self.name)
        meta = self._meta(key, obj, size)
        return Opened(meta, byte_range, S3Body(self, meta, byte_range, body))

    def _meta(self, key: str, head: Any, size: int) -> ObjectMeta:
        content_type = head.get("ContentType") or ""
        if not content_type.isprintable():  # never let metadata inject header lines
            content_type = ""
        last_modified = head.get("LastModified")
        return ObjectMeta(
            key=key,
            size=size,
            etag=head.get("ETag") or '""',
            last_modified=int(last_modified.timestamp()) if last_modified else None,
            content_type=None if content_type in _GENERIC_TYPES else content_type,
        )

    async def open(self, meta: ObjectMeta, byte_range: ByteRange) -> S3Body:
        """GET one range, pinned to the ETag `stat` saw (If-Match) so parts never mix versions."""
        body = await self.fetch(meta, byte_range.start, byte_range.end)
        return S3Body(self, meta, byte_range, body)

    async def read(self, meta: ObjectMeta, byte_range: ByteRange) -> bytes:
        """Read a small range whole; the body is read to its end, so its connection is reused."""
        body = await self.fetch(meta, byte_range.start, byte_range.end)
        try:  # the raw body, no S3Body: nothing to detach between these reads
            return await read_exactly(body, byte_range.length, storage=self.name, key=meta.key)
        except (TimeoutError, ReadTimeoutError) as exc:
            raise StorageTimeout("S3 body read timed out", storage=self.name) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise StorageError(f"S3 body failed: {exc}", storage=self.name) from exc
        finally:
            body.close()

    async def close(self) -> None:
        """Close the client and its connection pool."""
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        await self._stack.aclose()

    def connections_in_use(self) -> int:
        """S3 connections currently checked out of the pool (a leak never returns to 0)."""
        with contextlib.suppress(AttributeError):
            http_session = self._client._endpoint.http_session
            if isinstance(http_session, _SmallBufferSession):
                return http_session.connections_in_use()
        return 0

    def in_use(self) -> int:
        """Storage protocol: the S3 connections held by open bodies (/stats upstream_in_use)."""
        return self.connections_in_use()

    def idle(self) -> int:
        """Storage protocol: keep-alive S3 connections kept for reuse (/stats upstream_idle)."""
        with contextlib.suppress(AttributeError):
            http_session = self._client._endpoint.http_session
            if isinstance(http_session, _SmallBufferSession):
                return http_session.connections_idle()
        return 0

    def released(self) -> None:
        """A body dropped its buffers: return free heap pages to the OS soon, at most 1/s.

        glibc keeps freed memory in RSS; after a wave of detaches or closes it held +60 to
        +300 % of the baseline 10 s after the clients left (pitfalls P12).
        """
        if self._trim_handle is not None or _malloc_trim is None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to schedule on
            loop = asyncio.get_running_loop()
            self._trim_handle = loop.call_later(TRIM_AFTER_S, self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        if _malloc_trim is not None:
            _malloc_trim(0)
            self.trims_total += 1

    def figures(self) -> dict[str, int]:
        """Detach-on-stall counters: a `detached_active` that stays above 0 is a leak."""
        return {
            "detached_total": self.detached_total,
            "resumed_total": self.resumed_total,
            "detached_active": self.detached_active,
            "uncapped_total": self.uncapped_total,
            "trims_total": self.trims_total,
            "resume_queued_total": self.resume_queued_total,
            "resume_timed_out_total": self.resume_timed_out_total,
            "handovers_total": self.handovers_total,
            "spliced_bytes_total": self.spliced_bytes_total,
            "heads_total": self.heads_total,
            "unseen_gets_total": self.unseen_gets_total,
            "presigned_total": self._signed.answered_total if self._signed else 0,
            "presigned_fallbacks_total": self._signed.fallbacks_total if self._signed else 0,
        }

    async def probe(self) -> None:
        """HEAD the bucket: reachable, and the credentials are accepted."""
        await self._call("head_bucket", "", Bucket=self._bucket)

    async def fetch(self, meta: ObjectMeta, start: int, end: int) -> Any:
        """GET bytes `start..end` of the version `meta` names; return the open body."""
        pinned = meta.etag != '""'
        headers = {"Range": f"bytes={start}-{end}"}
        if pinned:
            headers["If-Match"] = meta.etag
        obj = await self._object("get_object", meta.key, headers)
        body = obj["Body"]
        if not cap_socket_reads(body, self.socket_read_max):
            self.uncapped_total += 1
        if int(obj.get("ContentLength", -1)) != end - start + 1:
            body.close()
            raise StorageError("S3 answered another range than asked", storage=self.name)
        if pinned and obj.get("ETag", meta.etag) != meta.etag:  # a server ignoring If-Match
            body.close()
            raise ObjectChanged("object changed", storage=self.name, key=meta.key)
        return body

    async def _object(self, op: str, key: str, headers: dict[str, str]) -> Any:
        """head_object or get_object: through a presigned URL when that answers, else botocore."""
        signed = self._signed
        refused = False  # by S3, to the presigned URL
        if signed is not None:
            method = "GET" if op == "get_object" else "HEAD"
            answer = await signed.request(method, self._prefix + key, headers)
            if not isinstance(answer, Fallback):
                return answer
            refused = answer.refused
        params = {"Bucket": self._bucket, "Key": self._prefix + key}
        if "Range" in headers:
            params["Range"] = headers["Range"]
        if "If-Match" in headers:
            params["IfMatch"] = headers["If-Match"]
        answer = await self._call(op, key, **params)
        if refused and signed is not None:
            signed.refused_where_botocore_was_served()
        return answer

    async def _call(self, op: str, key: str, **kwargs: Any) -> Any:
        try:
            return await getattr(self._client, op)(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise NotFound("no such key") from None
            if code in _CHANGED_CODES:
                raise ObjectChanged("object changed", storage=self.name, key=key) from None
            if code in _UNSATISFIABLE_CODES:
                raise RangeUnsatisfiable(
                    f"S3 {op}: range not satisfiable", storage=self.name
                ) from None
            raise StorageError(f"S3 {op} refused: {code}", storage=self.name, key=key) from exc
        except (TimeoutError, ConnectTimeoutError, ReadTimeoutError) as exc:
            raise StorageTimeout(f"S3 {op} timed out", storage=self.name, key=key) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise StorageError(f"S3 {op} failed: {exc}", storage=self.name, key=key) from exc


_malloc_trim = heap.malloc_trim  # module attribute: tests replace it


def _parse_content_range(value: str) -> tuple[ByteRange, int] | None:
    """`bytes 0-99/1000` → (ByteRange(0, 99), 1000); None for anything else."""
    unit, _, rest = value.partition(" ")
    span, _, size = rest.partition("/")
    first, _, last = span.partition("-")
    if unit != "bytes" or not all(x.isascii() and x.isdigit() for x in (first, last, size)):
        return None  # str.isdigit alone accepts "²", which int() refuses
    byte_range = ByteRange(int(first), int(last))
    if byte_range.start > byte_range.end or byte_range.end >= int(size):
        return None
    return byte_range, int(size)


def _require_env(var: str, storage: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise StorageError(f"storage {storage!r}: environment variable {var} is not set")
    return value
