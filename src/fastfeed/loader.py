"""``fastfeed.DataLoader``: a drop-in ``torch.utils.data.DataLoader`` that owns the whole path
from samples to (pinned host or device) batches.

Data flow::

    samples (in-process, or in worker processes)
      -> collate: native gather into one arena region per batch (fixed fields stacked,
         byte fields flat + offsets)   [in-process: a ring slot; worker: one of its
                                        shared-memory slots, page-locked by the main process]
      -> producer thread "fastfeed-batch": a worker's slot is used in place (views of it, no
         copy); only a user collate_fn's batch travels as torch sends it
      -> optional device copy on a side CUDA stream (fastfeed.device)
      -> bounded queue -> the training loop

Only the producer thread and the worker processes do work; the training loop's ``next()`` only
waits on a queue, and the time it waits is reported as ``stats().wait_s``.

torch DataLoader arguments it ignores, and why: ``pin_memory`` (batches are always assembled in
pinned memory when CUDA is available, with no per-batch pinning copy), ``pin_memory_device``
(use ``device=``), ``in_order`` (batches are always in order: order is part of exact resume).
"""

from __future__ import annotations

import base64
import collections
import itertools
import logging
import os
import pickle
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from fastfeed.batch import (
    Arena,
    ColumnBatch,
    collate_columns_into,
    collate_into,
    from_layout,
    layout_extent,
    to_layout,
    tree_map_tensors,
)
from fastfeed.device import DeviceFeeder, HostPinner
from fastfeed.errors import ConfigError
from fastfeed.gather import gather
from fastfeed.reshard import Segment, close_segment
from fastfeed.ring import HostRing
from fastfeed.streams import StreamPos, epoch_batches, stream_batches

__all__ = ["DataLoader", "LoaderStats"]

log = logging.getLogger(__name__)

_POLL = 0.1
#: Seconds a worker waits for one of its shared-memory slots before using a fresh region.
_SLOT_WAIT = 0.5
_JOIN_TIMEOUT = 10.0
_END = object()


@dataclass
class LoaderStats:
    """Counters of a loader, cumulative over its iterations.

    ``wait_s`` is the time the training loop spent blocked in ``next()``; the stage times are
    summed over the threads and processes that did the work (so they can exceed wall time).
    """

    samples: int = 0
    batches: int = 0
    #: Bytes of tensor data delivered (arena regions of the batches).
    bytes: int = 0
    #: Training loop blocked waiting for a batch.
    wait_s: float = 0.0
    #: Waiting for store bytes (fastfeed datasets only).
    fetch_s: float = 0.0
    #: Producing samples (reading, parsing, user transforms), fetch waits excluded.
    parse_s: float = 0.0
    #: Collating samples into arenas.
    collate_s: float = 0.0
    #: Copying into the ring / issuing device copies.
    copy_s: float = 0.0
    #: Bytes read from the store (S3 or local files), and from the node's cache (fastfeed
    #: datasets with ``cache_dir``).
    bytes_fetched: int = 0
    bytes_from_cache: int = 0
    #: Shards found complete in the cache, and shards that were not (fetched, or waited for).
    cache_hits: int = 0
    cache_misses: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class _StreamConfig:
    """What reading streams needs (picklable: it travels to spawned workers)."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        num_streams: int,
        next_stream: int,
        starts: dict[int, StreamPos],
        collate_fn: Callable[[list[Any]], Any] | None = None,
        epoch: int = 0,
        segments: tuple[Segment, ...] = (),
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_streams = num_streams
        self.next_stream = next_stream
        self.starts = starts
        # The epoch (and its closed segments) the iteration reads: fixed when it is created.
        self.epoch = epoch
        self.segments = segments

    def stream_source(
        self, streams: list[int], collate: Callable[[ColumnBatch], Any]
    ) -> Generator[tuple[Any, ...], None, None]:
        """Round-robin over ``streams`` (those still running), each from its resume position:
        ``("batch", stream, value, position_after, io_deltas)`` items (``io_deltas``: the
        :class:`LoaderStats` I/O fields this batch added), then an ``("end", stream, io_deltas)``
        item when a stream is exhausted (its last reads: the end of its last shard)."""
        io_stats = self.dataset.io_stats
        gens = {
            v: stream_batches(
                self.dataset, v, self.num_streams, self.batch_size, collate,
                drop_last=self.drop_last, start=self.starts.get(v), share=len(streams),
                epoch=self.epoch, segments=self.segments,
            )
            for v in streams
        }  # fmt: skip
        live = set(streams)
        v = streams[0] if streams else 0
        try:
            while live:
                io0 = io_stats()
                try:
                    value, after = next(gens[v])
                except StopIteration:
                    live.discard(v)
                    yield ("end", v, _io_delta(io0, io_stats()))  # what the stream read last
                else:
                    yield ("batch", v, value, after, _io_delta(io0, io_stats()))
                v = _cyclic_next(v, live, self.num_streams)
        finally:
            for gen in gens.values():
                gen.close()


def _io_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The dataset's I/O counters between two ``io_stats()`` snapshots, as LoaderStats fields."""
    return {
        "fetch_s": after["fetch_wait_s"] - before["fetch_wait_s"],
        **{
            key: int(after.get(key, 0) - before.get(key, 0))
            for key in ("bytes_fetched", "cache_hits", "cache_misses", "bytes_from_cache")
        },
    }


def _is_streaming(dataset: Any) -> bool:
    """Whether the loader reads ``dataset`` as resumable streams (see :mod:`fastfeed.streams`)."""
    from fastfeed.dataset import StreamingDataset

    return isinstance(dataset, StreamingDataset)


def _rotated(n: int, first: int) -> list[int]:
    """``0..n-1`` starting at ``first``: the round-robin order of streams from a resume point."""
    return [(first + i) % n for i in range(n)]


def _in_stream_order(
    items: Iterator[tuple[Any, ...]], order: list[int], on_end: Callable[[dict[str, float]], None] | None = None
) -> Iterator[tuple[Any, ...]]:
    """Reorder worker messages into the streams' round-robin order (what one process would
    produce): workers run disjoint streams and each emits its own streams in that order, so the
    wait for the next stream's batch is short and the buffers stay small."""
    pending: dict[int, collections.deque[tuple[Any, ...]]] = {v: collections.deque() for v in order}
    ended: set[int] = set()
    live = set(order)
    n = max(order) + 1 if order else 1
    v = order[0] if order else 0
    while live:
        while not pending[v] and v not in ended:
            item = next(items, None)
            if item is None:
                raise RuntimeError(f"DataLoader workers ended before stream {v} did")
            if item[0] == "end":
                ended.add(item[1])
                if on_end is not None and len(item) > 2:
                    on_end(item[2])
            else:
                pending[item[-2][0]].append(item)
        if pending[v]:
            yield pending[v].popleft()
        else:
            live.discard(v)
        v = _cyclic_next(v, live, n)


