"""Resumable streams: an epoch's batches in an order that does not depend on ``num_workers``.

A rank's share of the epoch is cut into ``num_streams`` streams (virtual workers; their pieces
come from :meth:`StreamingDataset.plan`, by equal sample runs when sample counts are known).
Each stream is read as consecutive *blocks* of samples; with shuffling, each block is permuted
by a generator seeded by ``(seed, epoch, rank, stream, block)``, and a block is a whole number
of batches, so batches never cross blocks or streams. The epoch's batch order is round-robin
over the streams that still have batches.

So the order is a pure function of the seed, the epoch, the rank layout and ``num_streams``; real
DataLoader workers only run streams (worker ``w`` runs the streams ``v`` with
``v % num_workers == w``). A stream's position is a :class:`StreamPos` (block, where the block
starts, samples of it already delivered): resuming re-reads only the current block (at most
``block_size`` samples), never earlier shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from fastfeed.batch.assemble import ColumnBatch, ColumnRun, materialize_run
from fastfeed.read.reader import iter_sample_runs

if TYPE_CHECKING:
    from fastfeed.order.source import PlannedDataset, Segment
    from fastfeed.read.prefetch import FetchStats, ShardFetch

__all__ = ["StreamPos", "block_size_for", "epoch_batches", "stream_batches"]

T = TypeVar("T")


@dataclass(frozen=True)
class StreamPos:
    """Where a stream resumes: block number ``block`` starts at sample ``offset`` (counted from
    the piece's own start) of piece ``piece``; ``delivered`` of its samples were delivered."""

    block: int = 0
    piece: int = 0
    offset: int = 0
    delivered: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def block_size_for(batch_size: int, shuffle: bool, shuffle_buffer: int, num_streams: int = 1) -> int:
    """Samples per block: one batch without shuffling, else the stream's share of the shuffle
    buffer (``shuffle_buffer`` counts samples held for shuffling across all streams), rounded up
    to whole batches."""
    if not shuffle or shuffle_buffer <= 1:
        return batch_size
    return max(1, math.ceil(shuffle_buffer / num_streams / batch_size)) * batch_size


def block_order(
    dataset: PlannedDataset, segment: int, rank: int, stream: int, block: int, n: int, epoch: int | None = None
) -> np.ndarray:
    """The order in which a block's ``n`` samples are delivered: a permutation seeded by
    ``(seed, epoch, rank, stream, block)`` with shuffling (and the resume segment, after a
    resume on another world size, see :mod:`fastfeed.order.reshard`), else ``arange(n)``.
    ``epoch`` defaults to the dataset's current one."""
    if not (dataset.shuffle and dataset.shuffle_buffer > 1):
        return np.arange(n)
    epoch = dataset.epoch if epoch is None else epoch
    key = [dataset.seed & 0xFFFFFFFF, epoch, rank, stream, block, 0xB10C] + ([segment] if segment else [])
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key))).permutation(n)


