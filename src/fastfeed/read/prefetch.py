"""The prefetcher: several shards in flight, each fetched as concurrent ranged GETs.

Thread ownership: the scheduler and every GET run on the process's IO loop
(:mod:`fastfeed._loop`); the consumer (the dataset iterator, in the training process or a
DataLoader worker) runs in its own thread and only waits on futures. The two meet at
:class:`ShardFetch`, one per shard, which holds one future per part in byte order.

Back-pressure comes only from bounded resources, all configured in
:class:`~fastfeed.config.PrefetchConfig`:

* ``shards_in_flight``: shards between "first GET issued" and "consumer done with it";
* ``max_requests``: concurrent GETs (with a node cache, a shard's fill bounds its own GETs);
* ``byte_budget``: bytes fetched or being fetched that the consumer has not finished parsing.

Parts are issued strictly in (shard, offset) order, so the shard being parsed always has priority
and its first part arrives first: samples flow as soon as their bytes have landed, not after the
whole shard. The budget admits any single sample: the reader's copy of a sample that straddles
parts (see :mod:`fastfeed.read.reader`) is counted but never blocks the parts that complete it, and a
part the consumer is waiting for is never refused (everything held then is the consumer's, so
refusing it could only deadlock). So the bytes held stay within ``byte_budget`` plus that one
copy, the largest sample, for a consumer that holds no more than the budget itself.

Every wait on the consumer side polls a close flag, so :meth:`Prefetcher.close` always returns
within seconds, and every store request has a deadline, so a dead store becomes an error rather
than a hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import mmap
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastfeed import _loop
from fastfeed.config import PrefetchConfig
from fastfeed.errors import FastfeedError, PipelineError
from fastfeed.store.base import ObjectInfo, Store
from fastfeed.store.buffers import pool_for
from fastfeed.store.pool import StoreSet
from fastfeed.urls import Location, parse_url

if TYPE_CHECKING:
    from fastfeed.cache.node import Planner, ShardCache

__all__ = ["FetchStats", "Prefetcher", "ShardChunks", "ShardFetch"]

log = logging.getLogger(__name__)

#: Seconds between checks of the close flag while the consumer waits for data.
_POLL = 0.1
#: Seconds ``close`` waits for the scheduler to wind down.
_CLOSE_TIMEOUT = 10.0


@dataclass
class FetchStats:
    """Counters of one prefetcher. Written on the IO loop, read by the consumer (ints: atomic)."""

    requests: int = 0
    bytes_fetched: int = 0
    #: Seconds the consumer spent blocked waiting for bytes.
    wait_s: float = 0.0
    shards_opened: int = 0
    #: With a cache (fastfeed.cache.node): shards found complete on local disk, shards not (filled
    #: by this or another process, or read from the store when they do not fit), and bytes
    #: read from local disk. ``bytes_fetched`` counts bytes from the store only.
    cache_hits: int = 0
    cache_misses: int = 0
    bytes_from_cache: int = 0
    #: Most bytes held at once: parts fetched (or being fetched) and not given back, plus the
    #: reader's copy of a sample that straddles parts.
    held_peak: int = 0
    #: Largest copy of a straddling sample held at once.
    copy_peak: int = 0
    #: Bytes of the shards copied by the reader (samples that straddle parts) and by a consumer
    #: that copies samples out to let parts go (fastfeed.order.streams); written by the consumer.
    bytes_copied: int = 0
    #: Most bytes held at once apart from that copy beyond ``byte_budget``: nonzero only when
    #: the consumer itself held that much and waited for one more part.
    over_budget: int = 0


class _ByteBudget:
    """A counting budget (see the module docstring).

    ``used`` counts parts issued and not given back (written on the IO loop); ``copy`` the bytes
    the consumer holds copied out of parts for a sample it has not finished (written by the
    consumer's thread, without a hop to the loop: the copy never blocks a part, so the loop
    need not hear of it). A part is admitted when the parts held leave room for it, when
    nothing else is held, or when the consumer is waiting for exactly that part (``wanted``).
    The peaks count both, under a lock, from whichever thread changed one.
    """

    def __init__(self, limit: int, stats: FetchStats) -> None:
        self.limit = limit
        self.used = 0
        self.copy = 0
        self.peak = 0
        self.wanted: _Part | None = None
        self._stats = stats
        self._changed = asyncio.Event()
        self._lock = threading.Lock()

    async def acquire(self, n: int, part: _Part) -> None:
        while self.used + n > self.limit and self.used > 0 and part is not self.wanted:
            self._changed.clear()
            await self._changed.wait()
        with self._lock:
            self.used += n
            stats = self._stats
            stats.over_budget = max(stats.over_budget, self.used - self.limit)
            self._peaks()

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n
        self._changed.set()

    def want(self, part: _Part) -> None:
        """The consumer is blocked until ``part`` lands."""
        self.wanted = part
        self._changed.set()

    def hold_copy(self, delta: int) -> None:
        """[consumer thread] The copy of a straddling sample grew (or shrank) by ``delta`` bytes."""
        with self._lock:
            self.copy += delta
            self._stats.copy_peak = max(self._stats.copy_peak, self.copy)
            self._peaks()

    def _peaks(self) -> None:
        self.peak = max(self.peak, self.used + self.copy)
        self._stats.held_peak = self.peak


@dataclass
class _Part:
    start: int
    end: int
    future: concurrent.futures.Future[memoryview] = field(default_factory=concurrent.futures.Future)
    task: asyncio.Task[None] | None = None
    #: The pooled buffer the part is read into (owned by the IO loop until delivered).
    buffer: mmap.mmap | None = None


class _LazyStore:
    """A store of ``stores`` made on first use: with a node cache, a shard that is a hit is read
    from disk, and a process whose shards all hit (a warm epoch's worker) builds no S3 client."""

    def __init__(self, stores: StoreSet) -> None:
        self._stores = stores

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        store = await self._stores.get(loc)
        return await store.read_range(loc, start, end, etag, out=out)


class ShardFetch:
    """The consumer's view of one shard being fetched: its parts, in byte order.

    Iterate :meth:`chunks` to receive the bytes as they land; call :meth:`close` when done (also
    when stopping early), which cancels outstanding GETs and returns their budget.
    """

    def __init__(self, owner: Prefetcher, info: ObjectInfo, parts: list[_Part]) -> None:
        self.info = info
        self._owner = owner
        self._parts = parts
        self._returned = [False] * len(parts)  # budget of part i given back (exactly once)
        self._held = 0  # parts handed out and not given back
        self._next = 0
        self._closed = False
        self._copy = 0  # bytes of the reader's copy of a straddling sample (see hold_copy)

    @property
    def url(self) -> str:
        return self.info.url

    def chunks(self, *, hold: bool = False) -> ShardChunks:
        """The parts in order as ``(bytes, is_last)``, each as soon as it has landed (a
        :class:`fastfeed.read.reader.ChunkSource`: pass it to the reader).

        A part's buffer goes back to the pool (and its budget is returned) when the consumer
        asks for the next part or closes the shard: it is overwritten after that, so release
        views of it and copy what you keep before asking for more. With ``hold=True`` parts are
        kept until :meth:`release_before` or :meth:`close` (for callers that gather views of
        several parts into one batch); they still count against the byte budget.
        """
        return ShardChunks(self, self._iter_parts(hold))

    def _iter_parts(self, hold: bool) -> Iterator[tuple[memoryview, bool]]:
        while self._next < len(self._parts) and not self._closed:
            index = self._next
            data = self._owner._wait(self._parts[index])
            self._next += 1
            self._held += 1
            yield data, index == len(self._parts) - 1
            if not hold:
                self._give_back(index)

    def _drop_last(self) -> None:
        if self._next > 0:
            self._give_back(self._next - 1)

    def _hold_copy(self, held: int, copied: int) -> None:
        self._owner.stats.bytes_copied += copied  # (the consumer's thread: the one writer)
        if held != self._copy and not self._closed:
            self._owner._hold_copy(held - self._copy)
            self._copy = held

    @property
    def parts_taken(self) -> int:
        """Parts handed to the consumer so far."""
        return self._next

    @property
    def parts_held(self) -> int:
        """Parts handed to the consumer and not given back yet."""
        return self._held

    def release_before(self, index: int) -> None:
        """Give back every part before ``index`` (held with ``chunks(hold=True)``)."""
        for i in range(min(index, self._next)):
            self._give_back(i)

    def _give_back(self, index: int) -> None:
        if not self._returned[index]:
            self._returned[index] = True
            self._held -= 1
            self._owner._release_part(self._parts[index])

    def close(self) -> None:
        """Stop fetching this shard and give back the budget of every part not yet returned."""
        if self._closed:
            return
        self._closed = True
        consumed = range(self._next)
        for index in consumed:
            self._give_back(index)
        remaining = [i for i in range(self._next, len(self._parts)) if not self._returned[i]]
        for index in remaining:
            self._returned[index] = True
        self._owner._abandon([self._parts[i] for i in remaining])
        if self._copy:
            self._owner._hold_copy(-self._copy)
            self._copy = 0
        self._owner._shard_done()


class ShardChunks:
    """:meth:`ShardFetch.chunks`: the parts of a shard as the reader consumes them (see
    :class:`fastfeed.read.reader.ChunkSource`), with the object's size, so that a header claiming
    more bytes than the object has is an error at once."""

    def __init__(self, fetch: ShardFetch, parts: Iterator[tuple[memoryview, bool]]) -> None:
        self._fetch = fetch
        self._parts = parts
        self.size: int | None = fetch.info.size

    def __iter__(self) -> ShardChunks:
        return self

    def __next__(self) -> tuple[memoryview, bool]:
        return next(self._parts)

    def hold_copy(self, held: int, copied: int) -> None:
        """The reader holds ``held`` bytes copied out of the parts for a sample it has not
        finished: counted as held (``FetchStats.held_peak``) but never blocking the parts that
        complete it."""
        self._fetch._hold_copy(held, copied)

    def drop_last(self) -> None:
        """The reader keeps nothing of the last part it was given: give it back now (also when
        held with ``hold=True``: nobody else has a view of it)."""
        self._fetch._drop_last()


class Prefetcher:
    """Fetch ``shards`` in order with bounded concurrency and memory; iterate to get them.

    ``ranges`` optionally limits each shard to a byte range ``(start, end)`` (``None``: whole).
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        shards: Sequence[ObjectInfo],
        stores: StoreSet,
        config: PrefetchConfig,
        cache: ShardCache | None = None,
        planner: Planner | None = None,
    ) -> None:
        self.config = config
        self._cache = cache
        self._planner = planner
        self.stats = FetchStats()
        self._shards = list(shards)
        self._stores = stores
        self._queue: queue.Queue[ShardFetch | BaseException | None] = queue.Queue()
        self._closed = threading.Event()
        self._finished = threading.Event()
        self._io = _loop.acquire()
        self._budget = _ByteBudget(config.byte_budget, self.stats)
        self._pool = pool_for(config.part_size)
        self._shard_slots = asyncio.Semaphore(config.shards_in_flight)
        self._requests = asyncio.Semaphore(config.max_requests)
        self._tasks: set[asyncio.Task[None]] = set()
        self._main = self._io.submit(self._run())

    # ---------------------------------------------------------------- IO loop side

    async def _run(self) -> None:
        try:
            for info in self._shards:
                await self._shard_slots.acquire()
                loc = parse_url(info.url)
                source: Any
                lazy: _LazyStore | None = None
                if self._cache is not None and loc.scheme != "file":
                    lazy = _LazyStore(self._stores)  # a hit never needs the store's client
                    source = await self._cache.open(
                        info,
                        loc,
                        lazy,
                        self._planner,
                        self._count_fetched,
                        self._count_cached,
                        self._tasks,
                        self.config.part_size,
                    )
                    if getattr(source, "hit", False):
                        self.stats.cache_hits += 1
                        if self.stats.cache_hits == 1 and not self.stats.cache_misses:
                            # A warm pass, most likely (see _trim_pool); unmapping the buffers
                            # takes tens of ms of the kernel's time: not on the loop.
                            asyncio.get_running_loop().run_in_executor(None, self._trim_pool)
                    else:
                        self.stats.cache_misses += 1
                else:
                    source = await self._stores.get(loc)
                direct = lazy is None or source is lazy  # not through the cache: counted here
                step = self.config.part_size
                parts = [_Part(s, min(s + step, info.size)) for s in range(0, info.size, step)]
                self.stats.shards_opened += 1
                self._queue.put(ShardFetch(self, info, parts))
                part_tasks: list[asyncio.Task[None]] = []
                for part in parts:
                    size = part.end - part.start
                    if part.future.cancelled():
                        continue  # the consumer abandoned the shard before this part was issued
                    await self._budget.acquire(size, part)
                    if direct:
                        # Through the cache, the fill (or the disk) does the requests, bounded by
                        # its own window: a part waiting for it is bounded by the budget only.
                        await self._requests.acquire()
                    if part.future.cancelled():
                        if direct:
                            self._requests.release()
                        self._budget.release(size)
                        continue
                    task = asyncio.create_task(self._fetch(source, loc, info, part, counted=direct))
                    part.task = task
                    part_tasks.append(task)
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if not direct:
                    closer = asyncio.create_task(_close_after(source, part_tasks))
                    self._tasks.add(closer)
                    closer.add_done_callback(self._tasks.discard)
            self._queue.put(None)
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # delivered to the consumer, raised there
            self._queue.put(exc)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            try:
                await self._stores.aclose()
            finally:
                self._finished.set()

    def _count_fetched(self, n: int) -> None:
        self.stats.bytes_fetched += n

    def _count_cached(self, n: int) -> None:
        self.stats.bytes_from_cache += n

    async def _fetch(self, store: Store, loc: Location, info: ObjectInfo, part: _Part, counted: bool = True) -> None:
        fut = part.future
        verified_view = getattr(store, "verified_view", None)
        try:
            if verified_view is not None:
                # A cache hit: a view of the mapped entry (checked against its checksums), no
                # copy and no pool buffer; it counts its bytes. The mapping lives as long as
                # any view of it. None: read it as below (the entry failed its check).
                view = await verified_view(part.start, part.end)
                if view is not None:
                    if fut.set_running_or_notify_cancel():
                        fut.set_result(view)
                    return
            part.buffer = self._pool.take()
            out = memoryview(part.buffer)[: part.end - part.start]
            data = await store.read_range(loc, part.start, part.end, info.etag, out=out)
        except asyncio.CancelledError:
            fut.cancel()
            # Not back to the pool: a read running in a thread (local files) may still be
            # writing into the buffer after the coroutine was cancelled. Let it be collected.
            part.buffer = None
            raise
        except FastfeedError as known:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(known)
        except Exception as exc:
            err = PipelineError(
                f"unexpected error fetching bytes {part.start}-{part.end - 1}: {type(exc).__name__}: {exc}",
                url=info.url,
                stage="fetch",
            )  # its remote_traceback is formatted from __cause__ by whoever reads it
            err.__cause__ = exc
            if fut.set_running_or_notify_cancel():
                fut.set_exception(err)
        else:
            self.stats.requests += 1
            if counted:  # else the cache counts store and disk bytes itself
                self.stats.bytes_fetched += len(data)
            if fut.set_running_or_notify_cancel():
                fut.set_result(data)
        finally:
            if counted:
                self._requests.release()

    # ---------------------------------------------------------------- consumer side

    def __iter__(self) -> Iterator[ShardFetch]:
        """Yield a :class:`ShardFetch` per shard in order; raises the first scheduling error."""
        while True:
            item = self._get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _get(self) -> ShardFetch | BaseException | None:
        start = time.perf_counter()
        try:
            while True:
                if self._closed.is_set():
                    return None
                try:
                    return self._queue.get(timeout=_POLL)
                except queue.Empty:
                    if self._main.done() and self._queue.empty():
                        exc = self._main.exception() if not self._main.cancelled() else None
                        return exc
        finally:
            self.stats.wait_s += time.perf_counter() - start

    def _wait(self, part: _Part) -> memoryview:
        fut = part.future
        if not fut.done():
            self._io.call_soon(self._budget.want, part)  # never refused: see _ByteBudget
        start = time.perf_counter()
        try:
            while True:
                if self._closed.is_set():
                    raise PipelineError("the prefetcher was closed while waiting for data", stage="fetch")
                try:
                    return fut.result(timeout=_POLL)
                except concurrent.futures.TimeoutError:
                    continue
        finally:
            self.stats.wait_s += time.perf_counter() - start

    def _release_part(self, part: _Part) -> None:
        def on_loop() -> None:
            self._budget.release(part.end - part.start)
            self._pool.give(part.buffer)
            part.buffer = None

        self._io.call_soon(on_loop)

    def _hold_copy(self, delta: int) -> None:
        self._budget.hold_copy(delta)

    def _shard_done(self) -> None:
        self._io.call_soon(self._shard_slots.release)

    def _abandon(self, parts: list[_Part]) -> None:
        def on_loop() -> None:
            for part in parts:
                if part.task is None:
                    # Not issued yet: the scheduler sees the cancelled future and skips it
                    # without taking budget.
                    part.future.cancel()
                else:
                    # Issued: its budget is held until now whether or not it has landed. Only a
                    # part that has landed returns its buffer to the pool; one still in flight
                    # drops it (a reading thread may still be writing into it).
                    part.task.cancel()
                    self._budget.release(part.end - part.start)
                    if part.task.done():
                        self._pool.give(part.buffer)
                        part.buffer = None

        self._io.call_soon(on_loop)

    @property
    def budget_peak(self) -> int:
        """Largest number of budgeted bytes held at once so far."""
        return self._budget.peak

    def close(self) -> None:
        """Cancel every outstanding request and stop; returns within seconds."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._io.call_soon(self._main_cancel)
        if not self._finished.wait(_CLOSE_TIMEOUT):
            log.warning("prefetcher did not stop within %.0fs", _CLOSE_TIMEOUT)
        self._io.release()

    def _trim_pool(self) -> None:
        """The pass starts with a hit of the node cache: a mapped entry, which takes no part
        buffers. The idle ones the pool keeps for the next cold pass would sit in memory through
        this warm pass and the ones after it (the whole byte budget): give them back. A miss
        later takes new ones (0.1 s per 256 MiB on the 2-core VM)."""
        released = self._pool.trim()
        if released:
            log.debug("released %d bytes of idle part buffers at the start of a warm pass", released)

    def _main_cancel(self) -> None:
        self._main.cancel()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed.is_set():
            with contextlib.suppress(Exception):  # interpreter shutdown
                self.close()


async def _close_after(source: Any, tasks: list[asyncio.Task[None]]) -> None:
    """Close a cached shard's reader once every part read from it has ended."""
    try:
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        source.close()
