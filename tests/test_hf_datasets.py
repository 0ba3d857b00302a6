"""Hugging Face ``datasets`` objects through fastfeed.DataLoader, side by side with
torch.utils.data.DataLoader: the same batches, bit for bit (``assert_same_batch``), in the same
order, for the same dataset, arguments and seeds.

The reference is torch's own loader on the same in-memory ``datasets.Dataset`` (built with
``Dataset.from_dict``: int labels, float and bool scalars, float feature lists, strings, an
image-like nested list column), with no format, ``with_format("numpy")`` and
``with_format("torch")``. ``with_format("torch")`` gives 0-d tensors for scalar columns, which
must batch to labels of shape ``(B,)``, not ``(B, 1)`` (a reported bug). HF datasets implement
``__getitems__``, which torch's loader calls with a batch's indices; fastfeed must call it the same
way. Also: unbatched loading (``batch_size=None``), HF's ``IterableDataset`` (a torch
``IterableDataset``, sharded across workers), and the errors of a ragged column.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import fastfeed
from batch_compare import assert_same_batch

datasets = pytest.importorskip("datasets")

N = 23  # with batch_size 4: five full batches and a partial one
BATCH = 4
FORMATS = ["torch", "numpy", None]


@pytest.fixture(autouse=True)
def _no_tqdm_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets formats batches through tqdm bars (disabled ones too), and tqdm starts a monitor
    thread that outlives the test (a leak for conftest's ``_no_leaks``): no monitor thread."""
    import tqdm

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)


def flat(lists: Any) -> list[Any]:
    return list(itertools.chain.from_iterable(lists))


def columns(n: int = N) -> dict[str, list[Any]]:
    """Python values for ``Dataset.from_dict``: one row per sample."""
    rng = np.random.default_rng(1)
    return {
        "label": [i % 5 for i in range(n)],
        "weight": [float(rng.standard_normal()) for _ in range(n)],
        "flag": [bool(i % 3) for i in range(n)],
        "feat": [rng.standard_normal(4).astype(np.float32).tolist() for _ in range(n)],
        "text": [f"sample {i}" for i in range(n)],
        "img": [rng.integers(0, 256, size=(2, 3, 3)).tolist() for _ in range(n)],
    }


def make_dataset(typed: bool) -> Any:
    """``typed``: explicit features (ClassLabel, float32, fixed-length lists, an Array3D of
    uint8); otherwise the types ``from_dict`` infers (int64, float64, nested lists)."""
    if not typed:
        return datasets.Dataset.from_dict(columns())
    features = datasets.Features(
        {
            "label": datasets.ClassLabel(num_classes=5),
            "weight": datasets.Value("float32"),
            "flag": datasets.Value("bool"),
            "feat": datasets.Sequence(datasets.Value("float32"), length=4),
            "text": datasets.Value("string"),
            "img": datasets.Array3D(shape=(2, 3, 3), dtype="uint8"),
        }
    )
    return datasets.Dataset.from_dict(columns(), features=features)


def formatted(ds: Any, fmt: str | None) -> Any:
    return ds.with_format(fmt) if fmt is not None else ds


def outcomes(loader: Any, epochs: int) -> list[tuple[str, Any]]:
    """Every ``next()`` outcome over ``epochs`` iterations: ``("ok", batch)`` or ``("error", (type,
    last line of the message))``."""
    results: list[tuple[str, Any]] = []
    for _ in range(epochs):
        it = iter(loader)
        while True:
            try:
                results.append(("ok", next(it)))
            except StopIteration:
                break
            except Exception as exc:
                results.append(("error", (type(exc), str(exc).strip().split("\n")[-1])))
    return results


def both(dataset: Any, seed: int = 0, epochs: int = 2, **kwargs: Any) -> tuple[list[Any], list[Any]]:
    """(torch's outcomes, fastfeed's outcomes) over the same dataset and arguments, each loader
    started from the same global RNG states and given its own ``generator`` seeded with ``seed``."""
    runs = []
    for cls in (torch.utils.data.DataLoader, fastfeed.DataLoader):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        loader = cls(dataset, generator=torch.Generator().manual_seed(seed), **kwargs)
        try:
            runs.append(outcomes(loader, epochs))
        finally:
            if isinstance(loader, fastfeed.DataLoader):
                loader.close()
    return runs[0], runs[1]


def assert_same_outcomes(ours: list[Any], theirs: list[Any]) -> None:
    assert [kind for kind, _ in ours] == [kind for kind, _ in theirs], "batches and errors in the same places"
    for i, ((kind, got), (_, want)) in enumerate(zip(ours, theirs, strict=True)):
        if kind == "error":
            assert got == want, f"next() #{i}"
        else:
            assert_same_batch(got, want, f"batch{i}")


