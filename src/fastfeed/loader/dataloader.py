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

    In-process is the default also with ``num_workers > 0`` when no Python code has to run in
    workers (``worker_mode="auto"``, see :func:`fastfeed.loader.settings.reads_in_threads`).

With ``device=...`` every batch is copied on a side CUDA stream (:mod:`fastfeed.batch.device`); the
training stream waits on the copy's event. ``stats()`` reports how long the training loop
waited in ``next()`` (``wait_s``) and where the time went.

The package's modules, bottom to top: :mod:`~fastfeed.loader.items` (what travels between the
stages) and :mod:`~fastfeed.loader.stats`; :mod:`~fastfeed.loader.streaming`,
:mod:`~fastfeed.loader.slots` and :mod:`~fastfeed.loader.resume`; :mod:`~fastfeed.loader.worker`
(inside the workers) and :mod:`~fastfeed.loader.settings` (what ``iter()`` snapshots and draws);
:mod:`~fastfeed.loader.pool` (the worker processes); :mod:`~fastfeed.loader.producer` (the thread)
and :mod:`~fastfeed.loader.iterator` (the training loop's side); this module on top.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader as _TorchDataLoader
from torch.utils.data import IterableDataset

from fastfeed.batch.ring import HostRing
from fastfeed.errors import ConfigError
from fastfeed.loader.iterator import LoaderIterator
from fastfeed.loader.resume import Progress, SamplerProgress
from fastfeed.loader.settings import WORKER_MODES, LoaderParts, PoolHolder, reads_in_threads
from fastfeed.loader.stats import LoaderStats, StatsSink
from fastfeed.loader.streaming import is_streaming
from fastfeed.order.streams import epoch_batches
from fastfeed.vision import Decode

__all__ = ["DataLoader"]

log = logging.getLogger(__name__)

_T_co = TypeVar("_T_co", covariant=True)

#: torch >= 2.6 has ``in_order``; older releases do not accept the argument.
_TORCH_HAS_IN_ORDER = "in_order" in inspect.signature(_TorchDataLoader.__init__).parameters


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
        worker_mode: where a :class:`~fastfeed.StreamingDataset`'s streams are read when
            ``num_workers > 0``. ``"auto"`` (default): in this process (an IO thread fetches,
            the producer thread scans and gathers natively, both without the GIL) when no
            Python code has to run in workers, that is with the default ``collate_fn``, batches
            (not ``batch_size=None``), no ``worker_init_fn`` and no ``multiprocessing_context``;
            otherwise in ``num_workers`` processes. ``"process"``: always in worker processes, as
            torch's loader. ``"thread"``: always in this process (a ``collate_fn`` then runs in
            the producer thread). The batches are the same in every mode.

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
        worker_mode: str = "auto",
        decode: Decode | None = None,
    ) -> None:
        checked = _check_device(device)
        if decode is not None and not isinstance(decode, Decode):
            raise ConfigError(
                f"decode must be a fastfeed.vision.Decode, got {type(decode).__name__}",
                hint="e.g. decode=fastfeed.vision.Decode(jpg='rgb', size=224)",
            )
        if prefetch_batches < 1:
            raise ConfigError(f"prefetch_batches must be >= 1, got {prefetch_batches}")
        if ring_slots is not None and ring_slots < 1:
            raise ConfigError(f"ring_slots must be >= 1, got {ring_slots}")
        if num_streams < 1:
            raise ConfigError(f"num_streams must be >= 1, got {num_streams}")
        if worker_mode not in WORKER_MODES:
            raise ConfigError(
                f"worker_mode must be one of {', '.join(map(repr, WORKER_MODES))}, got {worker_mode!r}",
                hint="'auto' reads a StreamingDataset in threads unless Python code must run in workers",
            )
        if worker_mode == "thread" and worker_init_fn is not None:
            raise ConfigError(
                "worker_init_fn runs in worker processes, and worker_mode='thread' starts none",
                hint="use worker_mode='process' (or 'auto') with a worker_init_fn",
            )
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
        self.worker_mode = worker_mode
        self.decode = decode
        self._ring = HostRing(ring_slots or prefetch_batches + 3, pin=torch.cuda.is_available())
        self._stats = StatsSink()
        self._progress = Progress(self.dataset)
        self._sampler_progress = (
            SamplerProgress(self._index_sampler, self.generator)
            if not isinstance(self.dataset, IterableDataset)
            else None
        )
        self._iterators: weakref.WeakSet[LoaderIterator] = weakref.WeakSet()
        # Persistent workers: kept between iterations, shut down by close() or when the loader
        # is collected.
        self._pool_holder = PoolHolder()
        weakref.finalize(self, self._pool_holder.close)
        ds: Any = self.dataset
        if is_streaming(ds):
            ds.set_read_streams(num_streams)  # the cache plans by the streams actually read

    def __len__(self) -> int:
        """Batches in an epoch, as torch counts them. With a :class:`~fastfeed.StreamingDataset`:
        the batches its ``num_streams`` streams deliver in the dataset's current epoch, each
        stream ending with its own partial batch (unless ``drop_last``); this needs the shards'
        sample counts, scanned once."""
        ds: Any = self.dataset
        if is_streaming(ds):
            batch = self.batch_size if self.batch_sampler is not None and self.batch_size is not None else 1
            return epoch_batches(ds, self.num_streams, batch, drop_last=self.drop_last)
        return super().__len__()

    def __iter__(self) -> LoaderIterator:  # type: ignore[override]
        processes = self.num_workers > 0 and not reads_in_threads(self)
        if processes and not (self.persistent_workers and self._pool_holder.idle()):
            self.check_worker_number_rationality()  # torch warns again when it starts workers
        if self.persistent_workers and self.num_workers > 0:
            # One iteration at a time over the same workers, as torch resets its one iterator.
            self._end_iterations()
        self._pool_holder.open()
        iterator = LoaderIterator(self, self._parts())
        self._iterators.add(iterator)
        return iterator

    def _parts(self) -> LoaderParts:
        """What an iteration takes from this loader besides torch's arguments (see LoaderParts)."""
        return LoaderParts(
            self.device,
            self.prefetch_batches,
            self.num_streams,
            self._ring,
            self._stats,
            self._progress,
            self._sampler_progress,
            self._pool_holder,
            self._IterableDataset_len_called,
            self.decode,
        )

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
        if not is_streaming(self.dataset):
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
        elif is_streaming(self.dataset):
            self._progress.load(self, state)
        else:
            raise ConfigError("load_state_dict() needs a map-style dataset or a fastfeed.StreamingDataset")

    def close(self) -> None:
        """Stop the iterations in progress and the worker processes (persistent ones too): they
        end within seconds. The loader can be iterated again afterwards."""
        self._end_iterations()
        self._pool_holder.close()

    def _end_iterations(self) -> None:
        """Stop the iterations in progress; persistent workers stay (see WorkerPool)."""
        for iterator in list(self._iterators):
            if iterator.delivered:
                log.info("ending an iteration in progress after %d batches", iterator.delivered)
            iterator.close()
        self._iterators = weakref.WeakSet()

    def __enter__(self) -> DataLoader[_T_co]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
