"""An S3 bucket (AWS, SeaweedFS, MinIO…) as a storage, through one long-lived aiobotocore client."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Final

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    ReadTimeoutError,
)

from proxy.config import S3StorageConfig
from proxy.errors import NotFound, ObjectChanged, StorageError, StorageTimeout
from proxy.model import ByteRange, ObjectMeta

# S3's default when the uploader set no type: treat it as "no metadata" (SPEC §3).
_GENERIC_TYPES: Final = frozenset({"", "binary/octet-stream"})
_NOT_FOUND_CODES: Final = frozenset({"404", "NoSuchKey", "NotFound"})
_CHANGED_CODES: Final = frozenset({"412", "PreconditionFailed"})
_POOL_HEADROOM: Final = 16


class S3Body:
    """One ranged GET's body; maps mid-body failures to storage errors (pitfalls P11)."""

    __slots__ = ("_body", "_name", "remaining")

    def __init__(self, body: Any, length: int, name: str) -> None:
        self._body = body
        self._name = name
        self.remaining = length

    async def read(self, n: int) -> bytes:
        """Read up to `n` bytes; b"" only once the whole range was read."""
        if self.remaining <= 0:
            return b""
        try:
            data: bytes = await self._body.read(min(n, self.remaining))
        except (TimeoutError, ReadTimeoutError) as exc:
            raise StorageTimeout("S3 body read timed out", storage=self._name) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise StorageError(f"S3 body failed: {exc}", storage=self._name) from exc
        if not data:
            raise StorageError("S3 body ended early", storage=self._name)
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        """Release the connection: back to the pool when fully read, else closed (P7)."""
        self._body.close()


class S3Storage:
    """Objects under `prefix` in one bucket; keys can never leave the prefix."""

    kind = "s3"
    inline_io = False

    def __init__(self, cfg: S3StorageConfig, *, max_streams: int) -> None:
        self.name = cfg.name
        self._cfg = cfg
        self._bucket = cfg.bucket
        self._prefix = cfg.prefix
        self._pool_size = max_streams + _POOL_HEADROOM  # a slot per stream (P7)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

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
        )
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3", region_name=cfg.region, endpoint_url=cfg.endpoint_url, config=config, **creds
            )
        )

    async def stat(self, key: str) -> ObjectMeta:
        """HEAD the object."""
        head = await self._call("head_object", key, Bucket=self._bucket, Key=self._prefix + key)
        content_type = head.get("ContentType") or ""
        if not content_type.isprintable():  # never let metadata inject header lines
            content_type = ""
        last_modified = head.get("LastModified")
        return ObjectMeta(
            key=key,
            size=int(head["ContentLength"]),
            etag=head.get("ETag") or '""',
            last_modified=int(last_modified.timestamp()) if last_modified else None,
            content_type=None if content_type in _GENERIC_TYPES else content_type,
        )

    async def open(self, meta: ObjectMeta, byte_range: ByteRange) -> S3Body:
        """GET one range, pinned to the ETag `stat` saw (If-Match) so parts never mix versions."""
        extra = {"IfMatch": meta.etag} if meta.etag != '""' else {}
        obj = await self._call(
            "get_object",
            meta.key,
            Bucket=self._bucket,
            Key=self._prefix + meta.key,
            Range=f"bytes={byte_range.start}-{byte_range.end}",
            **extra,
        )
        body = obj["Body"]
        if int(obj.get("ContentLength", -1)) != byte_range.length:
            body.close()
            raise StorageError("S3 answered another range than asked", storage=self.name)
        return S3Body(body, byte_range.length, self.name)

    async def read(self, meta: ObjectMeta, byte_range: ByteRange) -> bytes:
        """Read a small range whole; the body is read to its end, so its connection is reused."""
        body = await self.open(meta, byte_range)
        try:
            parts = []
            while chunk := await body.read(byte_range.length):
                parts.append(chunk)
            return b"".join(parts)
        finally:
            body.close()

    async def close(self) -> None:
        """Close the client and its connection pool."""
        await self._stack.aclose()

    def connections_in_use(self) -> int:
        """S3 connections currently checked out of the pool (a leak never returns to 0)."""
        with contextlib.suppress(AttributeError):
            connector = self._client._endpoint.http_session._session.connector
            return len(connector._acquired)
        return 0

    async def _call(self, op: str, key: str, **kwargs: Any) -> Any:
        try:
            return await getattr(self._client, op)(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise NotFound("no such key") from None
            if code in _CHANGED_CODES:
                raise ObjectChanged("object changed", storage=self.name, key=key) from None
            raise StorageError(f"S3 {op} refused: {code}", storage=self.name, key=key) from exc
        except (TimeoutError, ConnectTimeoutError, ReadTimeoutError) as exc:
            raise StorageTimeout(f"S3 {op} timed out", storage=self.name, key=key) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise StorageError(f"S3 {op} failed: {exc}", storage=self.name, key=key) from exc


def _require_env(var: str, storage: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise StorageError(f"storage {storage!r}: environment variable {var} is not set")
    return value
