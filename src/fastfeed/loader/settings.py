"""What one iteration of the loader starts from.

:class:`LoaderParts`: what the loader shares with its iterations (its options as they are at
``iter()``, the host ring, the stats sink, the resume trackers and the idle persistent worker
pool, :class:`PoolHolder`). :class:`IterationSettings`: the snapshot ``iter(loader)`` takes of
the loader, with what torch's DataLoader draws at that point (the workers' base seed, a
map-style epoch's indices), so the producer thread and the workers never touch a generator
and never reach back to the loader.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import IterableDataset
from torch.utils.data._utils.collate import default_collate

try:  # deprecated in torch, and may go: without it, no dataset is a datapipe
    from torch.utils.data.datapipes.datapipe import IterDataPipe
except ImportError:  # pragma: no cover

    class IterDataPipe:  # type: ignore[no-redef]
        """Stands for torch's IterDataPipe where this torch has none."""


from fastfeed.batch.ring import HostRing
from fastfeed.errors import ConfigError
from fastfeed.loader.resume import Progress, Resume, SamplerDraw, SamplerProgress
from fastfeed.loader.slots import SlotFlags, SlotTable
from fastfeed.loader.stats import StatsSink
from fastfeed.loader.streaming import StreamConfig, is_streaming
from fastfeed.loader.worker import WorkerStart
from fastfeed.vision import Decode

__all__ = [
    "WORKER_MODES",
    "IterationSettings",
    "KeptPool",
    "LoaderParts",
    "PoolHolder",
    "generator_from",
    "reads_in_threads",
]

#: ``DataLoader(worker_mode=...)``: where a StreamingDataset's streams are read.
WORKER_MODES = ("auto", "thread", "process")


def reads_in_threads(loader: TorchDataLoader[Any]) -> bool:
    """Whether an iteration of ``loader`` reads its StreamingDataset's streams in this process
    (the IO thread and the producer thread) instead of in ``num_workers`` worker processes.

    ``worker_mode="auto"`` reads in threads when no Python code runs per sample or per batch in
    the workers: fastfeed's native collate, batches (not ``batch_size=None``), no dataset stages
    (``decode``, ``map``...), no ``worker_init_fn`` and no ``multiprocessing_context``. Fetching, the tar scan and the
    native gather release the GIL, so the workers' processes would only add their start-up
    (an S3 client and an IO loop each, every epoch) and a hand-over per batch. The batches are
    the same either way: they depend on ``num_streams``, not on where the streams are read.
    """
    mode = getattr(loader, "worker_mode", "process")
    if loader.num_workers == 0 or not is_streaming(loader.dataset) or mode == "process":
        return False
    if mode == "thread":
        return True
    return (
        loader.batch_sampler is not None
        and loader.collate_fn is default_collate
        and loader.worker_init_fn is None
        and loader.multiprocessing_context is None
        and not getattr(loader.dataset, "stages", ())
    )


class KeptPool(Protocol):
    """A persistent worker pool as the loader keeps it between iterations
    (:class:`fastfeed.loader.pool.WorkerPool`)."""

    @property
    def key(self) -> tuple[Any, ...]:
        """What the pool was made for (:meth:`IterationSettings.pool_key`)."""
        ...

    @property
    def seed_state(self) -> torch.Tensor | None:
        """State of the generator the workers' base seed came from."""
        ...

    @property
    def slot_table(self) -> SlotTable:
        """The main-process side of the workers' slots (lives, pinned, as long as the pool)."""
        ...

    def start(self, settings: IterationSettings) -> Iterator[Any] | None:
        """Start an iteration of ``settings`` on the pool's workers (``None``: it cannot)."""
        ...

    def shutdown(self) -> None:
        """Stop the pool's workers and unpin its slots."""
        ...


