"""The shared memory between the loader's main process and its worker processes.

Each worker collates batches into its own shared-memory slots (:class:`WorkerSlots`); a batch
crosses to the main process as a slot number, and the main process rebuilds it as views of
the slot (:class:`SlotTable`, which also page-locks the slots). :class:`SlotFlags` says which
slots each side may touch. :class:`Mailbox` carries a persistent worker's next settings.
Both sides of each structure live here, so its protocol is in one place.
"""

from __future__ import annotations

import pickle
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fastfeed.batch.assemble import Arena, layout_extent, to_layout
from fastfeed.batch.device import HostPinner
from fastfeed.loader.items import RegionBatch, SlotBatch, StreamMeta

__all__ = ["Mailbox", "SlotFlags", "SlotTable", "WorkerSlots"]


class SlotFlags:
    """The shared-memory flags of the workers' slots (see :class:`WorkerSlots`).

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
        """Tell the workers a new epoch of a persistent pool starts (main process)."""
        self.epoch += 1


class WorkerSlots:
    """Worker side of the shared-memory slots: up to ``flags.free.shape[1]`` shared arenas per
    worker that batches are collated into, made as they are needed.

    A slot's tensor crosses to the main process (by file descriptor) only the first time it is
    used and after it grows; after that only its number travels (:class:`SlotBatch`). A worker
    never waits for a slot: when all of its slots are held (a training loop that keeps
    batches), it collates into a fresh region instead (:class:`RegionBatch`), so keeping
    batches costs memory, never time.
    """

    def __init__(self, flags: SlotFlags, worker: int) -> None:
        self.worker = worker
        self.free = flags.free[worker].numpy()
        self.held = flags.held[worker].numpy()
        self.epoch_flag = flags.epoch.numpy()
        self.epoch = int(self.epoch_flag[0])
        self.arenas: list[Arena] = []
        self.sent: list[int] = []  # generation of each slot the main process already has

    def claim(self) -> int | None:
        """A slot this worker may write (taken back from an early-ended epoch, reused, or made),
        or ``None`` when all of its slots are held."""
        free = self.free
        epoch = int(self.epoch_flag[0])
        if epoch != self.epoch:
            self.epoch = epoch
            for k in range(len(self.arenas)):
                if not free[k] and not self.held[k]:
                    free[k] = 1  # sent in an epoch that ended early, and dropped
                    # Dropped unseen, perhaps with the slot's tensor, which the main process
                    # then never received: send it again with the slot's next batch.
                    self.sent[k] = -1
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
            return RegionBatch(spare.tensor[: layout_extent(layout)], layout, stage, stream)
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
        return SlotBatch(self.worker, k, arena.generation, tensor, layout, stage, stream)


class SlotTable:
    """Main-process side of the worker slots: the tensors received, page-locked by ``pinner``
    when given, and their release."""

    def __init__(self, flags: SlotFlags, pinner: HostPinner | None = None) -> None:
        self.free = flags.free
        self.held = flags.held
        self.pinner = pinner
        self.tensors: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
        self.pinned: dict[tuple[int, int], torch.Tensor] = {}

    def base(self, worker: int, slot: int, generation: int, tensor: torch.Tensor | None) -> torch.Tensor:
        """The base tensor of a batch on ``worker``'s ``slot`` (``tensor``: the slot's memory when
        it is new or grew); the slot is held until it and every view of it are gone."""
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


class Mailbox:
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
        """The value last posted (worker side)."""
        array = self.buffer.numpy()
        n = int.from_bytes(array[:8].tobytes(), "little")
        return pickle.loads(array[8 : 8 + n].tobytes())  # written by the main process only
