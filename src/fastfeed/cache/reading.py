"""Reading one shard through the node cache (:class:`CachedFile`): a hit from its mapped entry,
each chunk checked, or a miss from the part file as its fill lands the bytes; from the store
when neither can serve them. :class:`~fastfeed.cache.node.ShardCache` decides which and makes
the :class:`CachedFile`.

* *Hit*: the entry is opened and ``flock(LOCK_SH)``'ed for as long as it is read (by the
  cache); eviction only removes entries it can ``flock(LOCK_EX)``, so a shard being read is
  never evicted. The entry is memory-mapped and readers get views of it (no copy), each chunk
  checked against its CRC32C the first time this mapping serves it (:meth:`CachedFile.verified_view`).
  A chunk that fails: the entry is dropped and the rest of the shard is read from the store.
* *Miss*: a reader in the filling process takes each part from the fill itself
  (:meth:`~fastfeed.cache.fill.Fills.claim`); a reader of another process's fill reads the part
  file as the bytes land, takes the fill over if its filler dies, and reads the store if it
  stalls for ``_STALL_S``.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
import time
from typing import Protocol

from fastfeed.cache.config import CacheCounters
from fastfeed.cache.entries import Entry, check_chunks
from fastfeed.cache.files import FILE_FLAGS, in_thread, pread_into, try_flock
from fastfeed.cache.fill import Fills, Source
from fastfeed.urls import Location

__all__ = ["CacheOps", "CachedFile"]

log = logging.getLogger(__name__)

#: A reader waiting for bytes of a shard another process fills gives up on the cache for that
#: shard (and reads from the store) if no byte lands for this long.
_STALL_S = 120.0
#: How often a waiting reader checks that the filler is still alive.
_LIVENESS_S = 0.1
#: Check each chunk of a hit against its CRC32C (off only to measure what the check costs:
#: benchmarks/cache/bench_hit_path.py).
_VERIFY = True


class CacheOps(Protocol):
    """What a :class:`CachedFile` uses of its cache (a :class:`~fastfeed.cache.node.ShardCache`)."""

    #: Where bytes served from local disk are counted.
    counters: CacheCounters
    #: The fills of this process: claims, landed parts, and a fill taken over.
    fills: Fills

    def drop(self, dir_fd: int, name: str, fd: int, url: str, why: str, then: str) -> None:
        """Remove a damaged entry, with a warning."""

    def take_over(self, key: str, locked_fd: int) -> int | None:
        """A read descriptor of ``key``'s part file whose lock the caller now holds, or None."""


def _map_entry(entry: Entry, size: int) -> memoryview | None:
    """A read-only view of the first ``size`` bytes (the shard) of ``entry``, or None.

    The mapping is made from a second descriptor of the same file: ``mmap`` keeps a
    duplicate of the descriptor it is given for as long as the mapping lives, and a
    duplicate of ``entry.fd`` would hold the lock with it. So closing the entry releases the
    lock (it can be evicted), while views handed to the consumer stay valid after the file
    is unlinked.
    """
    try:
        fd = os.open(entry.name, os.O_RDONLY | FILE_FLAGS, dir_fd=entry.dir_fd)
    except OSError:
        return None
    try:
        mine, locked = os.fstat(fd), os.fstat(entry.fd)
        if (mine.st_ino, mine.st_dev) != (locked.st_ino, locked.st_dev):
            return None  # not the file we hold (cannot happen while its LOCK_SH is held)
        return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


