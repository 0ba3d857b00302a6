"""Where finished shards go: a local directory (temporary name, fsync, rename) or a bucket
(each shard uploaded from a temporary file through the checkpoint store's upload path while the
next one is written). :class:`fastfeed.shards.ShardWriter` writes into the open shard of a sink.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import logging
import mmap
import os
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from fastfeed import _loop
from fastfeed.config import S3Config, format_size
from fastfeed.errors import (
    ConditionFailedError,
    ConfigError,
    FastfeedError,
    NotFoundError,
    StoreError,
)
from fastfeed.shards.manifest import (
    ShardInfo,
)
from fastfeed.store.upload import CkptStore, open_ckpt_store
from fastfeed.urls import Location

__all__ = ["FILE_BUFFER", "LocalSink", "OpenShard", "S3Sink", "Sink"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Buffer size of the shard files being written.
FILE_BUFFER = 1 << 20


@dataclass
class OpenShard:
    """A shard being written: its name, the file it goes to and the temporary path (local sinks)."""

    name: str
    fh: IO[bytes]
    tmp: str | None = None  # local sink: the temporary path


class Sink(abc.ABC):
    """Where finished shards go: a local directory or a bucket."""

    url: str

    @abc.abstractmethod
    def open(self, name: str) -> OpenShard:
        """A new shard being written."""

    @abc.abstractmethod
    def commit(self, shard: OpenShard, size: int, samples: int) -> None:
        """Make the shard durable (or start its upload); takes over ``shard.fh``."""

    def discard(self, shard: OpenShard | None) -> None:
        """Drop a shard that will not be committed."""
        if shard is None:
            return
        with contextlib.suppress(OSError):
            shard.fh.close()
        if shard.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(shard.tmp)

    @abc.abstractmethod
    def finish(self) -> list[ShardInfo]:
        """Wait for everything committed; the shards in order."""

    def abort(self, current: OpenShard | None) -> None:
        self.discard(current)

    def close(self) -> None:
        return None


class LocalSink(Sink):
    """Shards in a local directory: a temporary name, fsync, rename."""

    def __init__(self, root: str, *, overwrite: bool, first: str) -> None:
        self.root = os.path.abspath(root)
        self.url = Path(self.root).as_uri().rstrip("/") + "/"
        self._done: list[ShardInfo] = []
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"{self.root} exists and is not a directory", url=self.url, hint="pick a directory")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create {self.root}: {exc}", url=self.url, hint="check the path and permissions"
            ) from exc
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"{self.root} is not writable", url=self.url, hint="pick a writable directory")
        existing = os.path.join(self.root, *first.split("/"))
        if not overwrite and os.path.exists(existing):
            raise ConfigError(
                f"{existing} exists: the destination already holds a dataset",
                url=self.url,
                hint="write to an empty directory, or pass overwrite=True (--overwrite) to replace it",
            )

    def open(self, name: str) -> OpenShard:
        path = os.path.join(self.root, *name.split("/"))
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        except OSError as exc:
            raise StoreError(f"cannot create a shard in {parent}: {exc}", url=self.url) from exc
        return OpenShard(name, os.fdopen(fd, "wb", buffering=FILE_BUFFER), tmp)

    def commit(self, shard: OpenShard, size: int, samples: int) -> None:
        assert shard.tmp is not None
        path = os.path.join(self.root, *shard.name.split("/"))
        try:
            shard.fh.flush()
            os.fsync(shard.fh.fileno())
            shard.fh.close()
            os.chmod(shard.tmp, 0o644)  # mkstemp makes it 0600
            os.replace(shard.tmp, path)
        except OSError as exc:
            raise StoreError(
                f"cannot write {path}: {exc}", url=Path(path).as_uri(), hint="check free space and permissions"
            ) from exc
        self._done.append(ShardInfo(Path(path).as_uri(), size, None, samples))

    def finish(self) -> list[ShardInfo]:
        return list(self._done)


class S3Sink(Sink):
    """Uploads through the checkpoint store's one upload path (:class:`~fastfeed.store.upload.S3CkptStore`
    on fastfeed's IO loop): multipart with parts in parallel, conditional writes (``If-None-Match``)
    unless ``overwrite``, failed uploads aborted (again at close if that failed) and incomplete
    uploads of ``*.tar`` keys older than ``orphan_age`` (a writer killed mid-upload) aborted here at
    construction."""

    def __init__(
        self,
        loc: Location,
        config: S3Config,
        *,
        overwrite: bool,
        first: str,
        part_size: int,
        max_concurrency: int,
        tmp_dir: str | None,
        orphan_age: float,
    ) -> None:
        self.bucket = loc.bucket
        self.prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
        self.url = f"s3://{self.bucket}/{self.prefix}"
        self.overwrite = overwrite
        self._part_size = part_size
        self._concurrency = max_concurrency
        self._tmp_dir = tmp_dir
        self._done: list[ShardInfo] = []
        self._pending: concurrent.futures.Future[ShardInfo] | None = None
        self._uploader: concurrent.futures.ThreadPoolExecutor | None = None
        self._uploads: set[asyncio.Task[Any]] = set()  # on the IO loop: cancelled by abort()
        self._aborting = False  # on the IO loop: set by abort(), no upload starts after it
        self._io = _loop.acquire()
        self._released = False
        self._store: CkptStore | None = None
        try:
            self._store = self._io.run(open_ckpt_store(self.url, config))
            self._io.run(self._store.check_writable())
            first_url = f"{self.url}{first}"
            if not overwrite and self._exists(first):
                raise ConfigError(
                    f"{first_url} exists: the destination already holds a dataset",
                    url=self.url,
                    hint="write to an empty prefix, or pass overwrite=True (--overwrite) to replace it",
                )
            try:
                self._io.run(
                    self._store.abort_orphaned_uploads("", older_than=orphan_age, match=lambda k: k.endswith(".tar"))
                )
            except FastfeedError as err:
                log.warning("could not look for abandoned uploads under %s: %s", self.url, err)
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the IO loop as a task that :meth:`abort` can cancel."""

        async def tracked() -> T:
            if self._aborting:  # read and set on the IO loop only: no race with abort()
                coro.close()
                raise asyncio.CancelledError
            task = asyncio.ensure_future(coro)
            self._uploads.add(task)
            try:
                return await task
            finally:
                self._uploads.discard(task)

        return self._io.run(tracked())

    def _exists(self, key: str) -> bool:
        assert self._store is not None
        try:
            self._io.run(self._store.head(key))
        except NotFoundError:
            return False
        return True

    def open(self, name: str) -> OpenShard:
        try:
            fh = tempfile.TemporaryFile(  # noqa: SIM115 - owned by the OpenShard until uploaded
                dir=self._tmp_dir, prefix="fastfeed-shard-", buffering=FILE_BUFFER
            )
        except OSError as exc:
            raise StoreError(
                f"cannot create a temporary file for {name}: {exc}", url=self.url, hint="pass tmp_dir= a writable dir"
            ) from exc
        return OpenShard(name, fh)

    def commit(self, shard: OpenShard, size: int, samples: int) -> None:
        try:
            shard.fh.flush()
            self._drain()  # at most one upload in flight: two shards on disk at most
        except BaseException:
            self.discard(shard)
            raise
        if self._uploader is None:
            self._uploader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastfeed-shards-upload")
        self._pending = self._uploader.submit(self._upload, shard, size, samples)

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._done.append(pending.result())

    def finish(self) -> list[ShardInfo]:
        self._drain()
        return list(self._done)

    def abort(self, current: OpenShard | None) -> None:
        self.discard(current)

        def cancel() -> None:
            self._aborting = True
            for task in self._uploads:
                task.cancel()  # the upload aborts its multipart upload before it ends

        self._io.call_soon(cancel)
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(BaseException):
                pending.result()

    def close(self) -> None:
        if self._uploader is not None:
            self._uploader.shutdown(wait=True)
            self._uploader = None
        store, self._store = self._store, None
        if self._released:
            return
        self._released = True
        try:
            if store is not None:
                self._io.run(store.aclose())  # retries the abort of any upload that failed to abort
        finally:
            self._io.release()

    def put(self, key: str, body: bytes, *, if_absent: bool = False) -> None:
        """Write ``body`` to ``key`` (relative to the prefix)."""
        assert self._store is not None
        self._run(self._store.put(key, memoryview(body), if_absent=if_absent))

    def _upload(self, shard: OpenShard, size: int, samples: int) -> ShardInfo:
        assert self._store is not None
        store, key = self._store, shard.name
        url = f"{self.url}{key}"
        fd = shard.fh.fileno()
        try:
            if size <= self._part_size:
                self.put(key, os.pread(fd, size, 0), if_absent=not self.overwrite)
            else:
                mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)  # parts are read from the page cache
                try:
                    self._run(
                        store.put_large(
                            key,
                            memoryview(mapped),
                            part_size=self._part_size,
                            concurrency=self._concurrency,
                            if_absent=not self.overwrite,
                        )
                    )
                finally:
                    with contextlib.suppress(BufferError):  # a traceback still holds a view: GC closes it
                        mapped.close()
            head = self._io.run(store.head(key))
        except ConditionFailedError as err:
            raise StoreError(
                f"{url} appeared while this dataset was being written: another writer uses the prefix",
                url=url,
                hint="write to an empty prefix, or pass overwrite=True (--overwrite) to replace it",
            ) from err
        finally:
            shard.fh.close()
        if head.size != size:
            raise StoreError(
                f"{url} has {head.size} bytes after the upload, expected {size}",
                url=url,
                hint="another writer may be using this prefix",
            )
        log.info("uploaded %s (%s, %d samples)", url, format_size(size), samples)
        return ShardInfo(url, size, head.etag, samples)


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None
