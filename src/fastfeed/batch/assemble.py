"""Batches in host memory: arenas, ragged byte fields, batch trees and their layouts.

* :class:`Arena`: a growable byte region (pinned or shared) that batches are written into;
  :func:`fastfeed.batch.collate.collate_into` writes ``default_collate``'s batch into one.
* :class:`RaggedBytes`: ``B`` variable-size byte strings as one flat ``uint8`` tensor plus
  ``int64`` offsets (a :class:`~fastfeed.StreamingDataset`'s byte fields, ready for GPU decode).
* :func:`tree_map` walks a batch (dicts, sequences, namedtuples, custom containers) and rebuilds
  it with the same container types; :func:`to_layout` / :func:`from_layout` turn the tensors of
  a batch that view one arena into offsets and back, so a batch crosses to another process or
  device as one region.
* :class:`ColumnBatch` and :func:`collate_columns_into`: the columnar fast path of WebDataset
  samples (spans of the fetched shard bytes, no per-sample objects).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Mapping, MutableMapping, MutableSequence, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastfeed.errors import ConfigError

__all__ = [
    "ALIGN",
    "Arena",
    "ColumnBatch",
    "ColumnRun",
    "RaggedBytes",
    "TensorRef",
    "collate_columns_into",
    "from_layout",
    "layout_extent",
    "round_up",
    "to_layout",
    "tree_leaves",
    "tree_map",
    "tree_map_tensors",
]

#: Alignment of every field inside an arena (bytes): cache lines, and enough for any dtype.
ALIGN = 64


@dataclass
class RaggedBytes:
    """``B`` variable-size byte strings: ``data[offsets[i]:offsets[i+1]]`` is item ``i``.

    Per-item access copies nothing: on the host, ``ragged[i]`` and iteration give read-only
    ``memoryview`` s of ``data`` (equal to the ``bytes`` they hold; ``bytes(v)`` copies one
    out, as a dict key for instance), and :meth:`split` gives ``uint8`` tensor views on any device. The views keep
    the batch's memory alive as long as they live. :meth:`tolist` gives ``bytes`` (copies).
    """

    data: torch.Tensor
    offsets: torch.Tensor

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def _bounds(self) -> list[int]:
        return [int(v) for v in self.offsets.cpu().tolist()]

    def __getitem__(self, index: int) -> memoryview | torch.Tensor:
        """Item ``index``: a read-only memoryview (host data) or a uint8 tensor view (device)."""
        if not isinstance(index, int | np.integer) or isinstance(index, bool):
            raise TypeError(f"RaggedBytes indices must be integers, not {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a batch of {len(self)}")
        index = int(index) % len(self)
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        if self.data.device.type != "cpu":
            return self.data[lo:hi]
        return self._host_view()[lo:hi]

    def _host_view(self) -> memoryview:
        return memoryview(self.data.contiguous().numpy().view(np.uint8)).cast("B").toreadonly()  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[memoryview | torch.Tensor]:
        return iter(self.views())

    def views(self) -> list[memoryview] | list[torch.Tensor]:
        """Every item without a copy: read-only memoryviews of host data, or uint8 tensor views
        of device data."""
        bounds = self._bounds()
        if self.data.device.type != "cpu":
            return [self.data[lo:hi] for lo, hi in itertools.pairwise(bounds)]
        whole = self._host_view()
        return [whole[lo:hi] for lo, hi in itertools.pairwise(bounds)]

    def split(self) -> list[torch.Tensor]:
        """Every item as a ``uint8`` tensor view of ``data`` (no copy, on ``data``'s device):
        what ``torchvision.io.decode_jpeg`` or a DALI ``external_source`` takes per sample."""
        bounds = self._bounds()
        return [self.data[lo:hi] for lo, hi in itertools.pairwise(bounds)]

    def select(self, indices: Sequence[int]) -> RaggedBytes:
        """A new RaggedBytes of the items ``indices`` (copied, in that order)."""
        bounds = self._bounds()
        pieces = [self.data[bounds[i] : bounds[i + 1]] for i in indices]
        lengths = [len(p) for p in pieces]
        offsets = torch.zeros(len(pieces) + 1, dtype=self.offsets.dtype)
        if pieces:
            offsets[1:] = torch.tensor(lengths, dtype=self.offsets.dtype).cumsum(0)
        data = torch.cat(pieces) if pieces else self.data[:0].clone()
        return RaggedBytes(data, offsets.to(self.offsets.device))

    def tolist(self) -> list[bytes]:
        """The items as a list of ``bytes`` (what torch's ``default_collate`` would give)."""
        data = self.data.cpu().contiguous().numpy()
        return [data[lo:hi].tobytes() for lo, hi in itertools.pairwise(self._bounds())]

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
            raise ValueError(f"item {bad} of the batch is not an integer: {bytes(self[bad])!r}")
        return torch.from_numpy(out)

    def _to_ints_py(self) -> torch.Tensor:
        """Reference for :meth:`to_ints` (tests)."""
        values = []
        for i, item in enumerate(self.tolist()):
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
        """Make room for at least ``nbytes`` (contents are not preserved). An arena always has
        some memory (a page at least), so even a batch of empty tensors views real memory."""
        if nbytes <= self.nbytes and self.nbytes:
            return
        if self.nbytes:
            self.grows += 1
            nbytes = max(nbytes, int(self.nbytes * 1.5))
        nbytes = round_up(max(nbytes, ALIGN), 4096)
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        if self.shared:
            self.tensor.share_memory_()  # type: ignore[no-untyped-call]
        self.array = self.tensor.numpy()
        self.generation += 1


def round_up(n: int, align: int) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return (n + align - 1) // align * align


def _take(cursor: list[int], nbytes: int) -> int:
    """Reserve ``nbytes`` (aligned) at ``cursor[0]``; returns where they start."""
    start = cursor[0]
    cursor[0] = start + round_up(nbytes, ALIGN)
    return start


# ----------------------------------------------------------------------------------- trees


def tree_map(batch: Any, fn: Callable[[Any], Any], leaf: type | tuple[type, ...] = torch.Tensor) -> Any:
    """``batch`` with ``fn`` applied to every ``leaf`` (and to both tensors of every
    :class:`RaggedBytes`), rebuilt with the same container types.

    Containers are rebuilt as torch's ``pin_memory`` rebuilds them: a mutable mapping or
    sequence as a shallow copy updated in place (so a custom class keeps its type and extra
    attributes), other mappings and sequences by calling their type, namedtuples field by
    field; a type that cannot be rebuilt that way becomes a ``dict`` / ``list``. Unlike
    ``pin_memory``, a tuple stays a tuple. Anything else is returned as it is.
    """
    if isinstance(batch, leaf):
        return fn(batch)
    kind = type(batch)
    if kind in _LEAVES:
        return batch
    if kind is dict:
        return {k: tree_map(v, fn, leaf) for k, v in batch.items()}
    if kind is list:
        if batch and type(batch[0]) in _LEAVES and all(type(v) in _LEAVES for v in batch):
            return batch  # e.g. __key__ / __url__ columns: nothing to map, and nothing copied
        return [tree_map(v, fn, leaf) for v in batch]
    if kind is RaggedBytes:
        # Not the dataclass constructor's type check: a layout's RaggedBytes holds TensorRefs.
        return RaggedBytes(fn(batch.data), fn(batch.offsets))
    if kind is tuple:
        return tuple(tree_map(v, fn, leaf) for v in batch)
    if isinstance(batch, Mapping):
        mapped = {k: tree_map(v, fn, leaf) for k, v in batch.items()}
        try:
            if isinstance(batch, MutableMapping):
                clone = copy.copy(batch)
                clone.update(mapped)
                return clone
            return kind(mapped)
        except TypeError:
            return mapped
    if isinstance(batch, tuple):
        values = [tree_map(v, fn, leaf) for v in batch]
        if hasattr(batch, "_fields"):  # namedtuple
            return kind(*values)
        try:
            return kind(values)
        except TypeError:
            return tuple(values)
    if isinstance(batch, Sequence) and not isinstance(batch, str | bytes | bytearray | memoryview):
        values = [tree_map(v, fn, leaf) for v in batch]
        try:
            if isinstance(batch, MutableSequence):
                seq = copy.copy(batch)
                for i, value in enumerate(values):
                    seq[i] = value
                return seq
            return kind(values)
        except TypeError:
            return values
    return batch


def tree_map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor (and both tensors of every RaggedBytes) in ``batch``; see
    :func:`tree_map` for how containers are rebuilt."""
    return tree_map(batch, fn, torch.Tensor)


def tree_leaves(batch: Any, leaf: type | tuple[type, ...] = torch.Tensor) -> list[Any]:
    """The ``leaf`` objects of ``batch`` (tensors by default), in :func:`tree_map` order."""
    found: list[Any] = []

    def visit(x: Any) -> Any:
        found.append(x)
        return x

    tree_map(batch, visit, leaf)
    return found


#: Types that hold no tensor (a fast exit from tree_map).
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
    """Replace every tensor of ``batch`` that views ``base``'s storage by a :class:`TensorRef`.

    A layout plus the arena bytes is all it takes to rebuild the batch in another process or
    another buffer (:func:`from_layout`): one copy of one region, instead of one per field.
    Other tensors stay in the layout as they are.
    """
    base_ptr = base.data_ptr()
    base_storage = base.untyped_storage().data_ptr()

    def ref(t: torch.Tensor) -> Any:
        if t.device.type != "cpu" or t.untyped_storage().data_ptr() != base_storage or not t.is_contiguous():
            return t
        return TensorRef(t.data_ptr() - base_ptr, t.numel() * t.element_size(), t.dtype, tuple(t.shape))

    return tree_map(batch, ref, torch.Tensor)


def from_layout(layout: Any, base: torch.Tensor) -> Any:
    """Rebuild a batch whose tensors are views of ``base`` (see :func:`to_layout`)."""

    def view(ref: TensorRef) -> torch.Tensor:
        return base[ref.offset : ref.offset + ref.nbytes].view(ref.dtype).view(ref.shape)

    return tree_map(layout, view, TensorRef)


def layout_extent(layout: Any) -> int:
    """Bytes of the arena a layout uses (end of its last tensor)."""
    return max((ref.offset + ref.nbytes for ref in tree_leaves(layout, TensorRef)), default=0)


# ----------------------------------------------------------------------------------- columns


@dataclass
class ColumnRun:
    """Consecutive samples as spans of one buffer: ``fields[ext]`` is ``int64 [n, 2]``
    ``(offset, size)`` rows, ``(-1, 0)`` where a sample lacks ``ext``."""

    buffer: Any
    keys: list[str]
    url: str
    fields: dict[str, np.ndarray]
    #: ``buffer`` is a copy of its own (not a part of a shard that must be given back), so
    #: copying it out again would only cost time: see :func:`materialize_run`.
    owned: bool = False


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
    from fastfeed.read.columnar import gather_spans

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
    total = sum(round_up(8 * (n + 1), ALIGN) + round_up(int(s.sum()), ALIGN) for s in sizes.values())
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
    """A copy of ``run`` whose bytes live in a new compact buffer (to let its source go); an
    ``owned`` run is returned as it is, so a run is copied out at most once."""
    from fastfeed.read.columnar import gather_spans

    if run.owned:
        return run

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
    return ColumnRun(buffer, run.keys, run.url, fields, owned=True)