class PoolHolder:
    """The loader's idle persistent pool, taken by an iteration and given back when it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: KeptPool | None = None
        self._closed = False

    def idle(self) -> bool:
        """Whether a pool is kept (idle, between iterations)."""
        with self._lock:
            return self._pool is not None

    def peek(self, key: tuple[Any, ...]) -> KeptPool | None:
        """The idle pool if it was made for ``key`` (it stays idle)."""
        with self._lock:
            pool = self._pool
        return pool if pool is not None and pool.key == key else None

    def take(self, key: tuple[Any, ...]) -> KeptPool | None:
        """The idle pool for an iteration of ``key``'s (a pool made for another is shut down)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and pool.key != key:
            pool.shutdown()
            pool = None
        return pool

    def give_back(self, pool: KeptPool) -> None:
        """Keep ``pool`` idle for the next iteration (shut it down if the loader closed, or keeps one)."""
        with self._lock:
            kept = not self._closed and self._pool is None
            if kept:
                self._pool = pool
        if not kept:
            pool.shutdown()

    def open(self) -> None:
        """Keep pools again (an iteration starts after :meth:`close`)."""
        with self._lock:
            self._closed = False

    def close(self) -> None:
        """Shut the idle pool down; a pool in use is shut down when its iteration ends."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()


@dataclass(frozen=True)
class LoaderParts:
    """What a :class:`fastfeed.DataLoader` hands each of its iterations besides torch's
    arguments: its own options, as they are at ``iter()``, and the objects it shares with its
    iterations."""

    device: torch.device | None
    prefetch_batches: int
    num_streams: int
    #: Host arenas batches are assembled into (without workers, or a worker's spare region
    #: copied for an asynchronous device copy).
    ring: HostRing
    stats: StatsSink
    #: Resume trackers: a StreamingDataset's, and a map-style dataset's (``None`` otherwise).
    progress: Progress
    sampler_progress: SamplerProgress | None
    #: The idle persistent worker pool (``persistent_workers=True``).
    pool_holder: PoolHolder
    #: The length ``len(loader)`` reported for an iterable dataset (torch's
    #: ``_IterableDataset_len_called``), for torch's warning when an iteration yields more.
    iterable_len: int | None
    #: The image decode stage (``DataLoader(decode=...)``), or None.
    decode: Decode | None = None


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


def generator_from(state: torch.Tensor) -> torch.Generator:
    """A CPU generator in ``state`` (a saved or peeked generator state)."""
    generator = torch.Generator()
    generator.set_state(state)
    return generator


class IterationSettings:
    """What an iteration needs from the loader: a snapshot with no reference back to the
    loader or its iterator, so dropping those (or garbage-collecting them) stops the thread.

    Made by ``iter(loader)``, in the calling thread: it draws what torch's DataLoader draws
    there (the workers' base seed; with workers, the sampler's epoch), so the producer thread
    never touches a generator. ``epoch``, ``segments``: the StreamingDataset epoch the
    iteration reads."""

    def __init__(self, loader: TorchDataLoader[Any], parts: LoaderParts) -> None:
        if loader.num_workers == 0 and loader.timeout:
            raise ConfigError(
                f"timeout={loader.timeout} applies to worker processes, and this loader has num_workers=0",
                hint="set num_workers > 0 or leave timeout at 0 (torch's DataLoader refuses it too, when it starts)",
            )
        dataset = loader.dataset
        self.dataset = dataset
        self.streaming = is_streaming(dataset)
        self.iterable = isinstance(dataset, IterableDataset)
        self.auto_collation = loader.batch_sampler is not None
        self.batch_size = loader.batch_size
        self.drop_last = loader.drop_last
        #: The streams are read in this process although ``num_workers > 0`` (see
        #: :func:`reads_in_threads`); then the iteration has no worker processes.
        self.threads = reads_in_threads(loader)
        #: Worker processes this iteration starts (or keeps).
        self.num_workers = 0 if self.threads else loader.num_workers
        fn = loader.collate_fn
        #: None: fastfeed's native default_collate (into a ring or worker slot).
        self.collate_fn: Callable[[Any], Any] | None = None if self.auto_collation and fn is default_collate else fn
        self.timeout = loader.timeout
        self.worker_init_fn = loader.worker_init_fn
        self.multiprocessing_context = loader.multiprocessing_context
        self.persistent_workers = loader.persistent_workers and self.num_workers > 0
        self.prefetch_factor = loader.prefetch_factor
        self.generator = loader.generator
        self.ring = parts.ring
        self.stats = parts.stats
        self.pin_slots = torch.cuda.is_available()
        #: torch pins the batches of a user collate_fn when asked; fastfeed's own are pinned.
        self.pin_user = bool(loader.pin_memory) and torch.cuda.is_available() and parts.device is None
        self.slot_table: SlotTable | None = None
        #: The decode stage, applied to each batch before its device copy (after it, on the
        #: device, for a GPU backend), and the epoch its random crops are drawn for.
        self.decode = parts.decode
        self.decode_epoch = int(getattr(dataset, "epoch", 0) or 0)
        #: Whether the producer unpins the slot table when the iteration ends (a persistent
        #: pool's table lives, pinned, as long as the pool).
        self.owns_slot_table = True
        self.pool_holder = parts.pool_holder if self.persistent_workers else None
        #: The epoch's index batches (indices without auto-batching): a list drawn by iter()
        #: with workers, the sampler's own iterator without.
        self.index_batches: Iterable[Any] | None = None
        self.sampler_draw: SamplerDraw | None = None
        self.sampler_progress = parts.sampler_progress
        self.progress = parts.progress
        self.streams: StreamConfig | None = None
        self.stream_resume: Resume | None = None
        self.worker_generator: torch.Generator | None = None
        self.seed_state: torch.Tensor | None = None
        self.base_seed = 0
        #: A datapipe: torch draws a seed shared across ranks for its graph before the base seed.
        self.datapipe = isinstance(dataset, IterDataPipe)
        if self.streaming:
            self._draw_streaming(loader, parts)
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
        self.worker_generator = generator_from(saved) if saved is not None else _seed_generator(self.generator, draws)
        self.seed_state = self.worker_generator.get_state()

    def _draw_streaming(self, loader: TorchDataLoader[Any], parts: LoaderParts) -> None:
        ds: Any = loader.dataset
        epoch, segments = int(ds.epoch), tuple(ds.segments)
        resume = parts.progress.peek(epoch)
        self.stream_resume = resume
        if resume is not None and resume.base_seed is not None:
            self.base_seed = resume.base_seed
            # The workers' torch DataLoader draws from a private generator, never the global one;
            # what it draws is unused: stream workers seed themselves from base_seed.
            self.worker_generator = torch.Generator().manual_seed(resume.base_seed)
        else:
            self._draw_seed(None)
            assert self.worker_generator is not None
            peek = generator_from(self.worker_generator.get_state())
            self.base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=peek).item())
        unbatched = not self.auto_collation
        self.streams = StreamConfig(
            ds,
            1 if unbatched else int(loader.batch_size or 1),
            loader.drop_last,
            parts.num_streams,
            resume.next_stream if resume else 0,
            dict(resume.positions) if resume else {},
            self.collate_fn,
            epoch,
            segments,
            unbatched,
            self.base_seed,
        )

    def _draw_map(self, loader: TorchDataLoader[Any], progress: SamplerProgress) -> None:
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

    def new_flags(self) -> SlotFlags:
        """Shared flags for the workers' slots: each worker makes up to twice the slots it
        normally has batches in flight (torch's prefetch, the queue, the loop's batch)."""
        return SlotFlags(self.num_workers, 2 * ((self.prefetch_factor or 2) + 3))

    def torch_loader_kwargs(self) -> dict[str, Any]:
        """The arguments of the torch DataLoader that runs the workers, as the user gave them
        (the user's ``worker_init_fn`` runs inside :class:`~fastfeed.loader.worker.WorkerStart`)."""
        return {
            "num_workers": self.num_workers,
            "timeout": self.timeout,
            "worker_init_fn": WorkerStart(self.worker_init_fn),
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
