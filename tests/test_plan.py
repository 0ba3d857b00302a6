"""The epoch plan: deterministic order, exact and equal rank splits, worker round-robin."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfeed.errors import ConfigError
from fastfeed.order.plan import Piece, rank_pieces, shard_order, worker_pieces


def expand(pieces: list[Piece], counts: list[int]) -> list[tuple[int, int]]:
    out = []
    for p in pieces:
        stop = counts[p.shard] if p.limit is None else p.skip + p.limit
        out.extend((p.shard, i) for i in range(p.skip, stop))
    return out


def test_shard_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a = shard_order(50, seed=7, epoch=3, shuffle=True)
    assert a == shard_order(50, seed=7, epoch=3, shuffle=True)
    assert sorted(a) == list(range(50))
    assert a != shard_order(50, seed=7, epoch=4, shuffle=True)
    assert a != shard_order(50, seed=8, epoch=3, shuffle=True)
    assert shard_order(5, seed=7, epoch=3, shuffle=False) == [0, 1, 2, 3, 4]


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=12),
    world=st.integers(1, 5),
    seed=st.integers(0, 3),
    remainder=st.sampled_from(["drop", "pad"]),
)
def test_rank_split_is_disjoint_complete_and_equal(counts: list[int], world: int, seed: int, remainder: str) -> None:
    order = shard_order(len(counts), seed=seed, epoch=0, shuffle=True)
    total = sum(counts)
    per_rank = [
        expand(rank_pieces(order, counts, rank=r, world_size=world, remainder=remainder), counts) for r in range(world)
    ]
    sizes = {len(x) for x in per_rank}
    assert len(sizes) == 1, "every rank must yield the same number of samples"
    everything = [s for r in per_rank for s in r]
    universe = {(s, i) for s in range(len(counts)) for i in range(counts[s])}
    if remainder == "drop":
        assert sizes == {total // world}
        assert len(set(everything)) == len(everything), "no sample may be read twice"
        assert total - len(everything) == total % world
    else:
        assert sizes == {-(-total // world)} if total else {0}
        assert set(everything) == universe, "pad must cover every sample"
        assert max(Counter(everything).values(), default=1) <= 1 + (world - 1) // max(total, 1) + 1


def test_single_rank_reads_whole_shards_without_counts() -> None:
    assert rank_pieces([2, 0, 1], None, rank=0, world_size=1) == [Piece(2), Piece(0), Piece(1)]
    with pytest.raises(ConfigError):
        rank_pieces([0, 1], None, rank=0, world_size=2)
    with pytest.raises(ConfigError):
        rank_pieces([0, 1], [1, 1], rank=2, world_size=2)


def test_worker_round_robin_partitions_pieces() -> None:
    pieces = [Piece(i) for i in range(7)]
    parts = [worker_pieces(pieces, worker=w, num_workers=3) for w in range(3)]
    assert sorted(p.shard for part in parts for p in part) == list(range(7))
    assert parts[0] == [Piece(0), Piece(3), Piece(6)]


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=10),
    world=st.integers(1, 4),
    workers=st.integers(1, 4),
    seed=st.integers(0, 3),
)
def test_worker_split_with_counts_is_exact_and_equal_across_ranks(
    counts: list[int], world: int, workers: int, seed: int
) -> None:
    order = shard_order(len(counts), seed=seed, epoch=1, shuffle=True)
    per_rank_sizes = []
    for rank in range(world):
        pieces = rank_pieces(order, counts, rank=rank, world_size=world)
        parts = [worker_pieces(pieces, worker=w, num_workers=workers, counts=counts) for w in range(workers)]
        assert [s for part in parts for s in expand(part, counts)] == expand(pieces, counts), "a partition, in order"
        per_rank_sizes.append([len(expand(part, counts)) for part in parts])
    assert all(sizes == per_rank_sizes[0] for sizes in per_rank_sizes), "same per-worker counts on every rank"
    assert max(per_rank_sizes[0]) - min(per_rank_sizes[0]) <= 1