def stream_batches(
    dataset: PlannedDataset,
    stream: int,
    num_streams: int,
    batch_size: int,
    collate: Callable[[ColumnBatch], T],
    *,
    drop_last: bool = False,
    start: StreamPos | None = None,
    share: int = 1,
    epoch: int | None = None,
    segments: Sequence[Segment] | None = None,
) -> Generator[tuple[T, StreamPos], None, None]:
    """Stream ``stream``'s batches from ``start``: ``(collate(batch), position after it)``.

    ``batch`` is a :class:`~fastfeed.batch.assemble.ColumnBatch` valid only during ``collate``. ``share``
    is the number of streams this process runs at once: they split the prefetch budget.
    ``epoch`` and ``segments`` (its closed segments, see :mod:`fastfeed.order.reshard`) default to the
    dataset's current ones, read once here: changing them later does not affect this stream.
    """
    if epoch is None:
        epoch = dataset.epoch
    if segments is None:
        segments = dataset.segments if epoch == dataset.epoch else ()
    pieces = dataset.plan(stream, num_streams, epoch, segments)
    segment = len(segments)
    pos = start or StreamPos()
    if not pieces or pos.piece >= len(pieces):
        return
    block_size = block_size_for(batch_size, dataset.shuffle, dataset.shuffle_buffer, num_streams)
    cfg = dataset.stream_prefetch_config(share)
    max_held = max(1, cfg.byte_budget // 2 // cfg.part_size)
    todo = pieces[pos.piece :]
    open_fetches: list[ShardFetch] = []
    block: list[ColumnRun] = []
    count = 0
    block_no, block_start = pos.block, (pos.piece, pos.offset)
    skip_first = pos.delivered

    def let_go() -> None:
        *done, current = open_fetches
        for fetch in done:
            fetch.close()
        current.release_before(current.parts_taken - 1)
        open_fetches[:] = [current]

    def emit(next_start: tuple[int, int]) -> Generator[tuple[T, StreamPos], None, None]:
        nonlocal skip_first
        n = count
        order = block_order(dataset, segment, dataset.rank, stream, block_no, n, epoch)
        run_of = np.repeat(np.arange(len(block)), [len(r.keys) for r in block])
        row_of = np.concatenate([np.arange(len(r.keys)) for r in block]) if block else np.zeros(0, np.int64)
        first, skip_first = skip_first, 0
        for lo in range(first, n, batch_size):
            idx = order[lo : lo + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            runs = []
            for r in dict.fromkeys(run_of[idx].tolist()):
                rows = row_of[idx[run_of[idx] == r]]
                run = block[r]
                runs.append(
                    ColumnRun(
                        run.buffer, [run.keys[i] for i in rows], run.url, {e: s[rows] for e, s in run.fields.items()}
                    )
                )
            done = lo + len(idx)
            after = (
                StreamPos(block_no + 1, next_start[0], next_start[1], 0)
                if done >= n
                else StreamPos(block_no, block_start[0], block_start[1], done)
            )
            yield collate(ColumnBatch(runs)), after

    with dataset.prefetching(todo, share, epoch) as prefetcher:
        fetches = iter(prefetcher)
        try:
            for k, piece in enumerate(todo):
                p = pos.piece + k
                if len(open_fetches) >= cfg.shards_in_flight:
                    # The block holds every shard the prefetcher may have open: asking for the next
                    # one would wait forever. Copy the block out and let those shards go.
                    block = copy_out(block, prefetcher.stats)
                    for held in open_fetches:
                        held.close()
                    open_fetches.clear()
                fetch = next(fetches, None)
                if fetch is None:
                    break
                open_fetches.append(fetch)
                used = pos.offset if k == 0 else 0  # samples of this piece already read
                rows = None if piece.rows is None else np.asarray(piece.rows[used:], dtype=np.int64)
                first = piece.skip + used
                stop = None if piece.limit is None else piece.skip + piece.limit
                seen = 0
                for buffer, scan, copied in iter_sample_runs(fetch.url, fetch.chunks(hold=True)):
                    n = len(scan.keys)
                    base = seen  # the shard's sample index of row 0 of this run
                    seen += n
                    if rows is None:
                        lo, hi = max(first - base, 0), n if stop is None else min(n, stop - base)
                        picked = None
                    else:  # explicit rows: take those in this run
                        picked = rows[np.searchsorted(rows, base) : np.searchsorted(rows, seen)] - base
                        lo, hi = 0, len(picked)
                    while lo < hi:
                        take = min(hi - lo, block_size - count)
                        if picked is None:
                            fields = {ext: spans[lo : lo + take] for ext, spans in scan.fields.items()}
                            keys = scan.keys[lo : lo + take]
                        else:
                            sel = picked[lo : lo + take]
                            fields = {ext: spans[sel] for ext, spans in scan.fields.items()}
                            keys = [scan.keys[i] for i in sel.tolist()]
                        block.append(ColumnRun(buffer, keys, fetch.url, fields, owned=copied))
                        count += take
                        lo += take
                        used += take
                        if count == block_size:
                            nxt = (p, used)
                            yield from emit(nxt)
                            block_no, block_start = block_no + 1, nxt
                            block, count = [], 0
                            let_go()
                    if stop is not None and seen >= stop:
                        break
                    if sum(f.parts_held for f in open_fetches) > max_held:
                        block = copy_out(block, prefetcher.stats)
                        let_go()
            if block:
                yield from emit((pos.piece + len(todo), 0))
        finally:
            for fetch in open_fetches:
                fetch.close()


def copy_out(block: list[ColumnRun], stats: FetchStats) -> list[ColumnRun]:
    """The block with every run that points into a part copied out (so the parts can go),
    counted in ``stats.bytes_copied``; runs already copied stay as they are, so a sample is
    copied out at most once however many times this runs."""
    out = []
    for run in block:
        if not run.owned:
            run = materialize_run(run)
            stats.bytes_copied += len(run.buffer)
        out.append(run)
    return out


def epoch_batches(
    dataset: PlannedDataset,
    num_streams: int,
    batch_size: int,
    *,
    drop_last: bool = False,
    epoch: int | None = None,
    segments: Sequence[Segment] | None = None,
) -> int:
    """The batches this rank's ``num_streams`` streams deliver in a whole ``epoch`` (default:
    the current one, with its closed ``segments``). Each stream's blocks are whole batches, so
    a stream of ``n`` samples yields ``ceil(n / batch_size)`` batches, the last one partial
    (``n // batch_size`` with ``drop_last``). Needs the shards' sample counts (scanned once)."""
    counts = dataset.shard_sample_counts
    total = 0
    for v in range(num_streams):
        n = sum(p.size(counts) for p in dataset.plan(v, num_streams, epoch, segments))
        total += n // batch_size if drop_last else -(-n // batch_size)
    return total


def positions_from_dict(state: dict[str, Any]) -> dict[int, StreamPos]:
    """Inverse of ``{v: pos.as_dict()}``."""
    return {int(v): StreamPos(**p) for v, p in state.items()}