def _cyclic_next(v: int, live: set[int], n: int) -> int:
    """The stream after ``v`` in the cyclic order 0..n-1, among ``live`` (any value if empty)."""
    for step in range(1, n + 1):
        candidate = (v + step) % n
        if candidate in live:
            return candidate
    return v


class _WorkerSlots:
    """Worker side of the shared-memory slots: a small ring of shared arenas per worker that
    batches are collated into, announced as
    ``("slot", worker, slot, generation, tensor_or_None, layout, stage_times)``.

    A slot's tensor crosses to the main process (by file descriptor) only the first time it is
    used and after it grows; after that only its number travels. The main process sets
    ``free[worker, slot]`` back to 1 once the batch built on the slot is gone (freed by the
    training loop, or its device copy completed); the worker waits for a free slot, polling with
    a short sleep, gives up if its parent process dies, and after ``_SLOT_WAIT`` seconds
    collates into a fresh region instead (``("layout", region, layout, stage_times)``: one more
    copy in the main process, never a deadlock when the training loop keeps batches alive).
    """

    def __init__(self, free: torch.Tensor, worker: int) -> None:
        # Only this worker clears its row (1 -> 0) and only the main process sets it (0 -> 1):
        # plain byte loads and stores, no lock needed. (Not torch.nonzero: it asserts when the
        # tensor changes under it.)
        self.worker = worker
        self.free = free[worker].numpy()
        self.arenas = [Arena(0, shared=True) for _ in range(len(self.free))]
        self.sent = [0] * len(self.arenas)  # generation of each slot the main process already has
        self.parent = os.getppid()

    def claim(self) -> int | None:
        free = self.free
        delay = 0.0002
        deadline = time.monotonic() + _SLOT_WAIT
        while True:
            for k in range(len(free)):
                if free[k]:
                    free[k] = 0
                    return k
            if os.getppid() != self.parent:
                raise RuntimeError("the training process is gone")
            if time.monotonic() > deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def collate(self, fill: Callable[[Arena], Any], n: int) -> tuple[Any, ...]:
        """``fill(arena)`` writes the batch into an arena and returns it."""
        start = time.perf_counter()
        k = self.claim()
        if k is None:
            spare = Arena(0)
            layout = to_layout(fill(spare), spare.tensor)
            stage = {"n": n, "collate_s": time.perf_counter() - start}
            return ("layout", spare.tensor[: layout_extent(layout)], layout, stage)
        arena = self.arenas[k]
        layout = to_layout(fill(arena), arena.tensor)
        tensor = None
        if self.sent[k] != arena.generation:
            tensor, self.sent[k] = arena.tensor, arena.generation
        stage = {"n": n, "collate_s": time.perf_counter() - start}
        return ("slot", self.worker, k, arena.generation, tensor, layout, stage)


class _WorkerCollate:
    """Runs in DataLoader worker processes (datasets other than StreamingDataset): collate a batch
    into one of the worker's shared-memory slots (:class:`_WorkerSlots`); a user ``collate_fn``'s
    batch travels as torch sends it (``("user", batch, None, stage_times)``)."""

    def __init__(self, user_collate: Callable[[list[Any]], Any] | None, free: torch.Tensor | None = None) -> None:
        self.user_collate = user_collate
        self.free = free  # int8 [num_workers, slots] in shared memory, see _WorkerSlots
        self._slots: _WorkerSlots | None = None
        self._last_fetch = 0.0

    def __call__(self, samples: list[Any]) -> Any:
        start = time.perf_counter()
        if self.user_collate is not None:
            batch = self.user_collate(samples)
            return ("user", batch, None, {"collate_s": time.perf_counter() - start, "n": len(samples)})
        if self._slots is None:
            info = torch.utils.data.get_worker_info()
            assert info is not None and self.free is not None, "_WorkerCollate runs in DataLoader workers only"
            self._slots = _WorkerSlots(self.free, info.id)
        message = self._slots.collate(lambda arena: collate_into(samples, arena), len(samples))
        message[-1].update(self._io_delta())
        return (*message[:-1], None, message[-1])

    def _io_delta(self) -> dict[str, float]:
        info = torch.utils.data.get_worker_info()
        io_stats = getattr(info.dataset, "io_stats", None) if info is not None else None
        if io_stats is None:
            return {}
        fetch = float(io_stats()["fetch_wait_s"])
        delta, self._last_fetch = fetch - self._last_fetch, fetch
        return {"fetch_s": delta}


class _CollatedStream(IterableDataset[Any]):
    """Worker side of the fast path: the dataset's own streams, collated by each worker into its
    shared-memory slots (:class:`_WorkerSlots`).

    With persistent workers (``mailbox``), each iteration reads its settings and the workers'
    seed from the mailbox (:class:`_Mailbox`) instead of ``settings``, and the slots live on
    across iterations."""

    def __init__(self, settings: _StreamConfig | None, free: torch.Tensor, mailbox: _Mailbox | None = None) -> None:
        self.settings = settings
        self.free = free  # int8 [num_workers, slots] in shared memory: 1 = the worker may write
        self.mailbox = mailbox
        self._slots: _WorkerSlots | None = None

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        assert info is not None, "_CollatedStream runs in DataLoader workers only"
        worker = info.id
        if self.mailbox is None:
            assert self.settings is not None
            settings = self.settings
            slots = _WorkerSlots(self.free, worker)
        else:
            settings, base_seed = self.mailbox.read()
            _seed_worker(base_seed, worker)  # as fresh workers of this iteration would be seeded
            if self._slots is None:
                self._slots = _WorkerSlots(self.free, worker)
            slots = self._slots
        user_collate = settings.collate_fn

        def collate(samples: ColumnBatch) -> Any:
            if user_collate is not None:
                start = time.perf_counter()
                batch = user_collate(samples.samples())
                return ("user", batch, {"n": len(samples), "collate_s": time.perf_counter() - start})
            return slots.collate(lambda arena: collate_columns_into(samples, arena), len(samples))

        mine = [v for v in _rotated(settings.num_streams, settings.next_stream) if v % info.num_workers == worker]
        for item in settings.stream_source(mine, collate):
            if item[0] == "end":
                yield item
            else:
                _, v, message, after, io = item
                message[-1].update(io)
                yield (*message[:-1], (v, after), message[-1])


def _seed_worker(base_seed: int, worker: int) -> None:
    """Seed this worker's RNGs as torch seeds a worker it starts with ``base_seed``."""
    seed = base_seed + worker
    random.seed(seed)
    torch.manual_seed(seed)
    generate_state = getattr(torch.utils.data._utils.worker, "_generate_state", None)
    np.random.seed(generate_state(base_seed, worker) if generate_state is not None else seed % 2**32)


