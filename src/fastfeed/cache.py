"""Node-local shard cache: each shard is fetched from the store once per node, then read from
local disk (NVMe) by every DataLoader worker, rank and job on the node.

Layout of ``cache_dir``::

    v1/.lock                      flock'ed briefly while space is reserved (kernel-released)
    v1/entries/<key>.tar          complete shards, verified; never modified, only unlinked
    v1/tmp/<key>.part             shards being filled; the filler holds flock(LOCK_EX) on it

``key`` is ``<sha256(url)[:24]>-<sha256(etag)[:12]>-<size>``: a changed object (another ETag)
has another key, so a stale entry is never served, and every fill reads the object with
``If-Match`` on its ETag.

**Coordination is by ``flock`` only** (released by the kernel when a process dies, also on
``kill -9``), on files that exist anyway: no lock files, no shared memory, nothing to clean up
by hand.

* *Fill* (a miss): the process that wins ``flock(LOCK_EX)`` on ``tmp/<key>.part`` downloads
  the whole object in order (a few ranged GETs in flight, written in order, so the file's size
  is the number of bytes that landed), fsyncs it, checks its size, and renames it to
  ``entries/<key>.tar`` (atomic) before unlocking. The fill is the process's, not the
  reader's: it completes even if the reader that started it stops early. With
  ``CacheConfig.io == "direct"`` the fill writes its aligned parts with ``O_DIRECT`` (no
  page cache: for datasets larger than memory); a shard's last part is written buffered.
* *Stream-and-tee*: a reader in the filling process gets each part straight from the fill's
  GET buffer once it is written (:meth:`ShardCache.claim`); a reader of a shard another
  process fills reads each byte range from the part file as soon as it has landed. Either
  way the first sample does not wait for the whole shard. If the filler dies (its lock
  becomes free while the file is incomplete), a waiting reader takes the lock and continues
  the fill from the bytes already there.
* *Hit*: the entry is opened and ``flock(LOCK_SH)``'ed for as long as it is read; eviction
  only removes entries it can ``flock(LOCK_EX)``, so a shard being read is never evicted.
* *Space*: before a fill, under ``v1/.lock``, the bytes of all entries and part files (sizes
  from their names) plus the new shard must fit ``limit``; entries are evicted by the
  dataset's known future (Belady: the one used again farthest in the future; a shard whose own
  next use is farther than every candidate's is not cached at all) or, without a plan, least
  recently used first (entry mtime, touched on each hit). If nothing can be evicted, the shard
  is read from the store without caching.
* *Crash safety*: an entry exists only once complete and verified. At start-up, part files
  whose lock is free (their filler died) are deleted.
* *Errors*: a full disk (ENOSPC, EDQUOT, EFBIG) or an unwritable directory logs one warning
  and the shard (and, for an unwritable directory, the cache) is read from the store instead,
  or raises :class:`CacheError` with ``on_error="raise"``. Readers never lose data: a failed
  fill only means the bytes come from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastfeed.buffers import pool_for
from fastfeed.config import parse_size
from fastfeed.errors import ConfigError, FastfeedError
from fastfeed.store import ObjectInfo, RangeReader
from fastfeed.urls import Location

__all__ = ["CacheConfig", "CacheError", "CacheInfo", "ShardCache", "cache_info", "clear_cache"]

log = logging.getLogger(__name__)

_VERSION_DIR = "v1"
#: Bytes of one ranged GET of a fill, and how many are in flight at once per fill.
_FILL_PART = 8 << 20
_FILL_WINDOW = 4
#: A reader waiting for bytes of a shard another process fills gives up on the cache for that
#: shard (and reads from the store) if no byte lands for this long.
_STALL_S = 120.0
#: How often a waiting reader checks that the filler is still alive.
_LIVENESS_S = 0.1
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CacheError(FastfeedError):
    """The cache directory cannot be used (with ``on_error="raise"``)."""


@dataclass(frozen=True)
class CacheConfig:
    """Where shards are cached and how much space they may take.

    Args:
        dir: the cache directory (created if missing); shared by every process on the node.
        limit: bytes the cache may use (int or ``"500GB"``); entries and fills in progress.
        on_error: ``"warn"`` (default): a full disk or unwritable directory logs a warning and
            reading continues from the store; ``"raise"``: raise :class:`CacheError`.
        policy: ``"belady"`` (default): evict by the dataset's known future, falling back to
            least recently used for shards it does not plan to read; ``"lru"``: least recently
            used only.
        io: how fills write: ``"buffered"`` (through the page cache, so the next epoch of a
            dataset that fits in memory reads it from there) or ``"direct"`` (``O_DIRECT``: no
            page cache and no copy into it, for datasets larger than memory, which would only
            push other data out of it; falls back to buffered where the file system refuses).
    """

    dir: str
    limit: int
    on_error: str = "warn"
    policy: str = "belady"
    io: str = "buffered"

    @classmethod
    def of(
        cls,
        cache_dir: str | os.PathLike[str],
        cache_limit: int | str,
        on_error: str = "warn",
        policy: str = "belady",
        io: str = "buffered",
    ) -> CacheConfig:
        if io not in ("buffered", "direct"):
            raise ConfigError(f"cache io={io!r} is invalid", hint="use 'buffered' or 'direct'")
        if on_error not in ("warn", "raise"):
            raise ConfigError(f"cache on_error={on_error!r} is invalid", hint="use 'warn' or 'raise'")
        if policy not in ("belady", "lru"):
            raise ConfigError(f"cache policy={policy!r} is invalid", hint="use 'belady' or 'lru'")
        limit = parse_size(cache_limit, name="cache_limit")
        if limit <= 0:
            raise ConfigError(f"cache_limit must be > 0, got {cache_limit!r}")
        return cls(os.path.abspath(os.path.expanduser(os.fspath(cache_dir))), limit, on_error, policy, io)


def entry_key(info: ObjectInfo) -> str:
    """The cache key of one version of an object."""
    url_hash = hashlib.sha256(info.url.encode()).hexdigest()[:24]
    etag_hash = hashlib.sha256((info.etag or "").encode()).hexdigest()[:12]
    return f"{url_hash}-{etag_hash}-{info.size}"


def url_hash_of(key: str) -> str:
    return key.split("-", 1)[0]


def _size_of(name: str) -> int:
    """The object size a cache file name records (0 if the name is not ours)."""
    stem = name.split(".", 1)[0]
    try:
        return int(stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _try_flock(fd: int, flags: int) -> bool:
    try:
        fcntl.flock(fd, flags | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(path: str, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise EOFError(f"cache file ended at byte {offset + got}")
        got += n


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


#: Alignment of O_DIRECT writes (memory address, file offset and length): the page size, which
#: is a multiple of every common logical block size.
_DIRECT_ALIGN = mmap.PAGESIZE


def _address(view: memoryview) -> int | None:
    try:
        import numpy as np

        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
    except (TypeError, ValueError):
        return None


def _write_part(fd: int, direct_fd: int | None, data: memoryview, offset: int) -> None:
    """Write a fill's part: through ``direct_fd`` (O_DIRECT) when the part is aligned in memory,
    offset and length (every part of a shard but its last, with pooled buffers), else buffered
    through ``fd``."""
    if (
        direct_fd is not None
        and offset % _DIRECT_ALIGN == 0
        and len(data) % _DIRECT_ALIGN == 0
        and (_address(data) or 1) % _DIRECT_ALIGN == 0
    ):
        try:
            _pwrite_all(direct_fd, data, offset)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _pwrite_all(fd, data, offset)


@dataclass
class CacheCounters:
    """This process's cache counters (ints: read without locks)."""

    hits: int = 0
    misses: int = 0
    bytes_from_cache: int = 0
    fills_completed: int = 0
    fills_failed: int = 0
    bypassed: int = 0
    evicted: int = 0


