"""The checkpoint store of a local (or network-mounted) directory (:class:`LocalCkptStore`):
writes are a temporary file, fsync and rename (a hard link for conditional writes); every path
below the root is opened through directory descriptors with ``O_NOFOLLOW``.

See :mod:`fastfeed.store.upload` for the design; the interface is
:class:`~fastfeed.store.upload_base.CkptStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator

from fastfeed.errors import (
    ConditionFailedError,
    CorruptCheckpointError,
    FastfeedError,
    NotFoundError,
    NotSupportedError,
    StoreError,
)
from fastfeed.store.upload_base import (
    DAMAGED,
    PROBE_PREFIX,
    CkptStore,
    StoredObject,
    check_key,
    check_prefix,
    too_large,
)

__all__ = ["LocalCkptStore"]

log = logging.getLogger(__name__)

#: Names of the local store's temporary files (``.tmp-``: those of earlier versions).
_LOCAL_TEMP_PREFIXES = (".fastfeed-tmp-", ".tmp-")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
#: errno values of an O_NOFOLLOW open that met a symbolic link.
_LINK_ERRNOS = (errno.ELOOP, errno.EMLINK)
#: errno values of os.link on a file system without hard links.
_NO_LINK_ERRNOS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV)


class LocalCkptStore(CkptStore):
    """A local (or network-mounted) directory; writes are a temp file + fsync + rename (or a
    hard link, for ``if_absent``). Every path below the root is opened relative to a directory
    descriptor with ``O_NOFOLLOW``: symbolic links inside the root are refused."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root + "/"
        self.conditional_writes = True

    def _display(self, key: str) -> str:
        return "file://" + os.path.join(self.root, *key.split("/"))

    def _walk(self, parts: list[str], *, create: bool) -> int:
        """A descriptor of the directory ``root/parts...`` (the caller closes it); with
        ``create``, missing directories are made. Raises FileNotFoundError / a symlink error."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            for part in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[tuple[int, os.stat_result]]:
        """The regular file ``key``, opened for reading without following any link."""
        parts = check_key(key, self.url).split("/")
        url = self._display(key)
        try:
            dfd = self._walk(parts[:-1], create=False)
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dfd)
            finally:
                os.close(dfd)
        except FileNotFoundError as exc:
            raise NotFoundError(f"{url} does not exist", url=url) from exc
        except OSError as exc:
            raise self._map(exc, key) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptCheckpointError(f"{url} is not a regular file", url=url, hint=DAMAGED)
            yield fd, st
        finally:
            os.close(fd)

    def _map(self, exc: OSError, key: str) -> FastfeedError:
        url = self._display(key)
        if exc.errno == errno.ENOTDIR:
            return CorruptCheckpointError(f"a directory above {url} is a file", url=url, hint=DAMAGED)
        if exc.errno in _LINK_ERRNOS:
            return CorruptCheckpointError(
                f"{url} (or a directory above it) is a symbolic link: checkpoint objects are never links, "
                "refusing to follow it",
                url=url,
                hint="something other than fastfeed changed the checkpoint directory",
            )
        if isinstance(exc, PermissionError):
            return StoreError(f"permission denied for {url}", url=url, hint="check the permissions")
        return StoreError(f"cannot access {url}: {exc}", url=url, hint="check space and permissions")

    async def check_readable(self) -> None:
        def probe() -> None:
            try:
                st = os.stat(self.root)
            except FileNotFoundError:
                return  # nothing saved yet: the first save makes it
            except OSError as exc:
                raise StoreError(f"cannot read checkpoints in {self.root}: {exc}", url=self.url) from exc
            if not stat.S_ISDIR(st.st_mode):
                hint = "checkpoints go into a directory: pick another"
                raise StoreError(f"{self.root} is not a directory", url=self.url, hint=hint)

        await asyncio.to_thread(probe)

    async def check_writable(self) -> None:
        def probe() -> None:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot write checkpoints to {self.root}: {exc}", url=self.url, hint="pick a writable directory"
                ) from exc

        await asyncio.to_thread(probe)
        name = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
        try:
            await self._put_object(name, memoryview(b""), if_absent=True)
        except NotSupportedError as err:
            self.note_no_conditional_writes(err)
        finally:
            await self.delete([name])

    async def _put_object(self, key: str, data: memoryview, *, if_absent: bool, crc: int | None = None) -> None:
        parts = check_key(key, self.url).split("/")
        url = self._display(key)

        def write() -> None:
            dfd = self._walk(parts[:-1], create=True)
            try:
                tmp = f"{_LOCAL_TEMP_PREFIXES[0]}{secrets.token_hex(8)}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    if if_absent:
                        os.link(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                        os.unlink(tmp, dir_fd=dfd)
                    else:
                        os.replace(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
                os.fsync(dfd)  # the new name is durable too
            finally:
                os.close(dfd)

        try:
            await asyncio.to_thread(write)
        except FileExistsError as exc:
            raise ConditionFailedError(f"{url} exists already", url=url) from exc
        except OSError as exc:
            if if_absent and exc.errno in _NO_LINK_ERRNOS:
                raise NotSupportedError(f"the file system of {self.root} has no hard links", url=url) from exc
            raise self._map(exc, key) from exc

    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        def read() -> bytes:
            with self._open(key) as (fd, st):
                if limit is not None and st.st_size > limit:
                    raise too_large(self._display(key), st.st_size, limit)
                # Sized by the file, not by the limit: read(n) allocates n bytes up front.
                want = st.st_size + 1 if limit is None else min(st.st_size, limit) + 1
                with os.fdopen(os.dup(fd), "rb") as f:
                    return f.read(want) if st.st_size else f.read()

        data = await asyncio.to_thread(read)
        if limit is not None and len(data) > limit:  # it grew since fstat
            raise too_large(self._display(key), len(data), limit)
        return data

    async def head(self, key: str) -> StoredObject:
        def stat_() -> StoredObject:
            with self._open(key) as (_, st):
                return StoredObject(key, st.st_size, time.time() - st.st_mtime, _local_etag(st))

        return await asyncio.to_thread(stat_)

    async def read_range(self, key: str, start: int, end: int, out: memoryview, etag: str | None = None) -> None:
        url = self._display(key)

        def read() -> None:
            with self._open(key) as (fd, st):
                if etag is not None and _local_etag(st) != etag:
                    raise ConditionFailedError(f"{url} changed while it was being read", url=url)
                got = 0
                while got < end - start:
                    n = os.preadv(fd, [out[got:]], start + got)
                    if n == 0:
                        raise CorruptCheckpointError(
                            f"{url} ends at byte {start + got}, before the {end} its manifest says",
                            url=url,
                            hint=DAMAGED,
                        )
                    got += n

        if end > start:
            await asyncio.to_thread(read)

    async def get_into(
        self, key: str, out: memoryview, *, part_size: int, concurrency: int, etag: str | None = None
    ) -> None:
        url = self._display(key)

        def read() -> None:
            with self._open(key) as (fd, st):
                if st.st_size != len(out):
                    raise CorruptCheckpointError(
                        f"{url} has {st.st_size} bytes, expected {len(out)}", url=url, hint=DAMAGED
                    )
                got = 0
                while got < len(out):
                    n = os.preadv(fd, [out[got:]], got)
                    if n == 0:
                        raise CorruptCheckpointError(f"{url} shrank to {got} bytes while read", url=url, hint=DAMAGED)
                    got += n

        await asyncio.to_thread(read)

    def _scan(self, prefix: str) -> Iterator[tuple[str, str, os.stat_result]]:
        """``(key, name, stat)`` of every regular file below the root (links are skipped)."""
        stack = [""]
        while stack:
            rel = stack.pop()
            top = os.path.join(self.root, *rel.split("/")) if rel else self.root
            try:
                entries = list(os.scandir(top))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                key = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        stack.append(key)
                elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        yield key, entry.name, entry.stat(follow_symlinks=False)

    async def list_objects(self, prefix: str = "") -> list[StoredObject]:
        check_prefix(prefix, self.url)

        def walk() -> list[StoredObject]:
            now = time.time()
            return [
                StoredObject(key, st.st_size, now - st.st_mtime, _local_etag(st))
                for key, name, st in self._scan(prefix)
                if not name.startswith((*_LOCAL_TEMP_PREFIXES, PROBE_PREFIX))
            ]

        return await asyncio.to_thread(walk)

    async def abort_orphaned_uploads(self, prefix: str, *, older_than: float, match: Callable[[str], object]) -> int:
        check_prefix(prefix, self.url)

        def sweep() -> int:
            now = time.time()
            stale = [
                key
                for key, name, st in self._scan(prefix)
                if name.startswith(_LOCAL_TEMP_PREFIXES) and now - st.st_mtime >= older_than
            ]
            for key in stale:
                log.warning(
                    "removing %s, an unfinished write last touched over %.0f s ago", self._display(key), older_than
                )
            self._remove(stale)
            return len(stale)

        return await asyncio.to_thread(sweep)

    def _remove(self, keys: list[str]) -> None:
        for key in keys:
            parts = check_key(key, self.url).split("/")
            try:
                dfd = self._walk(parts[:-1], create=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._map(exc, key) from exc
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(parts[-1], dir_fd=dfd)
            except OSError as exc:
                raise self._map(exc, key) from exc
            finally:
                os.close(dfd)
            if len(parts) > 1:  # the directory, once empty
                with contextlib.suppress(OSError):
                    gfd = self._walk(parts[:-2], create=False)
                    try:
                        os.rmdir(parts[-2], dir_fd=gfd)
                    finally:
                        os.close(gfd)

    async def delete(self, keys: list[str]) -> None:
        await asyncio.to_thread(self._remove, list(keys))


def _local_etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"
