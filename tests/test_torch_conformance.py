"""fastfeed.DataLoader side by side with torch.utils.data.DataLoader: the same batches, errors,
warnings, attributes and len() for the same dataset, sampler, seed and arguments.

The reference is torch itself (``default_collate`` and ``torch.utils.data.DataLoader`` from the
installed torch), run in the same test on the same input. Sample structures come from
hypothesis strategies over nested containers (dicts, lists, tuples, namedtuples, custom mappings
and sequences) of tensors of every dtype, numpy arrays and scalars, Python numbers, strings,
bytes and ``None``; a drawn batch is sometimes made inconsistent on purpose (a shape, a dtype, a
missing key, a length), where both must raise the same error.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, IterableDataset, default_collate

import fastfeed
from batch_compare import assert_same_batch
from fastfeed.batch.assemble import Arena
from fastfeed.batch.collate import collate_into

# ------------------------------------------------------------------------------ sample structures


class Point(NamedTuple):
    x: Any
    y: Any


class FrozenMap(Mapping[str, Any]):
    """An immutable custom Mapping: torch rebuilds it by calling its type."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FrozenMap) and self._data == other._data


class TaggedList(list):  # type: ignore[type-arg]
    """A list subclass with an attribute: torch copies it and assigns items in place."""

    tag = "t"


class Pair(Sequence[Any]):
    """An immutable custom Sequence whose constructor takes an iterable."""

    def __init__(self, items: Any) -> None:
        self._items = tuple(items)

    def __getitem__(self, i: Any) -> Any:
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)


TENSOR_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip
NUMPY_DTYPES = [
    np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64, np.float16,
    np.float32, np.float64, np.complex64, np.complex128,
]  # fmt: skip
NUMPY_SCALARS = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16, np.float32, np.float64]


def _tensor(rng: np.random.Generator, dtype: torch.dtype, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    raw = np.asarray(rng.standard_normal(shape) * 100)
    if dtype == torch.bool:
        a = raw > 0
    elif dtype.is_complex:
        a = raw + 1j * np.flip(raw)
    elif dtype.is_floating_point:
        a = raw
    else:
        info = torch.iinfo(dtype)
        a = rng.integers(max(info.min, -(2**62)), min(info.max, 2**62), size=shape)
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(a))).to(dtype)
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1).contiguous().transpose(0, 1)  # same shape, non-contiguous strides
    elif layout == "sliced" and t.dim() >= 1:
        t = torch.cat([t, t]).narrow(0, t.shape[0], t.shape[0]) if t.shape[0] else t
    return t


def _array(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...], layout: str) -> np.ndarray:
    raw = np.asarray(rng.standard_normal(shape) * 100)
    a = (raw > 0) if dtype is np.bool_ else raw.astype(dtype) if np.dtype(dtype).kind in "fc" else None
    if a is None:
        info = np.iinfo(dtype)
        a = rng.integers(max(info.min, -(2**62)), min(info.max, 2**62), size=shape).astype(dtype)
    a = np.asarray(a)
    if layout == "transposed" and a.ndim >= 2:
        a = np.asfortranarray(a)
    elif layout == "reversed" and a.ndim >= 1:
        a = a[::-1]  # a negative stride: torch.as_tensor refuses it, so must fastfeed
    return a


@st.composite
def schemas(draw: st.DrawFn, depth: int = 0) -> Any:
    """A sample structure: leaves say what to make, containers hold child schemas."""
    leaves = st.one_of(
        st.tuples(
            st.just("tensor"),
            st.sampled_from(TENSOR_DTYPES),
            st.lists(st.integers(0, 3), max_size=3).map(tuple),
            st.sampled_from(["contiguous", "contiguous", "transposed", "sliced"]),
        ),
        st.tuples(
            st.just("array"),
            st.sampled_from(NUMPY_DTYPES),
            st.lists(st.integers(0, 3), max_size=3).map(tuple),
            st.sampled_from(["contiguous", "contiguous", "transposed", "reversed"]),
        ),
        st.tuples(st.just("npscalar"), st.sampled_from(NUMPY_SCALARS)),
        st.tuples(st.sampled_from(["int", "float", "bool", "str", "bytes", "none", "grad"])),
    )
    if depth >= 2:
        return draw(leaves)
    children = st.lists(schemas(depth + 1), min_size=1, max_size=3)
    return draw(
        st.one_of(
            leaves,
            leaves,
            st.tuples(st.sampled_from(["dict", "ordered", "frozen"]), children),
            st.tuples(st.sampled_from(["list", "tuple", "tagged", "pair"]), children),
            st.tuples(st.just("point"), st.lists(schemas(depth + 1), min_size=2, max_size=2)),
        )
    )


