"""``fastfeed.DataLoader``: ``torch.utils.data.DataLoader`` (a subclass of it) that owns the whole
path from samples to (pinned host or device) batches.

It gives the batches torch's loader gives (``default_collate``'s batches, in the same order,
with the same seeds and errors) for every dataset torch's loader accepts; see the README's
"Differences from torch's DataLoader" for the few that are documented. How the batches are made:

Map-style and iterable datasets (any ``torch.utils.data`` dataset)::

    num_workers=0   next() fetches the samples and collates them in the calling thread, as
                    torch does (so random transforms draw from the global RNG in the same
                    order), natively into a ring slot (pinned when CUDA is present).
    num_workers>0   torch's own worker processes fetch; each collates into its own shared-
                    memory slots (page-locked by the main process the first time it sees them);
                    a batch crosses as a slot number, and a producer thread "fastfeed-batch"
                    turns it into views of the slot (and starts its device copy).

:class:`~fastfeed.StreamingDataset` (its resumable streams, :mod:`fastfeed.order.streams`)::

    samples -> columnar spans -> native gather into a ring slot (in-process) or a worker's
    shared-memory slot -> producer thread "fastfeed-batch" -> bounded queue -> training loop

With ``device=...`` every batch is copied on a side CUDA stream (:mod:`fastfeed.batch.device`); the
training stream waits on the copy's event. ``stats()`` reports how long the training loop
waited in ``next()`` (``wait_s``) and where the time went.
"""

from __future__ import annotations

import base64
import collections
import inspect
import itertools
import logging
import multiprocessing.connection
import pickle
import queue
import random
import signal
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader as _TorchDataLoader
from torch.utils.data import IterableDataset
from torch.utils.data._utils.collate import default_collate, default_convert

try:  # deprecated in torch, and may go: without it, no dataset is a datapipe
    from torch.utils.data.datapipes.datapipe import IterDataPipe
except ImportError:  # pragma: no cover

    class IterDataPipe:  # type: ignore[no-redef]
        """Stands for torch's IterDataPipe where this torch has none."""


from fastfeed.batch.assemble import (
    Arena,
    ColumnBatch,
    collate_columns_into,
    from_layout,
    layout_extent,
    to_layout,
    tree_leaves,
)
from fastfeed.batch.collate import collate_into
from fastfeed.batch.device import DeviceFeeder, HostPinner
from fastfeed.batch.gather import gather
from fastfeed.batch.ring import HostRing
from fastfeed.errors import ConfigError
from fastfeed.order.reshard import close_segment
from fastfeed.order.source import Segment
from fastfeed.order.streams import StreamPos, epoch_batches, stream_batches

__all__ = ["DataLoader", "LoaderStats"]

log = logging.getLogger(__name__)

_T_co = TypeVar("_T_co", covariant=True)

_POLL = 0.1
_JOIN_TIMEOUT = 10.0
_END = object()
#: torch >= 2.6 has ``in_order``; older releases do not accept the argument.
_TORCH_HAS_IN_ORDER = "in_order" in inspect.signature(_TorchDataLoader.__init__).parameters


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


# ---------------------------------------------------------------------- messages
#
# What travels from the sources (worker processes, or the in-process readers) to the producer
# thread. ``stage`` holds the LoaderStats stage times the message's batch cost (and ``n``, its
# samples); ``stream`` is ``(stream, position after the batch)`` on the StreamingDataset path.

StreamMeta = tuple[int, StreamPos]


class _SlotBatch(NamedTuple):
    """A batch collated into a worker's shared-memory slot: rebuilt as views of the slot.
    ``tensor`` is the slot's memory the first time it is used (and after it grew), else None."""

    worker: int
    slot: int
    generation: int
    tensor: torch.Tensor | None
    layout: Any
    stage: dict[str, float]
    stream: StreamMeta | None = None


class _RegionBatch(NamedTuple):
    """A batch collated into a fresh shared-memory region (every slot of the worker was held)."""

    region: torch.Tensor
    layout: Any
    stage: dict[str, float]
    stream: StreamMeta | None = None


class _UserBatch(NamedTuple):
    """A batch made by a user ``collate_fn`` (or ``default_convert``), sent as torch sends it."""

    batch: Any
    stage: dict[str, float]
    stream: StreamMeta | None = None


class _RingBatch(NamedTuple):
    """A batch already collated into a ring slot of this process."""

    batch: Any
    stage: dict[str, float]
    stream: StreamMeta | None = None


class _StreamEnd(NamedTuple):
    """A stream has no more batches; ``io``: the I/O counters of its last reads."""

    stream_id: int
    io: dict[str, float]


class _Failure(NamedTuple):
    """An exception to raise in the training loop in place of one batch. ``fatal``: the
    iteration cannot continue after it."""

    exc: BaseException
    fatal: bool = False


class _WorkerError(NamedTuple):
    """An error a worker reading streams sends as a value (pickled whole, with its attributes:
    a :class:`~fastfeed.FastfeedError`'s ``url`` and ``hint``), where torch's worker machinery
    would rebuild it from its text; ``where``: the worker's traceback."""

    exc: BaseException
    where: str

    def rebuild(self) -> BaseException:
        """The exception, its cause the worker's traceback (as a chained exception)."""
        self.exc.__cause__ = _RemoteTraceback(self.where)
        return self.exc


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a DataLoader worker process."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


# ---------------------------------------------------------------------- StreamingDataset streams


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
        collate_fn: Callable[[Any], Any] | None = None,
        epoch: int = 0,
        segments: tuple[Segment, ...] = (),
        unbatched: bool = False,
        base_seed: int = 0,
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
        #: batch_size=None: one sample at a time, each a sample dict (``collate_fn`` per sample).
        self.unbatched = unbatched
        #: The workers' base seed (drawn as torch draws it, or a resumed run's): workers reading
        #: streams seed themselves from it, so a resumed run's workers draw what the saved run's did.
        self.base_seed = base_seed

    def stream_source(
        self, streams: list[int], collate: Callable[[ColumnBatch], Any]
    ) -> Generator[tuple[int, Any, StreamPos, dict[str, float]] | _StreamEnd, None, None]:
        """Round-robin over ``streams`` (those still running), each from its resume position:
        ``(stream, collate(batch), position_after, io_deltas)`` (``io_deltas``: the
        :class:`LoaderStats` I/O fields this batch added), then a :class:`_StreamEnd` when a
        stream is exhausted (its last reads: the end of its last shard)."""
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
                    yield _StreamEnd(v, _io_delta(io0, io_stats()))  # what the stream read last
                else:
                    yield (v, value, after, _io_delta(io0, io_stats()))
                v = _cyclic_next(v, live, self.num_streams)
        finally:
            for gen in gens.values():
                gen.close()

    def user_collate(self, columns: ColumnBatch) -> Any:
        """A user ``collate_fn`` (or ``default_convert``) over the batch's sample dicts; with
        ``batch_size=None``, over the one sample itself, as torch's loader calls it."""
        fn = self.collate_fn if self.collate_fn is not None else default_convert
        samples = columns.samples()
        return fn(samples[0]) if self.unbatched else fn(samples)


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
    """Whether the loader reads ``dataset`` as resumable streams (see :mod:`fastfeed.order.streams`)."""
    from fastfeed.dataset import StreamingDataset

    return isinstance(dataset, StreamingDataset)


def _rotated(n: int, first: int) -> list[int]:
    """``0..n-1`` starting at ``first``: the round-robin order of streams from a resume point."""
    return [(first + i) % n for i in range(n)]


def _in_stream_order(
    items: Iterator[Any], order: list[int], on_end: Callable[[dict[str, float]], None] | None = None
) -> Iterator[Any]:
    """Reorder worker messages into the streams' round-robin order (what one process would
    produce): workers run disjoint streams and each emits its own streams in that order, so the
    wait for the next stream's batch is short and the buffers stay small."""
    pending: dict[int, collections.deque[Any]] = {v: collections.deque() for v in order}
    ended: set[int] = set()
    live = set(order)
    n = max(order) + 1 if order else 1
    v = order[0] if order else 0
    while live:
        while not pending[v] and v not in ended:
            item = next(items, None)
            if item is None:
                raise RuntimeError(f"DataLoader workers ended before stream {v} did")
            if isinstance(item, _WorkerError):
                raise item.rebuild()
            if isinstance(item, _StreamEnd):
                ended.add(item.stream_id)
                if on_end is not None:
                    on_end(item.io)
            else:
                pending[item.stream[0]].append(item)
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


