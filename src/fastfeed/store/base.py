"""The read interface every store implements: list, head, read a byte range.

Everything above the stores (prefetcher, cache, dataset) depends only on :class:`Store`, so a
store can be replaced by a fake in unit tests, wrapped to inject latency in benchmarks, or
swapped for a faster data-plane engine without touching the pipeline. Implementations:
:class:`~fastfeed.store.s3.S3Store` (aiobotocore), :class:`~fastfeed.store.obstore.ObstoreS3Store`
(object_store) and :class:`~fastfeed.store.local.LocalStore`; :mod:`fastfeed.store.pool` picks
one per URL and shares S3 clients.

Stores are created and used on the process's IO loop (:mod:`fastfeed._loop`) and are not
thread-safe.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fastfeed.errors import (
    BucketNotFoundError,
    EmptyDatasetError,
    StoreError,
    TransientStoreError,
)
from fastfeed.urls import Location

__all__ = [
    "BUCKET_HINT",
    "CREDENTIAL_HINT",
    "ObjectInfo",
    "RangeReader",
    "Store",
    "bucket_missing",
    "check_received",
    "gather_limited",
    "put_chunk",
    "sorted_listing",
    "target_view",
]


@dataclass(frozen=True)
class ObjectInfo:
    """An object (or file): its URL, size in bytes and ETag (``None`` for local files)."""

    url: str
    size: int
    etag: str | None = None


class RangeReader(Protocol):
    """What reads of an object's bytes need: :meth:`Store.read_range`."""

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview: ...


class Store(abc.ABC):
    """The narrow interface every store implements (async, used on one event loop)."""

    @abc.abstractmethod
    async def list(self, loc: Location, suffix: str = ".tar") -> list[ObjectInfo]:
        """All objects under the prefix ``loc`` whose names end in ``suffix``, sorted by URL.

        Raises:
            BucketNotFoundError / NotFoundError: the bucket or directory does not exist.
            EmptyDatasetError: nothing matched.
        """

    @abc.abstractmethod
    async def head(self, loc: Location) -> ObjectInfo:
        """Size and ETag of one object. Raises NotFoundError if it does not exist."""

    @abc.abstractmethod
    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        """Bytes ``[start, end)`` of the object, as a memoryview of exactly ``end - start`` bytes.

        With ``out`` (a writable buffer of exactly that length) the bytes are written into it,
        so callers can reuse buffers; otherwise a new buffer is allocated. If ``etag`` is given
        and the object changed, raises :class:`StoreError` instead of returning bytes of a
        different version.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def target_view(out: memoryview | None, length: int) -> memoryview:
    """``out`` checked to be a writable byte buffer of ``length`` bytes, or a new one."""
    if out is None:
        return memoryview(bytearray(length))
    if out.readonly or out.nbytes != length or out.itemsize != 1:
        raise ValueError(f"out must be a writable byte buffer of {length} bytes, got {out.nbytes}")
    return out


def put_chunk(view: memoryview, got: int, chunk: bytes | memoryview, start: int, url: str) -> int:
    """Copy ``chunk`` of a ranged response into ``view`` (the range's bytes, from object byte
    ``start``) after the ``got`` bytes received so far; returns the bytes received now.

    Raises:
        StoreError: the server sent more bytes than the range holds.
    """
    n = len(chunk)
    if got + n > len(view):
        raise StoreError(f"server sent more bytes than requested for range {start}-{start + len(view) - 1}", url=url)
    view[got : got + n] = chunk
    return got + n


def check_received(view: memoryview, got: int, start: int, url: str) -> None:
    """Raises TransientStoreError (retried, resumed from byte ``got``) when a response ended
    before filling ``view``."""
    if got < len(view):
        raise TransientStoreError(
            f"response ended early: got {got} of {len(view)} bytes of range {start}-{start + len(view) - 1}", url=url
        )


BUCKET_HINT = "create the bucket or fix the URL; check AWS_ENDPOINT_URL points at the right store"
CREDENTIAL_HINT = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that they may read this bucket"


def bucket_missing(bucket_url: str) -> BucketNotFoundError:
    """The error for a bucket that does not exist (every S3 engine raises this one)."""
    return BucketNotFoundError(f"bucket does not exist: {bucket_url}", url=bucket_url, hint=BUCKET_HINT)


def sorted_listing(found: list[ObjectInfo], prefix_url: str, suffix: str) -> list[ObjectInfo]:
    """A listing's shards sorted by URL, or :class:`EmptyDatasetError` naming the prefix."""
    if not found:
        raise EmptyDatasetError(
            f"no *{suffix} objects under {prefix_url}",
            url=prefix_url,
            hint="check the prefix (listing is case-sensitive) and the endpoint",
        )
    return sorted(found, key=lambda o: o.url)


async def gather_limited(coros: Sequence[Any], limit: int) -> list[Any]:
    """Run awaitables with at most ``limit`` in flight; results in input order."""
    sem = asyncio.Semaphore(limit)

    async def run(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(run(c) for c in coros)))