def make(schema: Any, rng: np.random.Generator) -> Any:
    """One sample of ``schema`` (random values, the schema's shapes and dtypes)."""
    kind = schema[0]
    if kind == "tensor":
        return _tensor(rng, schema[1], schema[2], schema[3])
    if kind == "array":
        return _array(rng, schema[1], schema[2], schema[3])
    if kind == "npscalar":
        return schema[1](rng.integers(0, 100))
    if kind == "int":
        return int(rng.integers(-(2**40), 2**40))
    if kind == "float":
        return float(rng.standard_normal())
    if kind == "bool":
        return bool(rng.integers(0, 2))
    if kind == "str":
        return "s" * int(rng.integers(0, 4))
    if kind == "bytes":
        return bytes(rng.integers(0, 256, size=int(rng.integers(0, 5)), dtype=np.uint8))
    if kind == "none":
        return None
    if kind == "grad":
        return torch.tensor(rng.standard_normal(2), requires_grad=True)
    values = [make(child, rng) for child in schema[1]]
    if kind in ("dict", "ordered", "frozen"):
        items = {f"k{i}": v for i, v in enumerate(values)}
        return {"dict": dict, "ordered": collections.OrderedDict, "frozen": FrozenMap}[kind](items)
    if kind == "point":
        return Point(*values)
    return {"list": list, "tuple": tuple, "tagged": TaggedList, "pair": Pair}[kind](values)


def perturb(sample: Any, how: str, rng: np.random.Generator) -> Any:
    """Make one sample inconsistent with the others (a leaf's shape or dtype, a key, a length)."""
    if isinstance(sample, torch.Tensor):
        if how == "shape" and sample.dim():
            return torch.zeros((*sample.shape[:-1], sample.shape[-1] + 1))
        return torch.zeros(sample.shape, dtype=torch.float64) if how == "dtype" else sample
    if isinstance(sample, np.ndarray):
        if how == "shape":
            return np.zeros((*sample.shape, 1))
        return np.zeros(sample.shape, np.int8) if how == "dtype" else sample
    if isinstance(sample, dict) and sample:
        key = next(iter(sample))
        if how == "key":
            return {k: v for k, v in sample.items() if k != key}
        return {**sample, key: perturb(sample[key], how, rng)}
    if type(sample) is list and sample:
        return sample[:-1] if how == "length" else [perturb(sample[0], how, rng), *sample[1:]]
    return None if how == "none" else sample


def outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as exc:
        return "error", (type(exc), str(exc))


def assert_same_outcome(got: tuple[str, Any], want: tuple[str, Any]) -> None:
    assert got[0] == want[0], f"fastfeed: {got}, torch: {want}"
    if got[0] == "error":
        assert got[1] == want[1]
    else:
        assert_same_batch(got[1], want[1])


