"""Pickle-free checkpoint codec: a training state as a JSON tree plus raw array leaves.

Checkpoints of training state live in a bucket that other people can write to, so loading one
must never execute code from it: no pickle, no ``eval``, no importing names found in the data.
:func:`encode` splits a state (any nesting of plain values, containers, tensors and numpy arrays,
such as ``{"model": model.state_dict(), "optim": opt.state_dict(), "rng": {...}, "step": 3}``)
into

* a JSON-serializable *tree* that describes the structure and every plain value exactly, and
* an ordered list of array *leaves* (``torch.Tensor`` and ``numpy.ndarray`` objects, not
  copied) with a :class:`LeafSpec` each. The caller snapshots each leaf to its raw bytes and
  stores them wherever it likes; :func:`decode` rebuilds the state from the tree, the specs and
  one buffer per leaf::

    tree, leaves, specs = encode(state)
    blobs = [snapshot(x) for x in leaves]  # the caller's snapshot of the bytes, see below
    meta = json.dumps({"tree": tree, "specs": [spec_to_json(s) for s in specs]})
    ...
    doc = json.loads(meta)
    state = decode(doc["tree"], [spec_from_json(d) for d in doc["specs"]], blobs)

Snapshot of a leaf (C-contiguous bytes in the leaf's own dtype and byte order)::

    tensor:  t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
             (then ``.cpu().numpy().tobytes()``, or copy it anywhere; works for bfloat16 and float8)
    ndarray: np.ascontiguousarray(a).tobytes()

Tree format ``fastfeed-tree/1``: ``{"format": "fastfeed-tree/1", "root": node}``. A node is
either a bare JSON value, which stands for itself, or a JSON object with a tag ``"t"``. The two
never overlap: every tagged node is an object, and no bare value is.

=============================================  ================================================
node                                           Python value
=============================================  ================================================
``null`` / ``true`` / ``false`` / ``"text"``   ``None`` / ``True`` / ``False`` / ``str``
integer with ``abs(v) <= 2**53 - 1``           ``int`` (larger ints are tagged, below)
``[node, ...]``                                ``list``
``{"t": "int", "v": "-0x1f..."}``              ``int`` outside the range above (hexadecimal,
                                               so JSON readers that parse numbers as doubles
                                               lose nothing and no digit limit applies)
``{"t": "float", "v": 1.5}``                   ``float``; ``v`` is ``"nan"``, ``"inf"`` or
                                               ``"-inf"`` for non-finite values (a float is
                                               never bare: JSON tools blur ``1.0`` and ``1``;
                                               every NaN decodes as ``math.nan``)
``{"t": "bytes", "v": "<base64>"}``            ``bytes`` (``"bytearray"``: ``bytearray``)
``{"t": "tuple", "items": [node, ...]}``       ``tuple``
``{"t": "dict", "items": [[k, v], ...]}``      ``dict`` in insertion order; keys are nodes too
``{"t": "odict", "items": [...], "meta": n}``  ``collections.OrderedDict``; the optional
                                               ``meta`` is the ``_metadata`` attribute that
                                               ``Module.state_dict()`` sets (module versions);
                                               other instance attributes are refused
``{"t": "size", "v": [2, 3]}``                 ``torch.Size``
``{"t": "dtype", "v": "bfloat16"}``            ``torch.dtype`` (looked up in a fixed table)
``{"t": "device", "v": "cuda:0"}``             ``torch.device``
``{"t": "np", "dtype": "<f4", "v": "<b64>"}``  numpy scalar of that dtype, from its raw bytes
                                               (``"char"``: the type code, only where the dtype
                                               string alone would give another scalar type,
                                               e.g. ``np.longlong`` beside ``np.int64``)
``{"t": "leaf", "i": 0}``                      ``leaves[0]`` (a tensor or an ndarray)
=============================================  ================================================

Dict keys may be ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, numpy scalars,
``torch.dtype``, ``torch.device``, ``torch.Size`` and tuples of those. Types are matched
exactly: subclasses of the supported types (namedtuples, ``defaultdict``, ``IntEnum``, tensor
subclasses, ``np.memmap``...) are rejected rather than silently turned into their base type.
The one exception is ``torch.nn.Parameter``, stored as a plain tensor (it decodes as a
``torch.Tensor``; ``requires_grad`` is not kept, as with ``state_dict()`` itself). Tensors must be
dense and strided (CPU, CUDA or any other device with data; not sparse, quantized, nested or on
``meta``); ndarrays must have a boolean, integer, floating or complex dtype (any byte order).
Anything else raises :class:`~fastfeed.errors.ConfigError` naming the path of the value, e.g.
``state['optim']['x']``, and what to convert it to.

Decoding validates everything it reads and raises :class:`~fastfeed.errors.ConfigError` naming
the place of the first problem: unknown format or tag, missing or extra fields, values of the
wrong JSON type, leaf indices out of range, specs whose ``nbytes`` disagrees with their shape and
dtype, buffers of the wrong size, boolean leaves holding bytes other than 0 and 1, nesting deeper
than 200 levels. The saved device of a tensor is informational: tensors are decoded on the CPU,
or moved to ``map_location`` when it is given.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, NoReturn

import numpy as np
import torch

from fastfeed.errors import ConfigError

if TYPE_CHECKING:
    from numpy.typing import NDArray


from fastfeed.checkpoint.codec_decode import decode
from fastfeed.checkpoint.codec_format import (
    FORMAT,
    LEAF_DTYPES,
    MAX_DEPTH,
    MAX_SAFE_INT,
    NP_KINDS,
    Attr,
    LeafSpec,
    render_path,
    spec_from_json,
    spec_to_json,
)

__all__ = ["FORMAT", "LeafSpec", "decode", "encode", "spec_from_json", "spec_to_json"]

_SUPPORTED: Final = (
    "None, bool, int, float, str, bytes, bytearray, list, tuple, dict, OrderedDict, torch.Size, "
    "torch.dtype, torch.device, numpy scalars, dense tensors and numeric numpy arrays"
)


def _dotted_path(parts: Sequence[object]) -> str:
    """``optim.state.0.exp_avg`` style, for :attr:`LeafSpec.path`."""
    return ".".join(str(p) for p in parts) if parts else "<root>"


# ---------------------------------------------------------------------------------------------
# Encoding


def encode(state: Any) -> tuple[dict[str, Any], list[Any], list[LeafSpec]]:
    """Split ``state`` into a JSON tree and its array leaves.

    Args:
        state: any nesting of the supported types (see the module docstring).

    Returns:
        ``(tree, leaves, specs)``. ``tree`` is ``{"format": "fastfeed-tree/1", "root": node}``
        and ``json.dumps(tree, allow_nan=False)`` works. ``leaves[i]`` is the original tensor or
        ndarray object (not copied: snapshot it before training goes on) and ``specs[i]``
        describes it; the leaf appears in the tree as ``{"t": "leaf", "i": i}``. Leaves are
        numbered in the order they are met (dicts in insertion order). A tensor that appears
        twice is stored twice (aliasing is not preserved).

    Raises:
        ConfigError: a value of an unsupported type (named with its path and what to convert
            it to), a container that contains itself, or nesting deeper than 200 levels.
    """
    enc = _Encoder()
    root = enc.node(state, 0)
    return {"format": FORMAT, "root": root}, enc.leaves, enc.specs


class _Encoder:
    """One :func:`encode` call: the leaves found so far and the path of the current value."""

    def __init__(self) -> None:
        self.leaves: list[Any] = []
        self.specs: list[LeafSpec] = []
        self._path: list[object] = []
        self._active: set[int] = set()  # ids of the containers being encoded (cycle check)

    def node(self, x: Any, depth: int) -> Any:
        """The tree node of ``x``."""
        if x is None or x is True or x is False:
            return x
        t = type(x)
        if t is str:
            return x
        if t is int:
            return x if -MAX_SAFE_INT <= x <= MAX_SAFE_INT else {"t": "int", "v": hex(x)}
        if t is float:
            return {"t": "float", "v": _float_to_json(x)}
        if t is bytes:
            return {"t": "bytes", "v": _b64(x)}
        if t is bytearray:
            return {"t": "bytearray", "v": _b64(x)}
        if t is torch.Tensor or t is torch.nn.Parameter:
            return self._tensor(x)
        if t is np.ndarray:
            return self._ndarray(x)
        if isinstance(x, np.generic):
            return self._np_scalar(x)
        if t is torch.dtype:
            return {"t": "dtype", "v": str(x).removeprefix("torch.")}
        if t is torch.device:
            return {"t": "device", "v": str(x)}
        if t is torch.Size:
            return {"t": "size", "v": [int(d) for d in x]}
        if t is list or t is tuple or t is dict or t is OrderedDict:
            return self._container(x, depth)
        self._unsupported(x)

    def key(self, k: Any, depth: int) -> Any:
        """The tree node of the dict key ``k``."""
        t = type(k)
        if t is tuple:
            if depth >= MAX_DEPTH:
                self._too_deep()
            return {"t": "tuple", "items": [self.key(item, depth + 1) for item in k]}
        if (
            k is None
            or t in (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)
            or (isinstance(k, np.generic) and k.dtype.kind in NP_KINDS)
        ):
            return self.node(k, depth)
        self._unsupported(k, as_key=True)

    def _container(self, x: list[Any] | tuple[Any, ...] | dict[Any, Any], depth: int) -> Any:
        if depth >= MAX_DEPTH:
            self._too_deep()
        oid = id(x)
        if oid in self._active:
            raise ConfigError(
                f"cannot checkpoint a {type(x).__name__} that contains itself at {render_path(self._path)}",
                hint="break the reference cycle before checkpointing",
            )
        self._active.add(oid)
        path = self._path
        node: Any
        if isinstance(x, dict):
            items = []
            for k, v in x.items():
                knode = self.key(k, depth + 1)
                path.append(k)
                items.append([knode, self.node(v, depth + 1)])
                path.pop()
            if type(x) is OrderedDict:
                node = {"t": "odict", "items": items}
                meta = self._odict_meta(x, depth)
                if meta is not None:
                    node["meta"] = meta
            else:
                node = {"t": "dict", "items": items}
        else:
            children = []
            for i, v in enumerate(x):
                path.append(i)
                children.append(self.node(v, depth + 1))
                path.pop()
            node = children if type(x) is list else {"t": "tuple", "items": children}
        self._active.discard(oid)
        return node

    def _odict_meta(self, x: OrderedDict[Any, Any], depth: int) -> Any:
        """The node of ``x._metadata`` (set by ``Module.state_dict()``), ``None`` if absent."""
        attrs = vars(x)
        extra = sorted(set(attrs) - {"_metadata"})
        if extra:
            raise ConfigError(
                f"cannot checkpoint an OrderedDict with the instance attributes {extra} at "
                f"{render_path(self._path)}: only _metadata (set by Module.state_dict()) is kept",
                hint="delete the attributes or store them as entries of a dict",
            )
        if "_metadata" not in attrs:
            return None
        self._path.append(Attr("_metadata"))
        meta = self.node(attrs["_metadata"], depth + 1)
        self._path.pop()
        return meta

    def _tensor(self, x: torch.Tensor) -> dict[str, Any]:
        what = None
        if x.is_nested:
            what, hint = "a nested tensor", "store its components as a list (x.unbind())"
        elif x.layout != torch.strided:
            what, hint = f"a tensor with layout {x.layout}", "convert it to a dense tensor (x.to_dense())"
        elif x.is_quantized:
            what, hint = "a quantized tensor", "store x.dequantize(), or x.int_repr() with its scale and zero point"
        elif x.device.type == "meta":
            what, hint = "a tensor on the meta device (it has no data)", "materialize it on a real device first"
        elif str(x.dtype).removeprefix("torch.") not in LEAF_DTYPES:
            what, hint = f"a tensor of dtype {x.dtype}", "convert it to a supported dtype"
        if what is not None:
            raise ConfigError(f"cannot checkpoint {what} at {render_path(self._path)}", hint=hint)
        spec = LeafSpec(
            kind="tensor",
            dtype=str(x.dtype).removeprefix("torch."),
            shape=tuple(int(d) for d in x.shape),
            nbytes=x.numel() * x.element_size(),
            device=str(x.device),
            path=_dotted_path(self._path),
        )
        return self._leaf(x, spec)

    def _ndarray(self, x: NDArray[Any]) -> dict[str, Any]:
        if x.dtype.kind not in NP_KINDS:
            raise ConfigError(
                f"cannot checkpoint an ndarray of dtype {x.dtype} at {render_path(self._path)}: only boolean, "
                "integer, floating and complex arrays are stored as raw bytes",
                hint="convert it to a numeric array, or to a list of plain values (x.tolist())",
            )
        spec = LeafSpec(
            kind="ndarray",
            dtype=x.dtype.str,
            shape=tuple(int(d) for d in x.shape),
            nbytes=int(x.nbytes),
            device=None,
            path=_dotted_path(self._path),
        )
        return self._leaf(x, spec)

    def _leaf(self, x: Any, spec: LeafSpec) -> dict[str, Any]:
        self.leaves.append(x)
        self.specs.append(spec)
        return {"t": "leaf", "i": len(self.leaves) - 1}

    def _np_scalar(self, x: np.generic) -> dict[str, Any]:
        dtype = x.dtype
        if dtype.kind not in NP_KINDS:
            raise ConfigError(
                f"cannot checkpoint a numpy scalar of type {type(x).__name__} at {render_path(self._path)}",
                hint="convert it to a plain Python value (x.item())",
            )
        node = {"t": "np", "dtype": dtype.str, "v": _b64(x.tobytes())}
        if np.dtype(dtype.str).type is not type(x):
            node["char"] = dtype.char  # e.g. np.longlong, whose dtype string is that of np.int64
        return node

    def _too_deep(self) -> NoReturn:
        raise ConfigError(
            f"cannot checkpoint a state nested deeper than {MAX_DEPTH} levels (at {render_path(self._path)})",
            hint="flatten the structure",
        )

    def _unsupported(self, x: Any, *, as_key: bool = False) -> NoReturn:
        what, hint = _describe(x)
        if as_key:
            what = f"{what} as a dict key"
            hint = (
                "dict keys may be None, bool, int, float, str, bytes, numpy scalars, torch.dtype, "
                "torch.device, torch.Size and tuples of those; " + hint
            )
        raise ConfigError(
            f"cannot checkpoint {what} at {render_path(self._path)}: the checkpoint codec stores only {_SUPPORTED}",
            hint=hint,
        )


def _describe(x: Any) -> tuple[str, str]:
    """A name for an unsupported value and a hint on what to convert it to."""
    t = type(x)
    name = t.__qualname__
    if isinstance(x, (set, frozenset)):
        return f"a {name}", "convert it to a list (sorted(x) for a stable order)"
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return f"a namedtuple {name}", "convert it to a tuple (tuple(x)) or a dict (x._asdict())"
    if isinstance(x, Enum):
        return f"an enum member {name}.{x.name}", "store its .value or .name"
    if t is torch.Tensor or t is torch.nn.Parameter:
        return "a tensor", "use a plain value (x.item() or x.tolist())"
    if isinstance(x, torch.Tensor):
        return f"a tensor subclass {name}", "convert it to a plain tensor (x.as_subclass(torch.Tensor))"
    if isinstance(x, np.ndarray):
        return f"an ndarray subclass {name}", "convert it to a plain ndarray (np.asarray(x))"
    for base in (dict, list, tuple, str, int, float, bytes):
        if isinstance(x, base):
            return (
                f"a {name} (a subclass of {base.__name__})",
                f"convert it to a plain {base.__name__} ({base.__name__}(x))",
            )
    if callable(x):
        return f"a callable {name}", "store the settings it is built from and rebuild it after loading"
    return f"a {name}", f"convert it to one of the supported types ({_SUPPORTED})"


def _float_to_json(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(data).decode("ascii")