class _Mailbox:
    """How a persistent worker learns what its next iteration reads: torch re-iterates the
    worker's own copy of the dataset, so the main process posts each iteration's settings here
    (shared memory, pickled) before starting it. Only fastfeed's processes write it."""

    def __init__(self, size: int) -> None:
        self.buffer = torch.zeros(size, dtype=torch.uint8).share_memory_()  # type: ignore[no-untyped-call]

    def post(self, value: Any) -> bool:
        """Post ``value`` for the next iteration; ``False`` if it does not fit."""
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        if 8 + len(data) > self.buffer.numel():
            return False
        array = self.buffer.numpy()
        array[8 : 8 + len(data)] = np.frombuffer(data, dtype=np.uint8)
        array[:8] = np.frombuffer(len(data).to_bytes(8, "little"), dtype=np.uint8)
        return True

    def read(self) -> Any:
        array = self.buffer.numpy()
        n = int.from_bytes(array[:8].tobytes(), "little")
        return pickle.loads(array[8 : 8 + n].tobytes())  # written by the main process only


class _WorkerPool:
    """Persistent worker processes of the fast path (``persistent_workers=True``): one torch
    DataLoader whose workers, slots and pinned slot memory are kept from one iteration to the
    next. Used by one iteration at a time (see :class:`_PoolHolder`); an iteration that does not
    run to its end shuts the pool down, so a new one never sees an earlier one's messages."""

    def __init__(self, settings: _Settings, mailbox_size: int) -> None:
        self.key = settings.pool_key()
        self.free = settings.new_slots()
        self.slot_table = _SlotTable(self.free, HostPinner() if settings.pin_slots else None)
        self.mailbox = _Mailbox(mailbox_size)
        self.loader = torch.utils.data.DataLoader(
            _CollatedStream(None, self.free, self.mailbox),
            batch_size=None,
            collate_fn=_identity,
            persistent_workers=True,
            **settings.torch_loader_kwargs(),
        )
        self.iterator: Any = None

    def start(self, settings: _Settings) -> Iterator[Any] | None:
        """Start an iteration of ``settings``; ``None`` if its settings do not fit the mailbox."""
        # The base seed torch would draw for fresh workers, from a copy of the generator (the
        # pool's first iteration draws it from the generator itself, the same value).
        generator = torch.Generator()
        generator.set_state(settings.worker_generator.get_state())
        base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
        if not self.mailbox.post((settings.streams, base_seed)):
            return None
        iterator = iter(self.loader)  # the first starts the workers; later ones resume them
        self.iterator = iterator
        return iterator

    def shutdown(self) -> None:
        iterator, self.iterator = self.iterator, None
        if iterator is not None:
            _shutdown_workers(iterator)
        if self.slot_table.pinned:
            torch.cuda.synchronize()  # the training loop may still be copying from a slot
        self.slot_table.close()


