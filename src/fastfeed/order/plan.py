"""The epoch plan: which samples of which shards a (rank, worker) reads, in which order.

Everything here is a pure function of ``(seed, epoch, rank, world_size, worker, num_workers)``
and the shard list, so every process computes its share without talking to the others, a run
with the same seed reads in the same order, and a loader's position is a few integers.

Splitting across ranks (when ``world_size > 1``) is by *samples*, not shards, so every rank
yields exactly the same number of samples per epoch and DDP never hangs on an uneven last step:
the epoch's shard order is laid end to end as one sequence of ``total`` samples and rank ``r``
takes the contiguous run ``[r * n, (r + 1) * n)``. The remainder ``total % world_size`` is
handled per ``remainder``:

* ``"drop"`` (default): ``n = total // world_size``; the last ``total % world_size`` samples of
  the epoch's order are not read. With ``shuffle=True`` that is a different handful of samples
  each epoch, so none is left out for good.
* ``"pad"``: ``n = ceil(total / world_size)``; the ranks at the end wrap around to the start of
  the epoch's order, so up to ``world_size - 1`` samples are read twice in the epoch.

Within a rank, shard pieces go round-robin to DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastfeed.errors import ConfigError

__all__ = ["Piece", "cut", "rank_pieces", "rank_sample_count", "rank_share", "shard_order", "worker_pieces"]


@dataclass(frozen=True)
class Piece:
    """Read samples ``[skip, skip + limit)`` of shard number ``shard`` (``limit=None``: to the end).

    ``rows``, when set, names the exact samples to read (ascending indices within the shard;
    ``skip`` and ``limit`` then span them). Such pieces only arise when a run is resumed on a
    different world size: they hold what is left of a shuffle block that was partly delivered.
    """

    shard: int
    skip: int = 0
    limit: int | None = None
    rows: tuple[int, ...] | None = None

    @classmethod
    def of_rows(cls, shard: int, rows: Sequence[int]) -> Piece:
        """The piece reading exactly samples ``rows`` (non-empty) of ``shard``."""
        ordered = tuple(sorted(int(r) for r in rows))
        return cls(shard, ordered[0], ordered[-1] - ordered[0] + 1, ordered)

    def size(self, counts: Sequence[int]) -> int:
        """Samples this piece yields, given the shards' sample counts."""
        if self.rows is not None:
            return len(self.rows)
        return (counts[self.shard] - self.skip) if self.limit is None else self.limit

    def indices(self, counts: Sequence[int]) -> Sequence[int]:
        """The shard's sample indices this piece yields, in order."""
        if self.rows is not None:
            return self.rows
        return range(self.skip, self.skip + self.size(counts))

    def sub(self, lo: int, hi: int, counts: Sequence[int] | None) -> Piece:
        """The piece yielding this piece's samples ``[lo, hi)`` (``0 <= lo < hi <= size``)."""
        if self.rows is not None:
            return Piece.of_rows(self.shard, self.rows[lo:hi])
        whole_tail = self.limit is None and counts is not None and hi == self.size(counts)
        return Piece(self.shard, self.skip + lo, None if whole_tail else hi - lo)


def cut(pieces: Sequence[Piece], counts: Sequence[int], start: int, end: int) -> list[Piece]:
    """Pieces covering samples ``[start, end)`` of ``pieces`` laid end to end."""
    out: list[Piece] = []
    offset = 0
    for piece in pieces:
        size = piece.size(counts)
        lo, hi = max(start, offset), min(end, offset + size)
        if lo < hi:
            out.append(piece if (lo, hi) == (offset, offset + size) else piece.sub(lo - offset, hi - offset, counts))
        offset += size
        if offset >= end:
            break
    return out


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order: sorted, or a permutation seeded by ``(seed, epoch)``."""
    if not shuffle:
        return list(range(num_shards))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, 0x5A4D])))
    return [int(i) for i in rng.permutation(num_shards)]


def rank_sample_count(total: int, world_size: int, remainder: str) -> int:
    """Samples each rank yields per epoch."""
    if remainder == "drop":
        return total // world_size
    if remainder == "pad":
        return -(-total // world_size)
    raise ConfigError(f"remainder={remainder!r} is invalid", hint="use 'drop' or 'pad'")


def rank_pieces(
    order: Sequence[int],
    counts: Sequence[int] | None,
    *,
    rank: int,
    world_size: int,
    remainder: str = "drop",
) -> list[Piece]:
    """The pieces rank ``rank`` reads this epoch, in order.

    ``counts[i]`` is the number of samples in shard ``i``; it is required when
    ``world_size > 1`` (a single rank reads whole shards and needs no counts).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    if world_size == 1:
        return [Piece(s) for s in order]
    if counts is None:
        raise ConfigError("splitting across ranks needs per-shard sample counts")
    return rank_share([Piece(s) for s in order], counts, rank=rank, world_size=world_size, remainder=remainder)


def rank_share(
    pieces: Sequence[Piece], counts: Sequence[int], *, rank: int, world_size: int, remainder: str = "drop"
) -> list[Piece]:
    """Rank ``rank``'s contiguous run of the samples of ``pieces`` laid end to end: every rank
    gets the same number (see the module docstring for ``remainder``)."""
    total = sum(p.size(counts) for p in pieces)
    per_rank = rank_sample_count(total, world_size, remainder)
    if total == 0 or per_rank == 0:
        return []
    out: list[Piece] = []
    # With "pad" the run may wrap past the end (possibly more than once for tiny datasets);
    # walk it in sample-index space modulo total.
    remaining = per_rank
    cursor = (rank * per_rank) % total
    while remaining > 0:
        take = min(remaining, total - cursor)
        out.extend(cut(pieces, counts, cursor, cursor + take))
        remaining -= take
        cursor = 0
    return out


def worker_pieces(
    pieces: Sequence[Piece], *, worker: int, num_workers: int, counts: Sequence[int] | None = None
) -> list[Piece]:
    """The pieces DataLoader worker ``worker`` of ``num_workers`` reads.

    Without ``counts``: whole pieces, round-robin. With ``counts`` (known whenever there are
    several ranks): the rank's samples, laid end to end, are cut into ``num_workers`` contiguous
    runs of equal length (the first ``n % num_workers`` one sample longer). Every rank has the
    same sample count, hence the same per-worker counts and the same number of (partial)
    batches: torch's DataLoader yields a partial batch per worker, so round-robin pieces could
    give ranks different batch counts and hang DDP.
    """
    if not 0 <= worker < num_workers:
        raise ConfigError(f"worker {worker} is outside num_workers {num_workers}")
    if counts is None:
        return list(pieces[worker::num_workers])
    total = sum(p.size(counts) for p in pieces)
    base, extra = divmod(total, num_workers)
    start = worker * base + min(worker, extra)
    return cut(pieces, counts, start, start + base + (1 if worker < extra else 0))
