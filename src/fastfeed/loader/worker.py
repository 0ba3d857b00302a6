"""What runs inside the loader's worker processes (torch's, started by the loader's
:class:`~fastfeed.loader.pool.Workers`): the collate function of map-style and iterable
datasets (:class:`WorkerCollate`) and the iterable dataset that reads a StreamingDataset's
streams (:class:`CollatedStream`). Both collate into the worker's shared-memory slots
(:mod:`fastfeed.loader.slots`) and send the items of :mod:`fastfeed.loader.items`.
"""

from __future__ import annotations

import gc
import pickle
import random
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from fastfeed.batch.assemble import ColumnBatch, collate_columns_into
from fastfeed.batch.collate import collate_into
from fastfeed.loader.items import StreamEnd, UserBatch, WorkerError
from fastfeed.loader.slots import Mailbox, SlotFlags, WorkerSlots
from fastfeed.loader.stats import count_samples
from fastfeed.loader.streaming import SKIPPED, StreamConfig, rotated

__all__ = ["CollatedStream", "WorkerCollate", "WorkerStart"]


class WorkerStart:
    """The ``worker_init_fn`` of the loader's worker processes: ``gc.freeze()``, then the user's
    ``worker_init_fn`` (as torch calls it: after seeding, with the worker's id).

    A forked worker shares its parent's memory until a page is written, and a full garbage
    collection writes to every tracked object it walks: the first one in a worker makes a
    private copy of the pages of every object the parent had (torch's, the model's), about
    50 MiB per worker here (``benchmarks/loader/bench_worker_gc.py``), and walks them again at
    each later one. Frozen, the objects that existed when the worker started are never walked
    (they stay shared, and the worker's full collections take milliseconds, not 0.1 s);
    objects the worker makes later are collected as usual.
    """

    def __init__(self, user_fn: Callable[[int], None] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        gc.freeze()
        if self.user_fn is not None:
            self.user_fn(worker_id)

    def __eq__(self, other: object) -> bool:  # a persistent pool is kept for the same settings
        return isinstance(other, WorkerStart) and other.user_fn == self.user_fn

    def __hash__(self) -> int:
        return hash(self.user_fn)


class WorkerCollate:
    """The ``collate_fn`` of the workers of map-style and iterable datasets: ``default_collate``
    into one of the worker's shared-memory slots (:class:`WorkerSlots`); a user ``collate_fn``
    (or ``default_convert`` without auto-batching) runs as torch runs it and its batch travels
    as torch sends it."""

    def __init__(self, user_collate: Callable[[Any], Any] | None, flags: SlotFlags) -> None:
        self.user_collate = user_collate
        self.flags = flags
        self._slots: WorkerSlots | None = None
        self._last_fetch = 0.0

    def __call__(self, samples: Any) -> Any:
        start = time.perf_counter()
        if self.user_collate is not None:
            batch = self.user_collate(samples)
            return UserBatch(batch, {"collate_s": time.perf_counter() - start, "n": count_samples(samples)})
        if self._slots is None:
            info = torch.utils.data.get_worker_info()
            assert info is not None, "WorkerCollate runs in DataLoader workers only"
            self._slots = WorkerSlots(self.flags, info.id)
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


class CollatedStream(IterableDataset[Any]):
    """Worker side of the StreamingDataset path: the dataset's own streams, collated by each
    worker into its shared-memory slots (:class:`WorkerSlots`).

    With persistent workers (``mailbox``), each iteration reads its settings and the workers'
    seed from the mailbox (:class:`Mailbox`) instead of ``settings``, and the slots live on
    across iterations."""

    def __init__(self, settings: StreamConfig | None, flags: SlotFlags, mailbox: Mailbox | None = None) -> None:
        self.settings = settings
        self.flags = flags
        self.mailbox = mailbox
        self._slots: WorkerSlots | None = None

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        assert info is not None, "CollatedStream runs in DataLoader workers only"
        worker = info.id
        if self.mailbox is None:
            assert self.settings is not None
            settings = self.settings
            slots = WorkerSlots(self.flags, worker)
        else:
            settings = self.mailbox.read()
            if self._slots is None:
                self._slots = WorkerSlots(self.flags, worker)
            slots = self._slots
        _seed_worker(settings.base_seed, worker)  # as torch seeds fresh workers of this iteration
        user = settings.user

        def collate(samples: ColumnBatch) -> Any:
            if user:
                start = time.perf_counter()
                batch = settings.user_collate(samples)
                return UserBatch(batch, {"n": len(samples), "collate_s": time.perf_counter() - start})
            return slots.collate(lambda arena: collate_columns_into(samples, arena), len(samples))

        mine = [v for v in rotated(settings.num_streams, settings.next_stream) if v % info.num_workers == worker]
        try:
            for item in settings.stream_source(mine, collate):
                if isinstance(item, StreamEnd):
                    yield item
                else:
                    v, message, after, io = item
                    if isinstance(message, UserBatch) and message.batch is SKIPPED:
                        continue  # the dataset's stages dropped every sample of it
                    message.stage.update(io)
                    yield message._replace(stream=(v, after))
        except Exception as exc:
            if not _picklable(exc):
                raise  # torch's worker machinery sends its type and text
            where = f"in DataLoader worker process {worker}:\n" + "".join(traceback.format_exception(exc))
            yield WorkerError(exc, where)


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
