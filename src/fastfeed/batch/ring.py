"""A ring of preallocated host arenas that batches are assembled into.

A slot is busy from :meth:`HostRing.acquire` until every tensor of the batch written into it
has been freed: batch tensors are views of a per-batch base tensor made with
``torch.from_numpy`` over the arena, and a :func:`weakref.finalize` on that numpy view returns
the slot when the last view dies. So a CPU batch stays valid for as long as the training loop
holds it (nothing is overwritten under it), and a device batch's host slot is held only until
its copy has completed (the device feeder keeps the host batch alive until its event fires).

Acquiring never blocks: if every slot is held (a loop that keeps batches alive), a temporary
arena is allocated for that batch and a warning is logged once, so hoarding costs memory,
never a hang.
"""

from __future__ import annotations

import logging
import threading
import weakref

import torch

from fastfeed.batch.assemble import Arena

__all__ = ["HostRing", "Slot"]

log = logging.getLogger(__name__)


class Slot:
    """One acquired arena; :meth:`base` makes the tensor whose views form the batch."""

    def __init__(self, arena: Arena, ring: HostRing | None) -> None:
        self.arena = arena
        #: The ring the arena returns to (``None``: a temporary overflow arena).
        self.ring = ring

    def base(self) -> torch.Tensor:
        """A fresh base tensor over the arena; the slot is released when it and all of its views
        are gone. Call once per batch, after the arena has its final size."""
        view = self.arena.array[:]  # a new ndarray object: its death is the release signal
        tensor = torch.from_numpy(view)
        ring, self.ring = self.ring, None
        if ring is not None:
            weakref.finalize(view, ring._release, self.arena)
        return tensor

    def abandon(self) -> None:
        """Give the slot back unused (its batch failed before :meth:`base` was called)."""
        ring, self.ring = self.ring, None
        if ring is not None:
            ring._release(self.arena)


class HostRing:
    """``slots`` reusable arenas (page-locked when ``pin`` and CUDA is available)."""

    def __init__(self, slots: int, *, pin: bool = False, initial_bytes: int = 1 << 20) -> None:
        if slots < 1:
            raise ValueError("a ring needs at least one slot")
        self.pin = pin
        self._free = [Arena(initial_bytes, pin=pin) for _ in range(slots)]
        self._cond = threading.Condition()
        self.slots = slots
        self.overflows = 0
        self._warned = False
        self._last_size = initial_bytes

    def acquire(self) -> Slot:
        """A free slot, or a temporary arena if all slots are held (never blocks)."""
        with self._cond:
            if self._free:
                return Slot(self._free.pop(), self)
            self.overflows += 1
            if not self._warned:
                self._warned = True
                log.warning(
                    "all %d ring slots are held by live batches; allocating a temporary buffer. "
                    "Keeping batches alive across steps costs memory: drop them, .clone() what you "
                    "keep, or raise ring_slots",
                    self.slots,
                )
            size = self._last_size
        return Slot(Arena(size, pin=False), None)

    def _release(self, arena: Arena) -> None:
        with self._cond:
            self._last_size = max(self._last_size, arena.nbytes)
            self._free.append(arena)
            self._cond.notify_all()

    def free_slots(self) -> int:
        with self._cond:
            return len(self._free)

    def wait_all_free(self, timeout: float) -> bool:
        """Wait until every slot is back (for tests and shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._free) == self.slots, timeout)
