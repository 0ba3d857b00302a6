"""``file://`` URLs and local paths as a :class:`~fastfeed.store.base.Store`."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from fastfeed.config import RetryConfig
from fastfeed.errors import (
    AccessDeniedError,
    EmptyDatasetError,
    FastfeedError,
    NotFoundError,
    StoreError,
    TransientStoreError,
)
from fastfeed.store.base import ObjectInfo, Store, target_view
from fastfeed.urls import Location

__all__ = ["LocalStore"]


class LocalStore(Store):
    """``file://`` URLs and local paths. Reads run in the loop's default thread pool."""

    def __init__(self, retry: RetryConfig | None = None) -> None:
        self.retry = retry or RetryConfig()

    async def list(self, loc: Location, suffix: str = ".tar") -> list[ObjectInfo]:
        root = Path(loc.path)
        if not root.exists():
            raise NotFoundError(f"directory {root} does not exist", url=loc.url, hint="check the path of the dataset")
        if not root.is_dir():
            raise NotFoundError(f"{root} is not a directory", url=loc.url)
        files = sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())
        if not files:
            raise EmptyDatasetError(
                f"no *{suffix} files under {root}",
                url=loc.url,
                hint="point the source at the directory that holds the shards",
            )
        return [ObjectInfo(p.as_uri(), p.stat().st_size, None) for p in files]

    async def head(self, loc: Location) -> ObjectInfo:
        try:
            st = await asyncio.get_running_loop().run_in_executor(None, os.stat, loc.path)
        except OSError as exc:
            raise _map_os_error(exc, loc.url) from exc
        if not os.path.isfile(loc.path):
            raise NotFoundError(f"{loc.path} is not a regular file", url=loc.url)
        return ObjectInfo(loc.url, st.st_size, None)

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        view = target_view(out, end - start)

        def read() -> memoryview:
            fd = os.open(loc.path, os.O_RDONLY)
            try:
                got = 0
                while got < len(view):
                    n = os.preadv(fd, [view[got:]], start + got)
                    if n == 0:
                        raise NotFoundError(
                            f"file shrank while reading: expected {end - start} bytes at offset {start}",
                            url=loc.url,
                        )
                    got += n
            finally:
                os.close(fd)
            return view

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, read)
        except FastfeedError:
            raise
        except OSError as exc:
            raise _map_os_error(exc, loc.url) from exc


def _map_os_error(exc: OSError, url: str) -> StoreError:
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"no such file: {exc.filename}", url=url, hint="check the path")
    if isinstance(exc, PermissionError):
        return AccessDeniedError(f"permission denied reading {exc.filename}", url=url)
    if exc.errno in (errno.EIO, errno.ETIMEDOUT):
        return TransientStoreError(f"I/O error: {exc}", url=url)
    return StoreError(f"cannot read: {exc}", url=url)
