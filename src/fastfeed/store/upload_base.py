"""The checkpoint-store interface (:class:`CkptStore`) and what its implementations share: the
checked object names (:func:`check_key`), the listing entry (:class:`StoredObject`), the part
checksum (:func:`checksum`) and S3's part-size limits.

The design (conditional writes, check-write-verify, multipart uploads, orphan cleanup) is
described in :mod:`fastfeed.store.upload`, which also opens a store for a URL; the S3 store is in
:mod:`fastfeed.store.upload_s3`, the local one in :mod:`fastfeed.store.upload_local`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from fastfeed import _native
from fastfeed.errors import (
    ConditionFailedError,
    CorruptCheckpointError,
    NotFoundError,
    NotSupportedError,
)

__all__ = [
    "CHECKSUM",
    "DAMAGED",
    "MAX_PARTS",
    "MIN_PART",
    "PROBE_PREFIX",
    "CkptStore",
    "StoredObject",
    "Uploaded",
    "check_key",
    "check_prefix",
    "checksum",
    "checksum_in_thread",
    "effective_part_size",
    "too_large",
]

log = logging.getLogger(__name__)

#: S3's smallest part (all but the last).
MIN_PART = 5 << 20
#: S3's largest number of parts in one upload; larger objects get larger parts.
MAX_PARTS = 10_000
#: The name prefix of the objects that probe a store's writability (and conditional writes).
PROBE_PREFIX = ".fastfeed-probe-"
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_MAX_KEY = 1024


@dataclass(frozen=True)
class StoredObject:
    """An object of a checkpoint store, as listed or HEADed."""

    key: str  # relative to the store's prefix
    size: int
    #: Seconds since the object was last written, by the store's clock (None: unknown).
    age: float | None = None
    #: Changes whenever the object is rewritten (the S3 ETag; locally mtime and size).
    etag: str | None = None


class Uploaded(NamedTuple):
    """What :meth:`CkptStore.put_large` wrote: the part size it used (``part_size``, or larger
    to stay within S3's 10,000 parts) and the :func:`checksum` of each part-sized slice."""

    part_size: int
    crcs: list[int]


def check_key(key: str, url: str) -> str:
    """``key`` if it names an object inside the prefix ``url``; else a
    :class:`~fastfeed.errors.CorruptCheckpointError` (keys come from manifests, which anyone
    with write access to the bucket can change)."""
    if (
        type(key) is not str
        or not key
        or len(key) > _MAX_KEY
        or any(p in ("", ".", "..") for p in key.split("/"))
        or _BAD_KEY_CHARS.search(key)
    ):
        raise CorruptCheckpointError(
            f"refusing the object name {str(key)[:200]!r}: it is not a plain relative name inside {url}",
            url=url,
            hint="a manifest may only name objects of its own checkpoint; this one was damaged or tampered with",
        )
    return key


def check_prefix(prefix: str, url: str) -> str:
    """A listing prefix: ``""`` or a key, optionally ending with ``/``."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix, url)
    return prefix


class CkptStore(abc.ABC):
    """Keys are relative to the checkpoint prefix (``step-000000000042/MANIFEST.json``)."""

    url: str
    #: Whether ``put(if_absent=True)`` is enforced by the store (see the module docstring);
    #: known after :meth:`check_writable`.
    conditional_writes: bool = True

    @abc.abstractmethod
    async def check_readable(self) -> None:
        """Raise a clear error now if the prefix cannot be read (missing bucket, wrong
        credentials, denied): one cheap request, and nothing written."""

    @abc.abstractmethod
    async def check_writable(self) -> None:
        """Raise a clear error now if the prefix cannot be written (missing bucket, denied);
        probe conditional writes (cached per store)."""

    @abc.abstractmethod
    async def _put_object(self, key: str, data: memoryview, *, if_absent: bool, crc: int | None = None) -> None:
        """One write; with ``if_absent`` a conditional one (raises ConditionFailedError or, where
        the store turns out not to support it, NotSupportedError). ``crc``: the caller's
        :func:`checksum` of ``data``, if it has one (a store that sends it need not compute it)."""

    async def put(self, key: str, data: memoryview, *, if_absent: bool = False, crc: int | None = None) -> None:
        """Write one object. ``if_absent``: only if the key is free, else
        :class:`~fastfeed.errors.ConditionFailedError` (and nothing is replaced where the store
        has conditional writes; see the module docstring for the others). ``crc``: the caller's
        :func:`checksum` of ``data``, if it has one."""
        if not if_absent:
            await self._put_object(key, data, if_absent=False, crc=crc)
            return
        if self.conditional_writes:
            try:
                await self._put_object(key, data, if_absent=True, crc=crc)
                return
            except ConditionFailedError as err:
                if await self._holds(key, data):  # an earlier attempt of this very write landed
                    return
                raise self.exists_error(key) from err
            except NotSupportedError as err:
                self.note_no_conditional_writes(err)
        await self._put_verified(key, data, crc)

    async def _put_verified(self, key: str, data: memoryview, crc: int | None) -> None:
        """``if_absent`` without conditional writes: check, write, read back."""
        with contextlib.suppress(NotFoundError):
            await self.head(key)
            raise self.exists_error(key)  # the key is taken
        await self._put_object(key, data, if_absent=False, crc=crc)
        if not await self._holds(key, data):
            raise self.exists_error(key)

    async def _holds(self, key: str, data: memoryview) -> bool:
        """Whether ``key`` holds exactly ``data``."""
        try:
            return await self.get(key, limit=len(data)) == data
        except (NotFoundError, CorruptCheckpointError):
            return False

    def exists_error(self, key: str) -> ConditionFailedError:
        """The error of an ``if_absent`` write of ``key`` that met an existing object."""
        return ConditionFailedError(
            f"{self.url}{key} exists already: another writer created it first (nothing was replaced)",
            url=self.url + key,
            hint="another job writes to this prefix: give each job its own",
        )

    def note_no_conditional_writes(self, err: BaseException | None) -> None:
        """Record (and log once) that this store does not enforce conditional writes."""
        self.conditional_writes = False
        log.warning(
            "%s does not support conditional writes%s; fastfeed falls back to check-write-verify there, "
            "which detects most but not all races between two writers of the same object",
            self.url,
            f" ({err})" if err is not None else "",
        )

    async def put_large(
        self, key: str, data: memoryview, *, part_size: int, concurrency: int, if_absent: bool = False
    ) -> Uploaded:
        """Write ``data`` as one object, in parallel parts when large; the part size used and
        the :func:`checksum` of each part (computed while the parts go up)."""
        part = effective_part_size(len(data), part_size)
        crcs = await asyncio.gather(*(checksum_in_thread(data[s : s + part]) for s in range(0, len(data), part)))
        await self.put(key, data, if_absent=if_absent)
        return Uploaded(part, list(crcs))

    @abc.abstractmethod
    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        """The whole object; one larger than ``limit`` bytes raises
        :class:`~fastfeed.errors.CorruptCheckpointError` before its body is read."""

    @abc.abstractmethod
    async def head(self, key: str) -> StoredObject:
        """Size and ETag of one object (NotFoundError if it does not exist)."""

    @abc.abstractmethod
    async def read_range(self, key: str, start: int, end: int, out: memoryview, etag: str | None = None) -> None:
        """Bytes ``[start, end)`` into ``out`` (exactly that long); with ``etag``, refuse
        another version of the object. An object that ends early raises
        :class:`~fastfeed.errors.CorruptCheckpointError`."""

    async def get_into(
        self, key: str, out: memoryview, *, part_size: int, concurrency: int, etag: str | None = None
    ) -> None:
        """Read the whole object (exactly ``len(out)`` bytes) into ``out``, in parallel ranges."""
        limit = asyncio.Semaphore(concurrency)

        async def part(start: int) -> None:
            end = min(start + part_size, len(out))
            async with limit:
                await self.read_range(key, start, end, out[start:end], etag)

        await asyncio.gather(*(part(s) for s in range(0, len(out), part_size)))

    @abc.abstractmethod
    async def list_objects(self, prefix: str = "") -> list[StoredObject]:
        """Every object under ``prefix`` (keys relative to the store's prefix)."""

    @abc.abstractmethod
    async def delete(self, keys: list[str]) -> None:
        """Delete ``keys`` (missing ones are fine)."""

    @abc.abstractmethod
    async def abort_orphaned_uploads(self, prefix: str, *, older_than: float, match: Callable[[str], object]) -> int:
        """Abort the incomplete uploads under ``prefix`` whose key ``match`` accepts, started
        more than ``older_than`` seconds ago (by the store's clock); how many. Locally: remove
        this store's temporary files, last written that long ago."""

    async def aclose(self) -> None:
        return None


def effective_part_size(size: int, part_size: int) -> int:
    """``part_size``, or larger so that ``size`` bytes fit in S3's 10,000 parts."""
    return max(part_size, math.ceil(size / MAX_PARTS))


#: The hint of an object that is not what its manifest or store says.
DAMAGED = "it was damaged or tampered with (or is being rewritten by something other than fastfeed)"


def too_large(url: str, size: int, limit: int) -> CorruptCheckpointError:
    """The error of an object at ``url`` of ``size`` bytes where at most ``limit`` may be."""
    return CorruptCheckpointError(f"{url} has {size} bytes, more than the {limit} it may have", url=url, hint=DAMAGED)


#: The checksum recorded per part in manifests (CRC32C: the CPU computes it at several GB/s).
CHECKSUM = "crc32c"


def checksum(data: memoryview | bytes) -> int:
    """The :data:`CHECKSUM` of ``data`` (the GIL is released while it runs)."""
    return _native.crc32c(data)


async def checksum_in_thread(view: memoryview) -> int:
    """:func:`checksum` of ``view`` in a worker thread (off the IO loop)."""
    return await asyncio.to_thread(checksum, view)
