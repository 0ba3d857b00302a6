"""Resume on a different world size: no sample of the epoch delivered twice, none lost beyond
what ``remainder="drop"`` drops to keep ranks equal, equal batch counts on every new rank.

Most tests drive the ranks of a "world" in one process (``StreamingDataset(rank=, world_size=)``,
stepping every rank's loader in lockstep as DDP does); one runs real gloo process groups.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from fastfeed import DataLoader, StreamingDataset
from fastfeed.order.plan import Piece, cut, rank_share
from fastfeed.testing.servers import free_port
from fastfeed.testing.shards import write_synthetic_shards

SIZES = [23, 41, 9, 30, 17, 35, 12]  # 167 samples


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reshard")
    for i, n in enumerate(SIZES):
        (p,) = write_synthetic_shards(root / f"t{i}", num_shards=1, samples_per_shard=n, sample_bytes=200, seed=i)
        p.rename(root / f"shard-{i:06d}.tar")
    return root


def ids(batch: dict[str, Any]) -> list[str]:
    return [f"{u}#{k}" for u, k in zip(batch["__url__"], batch["__key__"], strict=True)]


def everything(root: Path) -> set[str]:
    return {f"{s['__url__']}#{s['__key__']}" for s in StreamingDataset(str(root))}


def world(
    root: Path, size: int, *, batch_size: int = 5, num_streams: int = 3, workers: int = 0, remainder: str = "drop"
) -> list[DataLoader]:
    loaders = []
    for rank in range(size):
        ds = StreamingDataset(
            str(root), shuffle=True, seed=9, shuffle_buffer=24, rank=rank, world_size=size, remainder=remainder
        )
        ds.set_epoch(1)
        loaders.append(DataLoader(ds, batch_size=batch_size, num_streams=num_streams, num_workers=workers))
    return loaders


def lockstep(loaders: list[DataLoader], steps: int | None) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Every rank takes ``steps`` batches (None: to the end); returns each rank's samples and state."""
    its = [iter(loader) for loader in loaders]
    got: list[list[str]] = [[] for _ in loaders]
    k = 0
    while steps is None or k < steps:
        batches = [next(it, None) for it in its]
        if all(b is None for b in batches):
            break
        assert all(b is not None for b in batches), f"ranks ran out of batches at different steps ({k})"
        for r, b in enumerate(batches):
            got[r] += ids(b)  # type: ignore[arg-type]
        k += 1
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    for loader in loaders:
        loader.close()
    return got, states


def check_no_repeats_no_loss(delivered: list[str], every: set[str], allowed_loss: int) -> None:
    assert len(delivered) == len(set(delivered)), "a sample was delivered twice"
    assert set(delivered) <= every
    lost = len(every) - len(delivered)
    assert 0 <= lost <= allowed_loss, f"{lost} samples lost, at most {allowed_loss} allowed"


@pytest.mark.parametrize(("old", "new", "steps"), [(2, 3, 4), (3, 2, 7), (2, 1, 3), (1, 2, 9), (3, 4, 1)])
def test_resume_on_another_world_size_delivers_the_rest_once(uneven: Path, old: int, new: int, steps: int) -> None:
    every = everything(uneven)
    head, states = lockstep(world(uneven, old), steps)
    saved = states[-1]  # any rank's state describes the whole world
    progress = [{v: (p["block"], p["delivered"]) for v, p in s["streams"].items()} for s in states]
    assert all(p == progress[0] for p in progress), "ranks in lockstep are equally far into each stream"
    resumed = world(uneven, new, batch_size=4, num_streams=2)  # batch size and streams may change too
    for loader in resumed:
        loader.load_state_dict(saved)
    tail, _ = lockstep(resumed, None)  # raises if the new ranks' batch counts differ
    assert len({len(t) for t in tail}) == 1, "every new rank yields the same number of samples"
    delivered = [k for part in head + tail for k in part]
    # The first run drops total % old; the resumed split drops fewer than `new`.
    check_no_repeats_no_loss(delivered, every, allowed_loss=len(every) % old + new - 1)