# ------------------------------------------------------------------------------ collation


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schema=schemas(),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    fault=st.sampled_from([None, None, None, "shape", "dtype", "key", "length", "none"]),
)
def test_collate_into_is_default_collate(schema: Any, batch: int, seed: int, fault: str | None) -> None:
    rng = np.random.default_rng(seed)
    samples = [make(schema, rng) for _ in range(batch)]
    if fault is not None:
        samples[-1] = perturb(samples[-1], fault, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's (not ours): non-writable arrays, ComplexHalf
        want = outcome(lambda: default_collate(samples))
        arena = Arena(0)
        got = outcome(lambda: collate_into(samples, arena))
    assert_same_outcome(got, want)
    if got[0] == "ok":
        # Tensors of the fast paths view the arena: one region, pinned or shared like it.
        base = arena.tensor.untyped_storage().data_ptr()
        in_arena = [t for t in _tensors(got[1]) if t.untyped_storage().data_ptr() == base]
        assert all(t.is_contiguous() for t in in_arena)


def _tensors(batch: Any) -> list[torch.Tensor]:
    from fastfeed.batch.assemble import tree_leaves

    return tree_leaves(batch)


@pytest.mark.parametrize(
    "sample",
    [
        torch.tensor(3),
        np.float32(1.5),
        np.int64(4),
        np.array(2.0),
        torch.ones(2, dtype=torch.bfloat16),
        {"a": np.bool_(True), "b": [np.float16(1), 2]},
        Point(torch.zeros(0, 3), "z"),
    ],
    ids=["0d-tensor", "np-float32", "np-int64", "0d-array", "bf16", "np-bool-in-dict", "empty-tensor"],
)
def test_reported_shapes_and_dtypes(sample: Any) -> None:
    """The cases users reported: labels of shape (B,) not (B, 1), float32 stays float32, bf16."""
    samples = [sample] * 4
    assert_same_batch(collate_into(samples, Arena(0)), default_collate(samples))


def test_fields_that_fast_paths_take_view_one_arena() -> None:
    samples = [
        {"img": torch.rand(3, 4, 4), "arr": np.ones(5, np.float32), "label": i, "w": np.float32(i)} for i in range(8)
    ]
    arena = Arena(0)
    batch = collate_into(samples, arena)
    ptr = arena.tensor.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == ptr for t in batch.values())
    assert_same_batch(batch, default_collate(samples))


def test_a_field_that_needs_torch_falls_back_alone() -> None:
    """A gradient-carrying field goes through torch.stack (its result keeps the autograd graph);
    the other fields still land in the arena."""
    samples = [{"w": torch.ones(2, requires_grad=True), "x": np.zeros(3)} for _ in range(3)]
    arena = Arena(0)
    batch = collate_into(samples, arena)
    assert batch["w"].requires_grad and batch["w"].grad_fn is not None
    assert batch["x"].untyped_storage().data_ptr() == arena.tensor.untyped_storage().data_ptr()
    assert_same_batch(batch, default_collate(samples))


def test_types_registered_in_torchs_collate_map_are_honoured() -> None:
    from torch.utils.data._utils.collate import default_collate_fn_map

    class Box:
        def __init__(self, v: int) -> None:
            self.v = v

    def collate_box(batch: list[Box], *, collate_fn_map: Any = None) -> torch.Tensor:
        return torch.tensor([b.v * 10 for b in batch])

    default_collate_fn_map[Box] = collate_box
    try:
        samples = [{"b": Box(i), "x": i} for i in range(3)]
        assert_same_batch(collate_into(samples, Arena(0)), default_collate(samples))
    finally:
        del default_collate_fn_map[Box]


# ------------------------------------------------------------------------------ loaders side by side


class ListDataset(Dataset[Any]):
    def __init__(self, samples: list[Any], fail_at: set[int] | None = None) -> None:
        self.samples = samples
        self.fail_at = fail_at or set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        if i in self.fail_at:
            raise ValueError(f"sample {i} is broken")
        return self.samples[i]


class ListIterable(IterableDataset[Any]):
    """Splits its samples across workers, as a well-behaved iterable dataset does."""

    def __init__(self, samples: list[Any], length: int | None = None) -> None:
        self.samples = samples
        self.length = length

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        step, first = (info.num_workers, info.id) if info is not None else (1, 0)
        return iter(self.samples[first::step])

    def __len__(self) -> int:
        return self.length if self.length is not None else len(self.samples)


def both(dataset: Any, seed: int = 0, **kwargs: Any) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """Every ``next()`` outcome (a batch, or the error it raised) of torch's loader and of
    fastfeed's over the same dataset and arguments, each started from the same RNG states."""
    runs = []
    for cls in (torch.utils.data.DataLoader, fastfeed.DataLoader):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        kw = dict(kwargs)
        if "generator" in kw:
            kw["generator"] = torch.Generator().manual_seed(seed)
        loader = cls(dataset, **kw)
        it = iter(loader)
        results = []
        for _ in range(1000):
            try:
                results.append(("ok", next(it)))
            except StopIteration:
                break
            except Exception as exc:
                results.append(("error", (type(exc), str(exc).split("\n")[-1] or str(exc))))
        runs.append(results)
        if isinstance(loader, fastfeed.DataLoader):
            loader.close()
    return runs[0], runs[1]


