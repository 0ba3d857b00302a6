"""The snapshot of a save: every tensor and array of the state copied into one staging buffer
of exactly the state's size (page-locked, and filled on a side CUDA stream, when tensors live on
a GPU). Buffers are reused across saves of the same size; the background upload of a
:class:`~fastfeed.checkpoint.checkpointer.Checkpointer` reads them and gives them back.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from fastfeed.checkpoint.codec import LeafSpec

__all__ = ["StagingBuffers"]


class StagingBuffers:
    """Staging buffers of one Checkpointer: :meth:`snapshot` fills one (on the training thread),
    :meth:`recycle` gives it back once its upload ended (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_arenas: list[torch.Tensor] = []
        self._side_stream: Any = None  # used by the training thread only

    def snapshot(
        self, leaves: list[Any], specs: list[LeafSpec], offsets: list[int], total: int
    ) -> tuple[torch.Tensor, Any]:
        """A buffer holding the ``leaves`` at ``offsets`` (``total`` bytes) and, when they live on
        a GPU, the CUDA event that the copies are done at (None otherwise)."""
        on_gpu = any(isinstance(x, torch.Tensor) and x.is_cuda for x in leaves)
        arena = self._arena(total, pinned=on_gpu)
        event = None
        stream: Any = None
        current: Any = None
        if on_gpu:
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            stream, current = self._side_stream, torch.cuda.current_stream()
            stream.wait_stream(current)  # the copies see every update queued so far
        for leaf, spec, offset in zip(leaves, specs, offsets, strict=True):
            if spec.nbytes == 0:
                continue
            region = arena[offset : offset + spec.nbytes]
            if isinstance(leaf, np.ndarray):
                np.copyto(region.numpy().view(leaf.dtype).reshape(leaf.shape), leaf)
                continue
            tensor = leaf.detach()
            dst = region.view(tensor.dtype).view(tensor.shape)
            if tensor.is_cuda:
                with torch.cuda.stream(stream):
                    dst.copy_(tensor, non_blocking=True)
            else:
                dst.copy_(tensor)
        if on_gpu:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
            current.wait_stream(stream)  # later updates wait for the copies, not the host
        return arena, event

    def _arena(self, total: int, *, pinned: bool) -> torch.Tensor:
        with self._lock:
            for i, arena in enumerate(self._free_arenas):
                if arena.numel() == total and arena.is_pinned() == pinned:
                    return self._free_arenas.pop(i)
            self._free_arenas.clear()  # another size: let those go
        return torch.empty(total, dtype=torch.uint8, pin_memory=pinned)

    def recycle(self, arena: torch.Tensor) -> None:
        """Give back a buffer that :meth:`snapshot` returned (its save ended or was replaced)."""
        with self._lock:
            self._free_arenas.append(arena)
