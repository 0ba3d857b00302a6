"""``torch.utils.data.default_collate``, written straight into a preallocated host arena.

:func:`collate_into` returns what ``default_collate(samples)`` returns, bit for bit: the same
container types (dicts, custom ``Mapping`` and ``Sequence`` types, namedtuples; tuples become
lists), the same tensor shapes, dtypes and values, the same strings and bytes, and the same
exceptions for what torch refuses (``None``, unequal lengths, string arrays...). It follows
torch's own dispatch, including anything registered in
``torch.utils.data._utils.collate.default_collate_fn_map``.

What differs is where tensors are built. Per field (never per batch):

* tensors of one dtype, on the CPU: ``torch.stack(..., out=)`` into the arena;
* numpy arrays of one shape and a dtype torch has, C-contiguous: one native gather (GIL
  released) into the arena, no per-array ``torch.as_tensor``;
* Python and numpy scalars: torch's own conversion (``torch.tensor`` / ``torch.as_tensor``:
  the same dtype inference), then copied into the arena;
* anything else (sparse, nested, ``requires_grad``, other devices, tensor subclasses, dtypes or
  layouts the fast paths do not take, types a user registered): torch's own function for that
  field, whose result (or error) is returned unchanged.

So every tensor of a batch made of common fields views one arena region (pinned or shared
memory, one device copy), and a field the fast paths do not cover costs only itself.
"""

from __future__ import annotations

import abc
import collections.abc
import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data._utils import collate as _torch_collate

from fastfeed.batch.assemble import ALIGN, Arena, round_up
from fastfeed.batch.gather import gather

__all__ = ["collate_into", "numpy_to_torch_dtype"]

_FN_MAP = _torch_collate.default_collate_fn_map
_ERR = _torch_collate.default_collate_err_msg_format
_STR_OBJ = _torch_collate.np_str_obj_array_pattern
_TENSOR_FN = _torch_collate.collate_tensor_fn
_ARRAY_FN = _torch_collate.collate_numpy_array_fn
#: torch's converters of Python and numpy scalars (the result is copied into the arena).
_SCALAR_FNS = (
    _torch_collate.collate_numpy_scalar_fn,
    _torch_collate.collate_float_fn,
    _torch_collate.collate_int_fn,
)
_STR_FN = _torch_collate.collate_str_fn