def assert_same_runs(ours: list[Any], theirs: list[Any]) -> None:
    assert len(ours) == len(theirs), f"fastfeed gave {len(ours)} results, torch {len(theirs)}"
    for got, want in zip(ours, theirs, strict=True):
        assert_same_outcome(got, want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schema=schemas(),
    n=st.integers(1, 13),
    batch_size=st.one_of(st.none(), st.integers(1, 5)),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_in_process_batches_match_torch(
    schema: Any, n: int, batch_size: int | None, shuffle: bool, drop_last: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    ds = ListDataset([make(schema, rng) for _ in range(n)])
    kwargs: dict[str, Any] = {"batch_size": batch_size, "shuffle": shuffle}
    if batch_size is not None:
        kwargs["drop_last"] = drop_last
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs, ours = both(ds, seed=seed, **kwargs)
    assert_same_runs(ours, theirs)
    assert len(fastfeed.DataLoader(ds, **kwargs)) == len(torch.utils.data.DataLoader(ds, **kwargs))


def _mixed(n: int) -> list[Any]:
    rng = np.random.default_rng(n)
    return [
        {
            "img": torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(i)),
            "bf": torch.full((2,), i, dtype=torch.bfloat16),
            "label": torch.tensor(i % 3),
            "np": np.float32(i) / 3,
            "arr": rng.integers(0, 9, size=(2, 2)).astype(np.int16),
            "pair": (i, f"n{i}"),
            "point": Point(np.array(i), [i, float(i)]),
            "raw": bytes([i % 256]) * (i % 4),
            "empty": torch.zeros(0, 2),
        }
        for i in range(n)
    ]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("persistent", [False, True])
def test_worker_batches_match_torch(context: str, persistent: bool) -> None:
    ds = ListDataset(_mixed(23))
    kwargs = {
        "batch_size": 4, "shuffle": True, "generator": True, "num_workers": 2, "multiprocessing_context": context,
        "persistent_workers": persistent,
    }  # fmt: skip
    theirs, ours = both(ds, **kwargs)
    assert_same_runs(ours, theirs)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("persistent", [False, True])
def test_a_batch_sampler_with_workers_matches_torch(persistent: bool) -> None:
    batches = [tuple(range(i, i + 2)) for i in range(0, 20, 5)] + [(3, 1, 4), (15,)]
    theirs, ours = both(ListDataset(_mixed(20)), batch_sampler=batches, num_workers=2, persistent_workers=persistent)
    assert len(ours) == len(batches)
    assert_same_runs(ours, theirs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])
def test_batches_of_empty_tensors_match_torch(workers: int) -> None:
    """Nothing but zero-size tensors: the batch's arena region is empty."""
    theirs, ours = both(ListDataset([torch.empty(0)] * 9), batch_size=4, num_workers=workers)
    assert [b.shape for _, b in ours] == [torch.Size([4, 0])] * 2 + [torch.Size([1, 0])]
    assert_same_runs(ours, theirs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_torchvision_style_samples_match_torch(workers: int) -> None:
    """``(image_tensor, int)`` samples, as torchvision datasets give them: a list of an image
    batch ``[B, C, H, W]`` and labels ``[B]``."""
    samples = [(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)), i % 10) for i in range(13)]
    theirs, ours = both(ListDataset(samples), batch_size=5, shuffle=True, generator=True, num_workers=workers)
    images, labels = ours[0][1]
    assert type(ours[0][1]) is list and images.shape == (5, 3, 8, 8) and labels.shape == (5,)
    assert labels.dtype == torch.int64
    assert_same_runs(ours, theirs)