def _shutdown_workers(iterator: Any) -> None:
    """Stop and join the worker processes of a torch DataLoader iterator."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class _PoolHolder:
    """The loader's idle persistent pool, taken by an iteration and given back when it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: _WorkerPool | None = None
        self._closed = False

    def take(self, key: tuple[Any, ...]) -> _WorkerPool | None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and pool.key != key:
            pool.shutdown()
            pool = None
        return pool

    def give_back(self, pool: _WorkerPool) -> None:
        with self._lock:
            kept = not self._closed and self._pool is None
            if kept:
                self._pool = pool
        if not kept:
            pool.shutdown()

    def open(self) -> None:
        with self._lock:
            self._closed = False

    def close(self) -> None:
        """Shut the idle pool down; a pool in use is shut down when its iteration ends."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()


class _SlotTable:
    """Main-process side of the worker slots: the tensors received, page-locked by ``pinner``
    when given, and their release."""

    def __init__(self, free: torch.Tensor, pinner: HostPinner | None = None) -> None:
        self.free = free
        self.pinner = pinner
        self.tensors: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
        self.pinned: dict[tuple[int, int], torch.Tensor] = {}

    def base(self, worker: int, slot: int, generation: int, tensor: torch.Tensor | None) -> torch.Tensor:
        if tensor is not None:
            # A new or grown slot. The old one's batches are all gone (the worker rewrites a
            # slot only after its release), and with them every copy from it.
            self._unpin((worker, slot))
            self.tensors[(worker, slot)] = (generation, tensor)
            if self.pinner is not None and self.pinner.register(tensor):
                self.pinned[(worker, slot)] = tensor
        have, shared = self.tensors[(worker, slot)]
        if have != generation:
            raise RuntimeError(f"worker {worker} slot {slot}: generation {generation} unknown (have {have})")
        view = shared.numpy()[:]  # its death (all batch views gone) frees the slot
        weakref.finalize(view, self._release, worker, slot)
        return torch.from_numpy(view)

    def _release(self, worker: int, slot: int) -> None:
        self.free[worker, slot] = 1

    def _unpin(self, key: tuple[int, int]) -> None:
        tensor = self.pinned.pop(key, None)
        if tensor is not None and self.pinner is not None:
            self.pinner.unregister(tensor)

    def close(self) -> None:
        """Unpin every slot (call once no copy from them can be in flight)."""
        for key in list(self.pinned):
            self._unpin(key)


def _identity(item: Any) -> Any:
    return item


class DataLoader:
    """Batches from any torch dataset, assembled straight into pinned host memory.

    Accepts ``torch.utils.data.DataLoader``'s arguments (see the module docstring for the few
    it ignores) plus:

    Args:
        device: if given (``"cuda"``, ``"cuda:1"``, a ``torch.device``), batches are delivered on
            that device, copied on a side stream overlapped with compute.
        prefetch_batches: batches assembled ahead of the training loop.
        ring_slots: host arenas in the ring (default ``prefetch_batches + 3``).
        num_streams: with a :class:`~fastfeed.StreamingDataset`, the epoch is read as this many
            streams whose batches are interleaved round-robin (see :mod:`fastfeed.streams`): the
            batch order depends on it and not on ``num_workers``, so a run resumed from
            :meth:`state_dict` with any number of workers continues exactly. Keep it fixed
            across restarts (and >= ``num_workers``, or some workers idle).
        persistent_workers: with a :class:`~fastfeed.StreamingDataset`, the worker processes,
            their connections, caches and shared-memory slots are kept from one epoch to the
            next, and each epoch still reads the dataset's current epoch (``set_epoch``). Their
            RNGs are reseeded each epoch as fresh workers' would be, so batches and random draws
            are those of fresh workers. An epoch abandoned part-way ends its workers (new ones
            start with the next). Stopped by :meth:`close` or when the loader is collected.
            Other datasets start new workers each epoch.

    Batches: fixed-size fields (arrays, tensors, numbers) are stacked tensors, ``bytes`` fields
    are :class:`fastfeed.batch.RaggedBytes`, strings are lists. A ``collate_fn`` replaces this.
    CPU batches are views of ring memory that stays reserved until the batch is freed;
    keeping many batches alive makes the ring allocate (and warn), never hang.

    Order: ``iter(loader)`` fixes the epoch it reads (a :class:`~fastfeed.StreamingDataset`'s
    ``epoch``: a later ``set_epoch`` applies to the next iteration) and draws nothing; the
    iteration starts at its first ``next()``, which draws, in the calling thread, what torch's
    DataLoader draws when an iteration starts: the workers' base seed from ``generator`` (if
    given), then the sampler's whole epoch of indices (a batch sampler without ``len()``, which
    may be endless, is instead read as batches are made). So the order of every epoch depends
    only on the generators' state and the number of iterations started, never on thread timing:
    an iterator dropped before its first ``next()`` (Lightning's probe) changes nothing, and
    with a ``generator`` the order is torch's for that generator, whatever ``num_workers``.
    ``iter()`` and :meth:`load_state_dict` end the loader's previous iteration.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Iterable[Any] | None = None,
        batch_sampler: Iterable[list[Any]] | None = None,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        device: str | torch.device | None = None,
        prefetch_batches: int = 4,
        ring_slots: int | None = None,
        num_streams: int = 8,
    ) -> None:
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        if prefetch_batches < 1:
            raise ConfigError(f"prefetch_batches must be >= 1, got {prefetch_batches}")
        if num_streams < 1:
            raise ConfigError(f"num_streams must be >= 1, got {num_streams}")
        self.dataset = dataset
        self.iterable = isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__")
        if self.iterable and (shuffle or sampler is not None or batch_sampler is not None):
            raise ConfigError(
                "shuffle, sampler and batch_sampler do not apply to an iterable dataset",
                hint="shuffle in the dataset, e.g. StreamingDataset(shuffle=True)",
            )
        if batch_sampler is not None and (batch_size != 1 or shuffle or sampler is not None or drop_last):
            raise ConfigError("batch_sampler is mutually exclusive with batch_size, shuffle, sampler and drop_last")
        if batch_size is None:
            raise ConfigError("batch_size=None (unbatched samples) is not supported", hint="use torch's DataLoader")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.timeout = timeout
        self.worker_init_fn = worker_init_fn
        self.multiprocessing_context = multiprocessing_context
        self.generator = generator
        self.prefetch_factor = prefetch_factor
        self.persistent_workers = persistent_workers
        self.prefetch_batches = prefetch_batches
        self.num_streams = num_streams
        self.device = torch.device(device) if device is not None else None
        self.pin = torch.cuda.is_available()
        self.ring_slots = ring_slots or prefetch_batches + 3
        self.batch_sampler: Iterable[list[Any]] | None = None
        if not self.iterable:
            if batch_sampler is None:
                if sampler is None and shuffle:
                    if generator is None:
                        # The loader's own generator, seeded from torch's global RNG (so
                        # torch.manual_seed governs it, as in torch), whose state exact resume saves.
                        generator = torch.Generator()
                        generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
                    sampler = RandomSampler(dataset, generator=generator)
                elif sampler is None:
                    sampler = SequentialSampler(dataset)
                batch_sampler = BatchSampler(sampler, batch_size, drop_last)
            self.batch_sampler = batch_sampler
        # Worker seeds: torch's DataLoader draws a base seed per iteration, from the global RNG
        # unless given a generator. Drawing it here once and deriving each iteration's from it
        # keeps iterating from touching the global RNG, so a run restored from a checkpoint
        # (RNG states included) sees the same random numbers as the uninterrupted run.
        self._seed_base = int(torch.empty((), dtype=torch.int64).random_().item()) if generator is None else 0
        self._iterations = 0
        self._ring = HostRing(self.ring_slots, pin=self.pin)
        self._stats = _StatsSink()
        self._progress = _Progress(dataset)
        if _is_streaming(dataset):
            dataset.read_streams = num_streams  # the cache plans by the streams actually read
        self._sampler_progress = (
            _SamplerProgress(self.batch_sampler, self.generator) if self.batch_sampler is not None else None
        )
        self._active: weakref.ref[_LoaderIterator] | None = None
        # Persistent workers (StreamingDataset): kept between iterations, shut down by close()
        # or when the loader is collected.
        self._pool_holder = _PoolHolder()
        weakref.finalize(self, self._pool_holder.close)
        del pin_memory, pin_memory_device, in_order  # accepted for compatibility; see docstring

    def __len__(self) -> int:
        """Batches in an epoch. With a :class:`~fastfeed.StreamingDataset`: the batches its
        ``num_streams`` streams deliver in the dataset's current epoch, each stream ending with
        its own partial batch (unless ``drop_last``); this needs the shards' sample counts,
        scanned once."""
        if self.batch_sampler is not None:
            return len(self.batch_sampler)  # type: ignore[arg-type]
        if _is_streaming(self.dataset):
            return epoch_batches(self.dataset, self.num_streams, self.batch_size, drop_last=self.drop_last)
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        self._end_iteration()
        self._pool_holder.open()
        iterator = _LoaderIterator(self)
        # A weak reference: dropping the iterator in the training loop must stop its thread.
        self._active = weakref.ref(iterator)
        return iterator

    def _worker_generator(self, epoch: int) -> torch.Generator:
        """The generator the workers' torch DataLoader draws this iteration's base seed from.

        With the user's ``generator``: a copy of its state, and the user's advances past the
        base seed now, as torch's DataLoader advances it when an iteration starts (so the
        sampler's draws that follow are torch's, and no other thread ever draws from it).
        Otherwise one seeded by this loader's seed and the ``epoch`` (StreamingDataset) or the
        iteration number (others; restored by :meth:`load_state_dict`)."""
        if self.generator is not None:
            private = torch.Generator(device=self.generator.device)
            private.set_state(self.generator.get_state())
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            return private
        key = epoch if _is_streaming(self.dataset) else self._iterations
        seed = hash((self._seed_base, key)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator().manual_seed(seed)

    def stats(self) -> LoaderStats:
        """A snapshot of the counters (cheap; safe to call every step)."""
        return self._stats.snapshot()

    def state_dict(self) -> dict[str, Any]:
        """Where the training loop is in the epoch: a few integers per stream.

        Restore it with :meth:`load_state_dict` into a fresh loader (same dataset source, seed,
        batch size, ``num_streams`` and world size; any ``num_workers``, any process): the next
        iteration yields exactly the batches the uninterrupted run had left, in order. Only the
        block each stream was in is read again (at most ``shuffle_buffer`` samples, rounded up
        to whole batches), never earlier shards.

        On a different world size, any one rank's state resumes every new rank (batch size and
        ``num_streams`` may change too): the samples not yet delivered are split evenly across
        the new ranks, none repeated (see :mod:`fastfeed.reshard` for the exact guarantee).

        Map-style datasets: the state is the number of batches delivered this epoch and the
        sampler's generator state at the epoch's start; resuming replays sampler indices, not
        data. Raises :class:`~fastfeed.errors.ConfigError` for a sampler drawing from torch's
        global RNG (give it a ``generator``) and for iterable datasets other than
        :class:`~fastfeed.StreamingDataset`.
        """
        if self._sampler_progress is not None:
            return self._sampler_progress.state(self)
        if not _is_streaming(self.dataset):
            raise ConfigError(
                "state_dict() needs a map-style dataset or a fastfeed.StreamingDataset",
                hint="an arbitrary iterable dataset cannot be resumed without replaying it",
            )
        return self._progress.state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` at the next ``iter(loader)`` (see there). The loader's
        current iteration, if any, ends first (its ``next()`` raises ``StopIteration``): it
        could not continue the loaded state, nor be left drawing from the generators it sets."""
        active = self._active() if self._active is not None else None
        if active is not None and active.delivered:
            log.info("load_state_dict(): ending the iteration in progress after %d batches", active.delivered)
        self._end_iteration()
        if self._sampler_progress is not None:
            self._sampler_progress.load(self, state)
        elif _is_streaming(self.dataset):
            self._progress.load(self, state)
        else:
            raise ConfigError("load_state_dict() needs a map-style dataset or a fastfeed.StreamingDataset")

    def close(self) -> None:
        """Stop the active iteration and the worker processes (persistent ones too): they end
        within seconds. The loader can be iterated again afterwards."""
        self._end_iteration()
        self._pool_holder.close()

    def _end_iteration(self) -> None:
        """Stop the active iteration; persistent workers stay (if it ran to its end)."""
        active = self._active() if self._active is not None else None
        self._active = None
        if active is not None:
            active.close()

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _StatsSink:
    """Thread-safe accumulator behind :meth:`DataLoader.stats`."""

    def __init__(self) -> None:
        self._stats = LoaderStats()
        self._lock = threading.Lock()

    def add(self, **values: float) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self._stats, key, getattr(self._stats, key) + value)

    def snapshot(self) -> LoaderStats:
        with self._lock:
            return LoaderStats(**asdict(self._stats))


class _Settings:
    """What the producer thread needs from the loader: a snapshot with no reference back to the
    loader or its iterator, so dropping those (or garbage-collecting them) stops the thread.

    Made when an iteration starts, in the thread calling ``next()``: it draws everything the
    epoch's order depends on (see :class:`DataLoader`), so the producer thread never touches a
    generator. ``epoch``, ``segments``: the epoch the iteration reads, fixed at ``iter()``."""

    def __init__(self, loader: DataLoader, epoch: int, segments: tuple[Segment, ...]) -> None:
        self.dataset = loader.dataset
        self.iterable = loader.iterable
        self.batch_size = loader.batch_size
        self.drop_last = loader.drop_last
        # Torch's order of draws: the generators' state at the start (what a saved state
        # records), the workers' base seed, then the sampler's indices.
        skip = loader._sampler_progress.start() if loader._sampler_progress is not None else 0
        self.worker_generator = loader._worker_generator(epoch)
        self.batch_sampler = _draw_batches(loader.batch_sampler, skip) if loader.batch_sampler is not None else None
        self.num_workers = loader.num_workers
        self.collate_fn = loader.collate_fn
        self.timeout = loader.timeout
        self.worker_init_fn = loader.worker_init_fn
        self.multiprocessing_context = loader.multiprocessing_context
        self.persistent_workers = loader.persistent_workers
        self.prefetch_factor = loader.prefetch_factor
        self.ring = loader._ring
        self.stats = loader._stats
        self.pin_slots = loader.pin
        self.slot_table: _SlotTable | None = None
        #: Whether the producer unpins the slot table when the iteration ends (a persistent
        #: pool's table lives, pinned, as long as the pool).
        self.owns_slot_table = True
        self.pool_holder = loader._pool_holder if loader.persistent_workers else None
        resume = loader._progress.resume
        if resume is not None and resume.epoch != epoch:
            log.warning("ignoring the loaded state of epoch %d: the dataset is at epoch %d", resume.epoch, epoch)
            resume = None
        self.streams = _StreamConfig(
            loader.dataset,
            loader.batch_size,
            loader.drop_last,
            loader.num_streams,
            resume.next_stream if resume else 0,
            dict(resume.positions) if resume else {},
            loader.collate_fn,
            epoch,
            segments,
        )

    # ------------------------------------------------------------------ sources of raw batches

    def fast_path(self) -> bool:
        """Whether the dataset reads its own batches as resumable streams of byte spans (with a
        ``collate_fn``, the spans become sample dicts for it)."""
        return _is_streaming(self.dataset)

    def sample_batches(self) -> Iterator[tuple[Any, ...]]:
        """In-process: lists of samples (or, on the fast path, batches already collated into a
        ring slot, in stream order), with the time spent producing them."""
        io_stats = getattr(self.dataset, "io_stats", None)
        if self.fast_path():
            ring = self.ring
            timing = {"collate_s": 0.0}

            user_collate = self.collate_fn

            def collate(columns: ColumnBatch) -> tuple[Any, int]:
                start = time.perf_counter()
                if user_collate is not None:
                    batch = user_collate(columns.samples())
                else:
                    slot = ring.acquire()
                    batch = collate_columns_into(columns, slot.arena, slot.base)
                timing["collate_s"] = time.perf_counter() - start
                return batch, len(columns)

            streams = self.streams
            source = streams.stream_source(_rotated(streams.num_streams, streams.next_stream), collate)
            try:
                while True:
                    start = time.perf_counter()
                    try:
                        item = next(source)
                    except StopIteration:
                        return
                    if item[0] == "end":
                        self.stats.add(**item[2])
                        continue
                    _, v, (batch, n), after, io = item
                    elapsed = time.perf_counter() - start
                    times = {"n": n, **io, "collate_s": timing["collate_s"]}
                    times["parse_s"] = max(0.0, elapsed - io["fetch_s"] - timing["collate_s"])
                    yield "collated", batch, (v, after), times
            finally:
                source.close()
        elif self.iterable:
            it = iter(self.dataset)
            try:
                while True:
                    start = time.perf_counter()
                    fetch0 = io_stats()["fetch_wait_s"] if io_stats else 0.0
                    samples = list(itertools.islice(it, self.batch_size))
                    if not samples or (self.drop_last and len(samples) < self.batch_size):
                        return
                    elapsed = time.perf_counter() - start
                    fetch = (io_stats()["fetch_wait_s"] - fetch0) if io_stats else 0.0
                    yield "samples", samples, None, {"fetch_s": fetch, "parse_s": elapsed - fetch}
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        else:
            assert self.batch_sampler is not None
            for indices in self.batch_sampler:
                start = time.perf_counter()
                samples = [self.dataset[i] for i in indices]
                yield "samples", samples, None, {"parse_s": time.perf_counter() - start}

    def new_slots(self) -> torch.Tensor:
        """The shared ``free`` flags of each worker's shared-memory slots (see _WorkerSlots)."""
        slots = (self.prefetch_factor or 2) + 3
        free: torch.Tensor = torch.ones(self.num_workers, slots, dtype=torch.int8)
        free.share_memory_()  # type: ignore[no-untyped-call]
        return free

    def torch_loader_kwargs(self) -> dict[str, Any]:
        """The arguments of the torch DataLoader that runs the workers, as the user gave them."""
        return {
            "num_workers": self.num_workers,
            "timeout": self.timeout,
            "worker_init_fn": self.worker_init_fn,
            "multiprocessing_context": self.multiprocessing_context,
            "prefetch_factor": self.prefetch_factor,
            "generator": self.worker_generator,
        }

    def pool_key(self) -> tuple[Any, ...]:
        """What a persistent pool was made for: a pool is reused only for the same."""
        return (
            self.num_workers,
            self.timeout,
            self.worker_init_fn,
            self.multiprocessing_context,
            self.prefetch_factor,
            self.pin_slots,
        )

    def persistent_batches(self, holder: _PoolHolder) -> Iterator[Any]:
        """The fast path with persistent workers: the loader's pool, or a new one. The pool goes
        back to the loader only when the iteration ran to its end."""
        kept = holder.take(self.pool_key())
        iterator = kept.start(self) if kept is not None else None
        if kept is not None and iterator is not None:
            pool = kept
        else:
            if kept is not None:
                kept.shutdown()  # the settings outgrew its mailbox
            size = max(1 << 20, 4 * len(pickle.dumps(self.streams, protocol=pickle.HIGHEST_PROTOCOL)))
            pool = _WorkerPool(self, size)
            iterator = pool.start(self)
            assert iterator is not None
        self.slot_table, self.owns_slot_table = pool.slot_table, False
        completed = False
        try:
            order = _rotated(self.streams.num_streams, self.streams.next_stream)
            yield from _in_stream_order(iterator, order, lambda io: self.stats.add(**io))
            for extra in iterator:  # each worker's end of iteration; nothing else may come
                raise RuntimeError(f"a DataLoader worker sent {extra[0]!r} after its streams ended")
            completed = True
        finally:
            if completed:
                holder.give_back(pool)
            else:
                pool.shutdown()

    def worker_batches(self) -> Iterator[Any]:
        """Worker processes (torch's worker machinery) returning one arena region per batch."""
        if self.pool_holder is not None and self.fast_path():
            yield from self.persistent_batches(self.pool_holder)
            return
        free = self.new_slots()
        self.slot_table = _SlotTable(free, HostPinner() if self.pin_slots else None)
        kwargs = self.torch_loader_kwargs()
        kwargs.update(collate_fn=_WorkerCollate(self.collate_fn, free), persistent_workers=self.persistent_workers)
        dataset = self.dataset
        if self.fast_path():
            # Workers read their streams and collate whole batches; torch only moves messages.
            dataset = _CollatedStream(self.streams, free)
            kwargs.update(batch_size=None, collate_fn=_identity)
        elif self.iterable:
            kwargs.update(batch_size=self.batch_size, drop_last=self.drop_last)
        else:
            kwargs.update(batch_sampler=self.batch_sampler)
        loader = torch.utils.data.DataLoader(dataset, **kwargs)
        it = iter(loader)
        try:
            if self.fast_path():
                order = _rotated(self.streams.num_streams, self.streams.next_stream)
                yield from _in_stream_order(it, order, lambda io: self.stats.add(**io))
            else:
                yield from it
        finally:
            # Now, not when ``it`` is collected: an exception raised from a worker keeps the
            # iterator (and so the workers) alive for as long as the exception is referenced.
            _shutdown_workers(it)
            del it


class _HandoffQueue(queue.Queue[Any]):
    """A bounded queue whose ``get`` does not wake a producer blocked on a full queue: the
    consumer calls :meth:`space` once it is done with the item.

    With a device, handing a batch over (``wait_event``) releases the GIL; a producer woken by
    the ``get`` would take it and run its Python work for the next batch right then, inside the
    training loop's ``next()`` (measured on an H200: ~0.5-0.9 ms per step, see
    benchmarks/RESULTS.md). Woken after ``next()``, it runs while the loop waits on the GPU.
    A producer still polls every ``_POLL`` seconds, so a missed :meth:`space` only delays it.
    """

    def get_quietly(self, timeout: float) -> Any:
        with self.not_empty:
            end = time.monotonic() + timeout
            while not self._qsize():
                remaining = end - time.monotonic()
                if remaining <= 0.0:
                    raise queue.Empty
                self.not_empty.wait(remaining)
            return self._get()

    def space(self) -> None:
        with self.mutex:
            self.not_full.notify()


class _LoaderIterator:
    """One pass over the loader: a producer thread and a bounded queue.

    Creating it fixes the epoch it reads and nothing else; the pass starts at the first
    ``next()`` (:meth:`_start`), which draws the order and starts the thread. The thread runs
    :func:`_produce` over a :class:`_Settings` snapshot and the queue only, never this object,
    so an iterator (and its loader) that the training loop drops is collected and its
    ``__del__`` stops the thread.
    """

    def __init__(self, loader: DataLoader) -> None:
        self._loader: DataLoader | None = loader  # until the pass starts
        ds = loader.dataset
        streaming = _is_streaming(ds)
        self._epoch = int(ds.epoch) if streaming else 0
        self._segments: tuple[Segment, ...] = tuple(ds.segments) if streaming else ()
        self._sampler_progress = loader._sampler_progress
        self._queue = _HandoffQueue(maxsize=loader.prefetch_batches)
        self._stop = threading.Event()
        self._stats = loader._stats
        self._progress = loader._progress
        self._feeder: DeviceFeeder | None = None
        self._thread: threading.Thread | None = None
        self._done = False
        #: Batches handed to the training loop.
        self.delivered = 0

    def _start(self) -> None:
        loader, self._loader = self._loader, None
        assert loader is not None
        loader._iterations += 1
        settings = _Settings(loader, self._epoch, self._segments)  # draws; takes the resume point, if any
        loader._progress.start(settings.streams)
        self._feeder = DeviceFeeder.for_device(loader.device) if loader.device is not None else None
        self._thread = threading.Thread(
            target=_produce,
            args=(settings, self._feeder, self._queue, self._stop),
            name="fastfeed-batch",
            daemon=True,
        )
        self._thread.start()

    # ------------------------------------------------------------------ training loop side

    def __iter__(self) -> _LoaderIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if self._thread is None:
            try:
                self._start()
            except BaseException:
                self.close()
                raise
        thread = self._thread
        assert thread is not None
        start = time.perf_counter()
        try:
            while True:
                try:
                    item = self._queue.get_quietly(_POLL)
                    break
                except queue.Empty:
                    if not thread.is_alive() and self._queue.empty():
                        self._done = True
                        raise StopIteration from None
        finally:
            self._stats.add(wait_s=time.perf_counter() - start)
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        batch, event, meta = item
        if meta is not None:
            self._progress.delivered(*meta)
        elif self._sampler_progress is not None:
            self._sampler_progress.delivered()
        if self._feeder is not None:
            self._feeder.hand_over(batch, event)
        self._queue.space()
        self.delivered += 1
        return batch

    def close(self) -> None:
        """Stop the producer and its workers; returns within seconds."""
        self._done = True
        self._loader = None
        self._stop.set()
        while True:  # unblock a producer waiting to put
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("fastfeed-batch thread did not stop within %.0fs", _JOIN_TIMEOUT)

    def __del__(self) -> None:
        if not self._done:
            self.close()


# ---------------------------------------------------------------------- producer thread


def _produce(settings: _Settings, feeder: DeviceFeeder | None, out: queue.Queue[Any], stop: threading.Event) -> None:
    """Thread "fastfeed-batch": raw batches -> ring slots (-> device) -> ``out``."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    source: Iterator[Any] | None = None
    try:
        source = settings.worker_batches() if settings.num_workers > 0 else settings.sample_batches()
        for item in source:
            if stop.is_set():
                return
            batch, event, nbytes, n, times = _assemble(settings, feeder, item)
            settings.stats.add(batches=1, samples=n, bytes=nbytes, **times)
            if not put((batch, event, item[-2])):
                return
            del batch, item
        put(_END)
    except BaseException as exc:  # delivered to the training loop and raised there
        put(_Failure(exc))
    finally:
        if source is not None:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        if feeder is not None:
            feeder.drain()
        if settings.slot_table is not None and settings.owns_slot_table:
            if settings.pin_slots and settings.slot_table.pinned:
                # The training loop may still be copying from CPU batches it was handed.
                torch.cuda.synchronize()
            settings.slot_table.close()


def _assemble(
    settings: _Settings, feeder: DeviceFeeder | None, item: Any
) -> tuple[Any, Any, int, int, dict[str, float]]:
    """Items are ``(kind, payload..., stream_meta, stage_times)``."""
    kind = item[0]
    times = dict(item[-1])
    n = int(times.pop("n", 0))
    if feeder is not None:
        feeder.reap()
        if settings.ring.free_slots() == 0:
            feeder.wait_oldest()
    start = time.perf_counter()
    if kind == "collated":  # the fast path collated into a ring slot already
        batch = item[1]
        nbytes = _tensor_bytes(batch)
        start = time.perf_counter()
    elif kind == "samples":
        samples = item[1]
        n = len(samples)
        if settings.collate_fn is not None:
            batch = settings.collate_fn(samples)
        else:
            slot = settings.ring.acquire()
            batch = collate_into(samples, slot.arena, slot.base)
        nbytes = _tensor_bytes(batch)
        times["collate_s"] = times.get("collate_s", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
    elif kind == "slot":  # a worker's shared-memory slot: views of it, no copy
        _, worker, slot, generation, tensor, layout = item[:6]
        assert settings.slot_table is not None
        batch = from_layout(layout, settings.slot_table.base(worker, slot, generation, tensor))
        nbytes = layout_extent(layout)
    elif kind == "layout":
        region, layout = item[1], item[2]
        slot = settings.ring.acquire()
        slot.arena.ensure(region.numel())
        gather(slot.arena.array, [region.numpy()], dst_offset=0)
        batch = from_layout(layout, slot.base())
        nbytes = int(region.numel())
    else:  # "user": a user collate_fn ran in the worker
        batch = item[1]
        nbytes = _tensor_bytes(batch)
    event = None
    if feeder is not None:
        batch, event = feeder.copy(batch)
    times["copy_s"] = times.get("copy_s", 0.0) + time.perf_counter() - start
    return batch, event, nbytes, n, times


class _SamplerProgress:
    """Progress through a map-style dataset's batch sampler: the batches delivered in the current
    iteration, and the state of the sampler's random generators when the iteration started (the
    order is a function of those; samplers without a generator, like ``DistributedSampler``,
    must be deterministic for their epoch). Resuming replays the sampler's indices, not data."""

    VERSION = 1

    def __init__(self, batch_sampler: Iterable[list[Any]], generator: torch.Generator | None = None) -> None:
        self.batch_sampler = batch_sampler
        self._lock = threading.Lock()
        self.generators = _sampler_generators(batch_sampler)
        if self.generators is not None and generator is not None and all(g is not generator for g in self.generators):
            self.generators.append(generator)  # the workers' base seed is drawn from it
        self.start_states: list[torch.Tensor] = []
        self.batches = 0
        self.pending_skip: int | None = None

    def start(self) -> int:
        """A new iteration: returns how many batches to skip (a loaded state's), once."""
        with self._lock:
            skip, self.pending_skip = self.pending_skip or 0, None
            self.start_states = [g.get_state() for g in self.generators or ()]
            self.batches = skip
            return skip

    def delivered(self) -> None:
        with self._lock:
            self.batches += 1

    def state(self, loader: DataLoader) -> dict[str, Any]:
        if self.generators is None:
            raise ConfigError(
                "state_dict(): the sampler draws its order from torch's global random generator, so a resumed "
                "run could not repeat it",
                hint="pass generator=torch.Generator() to the sampler, or use shuffle=True (the loader then "
                "keeps its own generator)",
            )
        with self._lock:
            return {
                "version": self.VERSION,
                "kind": "sampler",
                "batches": self.batches,
                "batch_size": loader.batch_size,
                "drop_last": loader.drop_last,
                "dataset_len": len(loader.dataset),
                "iteration": loader._iterations,
                "generators": [base64.b64encode(bytes(st.numpy())).decode() for st in self.start_states],
            }

    def load(self, loader: DataLoader, state: dict[str, Any]) -> None:
        if state.get("kind") != "sampler" or state.get("version") != self.VERSION:
            raise ConfigError(
                "cannot resume: this state is not a map-style loader's",
                hint="load the state_dict() of a loader over the same kind of dataset",
            )
        expect = {"batch_size": loader.batch_size, "drop_last": loader.drop_last, "dataset_len": len(loader.dataset)}
        for key, value in expect.items():
            if state.get(key) != value:
                raise ConfigError(
                    f"cannot resume: the saved loader state has {key}={state.get(key)!r}, this loader {value!r}",
                    hint="resume with the same dataset, batch size and sampler",
                )
        saved = state["generators"]
        if self.generators is None or len(saved) != len(self.generators):
            raise ConfigError("cannot resume: the sampler's random generators differ from the saved state's")
        with self._lock:
            for g, text in zip(self.generators, saved, strict=True):
                g.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))
            self.pending_skip = int(state["batches"])
        # The resumed iteration is the saved one (its worker seeds too): __iter__ counts it again.
        loader._iterations = int(state.get("iteration", 1)) - 1


def _sampler_generators(batch_sampler: Any) -> list[torch.Generator] | None:
    """The generators behind a (batch) sampler chain, or None if one draws from the global RNG."""
    gens: list[torch.Generator] = []
    obj, seen = batch_sampler, set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        if hasattr(obj, "generator"):
            g = obj.generator
            if isinstance(g, torch.Generator):
                gens.append(g)
            elif isinstance(obj, RandomSampler | SubsetRandomSampler | WeightedRandomSampler):
                return None  # generator=None: a fresh seed from the global RNG per iteration
        obj = getattr(obj, "sampler", None)
    return gens


def _draw_batches(batch_sampler: Iterable[list[Any]], skip: int) -> Iterable[list[Any]]:
    """The epoch's batches of indices after the first ``skip``, all drawn now (the draws of the
    skipped ones too, so the generators end where a whole epoch leaves them). A batch sampler
    without ``len()`` may be endless: it is read as batches are made instead."""
    try:
        len(batch_sampler)  # type: ignore[arg-type]
    except TypeError:
        return _Skip(batch_sampler, skip) if skip else batch_sampler
    return list(itertools.islice(iter(batch_sampler), skip, None))


class _Skip:
    """A batch sampler without its first ``skip`` batches (indices are generated, not loaded)."""

    def __init__(self, batch_sampler: Iterable[list[Any]], skip: int) -> None:
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self) -> Iterator[list[Any]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]


class _Progress:
    """What the training loop has received this epoch (written by the iterator on each batch)."""

    VERSION = 2

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._lock = threading.Lock()
        self.epoch = int(getattr(dataset, "epoch", 0))
        self.segments: tuple[Segment, ...] = tuple(dataset.segments) if _is_streaming(dataset) else ()
        self.positions: dict[int, StreamPos] = {}
        self.next_stream = 0
        self.resume: _Resume | None = None

    def start(self, streams: _StreamConfig) -> None:
        with self._lock:
            self.epoch = streams.epoch
            self.segments = streams.segments
            self.positions = dict(streams.starts)
            self.next_stream = streams.next_stream
            self.resume = None  # used once

    def delivered(self, stream: int, after: StreamPos) -> None:
        with self._lock:
            self.positions[stream] = after
            self.next_stream = stream + 1  # taken modulo num_streams when resuming

    def state(self, loader: DataLoader) -> dict[str, Any]:
        ds = self.dataset
        with self._lock:
            return {
                "version": self.VERSION,
                "epoch": self.epoch,
                "num_streams": loader.num_streams,
                "batch_size": loader.batch_size,
                "drop_last": loader.drop_last,
                "seed": ds.seed,
                "shuffle": ds.shuffle,
                "shuffle_buffer": ds.shuffle_buffer,
                "remainder": ds.remainder,
                "rank": ds.rank,
                "world_size": ds.world_size,
                "shards": len(ds.shards),
                "segments": [seg.as_dict() for seg in self.segments],
                "next_stream": self.next_stream % loader.num_streams,
                "streams": {str(v): p.as_dict() for v, p in sorted(self.positions.items())},
            }

    def load(self, loader: DataLoader, state: dict[str, Any]) -> None:
        ds = self.dataset
        if state.get("version") not in (1, self.VERSION):
            raise ConfigError(
                f"cannot resume: loader state version {state.get('version')!r} is not supported",
                hint=f"this fastfeed reads versions 1 and {self.VERSION}",
            )
        # What the epoch consists of: must match for any resume.
        expect: dict[str, Any] = {
            "seed": getattr(ds, "seed", None),
            "shuffle": getattr(ds, "shuffle", None),
            "shuffle_buffer": getattr(ds, "shuffle_buffer", None),
            "shards": len(getattr(ds, "shards", ())),
            "remainder": getattr(ds, "remainder", None),
        }
        same_world = state.get("world_size") == getattr(ds, "world_size", None)
        if same_world:
            # Exact continuation: this rank's own streams, read the same way.
            expect.update(
                num_streams=loader.num_streams,
                batch_size=loader.batch_size,
                drop_last=loader.drop_last,
                rank=getattr(ds, "rank", None),
            )
        for key, value in expect.items():
            have = state.get(key, "drop" if key == "remainder" else None)
            if have != value:
                raise ConfigError(
                    f"cannot resume: the saved loader state has {key}={have!r}, this loader {value!r}",
                    hint="resume with the same dataset, seed, shuffle settings and remainder; on the same "
                    "world size each rank loads its own state with the same batch size and num_streams",
                )
        epoch = int(state["epoch"])
        segments = tuple(Segment.from_dict(d) for d in state.get("segments", []))
        positions = {int(v): StreamPos(**p) for v, p in state["streams"].items()}
        next_stream = int(state["next_stream"])
        if not same_world:
            closed = close_segment(
                ds,
                world_size=int(state["world_size"]),
                num_streams=int(state["num_streams"]),
                batch_size=int(state["batch_size"]),
                positions=positions,
            )
            segments += (closed,)
            positions, next_stream = {}, 0
            log.info(
                "resuming epoch %d on %d ranks from a state saved on %d: the samples not yet delivered are "
                "split across the ranks (none repeated; see fastfeed.reshard)",
                epoch,
                ds.world_size,
                closed.world_size,
            )
        ds._resume_segments(epoch, segments)
        with self._lock:
            self.resume = _Resume(epoch, positions, next_stream)


@dataclass
class _Resume:
    epoch: int
    positions: dict[int, StreamPos]
    next_stream: int


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _tensor_bytes(batch: Any) -> int:
    total = [0]

    def count(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    tree_map_tensors(batch, count)
    return total[0]