@pytest.mark.parametrize("typed", [False, True], ids=["inferred", "typed"])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f or "no-format")
def test_shuffled_batches_match_torch(fmt: str | None, num_workers: int, typed: bool) -> None:
    """Two shuffled epochs (a seeded generator) with and without workers: torch's batches, in
    torch's order, every field with torch's container type, dtype and shape."""
    ds = formatted(make_dataset(typed), fmt)
    theirs, ours = both(ds, seed=3, batch_size=BATCH, shuffle=True, num_workers=num_workers)
    assert len(theirs) == 2 * -(-N // BATCH) and all(kind == "ok" for kind, _ in theirs)
    assert_same_outcomes(ours, theirs)
    # Each epoch is a permutation of the dataset, and the two epochs' orders differ.
    labels = [batch["text"] for _, batch in ours]
    epochs = [flat(labels[: len(labels) // 2]), flat(labels[len(labels) // 2 :])]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(columns()["text"])
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("typed", [False, True], ids=["inferred", "typed"])
def test_torch_format_scalar_columns_batch_to_shape_b(typed: bool, num_workers: int) -> None:
    """The reported case: with_format("torch") gives 0-d tensors for scalar columns; a batch of
    them is a (B,) tensor (as torch.stack makes it), not (B, 1)."""
    ds = make_dataset(typed).with_format("torch")
    assert ds[0]["label"].shape == () and ds[0]["weight"].shape == ()
    theirs, ours = both(ds, epochs=1, batch_size=BATCH, num_workers=num_workers)
    assert_same_outcomes(ours, theirs)
    sizes = [BATCH] * (N // BATCH) + [N % BATCH]
    for (_, batch), size in zip(ours, sizes, strict=True):
        assert batch["label"].shape == (size,) and batch["label"].dtype == torch.int64
        assert batch["weight"].shape == (size,) and batch["weight"].dtype == torch.float32
        assert batch["flag"].shape == (size,) and batch["flag"].dtype == torch.bool
        assert batch["feat"].shape == (size, 4) and batch["feat"].dtype == torch.float32
        assert batch["img"].shape == (size, 2, 3, 3)
        assert isinstance(batch["text"], list) and len(batch["text"]) == size
    got = torch.cat([batch["label"] for _, batch in ours])
    assert got.tolist() == columns()["label"]


@pytest.fixture
def getitems_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[int]]]:
    """Records the index lists ``datasets.Dataset.__getitems__`` is called with (in this process)."""
    calls: list[list[int]] = []
    original = datasets.Dataset.__getitems__

    def recording(self: Any, keys: list[int]) -> list[Any]:
        calls.append(list(keys))
        return original(self, keys)

    monkeypatch.setattr(datasets.Dataset, "__getitems__", recording)
    yield calls


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f or "no-format")
def test_getitems_is_called_with_torchs_index_batches(fmt: str | None, getitems_calls: list[list[int]]) -> None:
    """Both loaders fetch a batch with one ``__getitems__`` call, with the same indices."""
    ds = formatted(make_dataset(typed=True), fmt)
    calls = []
    for cls in (torch.utils.data.DataLoader, fastfeed.DataLoader):
        getitems_calls.clear()
        loader = cls(ds, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(5))
        assert len(list(loader)) == -(-N // BATCH)
        if isinstance(loader, fastfeed.DataLoader):
            loader.close()
        calls.append(list(getitems_calls))
    assert calls[1] == calls[0]
    assert len(calls[0]) == -(-N // BATCH) and sorted(flat(calls[0])) == list(range(N))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f or "no-format")
def test_unbatched_samples_match_torch(fmt: str | None, num_workers: int) -> None:
    """``batch_size=None``: each sample on its own, through torch's ``default_convert``."""
    ds = formatted(make_dataset(typed=True), fmt)
    theirs, ours = both(ds, epochs=1, batch_size=None, shuffle=True, num_workers=num_workers)
    assert len(theirs) == N
    assert_same_outcomes(ours, theirs)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("fmt", ["torch", None], ids=lambda f: f or "no-format")
def test_hf_iterable_dataset_matches_torch(fmt: str | None, num_workers: int) -> None:
    """HF's IterableDataset (a torch IterableDataset; its 4 shards are split across workers by
    HF itself): torch's batches, in torch's order (workers' batches interleaved)."""
    ds = formatted(make_dataset(typed=True).to_iterable_dataset(num_shards=4), fmt)
    assert isinstance(ds, torch.utils.data.IterableDataset)
    theirs, ours = both(ds, epochs=1, batch_size=BATCH, num_workers=num_workers)
    assert all(kind == "ok" for kind, _ in theirs)
    assert sorted(flat(batch["text"] for _, batch in theirs)) == sorted(columns()["text"])
    assert_same_outcomes(ours, theirs)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("fmt", ["torch", None], ids=lambda f: f or "no-format")
def test_ragged_column_raises_torchs_error_for_each_batch(fmt: str | None, num_workers: int) -> None:
    """A list column of varying length cannot be collated: each batch raises torch's error (a
    size mismatch), and batches whose rows happen to agree are still delivered."""
    cols = columns()
    cols["ragged"] = [list(range(1 + (i // 4 if i < 8 else i % 3))) for i in range(N)]  # batches 0, 1 agree
    ds = formatted(datasets.Dataset.from_dict(cols), fmt)
    theirs, ours = both(ds, epochs=1, batch_size=BATCH, num_workers=num_workers)
    assert [kind for kind, _ in theirs] == ["ok", "ok", "error", "error", "error", "error"]
    assert_same_outcomes(ours, theirs)