class WorkerRandom(Dataset[Any]):
    """Random augmentation drawn in the workers from torch's, numpy's and Python's RNGs."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> Any:
        info = torch.utils.data.get_worker_info()
        return {
            "t": torch.rand(2),
            "n": np.random.rand(),
            "p": random.random(),
            "seed": info.seed if info is not None else -1,
            "id": info.id if info is not None else -1,
        }


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [0, 2])
def test_random_transforms_draw_what_they_draw_under_torch(workers: int) -> None:
    """Worker seeds (and the global RNG, without workers) are torch's, epoch after epoch."""
    for cls_runs in [both(WorkerRandom(), seed=5, batch_size=3, num_workers=workers, shuffle=True)]:
        theirs, ours = cls_runs
        assert_same_runs(ours, theirs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_one_batch_does_not_end_the_epoch(workers: int) -> None:
    ds = ListDataset(list(range(20)), fail_at={5, 13})
    theirs, ours = both(ds, batch_size=3, num_workers=workers)
    assert [kind for kind, _ in ours].count("error") == 2
    assert_same_runs(ours, theirs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_iterable_datasets_match_torch(workers: int, batch_size: int | None) -> None:
    ds = ListIterable(_mixed(11))
    theirs, ours = both(ds, batch_size=batch_size, num_workers=workers)
    assert_same_runs(ours, theirs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_an_iterable_dataset_longer_than_its_len_warns_as_torch_does(workers: int) -> None:
    ds = ListIterable(list(range(8)), length=2)
    messages = []
    for cls in (torch.utils.data.DataLoader, fastfeed.DataLoader):
        loader = cls(ds, batch_size=1, num_workers=workers)
        assert len(loader) == 2
        with pytest.warns(UserWarning, match="was reported to be 2") as record:
            assert len(list(loader)) == 8
        messages.append(sorted({str(w.message) for w in record if "reported" in str(w.message)}))
    assert messages[0] == messages[1]


# ------------------------------------------------------------------------------ the public surface


def test_it_is_a_torch_dataloader() -> None:
    loader = fastfeed.DataLoader(ListDataset([1, 2]))
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert fastfeed.DataLoader[int] is not None  # subscriptable, like torch's


ATTRIBUTES = [
    "dataset", "batch_size", "drop_last", "num_workers", "collate_fn", "generator", "persistent_workers",
    "pin_memory", "pin_memory_device", "prefetch_factor", "timeout", "worker_init_fn", "in_order",
    "multiprocessing_context", "_dataset_kind", "_auto_collation",
]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"batch_size": 4, "shuffle": True, "drop_last": True},
        {"batch_size": None},
        {"batch_sampler": [[0, 1], [2]]},
        {"num_workers": 2, "prefetch_factor": 3, "persistent_workers": True, "multiprocessing_context": "spawn"},
        {"sampler": [3, 2, 1], "batch_size": 2, "timeout": 5},
    ],
)
def test_attributes_and_len_are_torchs(kwargs: dict[str, Any]) -> None:
    ds = ListDataset(list(range(10)))
    ours, theirs = fastfeed.DataLoader(ds, **kwargs), torch.utils.data.DataLoader(ds, **kwargs)
    for name in ATTRIBUTES:
        a, b = getattr(ours, name), getattr(theirs, name)
        if name == "multiprocessing_context" and a is not None:
            assert a.get_start_method() == b.get_start_method()
        else:
            assert a == b, name
    for name in ("sampler", "batch_sampler"):
        assert type(getattr(ours, name)) is type(getattr(theirs, name)), name
    assert len(ours) == len(theirs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": -1},
        {"num_workers": -1},
        {"multiprocessing_context": "fork"},
        {"multiprocessing_context": "nonsense", "num_workers": 1},
        {"sampler": [0, 1], "shuffle": True},
        {"batch_sampler": [[0]], "batch_size": 2},
        {"batch_sampler": [[0]], "drop_last": True},
        {"batch_size": None, "drop_last": True},
        {"prefetch_factor": 2},
        {"persistent_workers": True},
        {"num_workers": 1, "prefetch_factor": -1},
    ],
)
def test_invalid_arguments_raise_torchs_errors_at_construction(kwargs: dict[str, Any]) -> None:
    ds = ListDataset(list(range(4)))
    want = outcome(lambda: torch.utils.data.DataLoader(ds, **kwargs))
    got = outcome(lambda: fastfeed.DataLoader(ds, **kwargs))
    assert want[0] == got[0] == "error"
    assert got[1] == want[1]