# ---------------------------------------------------------------------- worker side


class _SlotFlags:
    """The shared-memory flags of the workers' slots (see :class:`_WorkerSlots`).

    ``free[w, k]``: 1 while worker ``w`` may write its slot ``k``; the worker clears it when it
    takes the slot, the main process sets it once the batch built on the slot is gone.
    ``held[w, k]``: 1 while the main process holds a batch on the slot. ``epoch``: raised by
    the main process before each epoch of a persistent pool. A worker that sees a new epoch
    takes back its slots that are neither free nor held: their batches were sent in an epoch
    that ended early, and torch's loader dropped them unseen when the new epoch started.
    Plain byte loads and stores; each flag has one writer at a time, no lock needed.
    """

    def __init__(self, workers: int, slots: int) -> None:
        self.free = torch.ones(workers, slots, dtype=torch.int8).share_memory_()  # type: ignore[no-untyped-call]
        self.held = torch.zeros(workers, slots, dtype=torch.int8).share_memory_()  # type: ignore[no-untyped-call]
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]

    def new_epoch(self) -> None:
        self.epoch += 1


class _WorkerSlots:
    """Worker side of the shared-memory slots: up to ``flags.free.shape[1]`` shared arenas per
    worker that batches are collated into, made as they are needed.

    A slot's tensor crosses to the main process (by file descriptor) only the first time it is
    used and after it grows; after that only its number travels (:class:`_SlotBatch`). A worker
    never waits for a slot: when all of its slots are held (a training loop that keeps
    batches), it collates into a fresh region instead (:class:`_RegionBatch`), so keeping
    batches costs memory, never time.
    """

    def __init__(self, flags: _SlotFlags, worker: int) -> None:
        self.worker = worker
        self.free = flags.free[worker].numpy()
        self.held = flags.held[worker].numpy()
        self.epoch_flag = flags.epoch.numpy()
        self.epoch = int(self.epoch_flag[0])
        self.arenas: list[Arena] = []
        self.sent: list[int] = []  # generation of each slot the main process already has

    def claim(self) -> int | None:
        free = self.free
        epoch = int(self.epoch_flag[0])
        if epoch != self.epoch:
            self.epoch = epoch
            for k in range(len(self.arenas)):
                if not free[k] and not self.held[k]:
                    free[k] = 1  # sent in an epoch that ended early, and dropped
        for k in range(len(self.arenas)):
            if free[k]:
                free[k] = 0
                return k
        if len(self.arenas) < len(free):
            k = len(self.arenas)
            free[k] = 0
            self.arenas.append(Arena(0, shared=True))
            self.sent.append(-1)
            return k
        return None

    def collate(self, fill: Callable[[Arena], Any], n: int, stream: StreamMeta | None = None) -> Any:
        """``fill(arena)`` writes the batch into an arena and returns it."""
        start = time.perf_counter()
        k = self.claim()
        if k is None:
            spare = Arena(0, shared=True)
            layout = to_layout(fill(spare), spare.tensor)
            stage = {"n": n, "collate_s": time.perf_counter() - start}
            return _RegionBatch(spare.tensor[: layout_extent(layout)], layout, stage, stream)
        arena = self.arenas[k]
        try:
            layout = to_layout(fill(arena), arena.tensor)
        except BaseException:
            self.free[k] = 1  # nothing was sent on it
            raise
        tensor = None
        if self.sent[k] != arena.generation:
            tensor, self.sent[k] = arena.tensor, arena.generation
        stage = {"n": n, "collate_s": time.perf_counter() - start}
        return _SlotBatch(self.worker, k, arena.generation, tensor, layout, stage, stream)


class _WorkerCollate:
    """The ``collate_fn`` of the workers of map-style and iterable datasets: ``default_collate``
    into one of the worker's shared-memory slots (:class:`_WorkerSlots`); a user ``collate_fn``
    (or ``default_convert`` without auto-batching) runs as torch runs it and its batch travels
    as torch sends it."""

    def __init__(self, user_collate: Callable[[Any], Any] | None, flags: _SlotFlags) -> None:
        self.user_collate = user_collate
        self.flags = flags
        self._slots: _WorkerSlots | None = None
        self._last_fetch = 0.0

    def __call__(self, samples: Any) -> Any:
        start = time.perf_counter()
        if self.user_collate is not None:
            batch = self.user_collate(samples)
            return _UserBatch(batch, {"collate_s": time.perf_counter() - start, "n": _count(samples)})
        if self._slots is None:
            info = torch.utils.data.get_worker_info()
            assert info is not None, "_WorkerCollate runs in DataLoader workers only"
            self._slots = _WorkerSlots(self.flags, info.id)
        message = self._slots.collate(lambda arena: collate_into(samples, arena), len(samples))
        message.stage.update(self._io_delta())
        return message

    def _io_delta(self) -> dict[str, float]:
        info = torch.utils.data.get_worker_info()
        io_stats = getattr(info.dataset, "io_stats", None) if info is not None else None
        if io_stats is None:
            return {}
        fetch = float(io_stats()["fetch_wait_s"])
        delta, self._last_fetch = fetch - self._last_fetch, fetch
        return {"fetch_s": delta}


def _count(samples: Any) -> int:
    """Samples in what a collate function was given (a list, or one sample when unbatched)."""
    return len(samples) if isinstance(samples, list) else 1


class _CollatedStream(IterableDataset[Any]):
    """Worker side of the StreamingDataset path: the dataset's own streams, collated by each
    worker into its shared-memory slots (:class:`_WorkerSlots`).

    With persistent workers (``mailbox``), each iteration reads its settings and the workers'
    seed from the mailbox (:class:`_Mailbox`) instead of ``settings``, and the slots live on
    across iterations."""

    def __init__(self, settings: _StreamConfig | None, flags: _SlotFlags, mailbox: _Mailbox | None = None) -> None:
        self.settings = settings
        self.flags = flags
        self.mailbox = mailbox
        self._slots: _WorkerSlots | None = None

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        assert info is not None, "_CollatedStream runs in DataLoader workers only"
        worker = info.id
        if self.mailbox is None:
            assert self.settings is not None
            settings = self.settings
            slots = _WorkerSlots(self.flags, worker)
        else:
            settings = self.mailbox.read()
            if self._slots is None:
                self._slots = _WorkerSlots(self.flags, worker)
            slots = self._slots
        _seed_worker(settings.base_seed, worker)  # as torch seeds fresh workers of this iteration
        user = settings.collate_fn is not None or settings.unbatched

        def collate(samples: ColumnBatch) -> Any:
            if user:
                start = time.perf_counter()
                batch = settings.user_collate(samples)
                return _UserBatch(batch, {"n": len(samples), "collate_s": time.perf_counter() - start})
            return slots.collate(lambda arena: collate_columns_into(samples, arena), len(samples))

        mine = [v for v in _rotated(settings.num_streams, settings.next_stream) if v % info.num_workers == worker]
        try:
            for item in settings.stream_source(mine, collate):
                if isinstance(item, _StreamEnd):
                    yield item
                else:
                    v, message, after, io = item
                    message.stage.update(io)
                    yield message._replace(stream=(v, after))
        except Exception as exc:
            if not _picklable(exc):
                raise  # torch's worker machinery sends its type and text
            where = f"in DataLoader worker process {worker}:\n" + "".join(traceback.format_exception(exc))
            yield _WorkerError(exc, where)


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:
        return False
    return True


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


# ---------------------------------------------------------------------- persistent workers


class _EpochIndices:
    """The index sampler of a persistent pool's torch DataLoader: each epoch's indices, drawn
    by the training thread, set before the epoch starts (torch reads it in ``_reset``)."""

    def __init__(self) -> None:
        self.indices: Iterable[Any] = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)  # type: ignore[arg-type]