def test_resume_twice_across_world_sizes_and_then_exactly(uneven: Path) -> None:
    every = everything(uneven)
    head, states = lockstep(world(uneven, 2), 5)
    mid_world = world(uneven, 3)
    for loader in mid_world:
        loader.load_state_dict(states[0])
    mid, mid_states = lockstep(mid_world, 3)
    assert all(len(s["segments"]) == 1 for s in mid_states)

    # Same world size again: an exact continuation of the resumed run, rank by rank.
    ref_world = world(uneven, 3)
    for loader in ref_world:
        loader.load_state_dict(states[0])
    ref, _ = lockstep(ref_world, None)
    exact_world = world(uneven, 3)
    for loader, state in zip(exact_world, mid_states, strict=True):
        loader.load_state_dict(state)
    rest, _ = lockstep(exact_world, None)
    assert [m + r for m, r in zip(mid, rest, strict=True)] == ref

    # And on to one rank.
    last = world(uneven, 1)
    last[0].load_state_dict(mid_states[1])
    tail, end_states = lockstep(last, None)
    assert len(end_states[0]["segments"]) == 2
    delivered = [k for part in head + mid + tail for k in part]
    check_no_repeats_no_loss(delivered, every, allowed_loss=len(every) % 2 + 2)


def test_resume_on_another_world_size_with_workers_and_pad(uneven: Path) -> None:
    every = everything(uneven)
    head, states = lockstep(world(uneven, 2, remainder="pad", workers=2), 6)
    resumed = world(uneven, 3, remainder="pad", workers=1)
    for loader in resumed:
        loader.load_state_dict(states[1])
    tail, _ = lockstep(resumed, None)
    delivered = [k for part in head + tail for k in part]
    # "pad" repeats instead of dropping: at most old-1 (first run) + new-1 (resumed split) repeats.
    assert set(delivered) == every
    assert len(delivered) - len(every) <= 1 + 2


def test_rank_state_on_the_same_world_size_must_be_its_own(uneven: Path) -> None:
    _, states = lockstep(world(uneven, 2), 2)
    other = world(uneven, 2)[1]
    with pytest.raises(Exception, match="rank=0"):
        other.load_state_dict(states[0])


def test_rows_pieces_split_and_cut_by_sample() -> None:
    counts = [10, 10]
    pieces = [Piece.of_rows(0, [7, 2, 5]), Piece(1, 3), Piece.of_rows(0, [9])]
    assert pieces[0] == Piece(0, 2, 6, (2, 5, 7))
    assert [p.size(counts) for p in pieces] == [3, 7, 1]
    assert cut(pieces, counts, 1, 5) == [Piece.of_rows(0, [5, 7]), Piece(1, 3, 2)]
    shares = [rank_share(pieces, counts, rank=r, world_size=3) for r in range(3)]
    flat = [(p.shard, i) for share in shares for p in share for i in p.indices(counts)]
    assert len(flat) == 9 and len(set(flat)) == 9  # 11 samples, 2 dropped, none twice


# --------------------------------------------------------------------- real process groups


def _rank_main(rank: int, world_size: int, port: int, root: str, out: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        ds = StreamingDataset(root, shuffle=True, seed=9, shuffle_buffer=24)  # rank, world from the group
        ds.set_epoch(1)
        loader = DataLoader(ds, batch_size=5, num_streams=3)
        state_file = Path(out, "state.json")
        if state_file.exists():
            loader.load_state_dict(json.loads(state_file.read_text()))
        got = []
        for k, batch in enumerate(loader):
            got += ids(batch)
            if k + 1 == steps:
                if rank == 0:  # the usual pattern: only rank 0 writes the checkpoint
                    state_file.write_text(json.dumps(loader.state_dict()))
                break
        counts: list[Any] = [None] * world_size
        dist.all_gather_object(counts, len(got))
        Path(out, f"w{world_size}-rank{rank}.json").write_text(json.dumps({"got": got, "counts": counts}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_two_ranks_checkpoint_then_three_ranks_finish_the_epoch(uneven: Path, tmp_path: Path) -> None:
    every = everything(uneven)
    for world_size, steps in ((2, 4), (3, -1)):
        mp.start_processes(
            _rank_main,
            args=(world_size, free_port(), str(uneven), str(tmp_path), steps),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
    parts = [json.loads((tmp_path / f"w2-rank{r}.json").read_text()) for r in range(2)]
    parts += [json.loads((tmp_path / f"w3-rank{r}.json").read_text()) for r in range(3)]
    assert [len(p["got"]) for p in parts[:2]] == [20, 20]
    assert len(set(parts[2]["counts"])) == 1, "the three ranks got equal shares"
    delivered = [k for p in parts for k in p["got"]]
    check_no_repeats_no_loss(delivered, every, allowed_loss=len(every) % 2 + 2)
    assert os.path.exists(tmp_path / "state.json")