READ_ONLY = """
import sys, warnings, numpy as np, torch, fastfeed
class DS(torch.utils.data.Dataset):
    def __len__(self): return 4
    def __getitem__(self, i):
        a = np.full(3, i, np.float32); a.setflags(write=False); return a
cls = torch.utils.data.DataLoader if sys.argv[1] == "torch" else fastfeed.DataLoader
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        batches = [b.tolist() for b in cls(DS(), batch_size=2)]
print(repr(([str(w.message) for w in caught], batches)))
"""


def test_read_only_arrays_give_torchs_warning_once() -> None:
    """torch.as_tensor warns (once per process) about a read-only array, and default_collate
    calls it: so does fastfeed's collation, whose fast path does not otherwise need it. Each in
    a fresh process, as the warning is shown once per process."""
    import ast
    import subprocess
    import sys

    results = [
        ast.literal_eval(
            subprocess.run(
                [sys.executable, "-c", READ_ONLY, kind], capture_output=True, text=True, timeout=120, check=True
            ).stdout
        )
        for kind in ("torch", "fastfeed")
    ]
    assert len(results[0][0]) == 1 and "not writable" in results[0][0][0]
    assert results[1] == results[0]


def test_a_timeout_without_workers_is_refused_when_iteration_starts() -> None:
    """torch accepts it at construction and fails with a bare AssertionError at iter(); fastfeed
    fails at the same point, with an error that says what to do."""
    ds = ListDataset([1, 2])
    with pytest.raises(AssertionError):
        iter(torch.utils.data.DataLoader(ds, timeout=5))
    with pytest.raises(fastfeed.ConfigError, match="timeout=5 applies to worker processes"):
        iter(fastfeed.DataLoader(ds, timeout=5))


@pytest.mark.parametrize("kwargs", [{"shuffle": True}, {"sampler": [0]}, {"batch_sampler": [[0]]}])
def test_iterable_datasets_refuse_what_torch_refuses(kwargs: dict[str, Any]) -> None:
    ds = ListIterable([1, 2])
    want = outcome(lambda: torch.utils.data.DataLoader(ds, **kwargs))
    assert want[0] == "error"
    assert outcome(lambda: fastfeed.DataLoader(ds, **kwargs))[1] == want[1]


@pytest.mark.parametrize(
    "attr", ["batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers"]
)
def test_attributes_cannot_be_reassigned(attr: str) -> None:
    ds = ListDataset([1, 2, 3])
    errors = []
    for cls in (torch.utils.data.DataLoader, fastfeed.DataLoader):
        loader = cls(ds, batch_size=2)
        with pytest.raises(ValueError) as info:
            setattr(loader, attr, getattr(loader, attr))
        errors.append(str(info.value).replace(cls.__name__, "DataLoader"))
    assert errors[0] == errors[1]


@pytest.mark.timeout(120)
def test_too_many_workers_warns_when_torch_warns() -> None:
    """At construction and again when iter() starts the workers; not when batches are taken."""
    n = (torch._utils.cpu_count() or os.cpu_count() or 1) + 1  # type: ignore[attr-defined]
    for cls in (torch.utils.data.DataLoader, fastfeed.DataLoader):
        with pytest.warns(UserWarning, match=f"will create {n} worker processes"):
            loader = cls(ListDataset(list(range(8))), num_workers=n)
        with pytest.warns(UserWarning, match=f"will create {n} worker processes"):
            it = iter(loader)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len(list(it)) == 8
        if isinstance(loader, fastfeed.DataLoader):
            loader.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_shuffle_applies_to_an_iterdatapipe(workers: int, persistent: bool) -> None:
    """The loader seeds a datapipe's shuffle from torch's RNG each epoch, as torch's does."""
    datapipes = pytest.importorskip("torch.utils.data.datapipes.iter")
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls in (torch.utils.data.DataLoader, fastfeed.DataLoader):
            pipe = datapipes.IterableWrapper(range(20)).shuffle().sharding_filter()
            loader = cls(pipe, batch_size=5, shuffle=True, num_workers=workers, persistent_workers=persistent)
            epochs = []
            for seed in (3, 3, 4):
                torch.manual_seed(seed)
                epochs.append([b.tolist() for b in loader])
            runs.append(epochs)
            if isinstance(loader, fastfeed.DataLoader):
                loader.close()
    ours = runs[1]
    assert sorted(x for batch in ours[0] for x in batch) == list(range(20))
    assert ours[0] == ours[1] != ours[2]
    assert runs[0] == ours