class _WorkerPool:
    """Persistent worker processes (``persistent_workers=True``): one torch DataLoader whose
    workers, slots and pinned slot memory are kept from one iteration to the next. Used by one
    iteration at a time (see :class:`_PoolHolder`).

    StreamingDataset: each iteration posts its settings and seed to the workers' mailbox, and
    an iteration that does not run to its end shuts the pool down. Other datasets: torch's own
    persistent workers, which keep their seeds and their dataset replica across epochs as in
    torch; each epoch's indices are drawn by the training thread (:class:`_EpochIndices`), and
    a new epoch takes back the slots of batches an early-ended epoch left behind
    (:class:`_SlotFlags`)."""

    def __init__(self, settings: _Settings, mailbox_size: int = 0) -> None:
        self.key = settings.pool_key()
        self.streaming = settings.streaming
        self.flags = settings.new_flags()
        self.slot_table = _SlotTable(self.flags, HostPinner() if settings.pin_slots else None)
        #: State of the generator the workers' base seed came from (map-style pools draw it
        #: once, when the pool starts; for a resumed run's state).
        self.seed_state = settings.seed_state
        self.mailbox: _Mailbox | None = None
        self.indices: _EpochIndices | None = None
        kwargs = settings.torch_loader_kwargs()
        if self.streaming:
            self.mailbox = _Mailbox(mailbox_size)
            dataset: Any = _CollatedStream(None, self.flags, self.mailbox)
            kwargs.update(batch_size=None, collate_fn=_identity)
        else:
            dataset = settings.dataset
            if not settings.iterable:
                self.indices = _EpochIndices()
            kwargs.update(
                collate_fn=_WorkerCollate(settings.collate_fn, self.flags), **settings.index_kwargs(self.indices)
            )
        self.loader = _WorkerLoader(dataset, persistent_workers=True, **kwargs)
        self.iterator: Any = None
        self.started = False

    def start(self, settings: _Settings) -> Iterator[Any] | None:
        """Start an iteration of ``settings``; ``None`` if its settings do not fit the mailbox."""
        if self.mailbox is not None:
            if not self.mailbox.post(settings.streams):
                return None
        else:
            assert self.indices is not None or settings.iterable
            if self.indices is not None:
                assert settings.index_batches is not None  # drawn by iter(), as torch's workers need
                self.indices.indices = settings.index_batches
            if self.started:
                self.flags.new_epoch()
        if settings.worker_generator is not None:
            # What this iteration's torch loader draws (the workers' base seed when it starts
            # them, a datapipe's shared seed each epoch) comes from a copy of the user's
            # generator in the state torch's loader would have drawn it from.
            self.loader.generator = settings.worker_generator
        assert self.started or settings.worker_generator is not None
        self.started = True
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

    def idle(self) -> bool:
        """Whether a pool is kept (idle, between iterations)."""
        with self._lock:
            return self._pool is not None

    def peek(self, key: tuple[Any, ...]) -> _WorkerPool | None:
        """The idle pool if it was made for ``key`` (it stays idle)."""
        with self._lock:
            pool = self._pool
        return pool if pool is not None and pool.key == key else None

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

    def __init__(self, flags: _SlotFlags, pinner: HostPinner | None = None) -> None:
        self.free = flags.free
        self.held = flags.held
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
        self.held[worker, slot] = 1
        view = shared.numpy()[:]  # its death (all batch views gone) frees the slot
        weakref.finalize(view, self._release, worker, slot)
        return torch.from_numpy(view)

    def _release(self, worker: int, slot: int) -> None:
        self.held[worker, slot] = 0
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


class _WorkerLoader(_TorchDataLoader[Any]):
    """The torch DataLoader that runs a fastfeed loader's worker processes. Its worker-count
    warning is the user's loader's (at construction and at ``iter()``, as torch warns), not
    this one's, which is made later, in the producer thread."""

    def check_worker_number_rationality(self) -> None:
        return None


# ---------------------------------------------------------------------- the loader


