"""Filling the cache: one shard's download into its part file, the hand-over of its parts to
the readers of this process as they land, and its publication as an entry.

* *Fill* (a miss): the process that wins ``flock(LOCK_EX)`` on ``tmp/<key>.part``
  (:mod:`fastfeed.cache.node` decides who fills) downloads the whole object in order (a few
  ranged GETs in flight, written in order, so the file's size is the number of bytes that
  landed), computing the chunks' CRC32Cs from the bytes it writes (in the same worker thread,
  while they are in memory), appends the trailer, fsyncs, checks the size, and renames it to
  ``entries/<key>.tar`` (atomic) before unlocking. The fill is the process's, not the reader's:
  it completes even if the reader that started it stops early. Unless ``CacheConfig.io ==
  "buffered"``, the fill writes its aligned parts with ``O_DIRECT`` where the file system takes
  it (no copy into the page cache); a shard's last part is written buffered.
* *Stream-and-tee*: a reader in the filling process gets each part straight from the fill's
  GET buffer once it is written (:meth:`Fills.claim`); a reader of a shard another process
  fills reads each byte range from the part file as soon as it has landed
  (:mod:`fastfeed.cache.reading`). If the filler dies (its lock becomes free while the file is
  incomplete), a waiting reader takes the lock and continues the fill from the bytes already
  there (their CRC32Cs are computed from the file).
* *Errors*: a full disk (ENOSPC, EDQUOT, EFBIG) or an unwritable directory logs one warning and
  the shard is read from the store instead. Readers never lose data: a failed fill only means
  the bytes come from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastfeed.cache.config import CacheConfig, CacheCounters
from fastfeed.cache.entries import ENTRY_SUFFIX, PART_SUFFIX, Checksums, seal, trailer_size, write_part
from fastfeed.cache.files import FILE_FLAGS, Tree, in_thread, pread_into, unlink_if_same
from fastfeed.store.base import ObjectInfo, RangeReader
from fastfeed.store.buffers import pool_for
from fastfeed.urls import Location

__all__ = ["FILL_PART", "Fills", "Source"]

log = logging.getLogger(__name__)

#: Bytes of one ranged GET of a fill, and how many are in flight at once per fill.
FILL_PART = 8 << 20
_FILL_WINDOW = 4
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass(frozen=True)
class Source:
    """One shard as the cache sees it: where its bytes come from when they are not on local
    disk (``store``), and who is told about them."""

    info: ObjectInfo
    key: str
    loc: Location
    store: RangeReader
    #: Bytes GET from the store, bytes read from local disk.
    on_fetched: Callable[[int], None] | None
    on_cached: Callable[[int], None] | None
    #: The owner's task set: fills started for it are added (it cancels them on close).
    tasks: set[asyncio.Task[Any]] | None
    part_size: int

    def fetched(self, n: int) -> None:
        """Tell the owner that ``n`` bytes were read from the store."""
        if self.on_fetched is not None:
            self.on_fetched(n)


@dataclass
class _Claim:
    """A reader in this process asking its own fill for bytes ``[start, end)`` before they land."""

    end: int
    out: memoryview
    future: asyncio.Future[memoryview | None]


@dataclass
class _FillState:
    """What a running fill of this process has issued, and the claims on parts it has not."""

    #: Parts start at ``base + k * part_size``; bytes before ``issued`` have been asked for.
    base: int = 0
    part_size: int = 1
    size: int = 0
    issued: int = 0
    claims: dict[int, _Claim] = field(default_factory=dict)
    #: CRC32Cs of the bytes written so far (the entry's trailer).
    sums: Checksums = field(default_factory=Checksums)

    def is_part(self, start: int, end: int) -> bool:
        """``[start, end)`` is one of the parts the fill will issue."""
        return (
            start >= self.issued
            and (start - self.base) % self.part_size == 0
            and end == min(start + self.part_size, self.size)
        )


class Fills:
    """The fills this process runs for one cache directory (on the IO loop), and what readers
    of this process wait on: the parts they claim (:meth:`claim`) and the news that a part
    landed (:meth:`landed`). A key whose fill failed is not filled again by this process.

    Args:
        config: the cache's config (``io``; ``dir`` and ``on_error`` for messages).
        counters: the cache's counters (``fills_completed``, ``fills_failed``).
        tree: the cache's directory tree as it is when a fill starts (the cache replaces it if
            the directory is removed under a running job).
    """

    def __init__(self, config: CacheConfig, counters: CacheCounters, tree: Callable[[], Tree]) -> None:
        self.config = config
        self.counters = counters
        self._tree = tree
        self._warned: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Set (and replaced) each time a fill of this process lands a part: its readers wake
        #: at once instead of polling the part file's size.
        self._landed: dict[str, asyncio.Event] = {}
        self._failed: set[str] = set()  # keys whose fill failed in this process: not retried
        self._states: dict[str, _FillState] = {}

    def running(self, key: str) -> asyncio.Task[None] | None:
        """This process's fill of ``key`` while it runs, else None."""
        return self._tasks.get(key)

    def has_failed(self, key: str) -> bool:
        """A fill of ``key`` failed in this process: its readers read the store instead."""
        return key in self._failed

    def _warn_once(self, kind: str, message: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message, *args)

    def start(self, src: Source, fd: int) -> asyncio.Task[None]:
        """Fill ``src`` on the IO loop; ``fd`` holds LOCK_EX on the part file (the task owns it)."""
        task = asyncio.get_running_loop().create_task(self._run(src, fd))
        self._tasks[src.key] = task
        if src.tasks is not None:
            src.tasks.add(task)
            task.add_done_callback(src.tasks.discard)
        task.add_done_callback(lambda _: self._tasks.pop(src.key, None))
        return task

    async def _run(self, src: Source, fd: int) -> None:
        """[holds LOCK_EX on the part file] Download the rest of the object, then publish it.

        A part a reader of this process has claimed (:meth:`claim`) is fetched straight into
        the reader's buffer and handed over once written; other parts are fetched into pooled
        buffers. Either way each byte is copied once from the socket and once to the page
        cache, and never read back (its CRC32C is taken in the thread that writes it).
        """
        key, info, tree = src.key, src.info, self._tree()
        name = f"{key}{PART_SUFFIX}"
        pool = pool_for(src.part_size)
        direct_fd = self._open_direct(tree, name, fd) if self.config.io != "buffered" else None
        # (start, GET, the claim it serves or None, the pooled buffer it fills or None)
        pending: list[tuple[int, asyncio.Task[memoryview], _Claim | None, mmap.mmap | None]] = []
        # Bytes a dead filler left are valid: resume after them (a partial trailer goes).
        offset = os.fstat(fd).st_size
        if offset > info.size:
            os.ftruncate(fd, info.size)
            offset = info.size
        next_start = offset
        state = self._states[key] = _FillState(offset, src.part_size, info.size, offset)
        published = False
        try:
            # The readers that opened this shard run first, so their claims are in before the
            # first GETs are issued.
            await asyncio.sleep(0)
            if offset:
                await in_thread(_sum_file, fd, offset, state.sums)
            while offset < info.size:
                while len(pending) < _FILL_WINDOW and next_start < info.size:
                    end = min(next_start + src.part_size, info.size)
                    claim = state.claims.pop(next_start, None)
                    if claim is not None and claim.future.done():
                        claim = None  # its reader was cancelled
                    buffer: mmap.mmap | None = None
                    if claim is not None:
                        out = claim.out
                    else:  # parts are at most part_size: the pool's size
                        buffer = pool.take()
                        out = memoryview(buffer)[: end - next_start]
                    read = src.store.read_range(src.loc, next_start, end, info.etag, out=out)
                    pending.append((next_start, asyncio.create_task(read), claim, buffer))
                    next_start = state.issued = end
                start, task, claim, buffer = pending[0]
                data = await task
                await in_thread(_write_and_sum, fd, direct_fd, data, start, state.sums)
                pending.pop(0)
                src.fetched(len(data))
                offset = start + len(data)
                if claim is not None:
                    _settle(claim, data)
                else:
                    pool.give(buffer)
                self._signal_landed(key)
            try:
                await in_thread(seal, fd, state.sums)
            except asyncio.CancelledError:
                # Every byte is here (the owner is closing): publishing is cheap, finish it.
                with contextlib.suppress(OSError):
                    self._publish(tree, key, info, fd)
                    published = True
                raise
            self._publish(tree, key, info, fd)
            published = True
        except BaseException as exc:
            if published:
                raise  # cancelled after publishing: nothing to undo
            for _, task, _, _ in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*(t for _, t, _, _ in pending), return_exceptions=True)
            with contextlib.suppress(OSError):
                unlink_if_same(tree.tmp, name, fd)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self.record_failure(key, exc)
        finally:
            # Readers whose claim was not served read the part file or the store instead.
            if self._states.get(key) is state:
                del self._states[key]
            for claim in [*state.claims.values(), *(c for _, _, c, _ in pending if c is not None)]:
                _settle(claim, None)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            if direct_fd is not None:
                os.close(direct_fd)
            self._signal_landed(key)

    async def claim(self, key: str, start: int, end: int, out: memoryview) -> memoryview | None:
        """Bytes ``[start, end)`` of ``key`` fetched by this process's fill straight into
        ``out``, returned once they are also on disk; ``None`` when the fill cannot serve them
        that way (no fill of ``key`` runs here, it has already issued that range, or the range
        is not one of its parts): read them from the part file then."""
        state = self._states.get(key)
        if state is None or not state.is_part(start, end) or start in state.claims:
            return None
        claim = _Claim(end, out, asyncio.get_running_loop().create_future())
        state.claims[start] = claim
        try:
            return await claim.future
        finally:
            if state.claims.get(start) is claim:
                del state.claims[start]  # cancelled before the fill issued it

    def _open_direct(self, tree: Tree, name: str, fd: int) -> int | None:
        """A second, ``O_DIRECT`` descriptor of the part file ``fd`` for its fill's writes; None
        (buffered writes) where the file system or the platform has no direct I/O: a warning
        when ``io="direct"`` asked for it, a debug message when ``"auto"`` chose it."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            self._fallback("fastfeed cache: O_DIRECT is not available here; fills are buffered")
            return None
        try:
            direct = os.open(name, os.O_WRONLY | flag | FILE_FLAGS, dir_fd=tree.tmp)
        except OSError as exc:
            self._fallback("fastfeed cache %s: no direct I/O (%s); fills are buffered", self.config.dir, exc)
            return None
        mine, theirs = os.fstat(direct), os.fstat(fd)
        if (mine.st_ino, mine.st_dev) != (theirs.st_ino, theirs.st_dev):
            os.close(direct)  # cannot happen while fd holds the part file's LOCK_EX
            return None
        return direct

    def _fallback(self, message: str, *args: Any) -> None:
        if self.config.io == "direct":
            self._warn_once("direct", message, *args)
        else:
            log.debug(message, *args)

    def _signal_landed(self, key: str) -> None:
        event = self._landed.pop(key, None)
        if event is not None:
            event.set()

    async def landed(self, key: str, timeout: float) -> None:
        """Wait until this process's fill of ``key`` lands its next part (or ends), at most
        ``timeout`` seconds."""
        event = self._landed.get(key)
        if event is None:
            event = self._landed[key] = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _publish(self, tree: Tree, key: str, info: ObjectInfo, fd: int) -> None:
        written, expected = os.fstat(fd).st_size, info.size + trailer_size(info.size)
        if written != expected:
            raise OSError(errno.EIO, f"cache fill of {info.url} wrote {written} of {expected} bytes")
        # Atomic: the entry appears complete (a rename never follows a link at its target).
        os.rename(f"{key}{PART_SUFFIX}", f"{key}{ENTRY_SUFFIX}", src_dir_fd=tree.tmp, dst_dir_fd=tree.entries)
        self.counters.fills_completed += 1

    def record_failure(self, key: str, exc: BaseException) -> None:
        """A fill of ``key`` failed with ``exc`` (its own, or opening its part file): counted, not
        tried again by this process, and a disk or directory error logged once per kind."""
        self.counters.fills_failed += 1
        self._failed.add(key)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            if self.config.on_error == "raise":
                log.error("fastfeed cache %s is full: %s", self.config.dir, exc)
            self._warn_once(
                "full",
                "fastfeed cache %s: the disk is full (%s); shards that do not fit are read from the store "
                "(lower cache_limit to fit the disk)",
                self.config.dir,
                exc,
            )
        elif isinstance(exc, OSError):
            self._warn_once("os", "fastfeed cache %s: %s; reading from the store instead", self.config.dir, exc)
        else:  # the store's error: the reader gets it from its own read of the store
            log.debug("cache fill of %s failed: %r", key, exc)


def _settle(claim: _Claim, data: memoryview | None) -> None:
    if not claim.future.done():
        claim.future.set_result(data)


def _write_and_sum(fd: int, direct_fd: int | None, data: memoryview, offset: int, sums: Checksums) -> None:
    """[worker thread] Write a fill's part and add it to the fill's checksums."""
    write_part(fd, direct_fd, data, offset)
    sums.update(data)


def _sum_file(fd: int, size: int, sums: Checksums) -> None:
    """[worker thread] Add bytes ``[0, size)`` of ``fd`` to ``sums`` (a fill resumed after its
    first filler died)."""
    buf = memoryview(bytearray(FILL_PART))
    for start in range(0, size, FILL_PART):
        piece = buf[: min(FILL_PART, size - start)]
        pread_into(fd, piece, start)
        sums.update(piece)
