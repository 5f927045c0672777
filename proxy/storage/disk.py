"""A directory on local disk as a storage, with keys confined to its root.

File system calls run inline on the event loop, as nginx does without `aio threads`:
on page-cached media a stat or a read costs microseconds, far less than a thread hop.
"""

from __future__ import annotations

import os
import stat as stat_mod
from collections import OrderedDict
from typing import Final

from proxy.config import DiskStorageConfig
from proxy.errors import NotFound, ObjectChanged, StorageError
from proxy.model import ByteRange, FileBody, ObjectMeta

_OPEN_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)
FD_CACHE_SIZE: Final = 256  # like nginx's open_file_cache, bounded; holds small files only


class DiskStorage:
    """Serve files below `root`; a path (or symlink) that leaves the root is NotFound."""

    kind = "disk"
    inline_io = True

    def __init__(self, cfg: DiskStorageConfig) -> None:
        self.name = cfg.name
        root = os.path.realpath(cfg.root)
        if not os.path.isdir(root):
            raise StorageError(f"storage {cfg.name!r}: root {str(cfg.root)!r} is not a directory")
        self.root = root
        self._root_prefix = root.rstrip(os.sep) + os.sep
        self._open_flags = _OPEN_FLAGS
        # Small files served whole: path -> (fd, (dev, ino, mtime_ns, size)), LRU order.
        # A hit costs lstat + pread instead of lstat + open + fstat + pread + close.
        self._fds: OrderedDict[str, tuple[int, tuple[int, int, int, int]]] = OrderedDict()
        self._open_bodies = 0

    async def stat(self, key: str) -> ObjectMeta:
        """Return the metadata of the regular file `key` (confined; symlinks resolved)."""
        path, st = self._lookup(key)
        if not stat_mod.S_ISREG(st.st_mode):
            raise NotFound("not a regular file")
        return ObjectMeta(
            key=key,
            size=st.st_size,
            etag=_etag(st),
            last_modified=int(st.st_mtime),
            content_type=None,  # a plain file has no type metadata: the extension decides
            token=(path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size),
        )

    def _lookup(self, key: str) -> tuple[str, os.stat_result]:
        """lstat each component of the key (keys hold no '..', see resolver.path).

        Without symlinks the path cannot leave the root and the last lstat is the
        answer: one syscall for a flat key, where realpath() makes one per component.
        """
        path = self.root
        try:
            for part in key.split("/"):
                path = f"{path}{os.sep}{part}"
                st = os.lstat(path)
                if stat_mod.S_ISLNK(st.st_mode):
                    return self._resolve_links(key)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound("no such file") from None
        except OSError as exc:
            raise StorageError(f"stat failed: {exc.strerror}", storage=self.name, key=key) from exc
        return path, st

    def _resolve_links(self, key: str) -> tuple[str, os.stat_result]:
        """Follow symlinks; a target outside the root is NotFound (SPEC §3)."""
        path = os.path.realpath(os.path.join(self.root, key))
        if not path.startswith(self._root_prefix):
            raise NotFound("outside root")
        try:
            return path, os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound("no such file") from None
        except OSError as exc:
            raise StorageError(f"stat failed: {exc.strerror}", storage=self.name, key=key) from exc

    async def open(self, meta: ObjectMeta, byte_range: ByteRange) -> FileBody:
        """Open the file `stat` described; ObjectChanged if it was replaced or modified since."""
        body = FileBody(
            self._open_verified(meta), byte_range.start, byte_range.length, self._body_closed
        )
        self._open_bodies += 1
        return body

    def _body_closed(self) -> None:
        self._open_bodies -= 1

    def in_use(self) -> int:
        """Files held open by streams now (the small-file cache is not counted)."""
        return self._open_bodies

    def idle(self) -> int:
        """Descriptors kept by the small-file cache."""
        return len(self._fds)

    def figures(self) -> dict[str, int]:
        return {}

    async def probe(self) -> None:
        """The root is still a readable directory."""
        # Inline like every call of this storage (module docstring).
        if not os.path.isdir(self.root) or not os.access(self.root, os.R_OK | os.X_OK):  # noqa: ASYNC240
            raise StorageError("root is not a readable directory", storage=self.name)

    def unchanged(self, meta: ObjectMeta) -> bool:
        """The file `stat` described is still there, the same inode, size and mtime.

        One lstat of the path `stat` ended at: a path whose components were replaced since
        (a symlink, another file) names another inode, or a hard link to this same file.
        """
        path, dev, ino, mtime_ns, size = meta.token
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return (
            st.st_ino == ino
            and st.st_mtime_ns == mtime_ns
            and st.st_size == size
            and st.st_dev == dev
            and stat_mod.S_ISREG(st.st_mode)
        )

    def plain_path(self, meta: ObjectMeta) -> bool:
        """`stat` reached the file by its key alone, through no symbolic link."""
        return bool(meta.token[0] == f"{self.root}{os.sep}{meta.key}")

    async def read(self, meta: ObjectMeta, byte_range: ByteRange) -> bytes:
        """Read a small range whole (see read_now)."""
        return self.read_now(meta, byte_range)

    async def open_unseen(self, key: str, range_spec: str | None) -> None:
        """Nothing to save: a stat is one system call, never a round trip."""
        return None

    def read_now(self, meta: ObjectMeta, byte_range: ByteRange) -> bytes:
        """Read a small range whole, from a cached descriptor when the file is unchanged.

        Synchronous from lookup to pread, so a cached descriptor is never in use across
        an await and eviction may close it at once. Streamed bodies never use the cache:
        they own their descriptor and close it when the stream ends (SPEC §4).
        """
        identity = meta.token[1:]
        cached = self._fds.get(meta.token[0])
        if cached is not None and cached[1] == identity:
            fd = cached[0]
            self._fds.move_to_end(meta.token[0])
        else:
            fd = self._open_verified(meta)
            self._remember(meta.token[0], fd, identity)
        try:
            data = os.pread(fd, byte_range.length, byte_range.start)
        except OSError as exc:
            raise StorageError(f"read failed: {exc.strerror}", storage=self.name) from exc
        if len(data) != byte_range.length:
            raise ObjectChanged("file shrank", storage=self.name, key=meta.key)
        return data

    def _remember(self, path: str, fd: int, identity: tuple[int, int, int, int]) -> None:
        old = self._fds.pop(path, None)
        if old is not None:
            os.close(old[0])
        self._fds[path] = (fd, identity)
        if len(self._fds) > FD_CACHE_SIZE:
            os.close(self._fds.popitem(last=False)[1][0])

    def _open_verified(self, meta: ObjectMeta) -> int:
        path, dev, ino, mtime_ns, size = meta.token
        try:
            fd = os.open(path, self._open_flags)
        except FileNotFoundError:
            raise ObjectChanged("file vanished", storage=self.name, key=meta.key) from None
        except PermissionError:
            # O_NOATIME needs file ownership; retry without it (and stop asking for it).
            self._open_flags &= ~getattr(os, "O_NOATIME", 0)
            try:
                fd = os.open(path, self._open_flags)
            except OSError as exc:
                raise StorageError(f"open failed: {exc.strerror}", storage=self.name) from exc
        except OSError as exc:
            raise StorageError(f"open failed: {exc.strerror}", storage=self.name) from exc
        st = os.fstat(fd)  # identity again after open(): the file may have been swapped
        if (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) != (dev, ino, mtime_ns, size):
            os.close(fd)
            raise ObjectChanged("file changed", storage=self.name, key=meta.key)
        return fd

    async def close(self) -> None:
        """Close the cached descriptors; streamed bodies close their own."""
        while self._fds:
            os.close(self._fds.popitem()[1][0])


def _etag(st: os.stat_result) -> str:
    """A strong validator that changes whenever the file does (RFC 9110 §8.8.3)."""
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"'
