"""How the loader reads a :class:`~fastfeed.StreamingDataset`: as resumable streams
(:mod:`fastfeed.order.streams`) interleaved round-robin.

:class:`StreamConfig` is what reading an iteration's streams needs (it travels to the worker
processes, which read disjoint streams); :func:`in_stream_order` puts the workers' batches back
into the round-robin order one process would produce, so the batch order depends on
``num_streams`` and never on ``num_workers``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Generator, Iterator
from typing import Any

from torch.utils.data._utils.collate import default_collate, default_convert

from fastfeed.batch.assemble import ColumnBatch
from fastfeed.loader.items import StreamEnd, WorkerError
from fastfeed.loader.stats import io_delta
from fastfeed.order.source import Segment
from fastfeed.order.streams import StreamPos, stream_batches
from fastfeed.read.stages import apply_stages

__all__ = ["SKIPPED", "StreamConfig", "in_stream_order", "is_streaming", "rotated"]


class StreamConfig:
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
    ) -> Generator[tuple[int, Any, StreamPos, dict[str, float]] | StreamEnd, None, None]:
        """Round-robin over ``streams`` (those still running), each from its resume position:
        ``(stream, collate(batch), position_after, io_deltas)`` (``io_deltas``: the
        :class:`~fastfeed.LoaderStats` I/O fields this batch added), then a :class:`StreamEnd` when a
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
            # One snapshot per batch: each item carries what was read since the previous one
            # (while it was collated and handed over too), so no read goes uncounted.
            io0 = io_stats()
            while live:
                try:
                    value, after = next(gens[v])
                except StopIteration:
                    live.discard(v)
                    io1 = io_stats()
                    yield StreamEnd(v, io_delta(io0, io1))  # what the stream read last
                else:
                    io1 = io_stats()
                    yield (v, value, after, io_delta(io0, io1))
                io0 = io1
                v = _cyclic_next(v, live, self.num_streams)
        finally:
            for gen in gens.values():
                gen.close()

    @property
    def user(self) -> bool:
        """Whether batches are made by :meth:`user_collate` (a ``collate_fn``, ``batch_size=None``
        or the dataset's stages) rather than gathered natively."""
        return self.collate_fn is not None or self.unbatched or bool(getattr(self.dataset, "stages", ()))

    def user_collate(self, columns: ColumnBatch) -> Any:
        """The batch's sample dicts through the dataset's stages (``decode``, ``to_tuple``...),
        then a user ``collate_fn`` (else torch's ``default_collate``, or ``default_convert`` with
        ``batch_size=None``, over the one sample itself, as torch's loader calls it).
        :data:`SKIPPED` when the stages dropped every sample of the batch."""
        samples = columns.samples()
        stages = getattr(self.dataset, "stages", ())
        if stages:
            samples = list(apply_stages(samples, stages))
            if not samples:
                return SKIPPED
        if self.unbatched:
            return (self.collate_fn or default_convert)(samples[0])
        return (self.collate_fn or (default_collate if stages else default_convert))(samples)


class _Skipped:
    def __repr__(self) -> str:
        return "SKIPPED"


#: What :meth:`StreamConfig.user_collate` returns for a batch whose samples the stages all
#: dropped: the batch is not delivered (its stream resumes after it all the same, as re-reading
#: it would deliver nothing either).
SKIPPED = _Skipped()


def is_streaming(dataset: Any) -> bool:
    """Whether the loader reads ``dataset`` as resumable streams (see :mod:`fastfeed.order.streams`)."""
    from fastfeed.dataset import StreamingDataset

    return isinstance(dataset, StreamingDataset)


def rotated(n: int, first: int) -> list[int]:
    """``0..n-1`` starting at ``first``: the round-robin order of streams from a resume point."""
    return [(first + i) % n for i in range(n)]


def in_stream_order(
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
            if isinstance(item, WorkerError):
                raise item.rebuild()
            if isinstance(item, StreamEnd):
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