def _check_device(device: str | torch.device | None) -> torch.device | None:
    """``device=`` as a :class:`torch.device`, checked now rather than at the first batch."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"device={device!r} is not a device", hint='use "cuda", "cuda:1", "cpu" or a torch.device'
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ConfigError(
                f"device={device!r}: CUDA is not available here (torch {torch.__version__}, {build}, "
                f"{torch.cuda.device_count()} GPUs visible)",
                hint="leave device unset for batches in host memory, or run on a machine with a GPU and a CUDA "
                "build of torch",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA devices",
                hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
            )
    return dev


class DataLoader(_TorchDataLoader[_T_co]):
    """``torch.utils.data.DataLoader`` with batches assembled straight into pinned host memory
    (and, with ``device=``, copied to the device on a side stream).

    A subclass of torch's DataLoader with its constructor, attributes, errors and warnings, so
    frameworks recognise it (Lightning's distributed sampler injection included). For any
    dataset torch accepts it yields the batches torch's loader yields: ``default_collate``'s
    batches (made natively, bit for bit the same), in the same order, with the same worker
    seeds, errors and ``len()``. The documented differences (README, "Differences from torch's
    DataLoader"): a :class:`~fastfeed.StreamingDataset` is read as resumable streams whose
    ``bytes`` fields are :class:`~fastfeed.RaggedBytes`; batches are in page-locked memory
    whenever CUDA is available (``pin_memory`` only pins a user ``collate_fn``'s batches);
    ``in_order=False`` still delivers in order.

    Args (besides torch's):
        device: if given (``"cuda"``, ``"cuda:1"``, a ``torch.device``), batches are delivered on
            that device, copied on a side stream overlapped with compute.
            :class:`~fastfeed.ConfigError` at construction if the device does not exist here.
        prefetch_batches: batches assembled ahead of the training loop (StreamingDataset, or
            worker processes).
        ring_slots: host arenas in the ring (default ``prefetch_batches + 3``).
        num_streams: with a :class:`~fastfeed.StreamingDataset`, the epoch is read as this many
            streams whose batches are interleaved round-robin (see :mod:`fastfeed.order.streams`): the
            batch order depends on it and not on ``num_workers``, so a run resumed from
            :meth:`state_dict` with any number of workers continues exactly. Keep it fixed
            across restarts (and >= ``num_workers``, or some workers idle).

    ``persistent_workers=True`` keeps the worker processes from one epoch to the next, as
    torch's. With a :class:`~fastfeed.StreamingDataset` each epoch still reads the dataset's
    current epoch (``set_epoch``; torch's persistent workers replay the epoch they started
    with) and the workers are reseeded each epoch as fresh workers would be; an epoch
    abandoned part-way ends them.

    Order and random draws are torch's: ``iter(loader)`` draws the workers' base seed from
    ``generator`` (torch's global generator if None), and the sampler draws its epoch at
    ``iter()`` with workers and at the first ``next()`` without (a batch sampler without
    ``len()``, which may be endless, is read as batches are made). A run restored with
    :meth:`load_state_dict` redraws nothing: it replays the saved draws.

    Batches: as ``default_collate`` makes them (a ``collate_fn`` replaces it). CPU batches are
    views of ring memory that stays reserved until the batch is freed; keeping batches alive
    costs memory, never a wait.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
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
        checked = _check_device(device)
        if prefetch_batches < 1:
            raise ConfigError(f"prefetch_batches must be >= 1, got {prefetch_batches}")
        if ring_slots is not None and ring_slots < 1:
            raise ConfigError(f"ring_slots must be >= 1, got {ring_slots}")
        if num_streams < 1:
            raise ConfigError(f"num_streams must be >= 1, got {num_streams}")
        extra: dict[str, Any] = {"in_order": in_order} if _TORCH_HAS_IN_ORDER else {}
        super().__init__(
            dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory, drop_last,
            timeout, worker_init_fn, multiprocessing_context, generator, prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers, pin_memory_device=pin_memory_device, **extra,
        )  # fmt: skip
        if not _TORCH_HAS_IN_ORDER:
            self.in_order = in_order
        self.device = checked
        self.prefetch_batches = prefetch_batches
        self.ring_slots = ring_slots
        self.num_streams = num_streams
        self._ring = HostRing(ring_slots or prefetch_batches + 3, pin=torch.cuda.is_available())
        self._stats = _StatsSink()
        self._progress = _Progress(self.dataset)
        self._sampler_progress = _SamplerProgress(self) if not isinstance(self.dataset, IterableDataset) else None
        self._iterators: weakref.WeakSet[_LoaderIterator] = weakref.WeakSet()
        # Persistent workers: kept between iterations, shut down by close() or when the loader
        # is collected.
        self._pool_holder = _PoolHolder()
        weakref.finalize(self, self._pool_holder.close)
        ds: Any = self.dataset
        if _is_streaming(ds):
            ds.read_streams = num_streams  # the cache plans by the streams actually read

    def __len__(self) -> int:
        """Batches in an epoch, as torch counts them. With a :class:`~fastfeed.StreamingDataset`:
        the batches its ``num_streams`` streams deliver in the dataset's current epoch, each
        stream ending with its own partial batch (unless ``drop_last``); this needs the shards'
        sample counts, scanned once."""
        ds: Any = self.dataset
        if _is_streaming(ds):
            batch = self.batch_size if self.batch_sampler is not None and self.batch_size is not None else 1
            return epoch_batches(ds, self.num_streams, batch, drop_last=self.drop_last)
        return super().__len__()

    def __iter__(self) -> _LoaderIterator:  # type: ignore[override]
        if self.num_workers > 0 and not (self.persistent_workers and self._pool_holder.idle()):
            self.check_worker_number_rationality()  # torch warns again when it starts workers
        if self.persistent_workers and self.num_workers > 0:
            # One iteration at a time over the same workers, as torch resets its one iterator.
            self._end_iterations()
        self._pool_holder.open()
        iterator = _LoaderIterator(self)
        self._iterators.add(iterator)
        return iterator

    def stats(self) -> LoaderStats:
        """A snapshot of the counters (cheap; safe to call every step)."""
        return self._stats.snapshot()

    def state_dict(self) -> dict[str, Any]:
        """Where the training loop is in the epoch (of the loader's latest iteration).

        Restore it with :meth:`load_state_dict` into a fresh loader (same dataset, sampler,
        batch size; any ``num_workers``, any process): the next iteration yields exactly the
        batches the uninterrupted run had left, in order, with the same worker seeds.

        :class:`~fastfeed.StreamingDataset`: a few integers per stream (same seed, batch size,
        ``num_streams`` and world size). Only the block each stream was in is read again (at
        most ``shuffle_buffer`` samples, rounded up to whole batches), never earlier shards. On
        a different world size, any one rank's state resumes every new rank (batch size and
        ``num_streams`` may change too): the samples not yet delivered are split evenly across
        the new ranks, none repeated (see :mod:`fastfeed.order.reshard`).

        Map-style datasets: the number of batches consumed this epoch and the random states
        the epoch's order and seeds were drawn from (the sampler's generators and torch's
        global generator); resuming replays the sampler's draws, not data. Raises
        :class:`~fastfeed.errors.ConfigError` for iterable datasets other than
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
        iterations in progress end first (their ``next()`` raises ``StopIteration``): they could
        not continue the loaded state. Persistent workers are restarted with the saved seeds."""
        self._end_iterations()
        if self._sampler_progress is not None:
            self._sampler_progress.load(self, state)
            self._pool_holder.close()  # a resumed epoch's workers start with the saved seed
        elif _is_streaming(self.dataset):
            self._progress.load(self, state)
        else:
            raise ConfigError("load_state_dict() needs a map-style dataset or a fastfeed.StreamingDataset")

    def close(self) -> None:
        """Stop the iterations in progress and the worker processes (persistent ones too): they
        end within seconds. The loader can be iterated again afterwards."""
        self._end_iterations()
        self._pool_holder.close()

    def _end_iterations(self) -> None:
        """Stop the iterations in progress; persistent workers stay (see _WorkerPool)."""
        for iterator in list(self._iterators):
            if iterator.delivered:
                log.info("ending an iteration in progress after %d batches", iterator.delivered)
            iterator.close()
        self._iterators = weakref.WeakSet()

    def __enter__(self) -> DataLoader[_T_co]:
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


def _seed_generator(generator: torch.Generator | None, draws: int = 1) -> torch.Generator:
    """What torch's DataLoader does when an iteration starts: draw the workers' base seed from
    ``generator`` (torch's global generator if None; for a datapipe, a shared seed first, so
    ``draws=2``). Returns a private generator in the state before those draws: the workers'
    torch DataLoader draws the same seeds from it, so no other thread ever touches the user's
    generator, and its state is what a resumed run replays."""
    source = generator if generator is not None else torch.default_generator
    private = torch.Generator(device=source.device)
    private.set_state(source.get_state())
    for _ in range(draws):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
    return private


def _seed_datapipe(dataset: Any, generator: torch.Generator | None) -> Any:
    """What torch's single-process iterator does to a datapipe when an iteration starts: draw a
    seed shared by the ranks, seed the graph's random operations from it, shard the graph."""
    from torch.utils.data import graph_settings
    from torch.utils.data.dataloader import _get_distributed_settings, _share_dist_seed

    group = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        group = torch.distributed.new_group(backend="gloo")
    shared = torch.Generator()
    shared.manual_seed(_share_dist_seed(generator, group))  # type: ignore[no-untyped-call]
    dataset = graph_settings.apply_random_seed(dataset, shared)
    world_size, rank = _get_distributed_settings()  # type: ignore[no-untyped-call]
    graph_settings.apply_sharding(dataset, world_size, rank)
    return dataset


def _generator_from(state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(state)
    return generator


class _Settings:
    """What an iteration needs from the loader: a snapshot with no reference back to the
    loader or its iterator, so dropping those (or garbage-collecting them) stops the thread.

    Made by ``iter(loader)``, in the calling thread: it draws what torch's DataLoader draws
    there (the workers' base seed; with workers, the sampler's epoch), so the producer thread
    never touches a generator. ``epoch``, ``segments``: the StreamingDataset epoch the
    iteration reads."""

    def __init__(self, loader: DataLoader[Any]) -> None:
        if loader.num_workers == 0 and loader.timeout:
            raise ConfigError(
                f"timeout={loader.timeout} applies to worker processes, and this loader has num_workers=0",
                hint="set num_workers > 0 or leave timeout at 0 (torch's DataLoader refuses it too, when it starts)",
            )
        dataset = loader.dataset
        self.dataset = dataset
        self.streaming = _is_streaming(dataset)
        self.iterable = isinstance(dataset, IterableDataset)
        self.auto_collation = loader.batch_sampler is not None
        self.batch_size = loader.batch_size
        self.drop_last = loader.drop_last
        self.num_workers = loader.num_workers
        fn = loader.collate_fn
        #: None: fastfeed's native default_collate (into a ring or worker slot).
        self.collate_fn: Callable[[Any], Any] | None = None if self.auto_collation and fn is default_collate else fn
        self.timeout = loader.timeout
        self.worker_init_fn = loader.worker_init_fn
        self.multiprocessing_context = loader.multiprocessing_context
        self.persistent_workers = loader.persistent_workers and loader.num_workers > 0
        self.prefetch_factor = loader.prefetch_factor
        self.generator = loader.generator
        self.ring = loader._ring
        self.stats = loader._stats
        self.pin_slots = torch.cuda.is_available()
        #: torch pins the batches of a user collate_fn when asked; fastfeed's own are pinned.
        self.pin_user = bool(loader.pin_memory) and torch.cuda.is_available() and loader.device is None
        self.slot_table: _SlotTable | None = None
        #: Whether the producer unpins the slot table when the iteration ends (a persistent
        #: pool's table lives, pinned, as long as the pool).
        self.owns_slot_table = True
        self.pool_holder = loader._pool_holder if self.persistent_workers else None
        #: The epoch's index batches (indices without auto-batching): a list drawn by iter()
        #: with workers, the sampler's own iterator without.
        self.index_batches: Iterable[Any] | None = None
        self.sampler_draw: _SamplerDraw | None = None
        self.sampler_progress = loader._sampler_progress
        self.progress = loader._progress
        self.streams: _StreamConfig | None = None
        self.stream_resume: _Resume | None = None
        self.worker_generator: torch.Generator | None = None
        self.seed_state: torch.Tensor | None = None
        self.base_seed = 0
        #: A datapipe: torch draws a seed shared across ranks for its graph before the base seed.
        self.datapipe = isinstance(dataset, IterDataPipe)
        if self.streaming:
            self._draw_streaming(loader)
        elif self.sampler_progress is not None:
            self._draw_map(loader, self.sampler_progress)
        elif self.datapipe and self.num_workers == 0:
            self.dataset = _seed_datapipe(dataset, self.generator)
            self._draw_seed(None)
        else:
            pool = self.pool_holder.peek(self.pool_key()) if self.pool_holder is not None else None
            if pool is None:
                self._draw_seed(None, draws=2 if self.datapipe else 1)
            elif self.datapipe:
                self._draw_seed(None)  # torch's persistent workers get a new shared seed each epoch
            else:
                self.seed_state = pool.seed_state  # and nothing else: they keep their seeds

    def _draw_seed(self, saved: torch.Tensor | None, draws: int = 1) -> None:
        self.worker_generator = _generator_from(saved) if saved is not None else _seed_generator(self.generator, draws)
        self.seed_state = self.worker_generator.get_state()

    def _draw_streaming(self, loader: DataLoader[Any]) -> None:
        ds: Any = loader.dataset
        epoch, segments = int(ds.epoch), tuple(ds.segments)
        resume = loader._progress.peek(epoch)
        self.stream_resume = resume
        if resume is not None and resume.base_seed is not None:
            self.base_seed = resume.base_seed
            # The workers' torch DataLoader draws from a private generator, never the global one;
            # what it draws is unused: stream workers seed themselves from base_seed.
            self.worker_generator = torch.Generator().manual_seed(resume.base_seed)
        else:
            self._draw_seed(None)
            assert self.worker_generator is not None
            peek = _generator_from(self.worker_generator.get_state())
            self.base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=peek).item())
        unbatched = not self.auto_collation
        self.streams = _StreamConfig(
            ds,
            1 if unbatched else int(loader.batch_size or 1),
            loader.drop_last,
            loader.num_streams,
            resume.next_stream if resume else 0,
            dict(resume.positions) if resume else {},
            self.collate_fn,
            epoch,
            segments,
            unbatched,
            self.base_seed,
        )

    def _draw_map(self, loader: DataLoader[Any], progress: _SamplerProgress) -> None:
        """torch's draws when an iteration of a map-style dataset starts. Without workers: the
        sampler's iterator (the sampler draws as batches are taken, in the calling thread), then
        the base seed. With workers: the base seed (once per pool with persistent workers), then
        the sampler's whole epoch (torch takes the first batches' indices when iter() starts
        its workers; here the producer thread must never draw, so all of them are taken now)."""
        resume = progress.peek()
        if self.num_workers == 0:
            self.index_batches = progress.open(resume, eager=False)
            self._draw_seed(resume.seed_state if resume is not None else None)
            # The sampler's own draws come later, from the states as they are now.
            self.sampler_draw = resume if resume is not None else progress.snapshot(self.seed_state)
            return
        pool = self.pool_holder.peek(self.pool_key()) if self.pool_holder is not None else None
        if resume is not None:
            self._draw_seed(resume.seed_state)
        elif pool is not None:
            self.seed_state = pool.seed_state  # torch's persistent workers keep their seed
        else:
            self._draw_seed(None)
        self.sampler_draw = resume if resume is not None else progress.snapshot(self.seed_state)
        self.index_batches = progress.open(resume, eager=True)

    # ------------------------------------------------------------------ sources of raw batches

    def stream_batches_in_process(self) -> Iterator[Any]:
        """StreamingDataset, no workers: batches collated into ring slots (or a user collate_fn's
        batches), in stream order, with the time spent producing them."""
        assert self.streams is not None
        streams = self.streams
        ring = self.ring
        timing = {"collate_s": 0.0}
        user = streams.collate_fn is not None or streams.unbatched

        def collate(columns: ColumnBatch) -> tuple[Any, int]:
            start = time.perf_counter()
            if user:
                batch = streams.user_collate(columns)
            else:
                slot = ring.acquire()
                batch = _collate_into_slot(slot, lambda s: collate_columns_into(columns, s.arena, s.base))
            timing["collate_s"] = time.perf_counter() - start
            return batch, len(columns)

        source = streams.stream_source(_rotated(streams.num_streams, streams.next_stream), collate)
        try:
            while True:
                start = time.perf_counter()
                item = next(source, None)
                if item is None:
                    return
                if isinstance(item, _StreamEnd):
                    self.stats.add(**item.io)
                    continue
                v, (batch, n), after, io = item
                elapsed = time.perf_counter() - start
                stage = {"n": n, **io, "collate_s": timing["collate_s"]}
                stage["parse_s"] = max(0.0, elapsed - io["fetch_s"] - timing["collate_s"])
                yield (_UserBatch if user else _RingBatch)(batch, stage, (v, after))
        finally:
            source.close()

    def new_flags(self) -> _SlotFlags:
        """Shared flags for the workers' slots: each worker makes up to twice the slots it
        normally has batches in flight (torch's prefetch, the queue, the loop's batch)."""
        return _SlotFlags(self.num_workers, 2 * ((self.prefetch_factor or 2) + 3))

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
            self.streaming,
            self.num_workers,
            self.timeout,
            self.worker_init_fn,
            self.multiprocessing_context,
            self.prefetch_factor,
            self.pin_slots,
            self.collate_fn,
            self.auto_collation,
            self.batch_size,
            self.drop_last,
        )

    def index_kwargs(self, indices: Any) -> dict[str, Any]:
        """How the workers' torch DataLoader takes the epoch's ``indices`` (as the user's loader
        takes its sampler: batches of indices, single indices, or none for iterable datasets)."""
        if self.iterable:
            return {"batch_size": self.batch_size if self.auto_collation else None, "drop_last": self.drop_last}
        if not self.auto_collation:
            return {"sampler": indices, "batch_size": None}
        return {"batch_sampler": indices}


class _Workers:
    """The worker processes of one iteration: torch's DataLoader iterator over them, started by
    ``iter(loader)`` in the calling thread (as torch starts its workers, with its SIGCHLD
    handler in the main thread), read by the producer thread; the slot table of their batches;
    and the persistent pool they belong to, if any.

    A persistent pool goes back to the loader when the iteration ends: a StreamingDataset's only
    when it ran to its end, another dataset's also when it ended early (torch's loader drops
    what its workers still send), never after an error."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.pool: _WorkerPool | None = None
        self.failed = False
        self.completed = False
        self._closed = False
        self._lock = threading.Lock()
        holder = settings.pool_holder
        if holder is not None:
            self.pool, self.iterator = self._from_pool(settings, holder)
            settings.slot_table, settings.owns_slot_table = self.pool.slot_table, False
            return
        flags = settings.new_flags()
        settings.slot_table = _SlotTable(flags, HostPinner() if settings.pin_slots else None)
        kwargs = settings.torch_loader_kwargs()
        if settings.streaming:
            # Workers read their streams and collate whole batches; torch only moves messages.
            assert settings.streams is not None
            dataset: Any = _CollatedStream(settings.streams, flags)
            kwargs.update(batch_size=None, collate_fn=_identity)
        else:
            dataset = settings.dataset
            collate = _WorkerCollate(settings.collate_fn, flags)
            kwargs.update(collate_fn=collate, **settings.index_kwargs(settings.index_batches))
        self.iterator = iter(_WorkerLoader(dataset, **kwargs))

    @staticmethod
    def _from_pool(settings: _Settings, holder: _PoolHolder) -> tuple[_WorkerPool, Iterator[Any]]:
        """The loader's pool (or a new one) and its iterator for this iteration."""
        kept = holder.take(settings.pool_key())
        iterator = kept.start(settings) if kept is not None else None
        if kept is not None and iterator is not None:
            return kept, iterator
        if kept is not None:
            kept.shutdown()  # the settings outgrew its mailbox
        if settings.worker_generator is None:
            # The pool this iteration saw a moment ago is gone: a new one with its seed.
            assert settings.seed_state is not None
            settings.worker_generator = _generator_from(settings.seed_state)
        size = 0
        if settings.streaming:
            size = max(1 << 20, 4 * len(pickle.dumps(settings.streams, protocol=pickle.HIGHEST_PROTOCOL)))
        pool = _WorkerPool(settings, size)
        iterator = pool.start(settings)
        assert iterator is not None
        return pool, iterator

    @property
    def processes(self) -> list[Any]:
        """The worker processes (torch's ``multiprocessing`` process objects)."""
        return list(getattr(self.iterator, "_workers", ()))

    def messages(self) -> Iterator[Any]:
        """The workers' messages, and a :class:`_Failure` in place of each batch whose worker
        raised (the iteration goes on, as torch's); StreamingDataset batches in stream order."""
        settings = self.settings
        try:
            if settings.streaming:
                assert settings.streams is not None
                order = _rotated(settings.streams.num_streams, settings.streams.next_stream)
                yield from _in_stream_order(self.iterator, order, lambda io: settings.stats.add(**io))
                if self.pool is not None:
                    for extra in self.iterator:  # each worker's end of iteration; nothing else may come
                        raise RuntimeError(f"a DataLoader worker sent {type(extra).__name__} after its streams ended")
            else:
                for item in _each_batch(self.iterator):
                    self.failed = self.failed or isinstance(item, _Failure)
                    yield item
                    # Not held while waiting for the next: a failure's exception, raised in the
                    # training loop, has the loop's frames (and the iterator) in its traceback.
                    del item
        except GeneratorExit:
            raise
        except BaseException:
            self.failed = True
            raise
        self.completed = True

    def close(self) -> None:
        """Stop the workers, or give them back to the loader's pool (see the class)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        pool = self.pool
        if pool is None:
            # Now, not when the iterator is collected: an exception raised from a worker keeps
            # it (and so the workers) alive for as long as the exception is referenced.
            _shutdown_workers(self.iterator)
            return
        holder = self.settings.pool_holder
        assert holder is not None
        keep = not self.failed and (self.completed or not self.settings.streaming)
        if keep:
            holder.give_back(pool)
        else:
            pool.shutdown()


def _each_batch(it: Iterator[Any]) -> Iterator[Any]:
    """``it``'s items, with a :class:`_Failure` in place of each one whose ``next()`` raised: a
    torch DataLoader iterator raises a worker's error for that batch and goes on. A worker that
    died ends the iteration, with the error torch raises in its main thread."""
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:
            # A broken connection to a worker (its shared memory handed over as it died): give
            # its exit a moment to show, so the error names the cause.
            dead = _dead_worker_error(it, wait=1.0 if isinstance(exc, ConnectionError | EOFError) else 0.0)
            if dead is not None:
                raise dead from exc
            yield _Failure(exc)
        else:
            yield item


def _dead_worker_error(it: Any, wait: float = 0.0) -> RuntimeError | None:
    """torch's error for a worker process of ``it`` that died (its SIGCHLD handler's, which runs
    only in the main thread: here the iterator runs in the producer thread), waiting up to
    ``wait`` seconds for one to end."""
    workers = list(getattr(it, "_workers", ()))
    if wait and workers:
        multiprocessing.connection.wait([w.sentinel for w in workers], timeout=wait)
    for worker in workers:
        code = worker.exitcode
        if code is None or code == 0:
            continue
        if code < 0:
            try:
                name = signal.strsignal(-code) or f"signal {-code}"
            except ValueError:
                name = f"signal {-code}"
            return RuntimeError(f"DataLoader worker (pid {worker.pid}) is killed by signal: {name}. ")
        return RuntimeError(
            f"DataLoader worker (pid {worker.pid}) exited unexpectedly with exit code {code}. Details are lost due "
            "to multiprocessing. Rerunning with num_workers=0 may give better error trace."
        )
    return None


def _collate_into_slot(slot: Any, fill: Callable[[Any], Any]) -> Any:
    """``fill(slot)``; a slot whose batch failed goes back to its ring."""
    try:
        return fill(slot)
    except BaseException:
        slot.abandon()
        raise


class _InlineSource:
    """``num_workers=0``, a dataset other than a StreamingDataset: each ``next()`` fetches and
    collates one batch in the calling thread, exactly as torch's single-process iterator does
    (``__getitems__`` when the dataset has it; an iterable dataset's iterator made now), so a
    dataset's random transforms draw from the global generators in torch's order."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.dataset_iter: Iterator[Any] | None = iter(settings.dataset) if settings.iterable else None
        self.index_iter: Iterator[Any] | None = None
        if settings.index_batches is not None:
            self.index_iter = iter(settings.index_batches)
        self.started = False
        self.ended = False

    def fetch(self, owner: Any) -> Any:
        """The next batch's samples (one sample without auto-batching); ``StopIteration`` at the
        end. A map-style dataset's epoch is drawn by the first call, which makes ``owner`` the
        iteration its progress describes."""
        s = self.settings
        if self.dataset_iter is not None:
            if not s.auto_collation:
                return next(self.dataset_iter)
            if self.ended:
                raise StopIteration
            assert s.batch_size is not None
            data = []
            for _ in range(s.batch_size):
                try:
                    data.append(next(self.dataset_iter))
                except StopIteration:
                    self.ended = True
                    break
            if not data or (s.drop_last and len(data) < s.batch_size):
                raise StopIteration
            return data
        progress = s.sampler_progress
        assert progress is not None and self.index_iter is not None
        if not self.started:
            self.started = True
            progress.begin(owner, s.sampler_draw)
        index = next(self.index_iter)
        progress.consumed(owner)  # used up, whether the dataset delivers it or raises
        dataset = s.dataset
        if not s.auto_collation:
            return dataset[index]
        getitems = getattr(dataset, "__getitems__", None)
        return getitems(index) if getitems else [dataset[i] for i in index]

    def close(self) -> None:
        close = getattr(self.dataset_iter, "close", None)
        if close is not None:
            close()
        self.dataset_iter = None


def _collate(settings: _Settings, data: Any) -> Any:
    """``settings``' collate_fn over ``data``, or fastfeed's native default_collate into a ring
    slot; a user collate_fn's batch is pinned when torch's loader would pin it."""
    if settings.collate_fn is not None:
        batch = settings.collate_fn(data)
        if settings.pin_user:
            from torch.utils.data._utils.pin_memory import pin_memory

            batch = pin_memory(batch)  # type: ignore[no-untyped-call]
        return batch
    return _collate_into_slot(settings.ring.acquire(), lambda slot: collate_into(data, slot.arena, slot.base))


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


def _warn_pin_memory(loader: DataLoader[Any]) -> None:
    """torch's warnings about ``pin_memory`` when an iteration starts."""
    if not loader.pin_memory:
        return
    if loader.pin_memory_device:
        warnings.warn(
            "pin_memory_device is deprecated, the current accelerator will be used as the device,"
            f"ignore pin_memory_device='{loader.pin_memory_device}'.",
            stacklevel=3,
        )
    accelerator = getattr(torch, "accelerator", None)
    available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if not available:
        warnings.warn(
            "'pin_memory' argument is set as true but no accelerator is found, "
            "then device pinned memory won't be used.",
            stacklevel=3,
        )


class _LoaderIterator:
    """One pass over the loader.

    Made by ``iter(loader)``, which draws what torch draws then (:class:`_Settings`). Without
    workers and with a dataset other than a StreamingDataset, ``next()`` makes each batch itself
    (:class:`_InlineSource`). Otherwise the first ``next()`` starts a producer thread that runs
    :func:`_produce` over the settings and a bounded queue only, never this object, so an
    iterator (and its loader) that the training loop drops is collected and its ``__del__``
    stops the thread.
    """

    def __init__(self, loader: DataLoader[Any]) -> None:
        self._done = True  # until it is made: __del__ of one whose _Settings refused has nothing to stop
        _warn_pin_memory(loader)
        self._settings: _Settings | None = _Settings(loader)
        settings = self._settings
        self._inline = _InlineSource(settings) if not settings.streaming and settings.num_workers == 0 else None
        #: Worker processes start now, as torch's start when iter() is called.
        self._workerset = _Workers(settings) if settings.num_workers > 0 else None
        self._queue = _HandoffQueue(maxsize=loader.prefetch_batches)
        self._stop = threading.Event()
        #: Names this iteration to the loader's progress (not the iterator itself: the producer
        #: thread reaches the progress, and must not keep the iterator alive).
        self._token = object()
        self._stats = loader._stats
        self._device = loader.device
        self._feeder: DeviceFeeder | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        #: Batches handed to the training loop.
        self.delivered = 0
        self._yielded = 0  # as torch counts them, for its IterableDataset length warning
        self._len_called: int | None = loader._IterableDataset_len_called if settings.iterable else None
        self._dataset = loader.dataset  # named by the length warning
        self._num_workers = loader.num_workers
        self._done = False

    def _start(self) -> None:
        """The first ``next()``: this iteration becomes the one ``state_dict()`` describes."""
        settings = self._settings
        assert settings is not None
        self._started = True
        if settings.streaming:
            settings.progress.start(self._token, settings.streams, settings.stream_resume)
        elif settings.sampler_progress is not None and settings.num_workers > 0:
            settings.sampler_progress.begin(self._token, settings.sampler_draw)
        self._feeder = DeviceFeeder.for_device(self._device) if self._device is not None else None
        if self._inline is not None:
            return
        self._thread = threading.Thread(
            target=_produce,
            args=(settings, self._workerset, self._feeder, self._queue, self._stop),
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
        if not self._started:
            try:
                self._start()
            except BaseException:
                self.close()
                raise
        start = time.perf_counter()
        try:
            batch = self._next_inline() if self._inline is not None else self._next_queued()
        finally:
            self._stats.add(wait_s=time.perf_counter() - start)
        self.delivered += 1
        self._yielded += 1
        if self._len_called is not None and self._yielded > self._len_called:
            self._warn_length()
        return batch

    def _next_inline(self) -> Any:
        settings, inline = self._settings, self._inline
        assert settings is not None and inline is not None
        t0 = time.perf_counter()
        try:
            data = inline.fetch(self._token)
        except StopIteration:
            self.close()
            raise
        t1 = time.perf_counter()
        feeder = self._feeder
        if feeder is not None:
            feeder.reap()
            if settings.ring.free_slots() == 0:
                feeder.wait_oldest()  # a ring slot is free once its copy has completed
        batch = _collate(settings, data)
        t2 = time.perf_counter()
        if feeder is not None:
            batch, event = feeder.copy(batch)
            feeder.hand_over(batch, event)
        t3 = time.perf_counter()
        n = _count(data) if settings.auto_collation else 1
        nbytes = _tensor_bytes(batch)
        self._stats.add(batches=1, samples=n, bytes=nbytes, parse_s=t1 - t0, collate_s=t2 - t1, copy_s=t3 - t2)
        return batch

    def _next_queued(self) -> Any:
        thread = self._thread
        assert thread is not None
        while True:
            try:
                item = self._queue.get_quietly(_POLL)
                break
            except queue.Empty:
                if not thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise StopIteration from None
        settings = self._settings
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            if item.fatal:
                self.close()
            elif settings is not None and settings.sampler_progress is not None:
                settings.sampler_progress.consumed(self._token)  # the batch's indices were used up
            self._queue.space()
            exc, item = item.exc, None
            try:
                raise exc
            finally:
                # No reference from this frame to the exception, whose traceback holds the
                # frame: a cycle would keep this iterator (and its workers) alive until the
                # garbage collector happens to run.
                del exc
        batch, event, stream = item
        if settings is not None:
            if stream is not None:
                settings.progress.delivered(self._token, *stream)
            elif settings.sampler_progress is not None:
                settings.sampler_progress.consumed(self._token)
        if self._feeder is not None:
            self._feeder.hand_over(batch, event)
        self._queue.space()
        return batch

    def _warn_length(self) -> None:
        message = (
            f"Length of IterableDataset {self._dataset} was reported to be {self._len_called}"
            f"(when accessing len(dataloader)), but {self._yielded} samples have been fetched. "
        )
        if self._num_workers > 0:
            message += (
                "For multiprocessing data-loading, this could be caused by not properly configuring the "
                "IterableDataset replica at each worker. Please see "
                "https://pytorch.org/docs/stable/data.html#torch.utils.data.IterableDataset for examples."
            )
        warnings.warn(message, stacklevel=3)

    def close(self) -> None:
        """Stop the producer and its workers; returns within seconds."""
        self._done = True
        self._stop.set()
        if self._inline is not None:
            self._inline.close()
        while self._queue.qsize():  # unblock a producer waiting to put
            self._queue.get_nowait()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("fastfeed-batch thread did not stop within %.0fs", _JOIN_TIMEOUT)
        if self._workerset is not None:
            self._workerset.close()  # started by iter(), and no producer ran (else a no-op)
        self._settings = None

    @property
    def _workers(self) -> list[Any]:
        """The worker processes, under the name torch's multi-process iterator gives them (code
        that inspects them, e.g. to check that they exit, keeps working)."""
        return self._workerset.processes if self._workerset is not None else []

    def __del__(self) -> None:
        if not self._done:
            self.close()


# ---------------------------------------------------------------------- producer thread


def _produce(
    settings: _Settings,
    workers: _Workers | None,
    feeder: DeviceFeeder | None,
    out: queue.Queue[Any],
    stop: threading.Event,
) -> None:
    """Thread "fastfeed-batch": raw batches (from ``workers``, or read in this thread) -> batches
    (-> device) -> ``out``."""

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
        source = workers.messages() if workers is not None else settings.stream_batches_in_process()
        for item in source:
            if stop.is_set():
                return
            if isinstance(item, _Failure):
                if not put(item):
                    return
                del item  # the training loop raises it: hold no reference (see _next_queued)
                continue
            batch, event, nbytes, n, times = _assemble(settings, feeder, item)
            settings.stats.add(batches=1, samples=n, bytes=nbytes, **times)
            if not put((batch, event, item.stream)):
                return
            del batch, item
        put(_END)
    except BaseException as exc:  # delivered to the training loop and raised there
        put(_Failure(exc, fatal=True))
    finally:
        if source is not None:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        if workers is not None:
            workers.close()
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
    """A message -> ``(batch, device event, bytes, samples, stage times)``."""
    times = dict(item.stage)
    n = int(times.pop("n", 0))
    if feeder is not None:
        feeder.reap()
        if settings.ring.free_slots() == 0:
            feeder.wait_oldest()
    start = time.perf_counter()
    if isinstance(item, _SlotBatch):  # a worker's shared-memory slot: views of it, no copy
        assert settings.slot_table is not None
        base = settings.slot_table.base(item.worker, item.slot, item.generation, item.tensor)
        batch = from_layout(item.layout, base)
        nbytes = layout_extent(item.layout)
    elif isinstance(item, _RegionBatch):
        region = item.region
        if settings.pin_slots:  # into a pinned ring slot, for an asynchronous device copy
            slot = settings.ring.acquire()
            slot.arena.ensure(region.numel())
            gather(slot.arena.array, [region.numpy()], dst_offset=0)
            region = slot.base()
        batch = from_layout(item.layout, region)
        nbytes = int(item.region.numel())
    else:  # a ring slot of this process, or a user collate_fn's batch
        batch = item.batch
        if isinstance(item, _UserBatch) and settings.pin_user:
            from torch.utils.data._utils.pin_memory import pin_memory

            batch = pin_memory(batch)  # type: ignore[no-untyped-call]
        nbytes = _tensor_bytes(batch)
    event = None
    if feeder is not None:
        batch, event = feeder.copy(batch)
    times["copy_s"] = times.get("copy_s", 0.0) + time.perf_counter() - start
    return batch, event, nbytes, n, times


# ---------------------------------------------------------------------- resume: map-style datasets


@dataclass
class _SamplerDraw:
    """The random states an epoch of a map-style dataset was drawn from: ``seed_state``, the
    state of the generator the workers' base seed came from, before that draw; the sampler
    chain's generators and torch's global generator, before the sampler drew the epoch; and
    ``skip``, the batches a resumed iteration skips."""

    seed_state: torch.Tensor | None
    generator_states: list[torch.Tensor]
    global_state: torch.Tensor
    skip: int = 0


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(bytes(state.numpy())).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class _SamplerProgress:
    """Progress through a map-style dataset's epoch: the index batches consumed by the loader's
    current iteration (delivered, or raised by the dataset), and the random states its order and
    worker seeds were drawn from. Resuming replays those draws, not data: the sampler's
    generators are set to the saved states, torch's global generator is set to its saved state
    for the draw and put back right after, so a resumed run consumes nothing from it."""

    VERSION = 2

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.index_sampler = loader._index_sampler
        generators = _sampler_generators(self.index_sampler)
        if loader.generator is not None and all(g is not loader.generator for g in generators):
            generators.append(loader.generator)  # the workers' base seed is drawn from it
        self.generators = generators
        self._lock = threading.Lock()
        self.pending: _SamplerDraw | None = None  # a loaded state, for the next iteration
        self.current: _SamplerDraw | None = None
        self.owner: Any = None
        self.batches = 0

    def peek(self) -> _SamplerDraw | None:
        with self._lock:
            return self.pending

    def snapshot(self, seed_state: torch.Tensor | None) -> _SamplerDraw:
        """The random states the sampler is about to draw from (and the base seed's)."""
        return _SamplerDraw(seed_state, [g.get_state() for g in self.generators], torch.get_rng_state())

    def open(self, resume: _SamplerDraw | None, *, eager: bool) -> Iterable[Any]:
        """The sampler's iterator for a new iteration, in the calling thread. ``eager``: its
        whole epoch drawn now (when the sampler has a ``len()``; one without may be endless and
        is read as batches are made). A loaded state is replayed from its saved states, its
        skipped batches drawn too, so every generator ends where the saved epoch left it, and
        torch's global generator is put back as it was."""
        if resume is None:
            it = iter(self.index_sampler)
            return list(it) if eager and _has_len(self.index_sampler) else it
        for g, state in zip(self.generators, resume.generator_states, strict=True):
            g.set_state(state)
        outer = torch.get_rng_state()
        torch.set_rng_state(resume.global_state)
        try:
            it = iter(self.index_sampler)
            for _ in itertools.islice(it, resume.skip):
                pass
            return list(it) if eager and _has_len(self.index_sampler) else it
        finally:
            torch.set_rng_state(outer)

    def begin(self, owner: Any, record: _SamplerDraw | None) -> None:
        """``owner`` (an iteration) is the one ``state()`` describes from now on."""
        with self._lock:
            self.owner = owner
            self.current = record
            self.batches = record.skip if record is not None else 0
            if record is not None and record is self.pending:
                self.pending = None  # used once

    def consumed(self, owner: Any) -> None:
        with self._lock:
            if owner is self.owner:
                self.batches += 1

    def state(self, loader: DataLoader[Any]) -> dict[str, Any]:
        with self._lock:
            record = self.current if self.pending is None else self.pending
            batches = self.batches if self.pending is None else self.pending.skip
        state: dict[str, Any] = {
            "version": self.VERSION,
            "kind": "sampler",
            "batches": batches,
            "batch_size": loader.batch_size,
            "drop_last": loader.drop_last,
            "dataset_len": _len_or_none(loader.dataset),
            "started": record is not None,
        }
        if record is not None:
            state["seed_state"] = _b64(record.seed_state) if record.seed_state is not None else None
            state["generators"] = [_b64(s) for s in record.generator_states]
            state["global_rng"] = _b64(record.global_state)
        return state

    def load(self, loader: DataLoader[Any], state: dict[str, Any]) -> None:
        if state.get("kind") != "sampler" or state.get("version") != self.VERSION:
            raise ConfigError(
                f"cannot resume: this is not a map-style loader state of version {self.VERSION} "
                f"(kind={state.get('kind')!r}, version={state.get('version')!r})",
                hint="load the state_dict() of a loader over the same kind of dataset, saved by this fastfeed "
                "(states of fastfeed 0.1's map-style loaders cannot be replayed: restart the epoch)",
            )
        expect = {
            "batch_size": loader.batch_size,
            "drop_last": loader.drop_last,
            "dataset_len": _len_or_none(loader.dataset),
        }
        for key, value in expect.items():
            if state.get(key) != value:
                raise ConfigError(
                    f"cannot resume: the saved loader state has {key}={state.get(key)!r}, this loader {value!r}",
                    hint="resume with the same dataset, batch size and sampler",
                )
        if not state.get("started"):
            with self._lock:
                self.pending = None
            return
        saved = state["generators"]
        if len(saved) != len(self.generators):
            raise ConfigError(
                f"cannot resume: the sampler draws from {len(self.generators)} random generators, the saved "
                f"state from {len(saved)}",
                hint="resume with the same sampler (and the same generator= argument)",
            )
        seed = state.get("seed_state")
        record = _SamplerDraw(
            _unb64(seed) if seed is not None else None,
            [_unb64(text) for text in saved],
            _unb64(state["global_rng"]),
            int(state["batches"]),
        )
        with self._lock:
            self.pending = record


def _len_or_none(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _sampler_generators(sampler: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects behind a (batch) sampler chain (``.generator`` attributes
    along ``.sampler`` links)."""
    gens: list[torch.Generator] = []
    obj, seen = sampler, set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not x for x in gens):
            gens.append(g)
        obj = getattr(obj, "sampler", None)
    return gens


def _has_len(sampler: Any) -> bool:
    try:
        len(sampler)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------- resume: StreamingDataset


class _Progress:
    """What the training loop has received this epoch of a StreamingDataset (written by the
    loader's current iteration on each batch)."""

    VERSION = 3

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._lock = threading.Lock()
        self.epoch = int(getattr(dataset, "epoch", 0))
        self.segments: tuple[Segment, ...] = tuple(dataset.segments) if _is_streaming(dataset) else ()
        self.positions: dict[int, StreamPos] = {}
        self.next_stream = 0
        self.base_seed: int | None = None
        self.resume: _Resume | None = None
        self.owner: Any = None

    def peek(self, epoch: int) -> _Resume | None:
        """A loaded state for ``epoch``, if any (it stays until an iteration starts with it)."""
        with self._lock:
            resume = self.resume
        if resume is not None and resume.epoch != epoch:
            log.warning("ignoring the loaded state of epoch %d: the dataset is at epoch %d", resume.epoch, epoch)
            return None
        return resume

    def start(self, owner: Any, streams: Any, resume: _Resume | None) -> None:
        with self._lock:
            self.owner = owner
            self.epoch = streams.epoch
            self.segments = streams.segments
            self.positions = dict(streams.starts)
            self.next_stream = streams.next_stream
            self.base_seed = streams.base_seed
            self.resume = None  # used once (or a stale one of another epoch: ignored)

    def delivered(self, owner: Any, stream: int, after: StreamPos) -> None:
        with self._lock:
            if owner is self.owner:
                self.positions[stream] = after
                self.next_stream = stream + 1  # taken modulo num_streams when resuming

    def state(self, loader: DataLoader[Any]) -> dict[str, Any]:
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
                "base_seed": self.base_seed,
            }

    def load(self, loader: DataLoader[Any], state: dict[str, Any]) -> None:
        ds = self.dataset
        if state.get("version") not in (1, 2, self.VERSION):
            raise ConfigError(
                f"cannot resume: loader state version {state.get('version')!r} is not supported",
                hint=f"this fastfeed reads versions 1 to {self.VERSION}",
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
        seed = state.get("base_seed")
        base_seed = int(seed) if seed is not None and same_world else None
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
                "split across the ranks (none repeated; see fastfeed.order.reshard)",
                epoch,
                ds.world_size,
                closed.world_size,
            )
        ds.resume_segments(epoch, segments)
        with self._lock:
            self.resume = _Resume(epoch, positions, next_stream, base_seed)


@dataclass
class _Resume:
    epoch: int
    positions: dict[int, StreamPos]
    next_stream: int
    base_seed: int | None = None


def _tensor_bytes(batch: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(batch))