#: ``next_use(url_hash, now_hash)``: when the shard with ``url_hash`` is next read, in epochs
#: from the start of the current one, as seen while the shard ``now_hash`` is being read;
#: ``None`` if the plan does not use it. Provided by the dataset (see :mod:`fastfeed.dataset`).
Planner = Callable[[str, str], float | None]


@dataclass(frozen=True)
class _Source:
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

    def is_part(self, start: int, end: int) -> bool:
        """``[start, end)`` is one of the parts the fill will issue."""
        return (
            start >= self.issued
            and (start - self.base) % self.part_size == 0
            and end == min(start + self.part_size, self.size)
        )


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
        self.config = config
        self.root = Path(config.dir, _VERSION_DIR)
        self.entries = self.root / "entries"
        self.tmp = self.root / "tmp"
        self.counters = CacheCounters()
        self.enabled = True
        self._warned: set[str] = set()
        self._fills: dict[str, asyncio.Task[None]] = {}
        #: Set (and replaced) each time a fill of this process lands a part: its readers wake
        #: at once instead of polling the part file's size.
        self._landed: dict[str, asyncio.Event] = {}
        self._failed: set[str] = set()  # keys whose fill failed in this process: not retried
        self._fill_states: dict[str, _FillState] = {}
        try:
            self.entries.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            probe = self.tmp / f".probe-{os.getpid()}-{threading.get_ident()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            self._disable(f"cache directory {config.dir} is not usable: {exc}")
            return
        self.cleanup()

    # ------------------------------------------------------------------ bookkeeping

    def _disable(self, why: str) -> None:
        if self.config.on_error == "raise":
            raise CacheError(why, url=self.config.dir, hint="fix the directory or pass cache_on_error='warn'")
        log.warning("%s; reading from the store without caching", why)
        self.enabled = False

    def _warn_once(self, kind: str, message: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message, *args)

    def entry_path(self, key: str) -> str:
        return str(self.entries / f"{key}.tar")

    def tmp_path(self, key: str) -> str:
        return str(self.tmp / f"{key}.part")

    def cleanup(self) -> int:
        """Delete part files no live process is filling (left by a crash); returns how many."""
        removed = 0
        for path in _listdir(self.tmp):
            if not path.endswith(".part"):
                continue
            full = str(self.tmp / path)
            try:
                fd = os.open(full, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if _try_flock(fd, fcntl.LOCK_EX) and _same_file(full, fd):
                    os.unlink(full)
                    removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info("fastfeed cache %s: removed %d incomplete shard(s) left by a stopped process", self.root, removed)
        return removed

    @contextlib.contextmanager
    def _global_lock(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _usage(self) -> int:
        return sum(_size_of(n) for n in _listdir(self.entries)) + sum(_size_of(n) for n in _listdir(self.tmp))

    def _reserve(self, key: str, size: int, planner: Planner | None) -> bool:
        """[under no lock] Make room for a fill of ``size`` bytes whose part file already exists
        (so it is counted); False if the shard should not be cached."""
        with self._global_lock():
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
                    over -= _size_of(name)
            return over <= 0

    def _victims(self, key: str, planner: Planner | None) -> list[str] | None:
        """Entries in eviction order, or None if the incoming shard is the best one to skip."""
        names = [n for n in _listdir(self.entries) if n.endswith(".tar")]
        mine = url_hash_of(key)
        stale = [n for n in names if url_hash_of(n) == mine]  # older versions of this object
        rest = [n for n in names if url_hash_of(n) != mine]

        def mtime(name: str) -> float:
            try:
                return os.stat(self.entries / name).st_mtime
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
        path = str(self.entries / name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True  # already gone: its space is free
        try:
            if not _try_flock(fd, fcntl.LOCK_EX):
                return False  # being read
            if _same_file(path, fd):
                os.unlink(path)
                self.counters.evicted += 1
            return True
        finally:
            os.close(fd)

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
        part_size: int = _FILL_PART,
    ) -> Any:
        """Something with ``read_range`` (as :class:`~fastfeed.store.Store`) and ``aclose``
        reading ``info``'s object through the cache (a hit, a fill, or a wait on another
        process's fill), or ``store`` itself (bypass: not cached).

        A fill this starts runs on the IO loop, added to ``tasks`` (its owner cancels them when
        it closes: a fill uses the owner's ``store``); ``on_fetched(n)`` counts bytes it GETs
        from the store, ``on_cached(n)`` bytes read from local disk. The result has ``hit``
        (found complete) and ``close()``. A fill GETs ``part_size`` bytes at a time: a reader
        of the shard gets each part as soon as it is written.
        """
        if not self.enabled or info.etag is None:
            return store
        key = entry_key(info)
        if key in self._failed:
            return store
        src = _Source(info, key, loc, store, on_fetched, on_cached, tasks, part_size)
        for _ in range(8):
            hit = self._open_entry(key)
            if hit is not None:
                self.counters.hits += 1
                return _CachedFile(self, src, hit, None, hit=True)
            try:
                fd = self._create_part(key)
            except OSError as exc:
                self._fill_failed(key, exc)
                return store
            fill = self._fills.get(key)
            if fill is None and _try_flock(fd, fcntl.LOCK_EX):
                if not _same_file(self.tmp_path(key), fd):
                    os.close(fd)  # unlinked or completed between open and lock: look again
                    continue
                if os.path.exists(self.entry_path(key)):
                    os.close(fd)  # a fill finished just now; the new empty part file goes
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.tmp_path(key))
                    continue
                if not self._reserve(key, info.size, planner):
                    self.counters.bypassed += 1
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.tmp_path(key))
                    os.close(fd)
                    return store
                self.counters.misses += 1
                reader = os.open(self.tmp_path(key), os.O_RDONLY)  # its own description: no lock
                return _CachedFile(self, src, reader, self._start_fill(src, fd))
            # Another process (or this one) is filling: read what lands.
            self.counters.misses += 1
            return _CachedFile(self, src, fd, fill)
        return store

    def _create_part(self, key: str) -> int:
        try:
            return os.open(self.tmp_path(key), os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            # The cache directory was removed under a running job (rm -rf): make it again.
            self.entries.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            return os.open(self.tmp_path(key), os.O_RDWR | os.O_CREAT, 0o644)

    def _open_entry(self, key: str) -> int | None:
        path = self.entry_path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # an evictor holds LOCK_EX only for an unlink
        if not _same_file(path, fd):
            os.close(fd)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used (LRU)
        return fd

    def _start_fill(self, src: _Source, fd: int) -> asyncio.Task[None]:
        """Fill ``src`` on the IO loop; ``fd`` holds LOCK_EX on the part file (the task owns it)."""
        task = asyncio.get_running_loop().create_task(self._fill(src, fd))
        self._fills[src.key] = task
        if src.tasks is not None:
            src.tasks.add(task)
            task.add_done_callback(src.tasks.discard)
        task.add_done_callback(lambda _: self._fills.pop(src.key, None))
        return task

    async def _fill(self, src: _Source, fd: int) -> None:
        """[holds LOCK_EX on the part file] Download the rest of the object, then publish it.

        A part a reader of this process has claimed (:meth:`claim`) is fetched straight into
        the reader's buffer and handed over once written; other parts are fetched into pooled
        buffers. Either way each byte is copied once from the socket and once to the page
        cache, and never read back.
        """
        key, info, tmp = src.key, src.info, self.tmp_path(src.key)
        pool = pool_for(src.part_size)
        direct_fd = self._open_direct(tmp) if self.config.io == "direct" else None
        # (start, GET, the claim it serves or None, the pooled buffer it fills or None)
        pending: list[tuple[int, asyncio.Task[memoryview], _Claim | None, mmap.mmap | None]] = []
        offset = os.fstat(fd).st_size  # bytes a dead filler left are valid: resume after them
        next_start = offset
        state = self._fill_states[key] = _FillState(offset, src.part_size, info.size, offset)
        published = False
        try:
            # The readers that opened this shard run first, so their claims are in before the
            # first GETs are issued.
            await asyncio.sleep(0)
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
                await _in_thread(_write_part, fd, direct_fd, data, start)
                pending.pop(0)
                src.fetched(len(data))
                offset = start + len(data)
                if claim is not None:
                    _settle(claim, data)
                else:
                    pool.give(buffer)
                self._signal_landed(key)
            try:
                await _in_thread(os.fsync, fd)
            except asyncio.CancelledError:
                # Every byte is here (the owner is closing): publishing is cheap, finish it.
                published = True
                self._publish(key, info, fd)
                raise
            published = True
            self._publish(key, info, fd)
        except BaseException as exc:
            if published:
                raise  # cancelled after publishing: nothing to undo
            for _, task, _, _ in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*(t for _, t, _, _ in pending), return_exceptions=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._fill_failed(key, exc)
        finally:
            # Readers whose claim was not served read the part file or the store instead.
            if self._fill_states.get(key) is state:
                del self._fill_states[key]
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
        state = self._fill_states.get(key)
        if state is None or not state.is_part(start, end) or start in state.claims:
            return None
        claim = _Claim(end, out, asyncio.get_running_loop().create_future())
        state.claims[start] = claim
        try:
            return await claim.future
        finally:
            if state.claims.get(start) is claim:
                del state.claims[start]  # cancelled before the fill issued it

    def _open_direct(self, path: str) -> int | None:
        """A second, ``O_DIRECT`` descriptor of a part file for its fill's writes; None (buffered
        writes) where the file system or the platform has no direct I/O."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            self._warn_once("direct", "fastfeed cache: O_DIRECT is not available here; fills are buffered")
            return None
        try:
            return os.open(path, os.O_WRONLY | flag)
        except OSError as exc:
            self._warn_once("direct", "fastfeed cache %s: no direct I/O (%s); fills are buffered", self.config.dir, exc)
            return None

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

    def _publish(self, key: str, info: ObjectInfo, fd: int) -> None:
        written = os.fstat(fd).st_size
        if written != info.size:
            raise OSError(errno.EIO, f"cache fill of {info.url} wrote {written} of {info.size} bytes")
        os.rename(self.tmp_path(key), self.entry_path(key))  # atomic: the entry appears complete
        self.counters.fills_completed += 1

    def _fill_failed(self, key: str, exc: BaseException) -> None:
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


class _CachedFile:
    """One shard read through the cache: from the entry (a hit) or from the part file as its
    bytes land (a fill by this or another process); from the store if the fill fails."""

    def __init__(self, cache: ShardCache, src: _Source, fd: int, fill: asyncio.Task[None] | None, *, hit: bool = False):
        self.cache = cache
        self.src = src
        self.info = src.info
        self.key = src.key
        self.fd: int | None = fd
        self.fill = fill
        self.complete = self.hit = hit
        self.bypass = False
        #: For a hit: the whole entry, memory-mapped; readers take views of it (no copy).
        self.mapped: memoryview | None = None
        if self.hit and self.info.size > 0:
            with contextlib.suppress(OSError, ValueError):
                self.mapped = _map_entry(cache.entry_path(self.key), fd, self.info.size)

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        view = memoryview(bytearray(end - start)) if out is None else out
        if not self.complete and not self.bypass:
            if self.fill is not None and not self.fill.done():
                # This process fills the shard: take the bytes from the fill itself.
                data = await self.cache.claim(self.key, start, end, view)
                if data is not None:
                    return data
            await self._wait_for(end)
        if self.bypass or self.fd is None:
            data = await self.src.store.read_range(loc, start, end, etag, out=view)
            self.src.fetched(len(data))
            return data
        await _in_thread(_pread_into, self.fd, view, start)
        self.cache.counters.bytes_from_cache += len(view)
        if self.src.on_cached is not None:
            self.src.on_cached(len(view))
        return view

    async def _wait_for(self, end: int) -> None:
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
                if _try_flock(self.fd, fcntl.LOCK_EX):
                    # The filler is gone. Take over if the part file is still the live one: the
                    # locked descriptor goes to the fill, this reader opens its own.
                    tmp = self.cache.tmp_path(self.key)
                    if _same_file(tmp, self.fd):
                        locked, self.fd = self.fd, os.open(tmp, os.O_RDONLY)
                        self.fill = self.cache._start_fill(self.src, locked)
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
                await self.cache.landed(self.key, _LIVENESS_S)  # our own fill: woken when a part lands
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


def _map_entry(path: str, locked_fd: int, size: int) -> memoryview | None:
    """A read-only view of the whole entry ``locked_fd`` (which holds its LOCK_SH) has open.

    The mapping is made from a second descriptor of the same file: ``mmap`` keeps a duplicate
    of the descriptor it is given for as long as the mapping lives, and a duplicate of
    ``locked_fd`` would hold the lock with it. So closing the entry releases the lock (it can
    be evicted), while views handed to the consumer stay valid after the file is unlinked.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        mine, locked = os.fstat(fd), os.fstat(locked_fd)
        if (mine.st_ino, mine.st_dev) != (locked.st_ino, locked.st_dev):
            return None  # not the file we hold (cannot happen while its LOCK_SH is held)
        return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
    finally:
        os.close(fd)


def _settle(claim: _Claim, data: memoryview | None) -> None:
    if not claim.future.done():
        claim.future.set_result(data)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker thread. If the caller is cancelled, the thread's work still
    ends before the cancellation propagates: it may be using a file descriptor the caller
    closes next (a reused descriptor number would then be another file)."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------- CLI helpers


@dataclass(frozen=True)
class CacheInfo:
    """What a cache directory holds."""

    dir: str
    entries: int
    entry_bytes: int
    partial: int
    partial_bytes: int


def cache_info(cache_dir: str | os.PathLike[str]) -> CacheInfo:
    """Count the entries and part files of a cache directory (no lock taken)."""
    root = Path(os.path.expanduser(os.fspath(cache_dir)), _VERSION_DIR)
    if not root.is_dir():
        raise ConfigError(f"{cache_dir} is not a fastfeed cache directory", hint="pass the cache_dir a dataset used")
    entries = [n for n in _listdir(root / "entries") if n.endswith(".tar")]
    parts = [n for n in _listdir(root / "tmp") if n.endswith(".part")]
    return CacheInfo(
        str(root.parent),
        len(entries),
        sum(_size_of(n) for n in entries),
        len(parts),
        sum(os.stat(root / "tmp" / n).st_size for n in parts if (root / "tmp" / n).exists()),
    )


def clear_cache(cache_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """Remove every entry not being read and every part file no process is filling; returns
    ``(removed, skipped_in_use)``. Safe while training runs: in-use files are left alone."""
    root = Path(os.path.expanduser(os.fspath(cache_dir)), _VERSION_DIR)
    if not root.is_dir():
        raise ConfigError(f"{cache_dir} is not a fastfeed cache directory", hint="pass the cache_dir a dataset used")
    removed = skipped = 0
    for sub, suffix in (("entries", ".tar"), ("tmp", ".part")):
        for name in _listdir(root / sub):
            if not name.endswith(suffix):
                continue
            path = str(root / sub / name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if _try_flock(fd, fcntl.LOCK_EX):
                    if _same_file(path, fd):
                        os.unlink(path)
                        removed += 1
                else:
                    skipped += 1
            finally:
                os.close(fd)
    return removed, skipped
