"""DiskStorage: the small-file descriptor cache never serves stale bytes and stays bounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.config import DiskStorageConfig
from proxy.errors import NotFound
from proxy.model import ByteRange
from proxy.storage.disk import FD_CACHE_SIZE, DiskStorage


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def read(storage: DiskStorage, key: str, start: int = 0, end: int | None = None) -> bytes:
    meta = await storage.stat(key)
    return await storage.read(meta, ByteRange(start, meta.size - 1 if end is None else end))


async def test_hit_reuses_the_descriptor_and_serves_ranges(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    storage = DiskStorage(DiskStorageConfig(name="d", root=tmp_path))
    before = open_fds()
    assert await read(storage, "a.bin") == b"0123456789"
    assert await read(storage, "a.bin", 2, 4) == b"234"
    assert storage.idle() == 1
    assert open_fds() == before + 1
    await storage.close()
    assert (storage.idle(), open_fds()) == (0, before)


async def test_a_changed_file_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"old-bytes")
    storage = DiskStorage(DiskStorageConfig(name="d", root=tmp_path))
    before = open_fds()
    assert await read(storage, "a.bin") == b"old-bytes"
    tmp = tmp_path / "a.tmp"
    tmp.write_bytes(b"new-bytes")
    os.replace(tmp, path)  # a new inode at the same path
    assert await read(storage, "a.bin") == b"new-bytes"
    st = path.stat()
    path.write_bytes(b"NEW-bytes")  # in place, same size...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # ...a later mtime
    assert await read(storage, "a.bin") == b"NEW-bytes"
    assert open_fds() == before + 1  # the stale descriptors were closed
    path.unlink()
    with pytest.raises(NotFound):
        await storage.stat("a.bin")
    await storage.close()
    assert open_fds() == before


async def test_the_cache_is_bounded(tmp_path: Path) -> None:
    storage = DiskStorage(DiskStorageConfig(name="d", root=tmp_path))
    before = open_fds()
    for i in range(FD_CACHE_SIZE + 20):
        (tmp_path / f"f{i}").write_bytes(b"%d" % i)
        assert await read(storage, f"f{i}") == b"%d" % i
    assert storage.idle() == FD_CACHE_SIZE
    assert open_fds() == before + FD_CACHE_SIZE
    await storage.close()
    assert open_fds() == before


async def test_streamed_bodies_own_their_descriptor(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    storage = DiskStorage(DiskStorageConfig(name="d", root=tmp_path))
    before = open_fds()
    meta = await storage.stat("a.bin")
    body = await storage.open(meta, ByteRange(10, 19))
    assert await body.read(100) == b"x" * 10
    assert await body.read(100) == b""
    body.close()
    body.close()  # idempotent
    assert (storage.idle(), open_fds()) == (0, before)


async def test_open_bodies_are_counted_until_closed(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    storage = DiskStorage(DiskStorageConfig(name="d", root=str(tmp_path)))
    meta = await storage.stat("a.bin")
    bodies = [await storage.open(meta, ByteRange(0, 99)) for _ in range(3)]
    assert storage.in_use() == 3
    for body in bodies:
        body.close()
        body.close()  # idempotent: never a negative count
    assert storage.in_use() == 0
    await storage.probe()
    await storage.close()
