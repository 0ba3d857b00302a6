"""The typed items that travel between the loader's stages: from the sources (worker
processes, or the in-process readers) to the producer thread "fastfeed-batch", and from it to
the training loop's ``next()``.

Each kind of item is its own ``NamedTuple`` (the producer dispatches on the type, never on a
tag or a position). ``stage`` holds the :class:`~fastfeed.LoaderStats` stage times the item's
batch cost (and ``n``, its samples); ``stream`` is ``(stream, position after the batch)`` on the
StreamingDataset path. Imports nothing else of the loader.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fastfeed.order.streams import StreamPos

__all__ = [
    "END",
    "Failure",
    "RegionBatch",
    "RemoteTraceback",
    "RingBatch",
    "SlotBatch",
    "StreamEnd",
    "StreamMeta",
    "UserBatch",
    "WorkerError",
]

#: The producer's last item of an iteration: the training loop's ``next()`` raises ``StopIteration``.
END = object()

#: ``(stream, position after the batch)`` of a StreamingDataset batch.
StreamMeta = tuple[int, StreamPos]


class SlotBatch(NamedTuple):
    """A batch collated into a worker's shared-memory slot: rebuilt as views of the slot.
    ``tensor`` is the slot's memory the first time it is used (and after it grew), else None."""

    worker: int
    slot: int
    generation: int
    tensor: torch.Tensor | None
    layout: Any
    stage: dict[str, float]
    stream: StreamMeta | None = None


class RegionBatch(NamedTuple):
    """A batch collated into a fresh shared-memory region (every slot of the worker was held)."""

    region: torch.Tensor
    layout: Any
    stage: dict[str, float]
    stream: StreamMeta | None = None


class UserBatch(NamedTuple):
    """A batch made by a user ``collate_fn`` (or ``default_convert``), sent as torch sends it."""

    batch: Any
    stage: dict[str, float]
    stream: StreamMeta | None = None


class RingBatch(NamedTuple):
    """A batch already collated into a ring slot of this process."""

    batch: Any
    stage: dict[str, float]
    stream: StreamMeta | None = None


class StreamEnd(NamedTuple):
    """A stream has no more batches; ``io``: the I/O counters of its last reads."""

    stream_id: int
    io: dict[str, float]


class Failure(NamedTuple):
    """An exception to raise in the training loop in place of one batch. ``fatal``: the
    iteration cannot continue after it."""

    exc: BaseException
    fatal: bool = False


class WorkerError(NamedTuple):
    """An error a worker reading streams sends as a value (pickled whole, with its attributes:
    a :class:`~fastfeed.FastfeedError`'s ``url`` and ``hint``), where torch's worker machinery
    would rebuild it from its text; ``where``: the worker's traceback."""

    exc: BaseException
    where: str

    def rebuild(self) -> BaseException:
        """The exception, its cause the worker's traceback (as a chained exception)."""
        self.exc.__cause__ = RemoteTraceback(self.where)
        return self.exc


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a DataLoader worker process."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text
