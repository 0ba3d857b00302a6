"""Batch assembly: samples -> one batch written straight into a preallocated host arena.

Collation rules (the same shapes as ``torch.utils.data.default_collate`` where they overlap):

* ``bytes`` / ``bytearray`` / ``memoryview`` fields (encoded images, token runs, raw records)
  become one :class:`RaggedBytes`: a flat ``uint8`` tensor plus ``int64`` offsets, ready for
  GPU decode. It behaves like a sequence of ``bytes`` (``len``, indexing, iteration).
* numpy arrays and tensors of one shape and dtype are stacked into a ``[B, ...]`` tensor;
  Python ints, floats and bools become a 1-D ``int64`` / ``float64`` / ``bool`` tensor.
* ``str`` fields (``__key__``, ``__url__``) and anything else stay Python lists.
* dicts collate per key, tuples/lists per position, recursively.

All tensor bytes of a batch are copied by the native gather (:mod:`fastfeed.gather`, GIL
released) into one :class:`Arena` region, so a batch costs no per-batch allocation and, when the
arena is pinned, no separate pinning copy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastfeed.errors import ConfigError
from fastfeed.gather import gather

__all__ = [
    "Arena",
    "ColumnBatch",
    "ColumnRun",
    "RaggedBytes",
    "TensorRef",
    "collate_columns_into",
    "collate_into",
    "from_layout",
    "nbytes_needed",
    "to_layout",
]

#: Alignment of every field inside an arena (bytes): cache lines, and enough for any dtype.
_ALIGN = 64

_BYTES_TYPES = (bytes, bytearray, memoryview)


@dataclass
class RaggedBytes:
    """``B`` variable-size byte strings: ``data[offsets[i]:offsets[i+1]]`` is item ``i``."""

    data: torch.Tensor
    offsets: torch.Tensor

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def __getitem__(self, index: int) -> bytes:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.data[lo:hi].cpu().numpy().tobytes()

    def __iter__(self) -> Iterator[bytes]:
        data = self.data.cpu().numpy()
        offsets = self.offsets.cpu().tolist()
        for lo, hi in itertools.pairwise(offsets):
            yield data[lo:hi].tobytes()

    def tolist(self) -> list[bytes]:
        """The items as a list of ``bytes`` (what torch's ``default_collate`` would give)."""
        return list(self)

    def lengths(self) -> torch.Tensor:
        """Length of each item, ``int64 [B]``."""
        return self.offsets[1:] - self.offsets[:-1]

    def to_ints(self) -> torch.Tensor:
        """Each item parsed as an ASCII decimal integer (WebDataset's ``.cls``, ``.idx``...):
        ``int64 [B]``, in one native pass, no per-item Python objects. Surrounding whitespace
        and a leading ``-`` or ``+`` are allowed; at most 18 digits.

        Raises:
            ValueError: an item that is not such an integer (the first one, named).
        """
        from fastfeed import _native

        data = self.data.cpu().contiguous().numpy()
        offsets = self.offsets.cpu().contiguous().numpy()
        out = np.empty(max(len(offsets) - 1, 0), dtype=np.int64)
        bad = _native.parse_ints(data, offsets, out) if len(out) else -1
        if bad >= 0:
            raise ValueError(f"item {bad} of the batch is not an integer: {self[bad]!r}")
        return torch.from_numpy(out)

    def _to_ints_py(self) -> torch.Tensor:
        """Reference for :meth:`to_ints` (tests)."""
        values = []
        for i, item in enumerate(self):
            text = item.decode("ascii", errors="replace").strip(" \t\n\r\x0b\x0c")
            digits = text[1:] if text[:1] in ("-", "+") else text
            if not (0 < len(digits) <= 18 and digits.isascii() and digits.isdigit()):
                raise ValueError(f"item {i} of the batch is not an integer: {item!r}")
            values.append(int(text))
        return torch.tensor(values, dtype=torch.int64)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RaggedBytes:
        """Both tensors moved to ``device``."""
        return RaggedBytes(
            self.data.to(device, non_blocking=non_blocking),
            self.offsets.to(device, non_blocking=non_blocking),
        )


class Arena:
    """A growable byte region that batches are written into.

    ``pin=True`` allocates page-locked memory (only when CUDA is available), so host-to-device
    copies can run asynchronously without a staging copy. ``shared=True`` allocates it in shared
    memory that torch can hand to another process by file descriptor (worker -> main). Growing
    reallocates (``generation`` counts it); callers reuse arenas so growth is rare.
    """

    def __init__(self, nbytes: int, *, pin: bool = False, shared: bool = False) -> None:
        self.pin = bool(pin and torch.cuda.is_available())
        self.shared = shared
        self.generation = 0
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self.array = self.tensor.numpy()
        self.grows = 0
        self.ensure(nbytes)

    @property
    def nbytes(self) -> int:
        return int(self.tensor.numel())

    def ensure(self, nbytes: int) -> None:
        """Make room for at least ``nbytes`` (contents are not preserved)."""
        if nbytes <= self.nbytes:
            return
        if self.nbytes:
            self.grows += 1
            nbytes = max(nbytes, int(self.nbytes * 1.5))
        nbytes = _round_up(max(nbytes, _ALIGN), 4096)
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        if self.shared:
            self.tensor.share_memory_()  # type: ignore[no-untyped-call]
        self.array = self.tensor.numpy()
        self.generation += 1


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


# ----------------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    """How one field of the batch is laid out in the arena."""

    kind: str  # "ragged" | "fixed" | "scalar" | "list" | "dict" | "tuple"
    nbytes: int = 0
    dtype: Any = None
    shape: tuple[int, ...] = ()
    children: Any = None
    seq_type: type | None = None


def _plan(items: Sequence[Any], path: str) -> _Plan:
    first = items[0]
    if isinstance(first, _BYTES_TYPES):
        total = 0
        for i, item in enumerate(items):
            if not isinstance(item, _BYTES_TYPES):
                raise _mixed(path, i, first, item)
            total += memoryview(item).nbytes
        return _Plan("ragged", nbytes=_round_up(total, _ALIGN) + _round_up(8 * (len(items) + 1), _ALIGN))
    if isinstance(first, np.ndarray | torch.Tensor):
        arrays = [_as_array(item, path, i) for i, item in enumerate(items)]
        dtype, shape = arrays[0].dtype, arrays[0].shape
        for i, arr in enumerate(arrays):
            if arr.shape != shape or arr.dtype != dtype:
                raise ConfigError(
                    f"field {path!r}: sample {i} has shape {tuple(arr.shape)} {arr.dtype}, sample 0 has "
                    f"{tuple(shape)} {dtype}",
                    hint="fixed-size fields must match within a batch; pad them or pass a collate_fn",
                )
        item_bytes = int(arrays[0].nbytes)
        return _Plan(
            "fixed",
            nbytes=_round_up(item_bytes * len(items), _ALIGN),
            dtype=dtype,
            shape=tuple(shape),
            children=arrays,
        )
    if isinstance(first, bool | int | float | np.generic) and not isinstance(first, str):
        dtype = _scalar_dtype(items, path)
        return _Plan("scalar", nbytes=_round_up(dtype.itemsize * len(items), _ALIGN), dtype=dtype)
    if isinstance(first, Mapping):
        keys = list(first.keys())
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or (list(item.keys()) != keys and set(item.keys()) != set(keys)):
                raise ConfigError(
                    f"field {path!r}: sample {i} has keys {sorted(item) if isinstance(item, Mapping) else item!r}, "
                    f"sample 0 has {sorted(keys)}",
                    hint="every sample of a batch needs the same fields; filter or pass a collate_fn",
                )
        children = {k: _plan([item[k] for item in items], f"{path}.{k}" if path else str(k)) for k in keys}
        return _Plan("dict", nbytes=sum(c.nbytes for c in children.values()), children=children)
    if isinstance(first, tuple | list) and not isinstance(first, str):
        width = len(first)
        if any(not isinstance(item, tuple | list) or len(item) != width for item in items):
            raise ConfigError(f"field {path!r}: samples have different lengths", hint="pass a collate_fn")
        columns = [_plan([item[j] for item in items], f"{path}[{j}]") for j in range(width)]
        return _Plan("tuple", nbytes=sum(c.nbytes for c in columns), children=columns, seq_type=type(first))
    return _Plan("list")


def _mixed(path: str, index: int, first: Any, item: Any) -> ConfigError:
    return ConfigError(
        f"field {path!r}: sample {index} is {type(item).__name__}, sample 0 is {type(first).__name__}",
        hint="every sample of a batch needs the same field types",
    )


def _as_array(item: Any, path: str, index: int) -> np.ndarray:
    if isinstance(item, torch.Tensor):
        if item.device.type != "cpu":
            raise ConfigError(f"field {path!r}: sample {index} is on {item.device}; samples must be CPU tensors")
        item = item.detach().resolve_conj().resolve_neg().numpy()
    elif not isinstance(item, np.ndarray):
        raise ConfigError(f"field {path!r}: sample {index} is {type(item).__name__}, expected an array")
    return np.ascontiguousarray(item)


def _scalar_dtype(items: Sequence[Any], path: str) -> np.dtype[Any]:
    kinds = {type(x) for x in items}
    if all(issubclass(k, bool | np.bool_) for k in kinds):
        return np.dtype(np.bool_)
    if all(issubclass(k, int | np.integer) and not issubclass(k, bool) for k in kinds):
        return np.dtype(np.int64)
    if all(issubclass(k, int | float | np.integer | np.floating) for k in kinds):
        return np.dtype(np.float64)
    raise ConfigError(f"field {path!r}: mixed scalar types {sorted(k.__name__ for k in kinds)}")


def nbytes_needed(samples: Sequence[Any]) -> int:
    """Arena bytes a batch of ``samples`` needs."""
    return _plan(samples, "").nbytes


# ----------------------------------------------------------------------------------- writing


def collate_into(samples: Sequence[Any], arena: Arena, make_base: Callable[[], torch.Tensor] | None = None) -> Any:
    """Collate ``samples`` into ``arena`` (grown if needed) and return the batch.

    Tensor fields of the batch are views of one base tensor over the arena (so their memory is
    the arena's: pinned if the arena is). ``make_base`` is called once the arena has its final
    size and returns that base tensor; the default is ``arena.tensor`` itself. A ring passes a
    factory whose tensor tells it when the batch's last view is gone.
    """
    if not samples:
        raise ConfigError("cannot collate an empty batch")
    plan = _plan(samples, "")
    arena.ensure(plan.nbytes)
    target = arena.tensor if make_base is None else make_base()
    cursor = [0]
    return _write(plan, samples, arena.array, target, cursor)


def _take(cursor: list[int], nbytes: int) -> int:
    start = cursor[0]
    cursor[0] = start + _round_up(nbytes, _ALIGN)
    return start


def _write(plan: _Plan, items: Sequence[Any], array: np.ndarray, tensor: torch.Tensor, cursor: list[int]) -> Any:
    kind = plan.kind
    if kind == "ragged":
        n = len(items)
        off_start = _take(cursor, 8 * (n + 1))
        offsets = array[off_start : off_start + 8 * (n + 1)].view(np.int64)
        total = sum(memoryview(x).nbytes for x in items)
        data_start = _take(cursor, total)
        gather(array, items, dst_offset=data_start, offsets=offsets)
        return RaggedBytes(
            tensor[data_start : data_start + total],
            tensor[off_start : off_start + 8 * (n + 1)].view(torch.int64),
        )
    if kind == "fixed":
        arrays = plan.children
        item_bytes = int(arrays[0].nbytes)
        start = _take(cursor, item_bytes * len(arrays))
        gather(array, arrays, dst_offset=start, item_size=item_bytes)
        out = tensor[start : start + item_bytes * len(arrays)]
        return out.view(_torch_dtype(plan.dtype)).view(len(arrays), *plan.shape)
    if kind == "scalar":
        dtype = plan.dtype
        start = _take(cursor, dtype.itemsize * len(items))
        array[start : start + dtype.itemsize * len(items)].view(dtype)[:] = items
        return tensor[start : start + dtype.itemsize * len(items)].view(_torch_dtype(dtype))
    if kind == "dict":
        return {
            k: _write(child, [item[k] for item in items], array, tensor, cursor) for k, child in plan.children.items()
        }
    if kind == "tuple":
        values = [
            _write(child, [item[j] for item in items], array, tensor, cursor) for j, child in enumerate(plan.children)
        ]
        return tuple(values) if plan.seq_type is tuple else values
    return list(items)


_DTYPES = {
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.complex64): torch.complex64,
    np.dtype(np.complex128): torch.complex128,
    np.dtype(np.uint16): torch.uint16,
    np.dtype(np.uint32): torch.uint32,
    np.dtype(np.uint64): torch.uint64,
}


