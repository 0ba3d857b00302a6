"""Resuming an epoch on a different world size.

An epoch is read in *segments*. The first is the plan of :mod:`fastfeed.order.plan` and
:mod:`fastfeed.order.streams` for the world size the run started with. When a checkpoint taken with
``world_size = W`` is loaded by ``W' != W`` ranks, that segment is closed: what each of its
``W x num_streams`` streams had delivered is known from any one rank's state (every rank's stream
``v`` has the same length and, in lockstep DDP, delivered the same batches), so the samples not
yet delivered are computable without reading data: per stream, the undelivered rest of the
shuffle block it was in (a permutation seeded like the reader's) and everything after it. Those
samples, laid end to end in (old rank, stream) order, are split across the ``W'`` ranks exactly
as an epoch is (:func:`fastfeed.order.plan.rank_share`, same ``remainder`` rule), and each rank reads
its share as fresh streams: the next segment.

Guarantee: no sample of the epoch is delivered twice, and none is lost except the fewer than
``W'`` that ``remainder="drop"`` leaves out to keep ranks equal (``"pad"`` repeats as many
instead). The order after the resume is deterministic but not the order an uninterrupted run
would have had. A segment is a few integers per stream, so the state stays small; resuming
again (same or another world size) replays the chain of segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fastfeed.order.plan import Piece, cut, rank_pieces, rank_share, shard_order, worker_pieces
from fastfeed.order.source import PlannedDataset, Segment
from fastfeed.order.streams import StreamPos, block_order, block_size_for

__all__ = ["close_segment", "segment_rank_pieces"]


def close_segment(
    dataset: PlannedDataset,
    *,
    world_size: int,
    num_streams: int,
    batch_size: int,
    positions: dict[int, StreamPos],
) -> Segment:
    """The segment a loader state describes (``positions``: its streams' resume points)."""
    block = block_size_for(batch_size, dataset.shuffle, dataset.shuffle_buffer, num_streams)
    consumed = tuple(
        (positions[v].block * block + positions[v].delivered) if v in positions else 0 for v in range(num_streams)
    )
    return Segment(world_size, num_streams, batch_size, consumed)


def segment_rank_pieces(
    dataset: PlannedDataset, segments: Sequence[Segment], rank: int, world_size: int
) -> list[Piece]:
    """The pieces ``rank`` of ``world_size`` reads in the segment after ``segments`` (of the
    dataset's current epoch)."""
    counts = dataset.shard_sample_counts
    order = shard_order(len(dataset.shards), seed=dataset.seed, epoch=dataset.epoch, shuffle=dataset.shuffle)
    first_world = segments[0].world_size

    def first_share(r: int) -> list[Piece]:
        return rank_pieces(
            order, counts if first_world > 1 else None, rank=r, world_size=first_world, remainder=dataset.remainder
        )

    share = first_share
    for j, seg in enumerate(segments):
        # The stream split each segment used (see PlannedDataset.plan): sample-equal with counts,
        # except in a first segment of one rank, which deals whole pieces round-robin.
        split_counts = counts if (j > 0 or seg.world_size > 1) else None
        remaining: list[Piece] = []
        for r in range(seg.world_size):
            base = share(r)
            for v in range(seg.num_streams):
                stream = worker_pieces(base, worker=v, num_workers=seg.num_streams, counts=split_counts)
                remaining += _undelivered(dataset, stream, counts, seg, j, r, v)
        next_world = segments[j + 1].world_size if j + 1 < len(segments) else world_size
        share = _sharer(remaining, counts, next_world, dataset.remainder)
    return share(rank)


def _sharer(pieces: list[Piece], counts: Sequence[int], world_size: int, remainder: str) -> Any:
    def share(r: int) -> list[Piece]:
        return rank_share(pieces, counts, rank=r, world_size=world_size, remainder=remainder)

    return share


def _undelivered(
    dataset: PlannedDataset,
    stream: Sequence[Piece],
    counts: Sequence[int],
    seg: Segment,
    segment: int,
    rank: int,
    v: int,
) -> list[Piece]:
    """What stream ``v`` of ``rank`` had not delivered when ``seg`` was closed."""
    total = sum(p.size(counts) for p in stream)
    done = min(seg.consumed[v] if v < len(seg.consumed) else 0, total)
    block = block_size_for(seg.batch_size, dataset.shuffle, dataset.shuffle_buffer, seg.num_streams)
    b, delivered = divmod(done, block)
    lo = b * block
    out: list[Piece] = []
    if delivered:
        # Part of block b went out, in the order the reader permuted it: keep the rest.
        n = min(block, total - lo)
        flat = [(p.shard, i) for p in cut(stream, counts, lo, lo + n) for i in p.indices(counts)]
        left = np.sort(block_order(dataset, segment, rank, v, b, n)[delivered:])
        run_shard, run_rows = -1, list[int]()
        for k in left.tolist():
            shard, row = flat[k]
            if shard != run_shard or (run_rows and row <= run_rows[-1]):
                if run_rows:
                    out.append(Piece.of_rows(run_shard, run_rows))
                run_shard, run_rows = shard, list[int]()
            run_rows.append(row)
        if run_rows:
            out.append(Piece.of_rows(run_shard, run_rows))
        lo += n
    return out + cut(stream, counts, lo, total)