_NP_TO_TORCH = {
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


def numpy_to_torch_dtype(dtype: np.dtype[Any]) -> torch.dtype | None:
    """The torch dtype ``torch.as_tensor`` gives an array of ``dtype`` (None if it has none or
    the byte order is not native)."""
    return _NP_TO_TORCH.get(dtype)


# ------------------------------------------------------------------------------------ plan
#
# Two passes: ``_plan`` walks the samples once as torch's ``collate`` would, checking the fast
# paths' conditions and adding up the arena bytes; ``_Node.write`` then fills the arena (grown
# once to the total) and builds the batch.


class _Writer:
    """The arena being written: its bytes (numpy), the base tensor the batch views, a cursor."""

    __slots__ = ("array", "cursor", "tensor")

    def __init__(self, array: np.ndarray, tensor: torch.Tensor) -> None:
        self.array = array
        self.tensor = tensor
        self.cursor = 0

    def take(self, nbytes: int) -> int:
        start = self.cursor
        self.cursor = start + round_up(nbytes, ALIGN)
        return start

    def view(self, start: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.tensor[start : start + nbytes].view(dtype).view(shape)


class _Node(abc.ABC):
    """One field of the batch (or a container of fields): the arena bytes it needs (``nbytes``)
    and how it is written (:meth:`write`)."""

    __slots__ = ()
    nbytes = 0

    @abc.abstractmethod
    def write(self, out: _Writer) -> Any:
        """Write the field into ``out`` and return its batch value."""


class _Value(_Node):
    """A value torch's function already made (strings, bytes, results of a fallback)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def write(self, out: _Writer) -> Any:
        return self.value


class _Stack(_Node):
    """Tensors of one dtype stacked by ``torch.stack(out=)`` into the arena."""

    __slots__ = ("dtype", "items", "nbytes", "shape")

    def __init__(self, items: Sequence[torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.items = items
        self.dtype = dtype
        self.shape = (len(items), *shape)
        self.nbytes = round_up(_numel(self.shape) * dtype.itemsize, ALIGN)

    def write(self, out: _Writer) -> Any:
        nbytes = _numel(self.shape) * self.dtype.itemsize
        start = out.take(nbytes)
        try:
            return torch.stack(self.items, 0, out=out.view(start, nbytes, self.dtype, self.shape))  # type: ignore[arg-type]
        except (RuntimeError, TypeError, ValueError):
            # What out= cannot take (a gradient, another device, unequal shapes): torch's own
            # function gives its result, or raises its error.
            return _TENSOR_FN(self.items, collate_fn_map=_FN_MAP)


class _Gather(_Node):
    """Equal-shape C-contiguous numpy arrays: one native gather into the arena."""

    __slots__ = ("arrays", "dtype", "item_bytes", "nbytes", "shape")

    def __init__(self, arrays: Sequence[np.ndarray], dtype: torch.dtype) -> None:
        first = arrays[0]
        self.arrays = arrays
        self.dtype = dtype
        self.shape = (len(arrays), *first.shape)
        self.item_bytes = int(first.nbytes)
        self.nbytes = round_up(self.item_bytes * len(arrays), ALIGN)

    def write(self, out: _Writer) -> Any:
        nbytes = self.item_bytes * len(self.arrays)
        start = out.take(nbytes)
        gather(out.array, self.arrays, dst_offset=start, item_size=self.item_bytes)
        return out.view(start, nbytes, self.dtype, self.shape)


class _Copy(_Node):
    """A tensor torch made (scalar fields), copied into the arena."""

    __slots__ = ("nbytes", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.nbytes = round_up(tensor.numel() * tensor.element_size(), ALIGN)

    def write(self, out: _Writer) -> Any:
        t = self.tensor
        nbytes = t.numel() * t.element_size()
        start = out.take(nbytes)
        view = out.view(start, nbytes, t.dtype, tuple(t.shape))
        view.copy_(t)
        return view


class _Mapping(_Node):
    __slots__ = ("children", "elem", "nbytes")

    def __init__(self, elem: collections.abc.Mapping[Any, Any], children: dict[Any, _Node]) -> None:
        self.elem = elem
        self.children = children
        self.nbytes = sum(c.nbytes for c in children.values())

    def write(self, out: _Writer) -> Any:
        values = {key: child.write(out) for key, child in self.children.items()}
        elem = self.elem
        if type(elem) is dict:
            return values
        try:  # as torch builds it
            if isinstance(elem, collections.abc.MutableMapping):
                clone = copy.copy(elem)
                clone.update(values)
                return clone
            return type(elem)(values)  # type: ignore[call-arg]
        except TypeError:
            return values


class _NamedTuple(_Node):
    __slots__ = ("children", "elem_type", "nbytes")

    def __init__(self, elem_type: type, children: list[_Node]) -> None:
        self.elem_type = elem_type
        self.children = children
        self.nbytes = sum(c.nbytes for c in children)

    def write(self, out: _Writer) -> Any:
        return self.elem_type(*(child.write(out) for child in self.children))


class _Sequence(_Node):
    __slots__ = ("children", "elem", "nbytes")

    def __init__(self, elem: Sequence[Any], children: list[_Node]) -> None:
        self.elem = elem
        self.children = children
        self.nbytes = sum(c.nbytes for c in children)

    def write(self, out: _Writer) -> Any:
        values = [child.write(out) for child in self.children]
        elem = self.elem
        if isinstance(elem, tuple) or type(elem) is list:
            return values  # torch: a list for any tuple ("backwards compatibility") and for lists
        try:  # as torch builds it
            if isinstance(elem, collections.abc.MutableSequence):
                clone = copy.copy(elem)
                for i, value in enumerate(values):
                    clone[i] = value
                return clone
            return type(elem)(values)  # type: ignore[call-arg]
        except TypeError:
            return values


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _lookup(elem: Any) -> Callable[..., Any] | None:
    """The function torch's ``collate`` dispatches ``elem`` to (exact type, then the first
    ``isinstance`` match in the map's order), or None."""
    fn = _FN_MAP.get(type(elem))
    if fn is not None:
        return fn
    for key, value in _FN_MAP.items():
        if isinstance(elem, key):
            return value
    return None


def _plan(items: Sequence[Any]) -> _Node:
    elem = items[0]
    fn = _lookup(elem)
    if fn is not None:
        if fn is _TENSOR_FN:
            return _plan_tensors(items)
        if fn is _ARRAY_FN and _FN_MAP.get(torch.Tensor) is _TENSOR_FN:
            return _plan_arrays(items)
        if fn in _SCALAR_FNS:
            value = fn(items, collate_fn_map=_FN_MAP)
            return _Copy(value) if _copyable(value) else _Value(value)
        if fn is _STR_FN:
            return _Value(items)
        return _Value(fn(items, collate_fn_map=_FN_MAP))  # registered by the user
    if isinstance(elem, collections.abc.Mapping):
        return _Mapping(elem, {key: _plan([d[key] for d in items]) for key in elem})
    if isinstance(elem, tuple) and hasattr(elem, "_fields"):  # namedtuple
        return _NamedTuple(type(elem), [_plan(column) for column in zip(*items, strict=False)])
    if isinstance(elem, collections.abc.Sequence):
        size = len(elem)
        if not all(len(item) == size for item in items):
            raise RuntimeError("each element in list of batch should be of equal size")
        return _Sequence(elem, [_plan(column) for column in zip(*items, strict=False)])
    raise TypeError(_ERR.format(type(elem)))


def _copyable(value: Any) -> bool:
    return (
        type(value) is torch.Tensor
        and value.layout == torch.strided
        and value.device.type == "cpu"
        and not value.requires_grad
        and value.is_contiguous()
    )


def _plan_tensors(items: Sequence[Any]) -> _Node:
    elem = items[0]
    dtype = elem.dtype
    if (
        type(elem) is torch.Tensor
        and elem.layout == torch.strided
        and elem.device.type == "cpu"
        and not elem.is_nested
        and all(type(t) is torch.Tensor and t.dtype is dtype for t in items)
    ):
        return _Stack(items, dtype, tuple(elem.shape))
    return _Value(_TENSOR_FN(items, collate_fn_map=_FN_MAP))


def _plan_arrays(items: Sequence[Any]) -> _Node:
    elem = items[0]
    dtype = elem.dtype
    torch_dtype = _NP_TO_TORCH.get(dtype)
    if torch_dtype is not None and _STR_OBJ.search(dtype.str) is None:
        shape = elem.shape
        if all(
            isinstance(a, np.ndarray) and (a.dtype is dtype or a.dtype == dtype) and a.shape == shape
            and a.flags.c_contiguous and min(a.strides, default=0) >= 0  # torch refuses any negative stride
            for a in items
        ):  # fmt: skip
            for a in items:
                if not a.flags.writeable:
                    torch.as_tensor(a)  # torch's own warning for a read-only array, which default_collate gives
                    break
            return _Gather(items, torch_dtype)
    return _Value(_ARRAY_FN(items, collate_fn_map=_FN_MAP))


# ------------------------------------------------------------------------------------ entry


def collate_into(samples: Sequence[Any], arena: Arena, make_base: Callable[[], torch.Tensor] | None = None) -> Any:
    """``default_collate(samples)``, its tensors written into ``arena`` (grown if needed).

    Tensor fields of the batch are views of one base tensor over the arena (so their memory is
    the arena's: pinned or shared if the arena is). ``make_base`` is called once the arena has
    its final size and returns that base tensor; the default is ``arena.tensor`` itself. A ring
    passes a factory whose tensor tells it when the batch's last view is gone.

    Raises what ``default_collate`` raises for the same samples (``TypeError`` for types it
    refuses, ``RuntimeError`` for unequal sizes, ``KeyError`` for a missing key...), and
    ``IndexError`` for an empty list.
    """
    if len(samples) == 0:
        raise IndexError("cannot collate an empty batch")
    plan = _plan(samples)
    arena.ensure(plan.nbytes)
    base = arena.tensor if make_base is None else make_base()
    return plan.write(_Writer(arena.array, base))