def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    try:
        return _DTYPES[np.dtype(dtype)]
    except KeyError:
        raise ConfigError(
            f"dtype {dtype} has no torch equivalent", hint="convert the field or pass a collate_fn"
        ) from None


def tree_map_tensors(batch: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor (and both tensors of every RaggedBytes) in ``batch``."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if type(batch) in _LEAVES:
        return batch
    if isinstance(batch, RaggedBytes):
        # Not the dataclass constructor's type check: a layout's RaggedBytes holds TensorRefs.
        return RaggedBytes(fn(batch.data), fn(batch.offsets))
    if isinstance(batch, Mapping):
        return {k: tree_map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(tree_map_tensors(v, fn) for v in batch)
    if isinstance(batch, list):
        if batch and type(batch[0]) in _LEAVES and all(type(v) in _LEAVES for v in batch):
            return batch  # e.g. __key__ / __url__ columns: nothing to map, and nothing copied
        return [tree_map_tensors(v, fn) for v in batch]
    return batch


#: Types that hold no tensor (a fast exit from tree_map_tensors).
_LEAVES = frozenset({str, bytes, int, float, bool, type(None)})


# ----------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor of a batch lives inside its arena: byte offset, dtype and shape."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def to_layout(batch: Any, base: torch.Tensor) -> Any:
    """Replace every tensor of ``batch`` that views ``base`` by a :class:`TensorRef`.

    A layout plus the arena bytes is all it takes to rebuild the batch in another process or
    another buffer (:func:`from_layout`): one copy of one region, instead of one per field.
    """
    base_ptr = base.data_ptr()
    base_storage = base.untyped_storage().data_ptr()

    def ref(t: torch.Tensor) -> Any:
        if t.untyped_storage().data_ptr() != base_storage or not t.is_contiguous():
            return t
        return TensorRef(t.data_ptr() - base_ptr, t.numel() * t.element_size(), t.dtype, tuple(t.shape))

    return tree_map_tensors(batch, ref)


def from_layout(layout: Any, base: torch.Tensor) -> Any:
    """Rebuild a batch whose tensors are views of ``base`` (see :func:`to_layout`)."""
    if isinstance(layout, TensorRef):
        return base[layout.offset : layout.offset + layout.nbytes].view(layout.dtype).view(layout.shape)
    if isinstance(layout, RaggedBytes):
        return RaggedBytes(from_layout(layout.data, base), from_layout(layout.offsets, base))
    if isinstance(layout, Mapping):
        return {k: from_layout(v, base) for k, v in layout.items()}
    if isinstance(layout, tuple):
        return tuple(from_layout(v, base) for v in layout)
    if isinstance(layout, list):
        return [from_layout(v, base) for v in layout]
    return layout


def layout_extent(layout: Any) -> int:
    """Bytes of the arena a layout uses (end of its last tensor)."""
    if isinstance(layout, TensorRef):
        return layout.offset + layout.nbytes
    if isinstance(layout, RaggedBytes):
        return max(layout_extent(layout.data), layout_extent(layout.offsets))
    if isinstance(layout, Mapping):
        return max((layout_extent(v) for v in layout.values()), default=0)
    if isinstance(layout, tuple | list):
        return max((layout_extent(v) for v in layout), default=0)
    return 0


# ----------------------------------------------------------------------------------- columns


@dataclass
class ColumnRun:
    """Consecutive samples as spans of one buffer: ``fields[ext]`` is ``int64 [n, 2]``
    ``(offset, size)`` rows, ``(-1, 0)`` where a sample lacks ``ext``."""

    buffer: Any
    keys: list[str]
    url: str
    fields: dict[str, np.ndarray]


@dataclass
class ColumnBatch:
    """A batch of WebDataset samples in columnar form: runs of spans, no per-sample objects."""

    runs: list[ColumnRun]

    def __len__(self) -> int:
        return sum(len(run.keys) for run in self.runs)

    def samples(self) -> list[dict[str, Any]]:
        """The batch as WebDataset sample dicts (``__key__``, ``__url__``, ``bytes`` per
        extension), for a user ``collate_fn``; copies the bytes out of the shard buffers."""
        out: list[dict[str, Any]] = []
        for run in self.runs:
            view = memoryview(run.buffer).cast("B")
            exts = list(run.fields.items())
            for i, key in enumerate(run.keys):
                sample: dict[str, Any] = {"__key__": key, "__url__": run.url}
                for ext, spans in exts:
                    offset, size = int(spans[i, 0]), int(spans[i, 1])
                    if offset >= 0:
                        sample[ext] = bytes(view[offset : offset + size])
                out.append(sample)
        return out


def collate_columns_into(
    batch: ColumnBatch, arena: Arena, make_base: Callable[[], torch.Tensor] | None = None
) -> dict[str, Any]:
    """Collate a :class:`ColumnBatch` into ``arena``: the same batch :func:`collate_into` makes
    from the equivalent sample dicts (``__key__``/``__url__`` lists, a :class:`RaggedBytes` per
    extension), with one native span gather per field and run."""
    from fastfeed.columnar import gather_spans

    n = len(batch)
    if n == 0:
        raise ConfigError("cannot collate an empty batch")
    exts: list[str] = []
    for run in batch.runs:
        for ext in run.fields:
            if ext not in exts:
                exts.append(ext)
    sizes: dict[str, np.ndarray] = {}
    for ext in exts:
        parts = []
        for run in batch.runs:
            spans = run.fields.get(ext)
            if spans is None or (len(spans) and bool((spans[:, 0] < 0).any())):
                raise ConfigError(
                    f"field {ext!r} is missing from some samples of a batch ({run.url})",
                    hint="every sample of a batch needs the same fields; filter or pass a collate_fn",
                )
            parts.append(spans[:, 1])
        sizes[ext] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    total = sum(_round_up(8 * (n + 1), _ALIGN) + _round_up(int(s.sum()), _ALIGN) for s in sizes.values())
    arena.ensure(total)
    tensor = arena.tensor if make_base is None else make_base()
    array = arena.array
    out: dict[str, Any] = {
        "__key__": [key for run in batch.runs for key in run.keys],
        "__url__": [run.url for run in batch.runs for _ in run.keys],
    }
    cursor = [0]
    for ext in exts:
        off_start = _take(cursor, 8 * (n + 1))
        offsets = array[off_start : off_start + 8 * (n + 1)].view(np.int64)
        offsets[0] = 0
        np.cumsum(sizes[ext], out=offsets[1:])
        nbytes = int(offsets[-1])
        data_start = _take(cursor, nbytes)
        dst = data_start
        for run in batch.runs:
            dst += gather_spans(array, run.buffer, run.fields[ext], dst_offset=dst)
        out[ext] = RaggedBytes(
            tensor[data_start : data_start + nbytes], tensor[off_start : off_start + 8 * (n + 1)].view(torch.int64)
        )
    return out


def materialize_run(run: ColumnRun) -> ColumnRun:
    """A copy of ``run`` whose bytes live in a new compact buffer (to let its source go)."""
    from fastfeed.columnar import gather_spans

    total = sum(int(spans[:, 1].sum()) for spans in run.fields.values())
    buffer = bytearray(total)
    fields: dict[str, np.ndarray] = {}
    cursor = 0
    for ext, spans in run.fields.items():
        offsets = np.empty(len(spans) + 1, np.int64)
        gather_spans(buffer, run.buffer, spans, dst_offset=cursor, offsets=offsets)
        new = np.empty_like(spans)
        new[:, 0] = np.where(spans[:, 0] < 0, -1, offsets[:-1] + cursor)
        new[:, 1] = spans[:, 1]
        fields[ext] = new
        cursor += int(offsets[-1])
    return ColumnRun(buffer, run.keys, run.url, fields)