class CachedFile:
    """One shard read through the cache: from the entry (a hit, each chunk checked against its
    CRC32C before it is served) or from the part file as its bytes land (a fill by this or
    another process); from the store if the fill fails or the entry fails its check."""

    def __init__(
        self,
        cache: CacheOps,
        src: Source,
        fd: int,
        fill: asyncio.Task[None] | None,
        *,
        entry: Entry | None = None,
    ):
        self.cache = cache
        self.src = src
        self.info = src.info
        self.key = src.key
        self.fd: int | None = fd
        self.fill = fill
        self.entry = entry
        self.complete = self.hit = entry is not None
        self.bypass = False
        #: For a hit: the whole entry, memory-mapped; readers take views of it (no copy).
        self.mapped: memoryview | None = None
        #: For a hit: 1 for each chunk checked against its CRC32C in this mapping.
        self._checked = bytearray(len(entry.crcs) if entry is not None else 0)
        if entry is not None and self.info.size > 0:
            self.mapped = _map_entry(entry, self.info.size)

    def _chunks_of(self, start: int, end: int) -> tuple[int, int]:
        assert self.entry is not None
        chunk = self.entry.chunk
        return start // chunk, max(start // chunk, (end - 1) // chunk + 1)

    def _served(self, n: int) -> None:
        self.cache.counters.bytes_from_cache += n
        if self.src.on_cached is not None:
            self.src.on_cached(n)

    async def verified_view(self, start: int, end: int) -> memoryview | None:
        """For a hit: bytes ``[start, end)`` of the mapped entry as a read-only view (no copy),
        each chunk they touch checked against its CRC32C the first time this mapping serves
        it; None when the shard is not (or no longer) a mapped hit: use :meth:`read_range`."""
        mapped, entry = self.mapped, self.entry
        if mapped is None or entry is None or self.bypass:
            return None
        first, last = self._chunks_of(start, end)
        if _VERIFY and not all(self._checked[first:last]):
            bad = await in_thread(check_chunks, mapped, 0, entry.chunk, entry.crcs, first, last, self._checked)
            if bad is not None:
                self._failed_check(bad)
                return None
        # Checked: served even if the entry was closed or another chunk found damaged meanwhile
        # (the mapping lives as long as this view of it).
        view = mapped[start:end]
        self._served(len(view))
        return view

    async def _read_checked(self, start: int, end: int, out: memoryview) -> bool:
        """For a hit that could not be mapped: read ``[start, end)`` into ``out``, checking the
        whole chunks it touches; False if one fails (the shard is then read from the store)."""
        assert self.entry is not None and self.fd is not None
        entry, fd = self.entry, self.fd
        first, last = self._chunks_of(start, end)
        lo, hi = first * entry.chunk, min(last * entry.chunk, self.info.size)
        buf = memoryview(bytearray(hi - lo))

        def read_and_check() -> int | None:
            try:
                pread_into(fd, buf, lo)
            except EOFError:
                return first  # cut short since it was opened
            done = bytearray(len(entry.crcs))
            return check_chunks(buf, lo, entry.chunk, entry.crcs, first, last, done) if _VERIFY else None

        bad = await in_thread(read_and_check)
        if bad is not None:
            self._failed_check(bad)
            return False
        out[:] = buf[start - lo : end - lo]
        self._served(end - start)
        return True

    def _failed_check(self, chunk: int) -> None:
        """Chunk ``chunk`` of the hit failed its CRC32C: drop the entry, read from the store."""
        if self.bypass or self.entry is None or self.fd is None:
            return
        entry = self.entry
        self.mapped = None  # views already handed out stay valid (and were checked)
        self.bypass = True
        lo, hi = chunk * entry.chunk, min((chunk + 1) * entry.chunk, self.info.size)
        self.cache.drop(
            entry.dir_fd,
            entry.name,
            self.fd,
            self.info.url,
            f"fails its CRC32C check in bytes {lo}-{hi - 1}",
            "this read takes the shard from the store and its next read caches it again",
        )

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        """Bytes ``[start, end)`` of the shard (into ``out`` if given), as
        :meth:`~fastfeed.store.base.Store.read_range`: from the entry, the fill, the part file or
        the store, whichever holds them for this reader."""
        view = memoryview(bytearray(end - start)) if out is None else out
        if self.hit and not self.bypass:
            data = await self.verified_view(start, end)
            if data is not None:
                view[:] = data
                return view
            if not self.bypass and self.fd is not None and await self._read_checked(start, end, view):
                return view
        if not self.complete and not self.bypass:
            if self.fill is not None and not self.fill.done():
                # This process fills the shard: take the bytes from the fill itself.
                data = await self.cache.fills.claim(self.key, start, end, view)
                if data is not None:
                    return data
            await self._wait_for(end)
        if self.bypass or self.fd is None:
            data = await self.src.store.read_range(loc, start, end, etag, out=view)
            self.src.fetched(len(data))
            return data
        await in_thread(pread_into, self.fd, view, start)
        self._served(len(view))
        return view

    async def _wait_for(self, end: int) -> None:
        """Wait until the part file holds byte ``end - 1`` (or the whole shard), taking over the
        fill if its filler died; sets ``bypass`` when the store has to serve the bytes instead."""
        assert self.fd is not None
        delay = 0.0005
        landed = -1
        last_progress = time.monotonic()
        last_liveness = 0.0
        while True:
            size = os.fstat(self.fd).st_size
            if size >= self.info.size:
                self.complete = True
                return
            if size >= end:
                return
            now = time.monotonic()
            if size != landed:
                landed, last_progress = size, now
            if self.fill is not None and self.fill.done():
                # This process's fill ended incomplete (its error was logged): use the store.
                self.bypass = True
                return
            if self.fill is None and now - last_liveness > _LIVENESS_S:
                last_liveness = now
                if try_flock(self.fd, fcntl.LOCK_EX):
                    # The filler is gone. Take over if the part file is still the live one: the
                    # locked descriptor goes to the fill, this reader opens its own.
                    reader = self.cache.take_over(self.key, self.fd)
                    if reader is not None:
                        locked, self.fd = self.fd, reader
                        self.fill = self.cache.fills.start(self.src, locked)
                        continue
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    if os.fstat(self.fd).st_size < self.info.size:
                        self.bypass = True  # removed by a clean-up: read from the store
                        return
                    continue
            if now - last_progress > _STALL_S:
                log.warning("no progress filling %s for %.0fs; reading it from the store", self.info.url, _STALL_S)
                self.bypass = True
                return
            if self.fill is not None and not self.fill.done():
                await self.cache.fills.landed(self.key, _LIVENESS_S)  # our own fill: woken when a part lands
            else:
                await asyncio.sleep(delay)  # another process's fill: poll the part file
                delay = min(delay * 2, 0.02)

    def close(self) -> None:
        """Close the file (releasing a hit's LOCK_SH); further reads go to the store. Views of
        a mapped entry stay valid (the mapping is released with the last of them)."""
        self.mapped = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            self.bypass = True
            os.close(fd)
