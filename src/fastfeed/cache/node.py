"""Node-local shard cache: each shard is fetched from the store once per node, then read from
local disk (NVMe) by every DataLoader worker, rank and job of the user on the node.

:class:`ShardCache` is the cache of one directory in one process: it opens (and checks) the
directory, decides for each shard whether it is a hit, a fill this process starts, a wait on
another's fill, or a bypass to the store, makes room for fills, and evicts. The other modules
of :mod:`fastfeed.cache` do the rest: :mod:`~fastfeed.cache.files` (the directory checks and
the trust model), :mod:`~fastfeed.cache.entries` (the entry format), :mod:`~fastfeed.cache.fill`
(filling a shard), :mod:`~fastfeed.cache.reading` (reading one through the cache),
:mod:`~fastfeed.cache.admin` (``fastfeed cache info/clear``).

Layout of ``cache_dir``::

    v2/.lock                      flock'ed briefly while space is reserved (kernel-released)
    v2/entries/<key>.tar          complete shards, checksummed; never modified, only unlinked
    v2/tmp/<key>.part             shards being filled; the filler holds flock(LOCK_EX) on it

``key`` names one version of an object (:func:`~fastfeed.cache.entries.entry_key`): a changed
object has another key, so a stale entry is never served. (``v1/``, the layout of older
versions, had no checksums; it is not read, and a notice says it can be removed.)

**Coordination is by ``flock`` only** (released by the kernel when a process dies, also on
``kill -9``), on files that exist anyway: no lock files, no shared memory, nothing to clean up
by hand.

* *Fill* (a miss): the process that wins ``flock(LOCK_EX)`` on ``tmp/<key>.part`` fills it and
  renames it to ``entries/<key>.tar`` (:mod:`fastfeed.cache.fill`); readers of the shard, in
  this process or another, get its bytes as they land, and take the fill over if its filler
  dies (:mod:`fastfeed.cache.reading`).
* *Hit*: the entry is opened and ``flock(LOCK_SH)``'ed for as long as it is read, and its size
  and trailer are checked before any byte is served; eviction only removes entries it can
  ``flock(LOCK_EX)``, so a shard being read is never evicted.
* *Space*: before a fill, under ``v2/.lock``, the bytes of all entries and part files (sizes
  from their names) plus the new shard must fit ``limit``; entries are evicted by the
  dataset's known future (Belady: the one used again farthest in the future; a shard whose own
  next use is farther than every candidate's is not cached at all) or, without a plan, least
  recently used first (entry mtime, touched on each hit). If nothing can be evicted, the shard
  is read from the store without caching.
* *Crash safety*: an entry exists only once complete and checksummed. At start-up, part files
  whose lock is free (their filler died) are deleted.
* *Errors*: a full disk (ENOSPC, EDQUOT, EFBIG) or an unwritable directory logs one warning
  and the shard (and, for an unwritable directory, the cache) is read from the store instead,
  or raises :class:`~fastfeed.errors.CacheError` with ``on_error="raise"``. Readers never lose
  data: a failed fill only means the bytes come from the store.
* *Locks have deadlines*: a hit waits at most ``_LOCK_S`` for an entry's ``LOCK_SH``, a fill as
  long for ``.lock``; past it the shard is read from the store (see the trust model in
  :mod:`fastfeed.cache.files`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastfeed.cache.config import CacheConfig, CacheCounters
from fastfeed.cache.entries import (
    ENTRY_SUFFIX,
    PART_SUFFIX,
    Damaged,
    Entry,
    entry_key,
    read_trailer,
    size_of,
    url_hash_of,
)
from fastfeed.cache.files import (
    FILE_FLAGS,
    VERSION_DIR,
    Tree,
    create_file,
    flock_within,
    listdir,
    open_checked,
    open_tree,
    same_at,
    try_flock,
    unlink_if_same,
)
from fastfeed.cache.fill import FILL_PART, Fills, Source
from fastfeed.cache.reading import CachedFile
from fastfeed.errors import CacheError
from fastfeed.store.base import ObjectInfo, RangeReader
from fastfeed.urls import Location

__all__ = ["Planner", "ShardCache"]

log = logging.getLogger(__name__)

#: How long a hit waits for an entry's LOCK_SH, and a fill for ``.lock``, before it reads the
#: shard from the store instead (both are held by others for milliseconds at most).
_LOCK_S = 10.0


#: ``next_use(url_hash, now_hash)``: when the shard with ``url_hash`` is next read, in epochs
#: from the start of the current one, as seen while the shard ``now_hash`` is being read;
#: ``None`` if the plan does not use it. Provided by the dataset (see :mod:`fastfeed.dataset`).
Planner = Callable[[str, str], float | None]


class _Busy:
    """An entry another process holds locked beyond the deadline (read the store instead)."""


_BUSY = _Busy()


class ShardCache:
    """The cache of one directory, as used by one process (see the module docstring).

    Get it with :meth:`for_config` (one per directory per process, recreated after fork).
    Its methods run on the IO loop (``fastfeed._loop``).
    """

    _instances: dict[tuple[int, str], ShardCache] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def for_config(cls, config: CacheConfig) -> ShardCache:
        key = (os.getpid(), config.dir)
        with cls._instances_lock:
            cache = cls._instances.get(key)
            if cache is None or cache.config != config:
                cache = cls(config)
                cls._instances[key] = cache
            return cache

    def __init__(self, config: CacheConfig) -> None:
        """Raises :class:`~fastfeed.errors.ConfigError` for a directory the cache may not use
        (another user's, or writable by others); one it cannot use (unwritable, a file in the
        way) disables the cache with a warning, or raises :class:`~fastfeed.errors.CacheError`."""
        self.config = config
        self.root = Path(config.dir, VERSION_DIR)
        self.entries = self.root / "entries"
        self.tmp = self.root / "tmp"
        self.counters = CacheCounters()
        self.enabled = True
        #: The fills this process runs in this directory (each on the tree current when it starts).
        self.fills = Fills(config, self.counters, lambda: self.tree)
        #: A lock another process held past ``_LOCK_S``: tried, not waited for, until it is
        #: seen free (``.lock``; entries by key).
        self._lock_stuck = False
        self._stuck_entries: set[str] = set()
        #: Directory trees replaced by a new one after the directory was removed (their
        #: descriptors stay open: a running fill may still use one).
        self._retired: list[Tree] = []
        self._tree: Tree | None = None
        try:
            self._open()
        except OSError as exc:
            self._disable(f"cache directory {config.dir} is not usable: {exc}")
            return
        self.cleanup()

    def _open(self) -> None:
        """Open (making them where missing) and check the directories and ``.lock``."""
        tree = open_tree(self.config.dir, create=True)
        try:
            probe = f".probe-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
            os.close(create_file(tree.tmp, probe, os.O_WRONLY))
            os.unlink(probe, dir_fd=tree.tmp)
        except BaseException:
            tree.close()
            raise
        if self._tree is not None:
            self._retired.append(self._tree)
        self._tree = tree

    def close(self) -> None:
        """Close the directory descriptors (entries being read stay readable); the cache is
        disabled from then on."""
        for tree in [*self._retired, *([self._tree] if self._tree is not None else [])]:
            tree.close()
        self._retired.clear()
        self._tree = None
        self.enabled = False

    # ------------------------------------------------------------------ bookkeeping

    def _disable(self, why: str) -> None:
        if self.config.on_error == "raise":
            raise CacheError(why, url=self.config.dir, hint="fix the directory or pass cache_on_error='warn'")
        log.warning("%s; reading from the store without caching", why)
        self.enabled = False

    @property
    def tree(self) -> Tree:
        assert self._tree is not None, "the cache is disabled or closed"
        return self._tree

    def entry_path(self, key: str) -> str:
        """Where ``key``'s entry is (for messages and tools: the cache itself opens by descriptor)."""
        return str(self.entries / f"{key}{ENTRY_SUFFIX}")

    def tmp_path(self, key: str) -> str:
        return str(self.tmp / f"{key}{PART_SUFFIX}")

    def cleanup(self) -> int:
        """Delete part files no live process is filling (left by a crash), and anything in
        ``tmp/`` fastfeed did not make; returns how many part files were deleted."""
        removed = 0
        tmp = self.tree.tmp
        for name in listdir(tmp):
            if not name.endswith(PART_SUFFIX):
                continue
            fd = open_checked(tmp, name, os.O_RDONLY, self.tmp / name)
            if fd is None:
                continue
            try:
                if try_flock(fd, fcntl.LOCK_EX) and unlink_if_same(tmp, name, fd):
                    removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info("fastfeed cache %s: removed %d incomplete shard(s) left by a stopped process", self.root, removed)
        return removed

    async def _lock_global(self, lock: int) -> bool:
        """Take ``.lock`` (open at ``lock``; LOCK_EX) within ``_LOCK_S``; False (after one
        warning) if another process holds it longer, and from then on without waiting, until
        it is seen free."""
        if await flock_within(lock, fcntl.LOCK_EX, 0.0 if self._lock_stuck else _LOCK_S):
            self._lock_stuck = False
            return True
        if not self._lock_stuck:
            self._lock_stuck = True
            log.warning(
                "fastfeed cache: another process has held %s for more than %.0fs (fastfeed holds it only while it "
                "makes room for a shard); shards are read from the store, not cached, until it is free (see who "
                "holds it: fuser -v %s)",
                self.root / ".lock",
                _LOCK_S,
                self.root / ".lock",
            )
        return False

    def _usage(self) -> int:
        return sum(size_of(n) for n in listdir(self.tree.entries)) + sum(size_of(n) for n in listdir(self.tree.tmp))

    async def _reserve(self, key: str, size: int, planner: Planner | None) -> bool:
        """Make room for a fill of ``size`` bytes whose part file already exists (so it is
        counted); False if the shard should not be cached."""
        lock = self.tree.lock
        if not await self._lock_global(lock):
            return False
        try:
            over = self._usage() - self.config.limit
            if over <= 0:
                return True
            victims = self._victims(key, planner)
            if victims is None:
                return False
            for name in victims:
                if over <= 0:
                    break
                if self._evict(name):
                    over -= size_of(name)
            return over <= 0
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

    def _victims(self, key: str, planner: Planner | None) -> list[str] | None:
        """Entries in eviction order, or None if the incoming shard is the best one to skip."""
        entries = self.tree.entries
        names = [n for n in listdir(entries) if n.endswith(ENTRY_SUFFIX)]
        mine = url_hash_of(key)
        stale = [n for n in names if url_hash_of(n) == mine]  # older versions of this object
        rest = [n for n in names if url_hash_of(n) != mine]

        def mtime(name: str) -> float:
            try:
                return os.stat(name, dir_fd=entries, follow_symlinks=False).st_mtime
            except FileNotFoundError:
                return 0.0

        if planner is None:
            return stale + sorted(rest, key=mtime)  # least recently used first
        inf = float("inf")
        nexts: dict[str, float] = {}
        for n in rest:
            t = planner(url_hash_of(n), mine)
            nexts[n] = inf if t is None else t  # not in the plan: never needed again
        order = sorted(rest, key=lambda n: (-nexts[n], mtime(n)))  # farthest next use first
        incoming = planner(mine, mine)
        if incoming is not None:
            # Belady: only shards needed again later than this one make way for it.
            order = [n for n in order if nexts[n] > incoming]
            if not order and not stale:
                return None
        return stale + order

    def _evict(self, name: str) -> bool:
        entries = self.tree.entries
        fd = open_checked(entries, name, os.O_RDONLY, self.entries / name)
        if fd is None:
            return True  # gone (or not ours, and removed): its space is free
        try:
            if not try_flock(fd, fcntl.LOCK_EX):
                return False  # being read
            if unlink_if_same(entries, name, fd):
                self.counters.evicted += 1
            return True
        finally:
            os.close(fd)

    def drop(self, dir_fd: int, name: str, fd: int, url: str, why: str, then: str) -> None:
        """Remove the entry ``name`` (open at ``fd``) that ``why`` says is damaged, with a
        warning naming it, the shard's ``url`` and what happens ``then``."""
        unlink_if_same(dir_fd, name, fd)
        self.counters.dropped += 1
        log.warning("fastfeed cache: entry %s of %s %s; removed, %s", self.entries / name, url, why, then)

    # ------------------------------------------------------------------ the read path

    async def open(
        self,
        info: ObjectInfo,
        loc: Location,
        store: RangeReader,
        planner: Planner | None = None,
        on_fetched: Callable[[int], None] | None = None,
        on_cached: Callable[[int], None] | None = None,
        tasks: set[asyncio.Task[Any]] | None = None,
        part_size: int = FILL_PART,
    ) -> Any:
        """Something with ``read_range`` (as :class:`~fastfeed.store.base.Store`) and ``aclose``
        reading ``info``'s object through the cache (a hit, a fill, or a wait on another
        process's fill), or ``store`` itself (bypass: not cached).

        A fill this starts runs on the IO loop, added to ``tasks`` (its owner cancels them when
        it closes: a fill uses the owner's ``store``); ``on_fetched(n)`` counts bytes it GETs
        from the store, ``on_cached(n)`` bytes read from local disk. The result
        (:class:`~fastfeed.cache.reading.CachedFile`) has ``hit`` (found complete) and
        ``close()``; a hit's ``verified_view`` gives checked views of the mapped entry. A fill
        GETs ``part_size`` bytes at a time: a reader of the shard gets each part as soon as it is
        written.
        """
        if not self.enabled or info.etag is None:
            return store
        key = entry_key(info)
        if self.fills.has_failed(key):
            return store
        src = Source(info, key, loc, store, on_fetched, on_cached, tasks, part_size)
        for _ in range(8):
            entry = await self._open_entry(key, info)
            if isinstance(entry, _Busy):
                self.counters.bypassed += 1
                return store
            if entry is not None:
                self.counters.hits += 1
                return CachedFile(self, src, entry.fd, None, entry=entry)
            try:
                fd = self._open_part(key)
            except OSError as exc:
                self.fills.record_failure(key, exc)
                return store
            if fd is None:
                continue  # something fastfeed did not make stood there (removed): look again
            fill = self.fills.running(key)
            if fill is None and try_flock(fd, fcntl.LOCK_EX):
                tree, name = self.tree, f"{key}{PART_SUFFIX}"
                if not same_at(tree.tmp, name, fd):
                    os.close(fd)  # unlinked or completed between open and lock: look again
                    continue
                if _exists_at(tree.entries, f"{key}{ENTRY_SUFFIX}"):
                    unlink_if_same(tree.tmp, name, fd)  # a fill finished just now: drop the new part
                    os.close(fd)
                    continue
                if not await self._reserve(key, info.size, planner):
                    self.counters.bypassed += 1
                    unlink_if_same(tree.tmp, name, fd)
                    os.close(fd)
                    return store
                self.counters.misses += 1
                try:
                    reader = self._reader_of(tree, name, fd)  # its own description: no lock
                except BaseException:
                    unlink_if_same(tree.tmp, name, fd)
                    os.close(fd)
                    raise
                return CachedFile(self, src, reader, self.fills.start(src, fd))
            # Another process (or this one) is filling: read what lands.
            self.counters.misses += 1
            return CachedFile(self, src, fd, fill)
        return store

    def _open_part(self, key: str) -> int | None:
        """``key``'s part file: a new one (this process made it) or the one another fill
        made; None if something else stood at its name (now removed)."""
        name = f"{key}{PART_SUFFIX}"
        try:
            return create_file(self.tree.tmp, name, os.O_RDWR)
        except FileExistsError:
            return open_checked(self.tree.tmp, name, os.O_RDWR, self.tmp / name)
        except FileNotFoundError:
            # The cache directory was removed under a running job (rm -rf): make it again.
            self._open()
            return create_file(self.tree.tmp, name, os.O_RDWR)

    def take_over(self, key: str, locked_fd: int) -> int | None:
        """A reader now holding LOCK_EX on ``key``'s part file at ``locked_fd`` (its filler
        died): a new read descriptor for it if it is still the live part file (then the caller
        continues its fill on ``locked_fd``), else None."""
        tree, name = self.tree, f"{key}{PART_SUFFIX}"
        if not same_at(tree.tmp, name, locked_fd) or os.fstat(locked_fd).st_nlink != 1:
            return None
        return self._reader_of(tree, name, locked_fd)

    @staticmethod
    def _reader_of(tree: Tree, name: str, fd: int) -> int:
        """A second descriptor (its own open file description: no lock) of the part file at ``fd``."""
        reader = os.open(name, os.O_RDONLY | FILE_FLAGS, dir_fd=tree.tmp)
        mine, theirs = os.fstat(reader), os.fstat(fd)
        if (mine.st_ino, mine.st_dev) != (theirs.st_ino, theirs.st_dev):
            os.close(reader)
            raise OSError(errno.ESTALE, f"the part file {name} changed while it was locked")
        return reader

    async def _open_entry(self, key: str, info: ObjectInfo) -> Entry | _Busy | None:
        """``key``'s entry, locked LOCK_SH and its trailer checked; None if there is none (or
        it was damaged or not ours: removed), ``_BUSY`` if another process holds it locked."""
        tree, name = self.tree, f"{key}{ENTRY_SUFFIX}"
        fd = open_checked(tree.entries, name, os.O_RDONLY, self.entries / name)
        if fd is None:
            return None
        entry: Entry | None = None
        try:
            # An evictor holds LOCK_EX only for an unlink: anything longer is not fastfeed's.
            stuck = key in self._stuck_entries
            if not await flock_within(fd, fcntl.LOCK_SH, 0.0 if stuck else _LOCK_S):
                if not stuck:
                    self._stuck_entries.add(key)
                    log.warning(
                        "fastfeed cache: another process has held %s locked for more than %.0fs (fastfeed locks an "
                        "entry only to remove it); reading %s from the store instead (see who holds it: fuser -v %s)",
                        self.entries / name,
                        _LOCK_S,
                        info.url,
                        self.entries / name,
                    )
                return _BUSY
            self._stuck_entries.discard(key)
            if not same_at(tree.entries, name, fd):
                return None  # evicted between open and lock
            try:
                chunk, crcs = read_trailer(fd, info.size)
            except Damaged as exc:
                self.drop(tree.entries, name, fd, info.url, str(exc), "fetching the shard again")
                return None
            with contextlib.suppress(OSError):
                os.utime(fd)  # recently used (LRU)
            entry = Entry(fd, tree.entries, name, chunk, crcs)
            return entry
        finally:
            if entry is None:
                os.close(fd)


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
