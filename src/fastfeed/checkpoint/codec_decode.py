"""Decoding of the ``fastfeed-tree`` format (:func:`decode`): the JSON tree and the raw bytes of
its array leaves back into the state :func:`fastfeed.checkpoint.codec.encode` split, validating
everything it reads (see :mod:`fastfeed.checkpoint.codec` for the format and its guarantees).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

import numpy as np
import torch

from fastfeed.errors import ConfigError

if TYPE_CHECKING:
    from numpy.typing import NDArray


from fastfeed.checkpoint.codec_format import (
    FORMAT,
    MAX_DEPTH,
    MAX_SAFE_INT,
    TORCH_DTYPES,
    Attr,
    LeafSpec,
    check_spec,
    np_dtype,
    render_path,
    short_repr,
)

__all__ = ["decode"]

_HEX_INT: Final = re.compile(r"-?0x[0-9a-f]+")
_NONFINITE: Final = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

# ---------------------------------------------------------------------------------------------
# Decoding


def decode(
    tree: dict[str, Any],
    specs: Sequence[LeafSpec],
    buffers: Sequence[Any],
    *,
    map_location: str | torch.device | None = None,
) -> Any:
    """Rebuild the state that :func:`encode` split into ``tree`` and leaves.

    Args:
        tree: the tree from :func:`encode`, as is or after a JSON round trip.
        specs: ``specs[i]`` describes leaf ``i`` (see :func:`spec_from_json`).
        buffers: ``buffers[i]`` holds exactly ``specs[i].nbytes`` bytes of leaf ``i``, C-contiguous,
            in the leaf's dtype and byte order: ``bytes``, ``bytearray``, ``memoryview`` (or any
            object with the buffer protocol), a 1-D ``uint8`` numpy array or a 1-D contiguous
            ``uint8`` tensor. Writable buffers are shared, not copied (the decoded leaf is a
            view of the buffer: do not reuse it); read-only ones (``bytes``) and ones not aligned
            for the dtype are copied.
        map_location: move tensors there (``"cpu"``, ``"cuda:0"``, a ``torch.device``). ``None``:
            tensors are decoded on the CPU whatever device they were saved from. ndarrays
            always stay numpy arrays.

    Returns:
        The state, with the exact types it was encoded with (``OrderedDict`` included, and its
        ``_metadata``); ``nn.Parameter`` leaves come back as plain tensors.

    Raises:
        ConfigError: an unknown format, a malformed tree or spec (naming the place), a buffer
            of the wrong type or size, or a ``map_location`` that cannot be used.
    """
    if type(tree) is not dict:
        raise ConfigError(f"not a checkpoint tree: expected a JSON object, got {type(tree).__name__}")
    if "format" not in tree:
        raise ConfigError("not a checkpoint tree: it has no 'format' field", hint=f"expected format {FORMAT!r}")
    if tree["format"] != FORMAT:
        raise ConfigError(
            f"unknown checkpoint tree format {short_repr(tree['format'])}: this fastfeed reads {FORMAT!r}",
            hint="load the checkpoint with the fastfeed version that wrote it, or a newer one",
        )
    if set(tree) != {"format", "root"}:
        raise ConfigError(
            f"malformed checkpoint tree: expected the fields format and root, got {sorted(map(str, tree))}"
        )
    if len(specs) != len(buffers):
        raise ConfigError(f"checkpoint has {len(specs)} leaf specs but {len(buffers)} buffers")
    device = torch.device("cpu")
    if map_location is not None:
        try:
            device = torch.device(map_location)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid map_location {map_location!r}: {exc}") from exc
    return _Decoder(specs, buffers, device).node(tree["root"], 0, key=False)


class _Decoder:
    """One :func:`decode` call: the leaf inputs and the path of the current node."""

    def __init__(self, specs: Sequence[LeafSpec], buffers: Sequence[Any], device: torch.device) -> None:
        self.specs = specs
        self.buffers = buffers
        self.device = device
        self._path: list[object] = []

    def fail(self, what: str) -> NoReturn:
        raise ConfigError(f"malformed checkpoint tree at {render_path(self._path)}: {what}")

    def node(self, n: Any, depth: int, *, key: bool) -> Any:
        """The value of node ``n``; ``key``: ``n`` is a dict key (no containers but tuples, no leaves)."""
        if n is None or n is True or n is False:
            return n
        t = type(n)
        if t is str or t is int:
            return n
        if t is list:
            if key:
                self.fail("a list cannot be a dict key")
            return self._sequence(n, depth)
        if t is float:
            self.fail(f"bare float {n!r} (floats are {{'t': 'float'}} nodes)")
        if t is not dict:
            self.fail(f"unexpected value of type {t.__name__}")
        tag = n.get("t")
        if type(tag) is not str:
            self.fail(f"node {short_repr(n)} has no string tag 't'")
        handler = _HANDLERS.get(tag)
        if handler is None:
            self.fail(f"unknown node tag {tag!r}")
        if key and tag in _NOT_KEYS:
            self.fail(f"a {tag!r} node cannot be a dict key")
        fields, optional, fn = handler
        extra = set(n) - fields - optional - {"t"}
        missing = fields - set(n)
        if missing or extra:
            self.fail(
                f"{tag!r} node {short_repr(n)}: missing fields {sorted(missing)}, "
                f"unknown fields {sorted(map(str, extra))}"
            )
        return fn(self, n, depth, key)

    def _enter(self, depth: int) -> None:
        if depth >= MAX_DEPTH:
            self.fail(f"nested deeper than {MAX_DEPTH} levels")

    def _sequence(self, items: Any, depth: int, *, key: bool = False) -> list[Any]:
        if type(items) is not list:
            self.fail(f"items must be a list, got {type(items).__name__}")
        self._enter(depth)
        out = []
        for i, child in enumerate(items):
            self._path.append(i)
            out.append(self.node(child, depth + 1, key=key))
            self._path.pop()
        return out

    def _tuple(self, n: dict[str, Any], depth: int, key: bool) -> tuple[Any, ...]:
        return tuple(self._sequence(n["items"], depth, key=key))

    def _dict(self, n: dict[str, Any], depth: int, key: bool) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        self._items(n["items"], depth, out)
        return out

    def _odict(self, n: dict[str, Any], depth: int, key: bool) -> OrderedDict[Any, Any]:
        out: OrderedDict[Any, Any] = OrderedDict()
        self._items(n["items"], depth, out)
        if "meta" in n:
            self._path.append(Attr("_metadata"))
            vars(out)["_metadata"] = self.node(n["meta"], depth + 1, key=False)
            self._path.pop()
        return out

    def _items(self, items: Any, depth: int, out: dict[Any, Any]) -> None:
        """Decode the ``[key, value]`` pairs of ``items`` into ``out``."""
        if type(items) is not list:
            self.fail(f"items must be a list, got {type(items).__name__}")
        self._enter(depth)
        for pos, pair in enumerate(items):
            if type(pair) is not list or len(pair) != 2:
                self.fail(f"item {pos} must be a [key, value] pair, got {short_repr(pair)}")
            self._path.append(Attr(f"<key {pos}>"))
            k = self.node(pair[0], depth + 1, key=True)
            self._path.pop()
            if k in out:
                self.fail(f"duplicate dict key {short_repr(k)}")
            self._path.append(k)
            out[k] = self.node(pair[1], depth + 1, key=False)
            self._path.pop()

    def _int(self, n: dict[str, Any], depth: int, key: bool) -> int:
        v = n["v"]
        if type(v) is int:
            return v
        if type(v) is not str or not _HEX_INT.fullmatch(v):
            self.fail(f"int node value must be a hexadecimal string like '-0x1f', got {short_repr(v)}")
        return int(v, 16)

    def _float(self, n: dict[str, Any], depth: int, key: bool) -> float:
        v = n["v"]
        if type(v) is float:
            return v
        if type(v) is int and abs(v) <= MAX_SAFE_INT:
            return float(v)
        if type(v) is str and v in _NONFINITE:
            return _NONFINITE[v]
        self.fail(f"float node value must be a number, 'nan', 'inf' or '-inf', got {short_repr(v)}")

    def _raw(self, v: Any, what: str) -> bytes:
        if type(v) is not str:
            self.fail(f"{what} must be a base64 string, got {type(v).__name__}")
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as exc:
            self.fail(f"{what} is not valid base64: {exc}")

    def _bytes(self, n: dict[str, Any], depth: int, key: bool) -> bytes:
        return self._raw(n["v"], "bytes node value")

    def _bytearray(self, n: dict[str, Any], depth: int, key: bool) -> bytearray:
        return bytearray(self._raw(n["v"], "bytearray node value"))

    def _size(self, n: dict[str, Any], depth: int, key: bool) -> torch.Size:
        v = n["v"]
        if type(v) is not list or any(type(d) is not int or not -(2**63) <= d < 2**63 for d in v):
            self.fail(f"size node value must be a list of 64-bit integers, got {short_repr(v)}")
        return torch.Size(v)

    def _dtype(self, n: dict[str, Any], depth: int, key: bool) -> torch.dtype:
        v = n["v"]
        dtype = TORCH_DTYPES.get(v) if type(v) is str else None
        if dtype is None:
            self.fail(f"unknown torch dtype {short_repr(v)}")
        return dtype

    def _device(self, n: dict[str, Any], depth: int, key: bool) -> torch.device:
        v = n["v"]
        if type(v) is not str:
            self.fail(f"device node value must be a string, got {short_repr(v)}")
        try:
            return torch.device(v)
        except (RuntimeError, ValueError) as exc:
            self.fail(f"invalid torch device {v!r}: {exc}")

    def _np_scalar(self, n: dict[str, Any], depth: int, key: bool) -> np.generic:
        dtype = np_dtype(n["dtype"])
        if dtype is None:
            self.fail(f"unsupported numpy scalar dtype {short_repr(n['dtype'])}")
        if "char" in n:
            char = n["char"]
            alt = np.dtype(char) if type(char) is str and len(char) == 1 and char in np.typecodes["All"] else None
            if alt is None or alt.kind != dtype.kind or alt.itemsize != dtype.itemsize:
                self.fail(f"numpy type code {short_repr(char)} does not match dtype {dtype.str}")
            dtype = alt.newbyteorder(dtype.byteorder) if dtype.byteorder in "<>" else alt
        raw = self._raw(n["v"], "numpy scalar bytes")
        if len(raw) != dtype.itemsize:
            self.fail(f"numpy scalar of dtype {dtype.str} needs {dtype.itemsize} bytes, got {len(raw)}")
        if dtype.kind == "b" and raw[0] > 1:
            self.fail(f"numpy bool scalar holds the byte {raw[0]}")
        value: np.generic = np.frombuffer(raw, dtype=dtype)[0]
        return value

    def _leaf(self, n: dict[str, Any], depth: int, key: bool) -> torch.Tensor | NDArray[Any]:
        i = n["i"]
        if type(i) is not int or not 0 <= i < len(self.specs):
            self.fail(f"leaf index {short_repr(i)} out of range (there are {len(self.specs)} leaves)")
        spec = self.specs[i]
        where = f"leaf {i} ({spec.path!r})" if type(spec.path) is str else f"leaf {i}"
        dtype = check_spec(spec, where)
        buf = self.buffers[i]
        if isinstance(dtype, torch.dtype):
            return self._tensor_leaf(spec, dtype, buf, where)
        return self._ndarray_leaf(spec, dtype, buf, where)

    def _tensor_leaf(self, spec: LeafSpec, dtype: torch.dtype, buf: Any, where: str) -> torch.Tensor:
        flat = (
            torch.from_numpy(_u8(buf, spec, where))
            if not isinstance(buf, torch.Tensor)
            else _u8_tensor(buf, spec, where)
        )
        if spec.nbytes == 0:
            t = torch.empty(spec.shape, dtype=dtype)
        else:
            align = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize
            if flat.data_ptr() % align or flat.storage_offset() % dtype.itemsize:
                flat = flat.clone()
            if dtype == torch.bool and bool((flat > 1).any()):
                raise ConfigError(f"{where}: a bool tensor holds bytes other than 0 and 1")
            t = flat.view(dtype).reshape(spec.shape)
        try:
            return t.to(self.device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ConfigError(
                f"cannot move {where} to {self.device}: {exc}",
                hint="pass a map_location that is available here, e.g. map_location='cpu'",
            ) from exc

    def _ndarray_leaf(self, spec: LeafSpec, dtype: np.dtype[Any], buf: Any, where: str) -> NDArray[Any]:
        flat = _u8_tensor(buf, spec, where).cpu().numpy() if isinstance(buf, torch.Tensor) else _u8(buf, spec, where)
        if spec.nbytes == 0:
            return np.empty(spec.shape, dtype=dtype)
        if flat.ctypes.data % dtype.alignment:
            flat = flat.copy()
        if dtype.kind == "b" and bool((flat > 1).any()):
            raise ConfigError(f"{where}: a bool array holds bytes other than 0 and 1")
        return flat.view(dtype).reshape(spec.shape)


def _u8(buf: Any, spec: LeafSpec, where: str) -> NDArray[np.uint8]:
    """``buf`` as a writable 1-D uint8 array of ``spec.nbytes`` bytes (shared when possible)."""
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise ConfigError(f"{where}: a numpy buffer must be a 1-D uint8 array, got {buf.dtype} {buf.shape}")
        arr: NDArray[np.uint8] = np.ascontiguousarray(buf)
    else:
        try:
            view = memoryview(buf)
        except TypeError as exc:
            raise ConfigError(
                f"{where}: buffer of type {type(buf).__name__} is not bytes-like",
                hint="pass bytes, bytearray, memoryview, a 1-D uint8 numpy array or a 1-D uint8 tensor",
            ) from exc
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        arr = np.frombuffer(view, dtype=np.uint8)
    if arr.size != spec.nbytes:
        raise ConfigError(f"{where}: buffer holds {arr.size} bytes, the spec says {spec.nbytes}")
    return arr if arr.flags.writeable else arr.copy()


def _u8_tensor(buf: torch.Tensor, spec: LeafSpec, where: str) -> torch.Tensor:
    """A tensor buffer, checked: 1-D, contiguous, uint8, ``spec.nbytes`` long."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.layout != torch.strided:
        raise ConfigError(f"{where}: a tensor buffer must be a 1-D uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
    if buf.numel() != spec.nbytes:
        raise ConfigError(f"{where}: buffer holds {buf.numel()} bytes, the spec says {spec.nbytes}")
    return buf.detach().contiguous()


_Handler = tuple[frozenset[str], frozenset[str], Callable[[_Decoder, dict[str, Any], int, bool], Any]]

#: tag -> (required fields besides "t", optional fields, decoder method).
_HANDLERS: Final[dict[str, _Handler]] = {
    "int": (frozenset({"v"}), frozenset(), _Decoder._int),
    "float": (frozenset({"v"}), frozenset(), _Decoder._float),
    "bytes": (frozenset({"v"}), frozenset(), _Decoder._bytes),
    "bytearray": (frozenset({"v"}), frozenset(), _Decoder._bytearray),
    "tuple": (frozenset({"items"}), frozenset(), _Decoder._tuple),
    "dict": (frozenset({"items"}), frozenset(), _Decoder._dict),
    "odict": (frozenset({"items"}), frozenset({"meta"}), _Decoder._odict),
    "size": (frozenset({"v"}), frozenset(), _Decoder._size),
    "dtype": (frozenset({"v"}), frozenset(), _Decoder._dtype),
    "device": (frozenset({"v"}), frozenset(), _Decoder._device),
    "np": (frozenset({"dtype", "v"}), frozenset({"char"}), _Decoder._np_scalar),
    "leaf": (frozenset({"i"}), frozenset(), _Decoder._leaf),
}
#: Tags that cannot stand for a dict key (unhashable, or a leaf).
_NOT_KEYS: Final = frozenset({"dict", "odict", "bytearray", "leaf"})