def test_cuda_device_without_cuda_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(fastfeed.ConfigError, match="CUDA is not available"):
        fastfeed.DataLoader(ListDataset([1]), device="cuda")
    with pytest.raises(fastfeed.ConfigError, match="not a device"):
        fastfeed.DataLoader(ListDataset([1]), device="gpu please")


class Killer(Dataset[int]):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> int:
        if i == 9 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return i


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attempt", range(3))
def test_a_worker_killed_by_a_signal_is_named_with_its_signal(attempt: int) -> None:
    """torch's wording (its SIGCHLD handler's), every time. torch's own loader gives it only when
    its handler wins a race with its main thread (otherwise "exited unexpectedly", or the
    ConnectionResetError of a shared-memory handover cut short), so it is not run here."""
    with pytest.raises(RuntimeError, match=r"^DataLoader worker \(pid \d+\) is killed by signal: Killed\. $") as info:
        for _ in fastfeed.DataLoader(Killer(), batch_size=2, num_workers=2):
            pass
    # The traceback (kept here) holds the iterator, yet its producer thread has stopped: the
    # error closed it, whichever thread saw the dead worker first (torch's SIGCHLD handler
    # raises in this one).
    deadline = time.monotonic() + 30
    while any(t.name == "fastfeed-batch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert info.value is not None and not any(t.name == "fastfeed-batch" for t in threading.enumerate())


class PidDataset(Dataset[int]):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return os.getpid()


@pytest.mark.timeout(120)
def test_persistent_workers_of_a_map_style_dataset_live_across_epochs() -> None:
    loader = fastfeed.DataLoader(PidDataset(), batch_size=2, num_workers=2, persistent_workers=True)
    epochs = [sorted({int(p) for b in loader for p in b}) for _ in range(3)]
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1] == epochs[2]
    it = iter(loader)
    next(it)  # an epoch ended early keeps them too, as torch's
    assert sorted({int(p) for b in loader for p in b}) == epochs[0]
    loader.close()


class Counting(IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(20))


@pytest.mark.timeout(120)
def test_persistent_workers_after_epochs_abandoned_at_their_first_batch_match_torch() -> None:
    # Each worker's first batches carry its slots' memory to the main process; an epoch ended
    # after one batch drops the others unseen (as torch's loader does), so a worker taking such
    # a slot back must send its memory again, or the next epoch fails on it.
    got = {}
    for cls in (torch.utils.data.DataLoader, fastfeed.DataLoader):
        loader = cls(Counting(), batch_size=1, num_workers=2, persistent_workers=True, prefetch_factor=4)
        try:
            for _ in range(3):
                it = iter(loader)
                next(it)
            got[cls] = sorted(int(x) for b in loader for x in b)
        finally:
            getattr(loader, "close", lambda: None)()
    assert got[fastfeed.DataLoader] == got[torch.utils.data.DataLoader] == sorted(list(range(20)) * 2)


class Slow(Dataset[int]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        import time

        time.sleep(2)
        return i


@pytest.mark.timeout(120)
def test_worker_timeout_is_torchs_error() -> None:
    errors = []
    for cls in (torch.utils.data.DataLoader, fastfeed.DataLoader):
        with pytest.raises(RuntimeError) as info:
            list(cls(Slow(), batch_size=1, num_workers=1, timeout=1))
        errors.append(str(info.value))
    assert errors[0] == errors[1] == "DataLoader timed out after 1 seconds"
