"""The stores a process uses: one per URL scheme, and S3 clients shared by configuration.

:func:`open_store` makes a store for one URL (the caller closes it); :class:`StoreSet` is what a
pipeline holds: the local store and an S3 store created lazily on the IO loop and shared with
every other :class:`StoreSet` of the same configuration in this process.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastfeed.config import RetryConfig, S3Config
from fastfeed.store.base import Store
from fastfeed.store.http import HttpStore
from fastfeed.store.local import LocalStore
from fastfeed.store.s3 import S3Store
from fastfeed.urls import Location, parse_url

__all__ = ["StoreSet", "create_s3_store", "open_store", "shared_s3_clients_created"]


class StoreSet:
    """The stores one pipeline uses, by scheme, created lazily on the IO loop.

    The S3 store (its client and connection pool) is shared with every other :class:`StoreSet`
    of the same configuration on this process's IO loop, and closed when the last of them
    closes: a client takes tens of milliseconds of CPU to build (endpoint rules, the service
    model), which every stream of every epoch would otherwise pay, even when all its shards are
    cache hits.
    """

    def __init__(self, s3: S3Config, retry: RetryConfig | None = None) -> None:
        self.s3_config = s3
        self._local = LocalStore(retry or s3.retry)
        self._http: HttpStore | None = None
        self._s3: Store | None = None
        self._lock = asyncio.Lock()

    async def get(self, loc: Location) -> Store:
        """The store for ``loc``'s scheme."""
        if loc.scheme == "file":
            return self._local
        if loc.scheme in ("http", "https"):
            if self._http is None:
                self._http = _http_store(self.s3_config)
            return self._http
        async with self._lock:
            if self._s3 is None:
                self._s3 = await _shared_s3.acquire(self.s3_config)
            return self._s3

    async def aclose(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()
        if self._s3 is not None:
            self._s3 = None
            await _shared_s3.release(self.s3_config)


class _SharedS3Stores:
    """S3 stores shared by configuration on the running loop, reference-counted (IO loop only)."""

    def __init__(self) -> None:
        # (pid, id(loop), config) -> [task creating the store, references]. The pid keeps a
        # forked worker off its parent's clients; the loop id keeps loops apart.
        self._entries: dict[tuple[int, int, S3Config], list[Any]] = {}
        #: Clients built by this process so far.
        self.created = 0

    @staticmethod
    def _key(config: S3Config) -> tuple[int, int, S3Config]:
        return (os.getpid(), id(asyncio.get_running_loop()), config)

    async def acquire(self, config: S3Config) -> Store:
        key = self._key(config)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = [asyncio.ensure_future(create_s3_store(config)), 0]
            self.created += 1
        entry[1] += 1
        try:
            return await asyncio.shield(entry[0])
        except BaseException:
            await self.release(config)
            raise

    async def release(self, config: S3Config) -> None:
        key = self._key(config)
        entry = self._entries.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del self._entries[key]
        task = entry[0]
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().aclose()
        elif not task.done():
            task.cancel()


_shared_s3 = _SharedS3Stores()


async def create_s3_store(config: S3Config) -> Store:
    """The S3 store of ``config.engine``: :class:`S3Store` or the obstore engine."""
    if config.engine == "obstore":
        from fastfeed.store.obstore import ObstoreS3Store

        return await ObstoreS3Store.create(config)
    return await S3Store.create(config)


async def open_store(url: str, config: S3Config) -> Store:
    """Create the store for ``url``'s scheme (the caller closes it with ``aclose``)."""
    loc = parse_url(url)
    if loc.scheme == "file":
        return LocalStore(config.retry)
    if loc.scheme in ("http", "https"):
        return _http_store(config)
    return await create_s3_store(config)


def _http_store(config: S3Config) -> HttpStore:
    """A store for http(s) shards, with the S3 configuration's retries and timeouts."""
    return HttpStore(config.retry, config.connect_timeout, config.read_timeout)


def shared_s3_clients_created() -> int:
    """How many S3 clients this process has built for :class:`StoreSet` s so far."""
    return _shared_s3.created
