"""Exact mid-epoch resume: stop after any batch, save, restore into a fresh loader (any number of
workers, fresh process) and get exactly the batches the uninterrupted run had left, in order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastfeed import ConfigError, DataLoader, StreamingDataset
from fastfeed.testing.shards import write_synthetic_shards


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of different sizes, so streams end at different times."""
    root = tmp_path_factory.mktemp("uneven")
    for i, n in enumerate([23, 41, 9, 30, 17, 35]):
        (p,) = write_synthetic_shards(root / f"t{i}", num_shards=1, samples_per_shard=n, sample_bytes=700, seed=i)
        p.rename(root / f"shard-{i:06d}.tar")
    return root


def ids(batch: dict[str, object]) -> list[str]:
    """Sample identities (keys repeat across these shards: the URL is part of the identity)."""
    return [f"{u}#{k}" for u, k in zip(batch["__url__"], batch["__key__"], strict=True)]  # type: ignore[call-overload]


def keys_of(batches: list[dict[str, object]]) -> list[list[str]]:
    return [ids(b) for b in batches]


def make(root: Path, shuffle: bool, workers: int) -> DataLoader:
    ds = StreamingDataset(str(root), shuffle=shuffle, seed=4, shuffle_buffer=20)
    ds.set_epoch(2)
    return DataLoader(ds, batch_size=6, num_workers=workers, num_streams=4)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("before", "after"), [(0, 2), (2, 1)])
def test_resume_continues_exactly_with_other_worker_counts(
    uneven: Path, shuffle: bool, before: int, after: int
) -> None:
    full = keys_of(list(make(uneven, shuffle, before)))
    assert sorted(k for b in full for k in b) == sorted({k for b in full for k in b}), "no repeats"
    for stop in (5, len(full) - 1):
        loader = make(uneven, shuffle, before)
        it = iter(loader)
        head = [ids(next(it)) for _ in range(stop)]
        state = loader.state_dict()
        loader.close()
        assert head == full[:stop]
        fresh = make(uneven, shuffle, after)
        fresh.load_state_dict(json.loads(json.dumps(state)))  # a state survives JSON
        assert keys_of(list(fresh)) == full[stop:], f"stop={stop}"


def test_the_order_does_not_depend_on_num_workers(uneven: Path) -> None:
    orders = [keys_of(list(make(uneven, True, w))) for w in (0, 1, 2)]
    assert orders[0] == orders[1] == orders[2]


def test_resume_in_a_fresh_process(uneven: Path, tmp_path: Path) -> None:
    full = keys_of(list(make(uneven, True, 0)))
    loader = make(uneven, True, 0)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    loader.close()
    assert len(json.dumps(state)) < 2000, "the state is a few integers per stream"
    (tmp_path / "state.json").write_text(json.dumps(state))
    code = (
        "import json,sys\n"
        "from fastfeed import DataLoader, StreamingDataset\n"
        f"ds = StreamingDataset({str(uneven)!r}, shuffle=True, seed=4, shuffle_buffer=20)\n"
        "loader = DataLoader(ds, batch_size=6, num_workers=2, num_streams=4)\n"
        f"loader.load_state_dict(json.load(open({str(tmp_path / 'state.json')!r})))\n"
        "print(json.dumps([[f'{u}#{k}' for u, k in zip(b['__url__'], b['__key__'])] for b in loader]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == full[5:]


def test_resume_reads_only_what_is_left(uneven: Path) -> None:
    """Without shuffling a stream's block is one batch: resuming near the end of the epoch must
    not read the shards already consumed."""
    ds = StreamingDataset(str(uneven))
    loader = DataLoader(ds, batch_size=6, num_streams=2)
    it = iter(loader)
    total = len(list(DataLoader(StreamingDataset(str(uneven)), batch_size=6, num_streams=2)))
    for _ in range(total - 2):
        next(it)
    state = loader.state_dict()
    loader.close()
    resumed_ds = StreamingDataset(str(uneven))
    resumed = DataLoader(resumed_ds, batch_size=6, num_streams=2)
    resumed.load_state_dict(state)
    assert len(list(resumed)) == 2
    dataset_bytes = sum(s.size for s in resumed_ds.shards)
    assert resumed_ds.io_stats()["bytes_fetched"] < dataset_bytes / 2


def test_mismatched_state_is_a_clear_error(uneven: Path) -> None:
    loader = make(uneven, True, 0)
    next(iter(loader))
    state = loader.state_dict()
    loader.close()
    other = StreamingDataset(str(uneven), shuffle=True, seed=5, shuffle_buffer=20)
    with pytest.raises(ConfigError, match="seed"):
        DataLoader(other, batch_size=6, num_streams=4).load_state_dict(state)
    with pytest.raises(ConfigError, match="batch_size"):
        make_ds = StreamingDataset(str(uneven), shuffle=True, seed=4, shuffle_buffer=20)
        DataLoader(make_ds, batch_size=7, num_streams=4).load_state_dict(state)


def test_state_of_another_epoch_is_ignored(uneven: Path, caplog: pytest.LogCaptureFixture) -> None:
    loader = make(uneven, False, 0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    loader.close()
    fresh = make(uneven, False, 0)
    fresh.load_state_dict(state)
    fresh.dataset.set_epoch(3)
    assert len(keys_of(list(fresh))) == len(keys_of(list(make(uneven, False, 0))))
    assert "ignoring the loaded state" in caplog.text
