"""Exact mid-epoch resume: stop after any batch, save, restore into a fresh loader (any number of
workers, fresh process) and get exactly the batches the uninterrupted run had left, in order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, RandomSampler

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


# --------------------------------------------------------------- map-style datasets, collate_fn


class Numbers(Dataset[dict[str, Any]]):
    def __init__(self, n: int = 103) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"i": i, "x": np.full(3, i, dtype=np.int32)}


def indices(batches: list[Any]) -> list[list[int]]:
    return [b["i"].tolist() for b in batches]


def _first_key(samples: list[dict[str, Any]]) -> list[str]:
    return [f"{s['__url__']}#{s['__key__']}:{len(s['bin'])}" for s in samples]


@pytest.mark.parametrize(("before", "after"), [(0, 2), (2, 0)])
def test_map_style_shuffled_resume_continues_exactly(before: int, after: int) -> None:
    torch.manual_seed(123)
    full = indices(list(DataLoader(Numbers(), batch_size=8, shuffle=True, num_workers=before)))
    assert sorted(i for b in full for i in b) == list(range(103)) and full != sorted(full)
    torch.manual_seed(123)  # the same loader seed: the same epoch order
    loader = DataLoader(Numbers(), batch_size=8, shuffle=True, num_workers=before)
    it = iter(loader)
    head = [next(it)["i"].tolist() for _ in range(5)]
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()
    assert head == full[:5]
    torch.manual_seed(999)  # a fresh process would draw another seed: the state carries the order
    fresh = DataLoader(Numbers(), batch_size=8, shuffle=True, num_workers=after)
    fresh.load_state_dict(state)
    assert indices(list(fresh)) == full[5:]


def test_map_style_resume_in_a_later_epoch_with_a_collate_fn() -> None:
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"i": torch.tensor([s["i"] for s in samples])}

    torch.manual_seed(5)
    reference = DataLoader(Numbers(), batch_size=10, shuffle=True, collate_fn=collate)
    epochs = [indices(list(reference)) for _ in range(2)]
    assert epochs[0] != epochs[1]
    torch.manual_seed(5)
    loader = DataLoader(Numbers(), batch_size=10, shuffle=True, collate_fn=collate)
    list(loader)  # epoch 0
    it = iter(loader)
    head = [next(it)["i"].tolist() for _ in range(3)]
    state = loader.state_dict()
    assert head == epochs[1][:3]
    fresh = DataLoader(Numbers(), batch_size=10, shuffle=True, collate_fn=collate)
    fresh.load_state_dict(state)
    assert indices(list(fresh)) == epochs[1][3:]
    assert len(indices(list(fresh))) == 11, "the state applies to one iteration; the next is a whole epoch"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sampler_on_the_global_rng_resumes_exactly(workers: int) -> None:
    """RandomSampler without a generator draws its seed from torch's global generator: the saved
    state holds that generator's state, and a resumed run replays the draw without consuming
    anything from the global generator (so what the training loop draws next is unchanged)."""
    ds = Numbers()

    def make_loader() -> DataLoader:
        return DataLoader(ds, batch_size=4, sampler=RandomSampler(ds), num_workers=workers)

    torch.manual_seed(11)
    full = indices(list(make_loader()))
    torch.manual_seed(11)
    loader = make_loader()
    it = iter(loader)
    head = indices([next(it) for _ in range(3)])
    state = json.loads(json.dumps(loader.state_dict()))
    after_save = torch.get_rng_state()
    loader.close()
    assert head == full[:3]
    torch.manual_seed(999)  # a new process: some other global state, restored from the checkpoint
    torch.set_rng_state(after_save)
    fresh = make_loader()
    fresh.load_state_dict(state)
    assert indices(list(fresh)) == full[3:]
    assert torch.equal(torch.get_rng_state(), after_save), "the resumed epoch drew nothing from the global generator"


def test_a_state_that_does_not_fit_the_loader_is_refused() -> None:
    ds = Numbers()
    seeded = DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(1)))
    next(iter(seeded))
    state = seeded.state_dict()
    with pytest.raises(ConfigError, match="batch_size"):
        DataLoader(ds, batch_size=5, sampler=RandomSampler(ds, generator=torch.Generator())).load_state_dict(state)
    with pytest.raises(ConfigError, match="not a map-style loader state"):
        DataLoader(ds, batch_size=4).load_state_dict({"version": 2, "epoch": 0, "streams": {}})
    with pytest.raises(ConfigError, match="random generators"):
        DataLoader(ds, batch_size=4, shuffle=True).load_state_dict(state)


@pytest.mark.parametrize(("before", "after"), [(0, 2), (2, 1)])
def test_streaming_with_a_collate_fn_resumes_exactly(uneven: Path, before: int, after: int) -> None:
    def mk(workers: int) -> DataLoader:
        ds = StreamingDataset(str(uneven), shuffle=True, seed=4, shuffle_buffer=20)
        ds.set_epoch(2)  # as make() does
        return DataLoader(ds, batch_size=6, num_workers=workers, num_streams=4, collate_fn=_first_key)

    full = list(mk(before))
    plain = keys_of(list(make(uneven, True, 0)))
    # The same streams as without collate_fn, handed to it as WebDataset sample dicts.
    assert [[k.rsplit(":", 1)[0] for k in b] for b in full] == plain
    assert all(k.endswith(":700") for b in full for k in b)
    loader = mk(before)
    it = iter(loader)
    head = [next(it) for _ in range(4)]
    state = loader.state_dict()
    loader.close()
    assert head == full[:4]
    fresh = mk(after)
    fresh.load_state_dict(state)
    assert list(fresh) == full[4:]
