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
import binascii
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, NoReturn

import numpy as np
import torch

from fastfeed.errors import ConfigError

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["FORMAT", "LeafSpec", "decode", "encode", "spec_from_json", "spec_to_json"]

#: The ``format`` of the trees this module writes and reads.
FORMAT: Final = "fastfeed-tree/1"

#: Containers nested deeper than this are refused (both ways), well inside Python's recursion limit.
_MAX_DEPTH: Final = 200
#: Integers with an absolute value up to this are bare JSON numbers (exact as IEEE doubles).
_MAX_SAFE_INT: Final = 2**53 - 1
_HEX_INT: Final = re.compile(r"-?0x[0-9a-f]+")
_NP_DTYPE: Final = re.compile(r"[<>|][biufc][0-9]{1,2}")
_NP_KINDS: Final = "biufc"
_NONFINITE: Final = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_QUANTIZED_DTYPES: Final = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})
_SPEC_FIELDS: Final = ("kind", "dtype", "shape", "nbytes", "device", "path")


def _torch_dtypes() -> dict[str, torch.dtype]:
    """Every dtype torch defines, by its canonical name (``str(dtype)`` without ``torch.``)."""
    # vars(), not getattr(): no lazy submodule import is ever triggered by a name in a checkpoint.
    return {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}


_TORCH_DTYPES: Final = _torch_dtypes()
#: The dtypes a tensor leaf may have (quantized tensors are refused, so are their dtypes).
_LEAF_DTYPES: Final = {k: v for k, v in _TORCH_DTYPES.items() if k not in _QUANTIZED_DTYPES}

_SUPPORTED: Final = (
    "None, bool, int, float, str, bytes, bytearray, list, tuple, dict, OrderedDict, torch.Size, "
    "torch.dtype, torch.device, numpy scalars, dense tensors and numeric numpy arrays"
)


@dataclass(frozen=True)
class LeafSpec:
    """What :func:`decode` needs to rebuild one array leaf from its raw bytes."""

    #: ``"tensor"`` or ``"ndarray"``.
    kind: str
    #: Tensors: the torch dtype name (``"float32"``, ``"bfloat16"``, ``"float8_e4m3fn"``...);
    #: ndarrays: ``np.dtype(...).str`` (``"<f4"``, ``">i8"``, ``"|b1"``), byte order included.
    dtype: str
    shape: tuple[int, ...]
    #: Size of the C-contiguous raw bytes: the number of elements times the item size.
    nbytes: int
    #: Tensors: ``str(t.device)`` at encode time (informational only); ndarrays: ``None``.
    device: str | None
    #: Where the leaf sits in the state, e.g. ``"optim.state.0.exp_avg"`` (for messages).
    path: str


# ---------------------------------------------------------------------------------------------
# Paths


class _Attr(str):
    """A path component that is an attribute (``._metadata``), not a key or an index."""


def _render_path(parts: Sequence[object], root: str = "state") -> str:
    """``state['optim']['state'][0]`` style, for error messages."""
    out = [root]
    for p in parts:
        if isinstance(p, _Attr):
            out.append(f".{p}")
        else:
            text = repr(p)
            out.append(f"[{text[:60]}...]" if len(text) > 64 else f"[{text}]")
    return "".join(out)


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
            return x if -_MAX_SAFE_INT <= x <= _MAX_SAFE_INT else {"t": "int", "v": hex(x)}
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
            if depth >= _MAX_DEPTH:
                self._too_deep()
            return {"t": "tuple", "items": [self.key(item, depth + 1) for item in k]}
        if (
            k is None
            or t in (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)
            or (isinstance(k, np.generic) and k.dtype.kind in _NP_KINDS)
        ):
            return self.node(k, depth)
        self._unsupported(k, as_key=True)

    def _container(self, x: list[Any] | tuple[Any, ...] | dict[Any, Any], depth: int) -> Any:
        if depth >= _MAX_DEPTH:
            self._too_deep()
        oid = id(x)
        if oid in self._active:
            raise ConfigError(
                f"cannot checkpoint a {type(x).__name__} that contains itself at {_render_path(self._path)}",
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
                f"{_render_path(self._path)}: only _metadata (set by Module.state_dict()) is kept",
                hint="delete the attributes or store them as entries of a dict",
            )
        if "_metadata" not in attrs:
            return None
        self._path.append(_Attr("_metadata"))
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
        elif str(x.dtype).removeprefix("torch.") not in _LEAF_DTYPES:
            what, hint = f"a tensor of dtype {x.dtype}", "convert it to a supported dtype"
        if what is not None:
            raise ConfigError(f"cannot checkpoint {what} at {_render_path(self._path)}", hint=hint)
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
        if x.dtype.kind not in _NP_KINDS:
            raise ConfigError(
                f"cannot checkpoint an ndarray of dtype {x.dtype} at {_render_path(self._path)}: only boolean, "
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
        if dtype.kind not in _NP_KINDS:
            raise ConfigError(
                f"cannot checkpoint a numpy scalar of type {type(x).__name__} at {_render_path(self._path)}",
                hint="convert it to a plain Python value (x.item())",
            )
        node = {"t": "np", "dtype": dtype.str, "v": _b64(x.tobytes())}
        if np.dtype(dtype.str).type is not type(x):
            node["char"] = dtype.char  # e.g. np.longlong, whose dtype string is that of np.int64
        return node

    def _too_deep(self) -> NoReturn:
        raise ConfigError(
            f"cannot checkpoint a state nested deeper than {_MAX_DEPTH} levels (at {_render_path(self._path)})",
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
            f"cannot checkpoint {what} at {_render_path(self._path)}: the checkpoint codec stores only {_SUPPORTED}",
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


# ---------------------------------------------------------------------------------------------
# Specs


def spec_to_json(spec: LeafSpec) -> dict[str, Any]:
    """The JSON object of ``spec`` (``shape`` as a list); :func:`spec_from_json` inverts it."""
    return {
        "kind": spec.kind,
        "dtype": spec.dtype,
        "shape": list(spec.shape),
        "nbytes": spec.nbytes,
        "device": spec.device,
        "path": spec.path,
    }


def spec_from_json(d: dict[str, Any]) -> LeafSpec:
    """The :class:`LeafSpec` of a :func:`spec_to_json` object, validated.

    Raises:
        ConfigError: a missing or extra field, a field of the wrong type, an unknown kind or
            dtype, a negative dimension, or ``nbytes`` that disagrees with shape and dtype.
    """
    if type(d) is not dict:
        raise ConfigError(f"malformed leaf spec: expected a JSON object, got {type(d).__name__}")
    missing = [f for f in _SPEC_FIELDS if f not in d]
    extra = sorted(str(k) for k in d if k not in _SPEC_FIELDS)
    if missing or extra:
        raise ConfigError(f"malformed leaf spec {_short(d)}: missing fields {missing}, unknown fields {extra}")
    shape = d["shape"]
    if type(shape) is not list:
        raise ConfigError(f"malformed leaf spec {_short(d)}: shape must be a list of integers")
    spec = LeafSpec(
        kind=d["kind"], dtype=d["dtype"], shape=tuple(shape), nbytes=d["nbytes"], device=d["device"], path=d["path"]
    )
    _check_spec(spec, f"leaf spec {_short(d)}")
    return spec


def _check_spec(spec: LeafSpec, where: str) -> torch.dtype | np.dtype[Any]:
    """Validate ``spec`` (every field's type, and nbytes against shape and dtype); its dtype."""

    def bad(what: str) -> NoReturn:
        raise ConfigError(f"malformed {where}: {what}")

    if type(spec.path) is not str:
        bad("path must be a string")
    if type(spec.shape) is not tuple or any(type(d) is not int or not 0 <= d < 2**63 for d in spec.shape):
        bad(f"shape must be a list of non-negative integers below 2**63, got {_short(spec.shape)}")
    if type(spec.nbytes) is not int or not 0 <= spec.nbytes < 2**63:
        bad(f"nbytes must be a non-negative integer below 2**63, got {_short(spec.nbytes)}")
    if type(spec.dtype) is not str:
        bad(f"dtype must be a string, got {spec.dtype!r}")
    dtype: torch.dtype | np.dtype[Any]
    if spec.kind == "tensor":
        if spec.device is not None and type(spec.device) is not str:
            bad(f"device must be a string or null, got {spec.device!r}")
        tdtype = _LEAF_DTYPES.get(spec.dtype)
        if tdtype is None:
            bad(f"unknown tensor dtype {spec.dtype!r}")
        dtype, itemsize = tdtype, tdtype.itemsize
    elif spec.kind == "ndarray":
        if spec.device is not None:
            bad(f"an ndarray has no device, got {spec.device!r}")
        ndtype = _np_dtype(spec.dtype)
        if ndtype is None:
            bad(f"unsupported ndarray dtype {spec.dtype!r} (expected a numeric dtype string such as '<f4')")
        dtype, itemsize = ndtype, ndtype.itemsize
    else:
        bad(f"kind must be 'tensor' or 'ndarray', got {spec.kind!r}")
    expected = math.prod(spec.shape) * itemsize
    if spec.nbytes != expected:
        bad(f"nbytes is {spec.nbytes} but shape {spec.shape} of {spec.dtype} takes {expected} bytes")
    return dtype


def _np_dtype(text: object) -> np.dtype[Any] | None:
    """The numeric numpy dtype of a canonical ``dtype.str`` (``"<f4"``), else ``None``."""
    if type(text) is not str or not _NP_DTYPE.fullmatch(text):
        return None
    try:
        dtype = np.dtype(text)
    except TypeError:
        return None
    return dtype if dtype.kind in _NP_KINDS and dtype.str == text else None


def _short(x: object) -> str:
    text = repr(x)
    return text if len(text) <= 200 else text[:200] + "..."


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
            f"unknown checkpoint tree format {_short(tree['format'])}: this fastfeed reads {FORMAT!r}",
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
        raise ConfigError(f"malformed checkpoint tree at {_render_path(self._path)}: {what}")

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
            self.fail(f"node {_short(n)} has no string tag 't'")
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
                f"{tag!r} node {_short(n)}: missing fields {sorted(missing)}, unknown fields {sorted(map(str, extra))}"
            )
        return fn(self, n, depth, key)

    def _enter(self, depth: int) -> None:
        if depth >= _MAX_DEPTH:
            self.fail(f"nested deeper than {_MAX_DEPTH} levels")

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
            self._path.append(_Attr("_metadata"))
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
                self.fail(f"item {pos} must be a [key, value] pair, got {_short(pair)}")
            self._path.append(_Attr(f"<key {pos}>"))
            k = self.node(pair[0], depth + 1, key=True)
            self._path.pop()
            if k in out:
                self.fail(f"duplicate dict key {_short(k)}")
            self._path.append(k)
            out[k] = self.node(pair[1], depth + 1, key=False)
            self._path.pop()

    def _int(self, n: dict[str, Any], depth: int, key: bool) -> int:
        v = n["v"]
        if type(v) is int:
            return v
        if type(v) is not str or not _HEX_INT.fullmatch(v):
            self.fail(f"int node value must be a hexadecimal string like '-0x1f', got {_short(v)}")
        return int(v, 16)

    def _float(self, n: dict[str, Any], depth: int, key: bool) -> float:
        v = n["v"]
        if type(v) is float:
            return v
        if type(v) is int and abs(v) <= _MAX_SAFE_INT:
            return float(v)
        if type(v) is str and v in _NONFINITE:
            return _NONFINITE[v]
        self.fail(f"float node value must be a number, 'nan', 'inf' or '-inf', got {_short(v)}")

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
            self.fail(f"size node value must be a list of 64-bit integers, got {_short(v)}")
        return torch.Size(v)

    def _dtype(self, n: dict[str, Any], depth: int, key: bool) -> torch.dtype:
        v = n["v"]
        dtype = _TORCH_DTYPES.get(v) if type(v) is str else None
        if dtype is None:
            self.fail(f"unknown torch dtype {_short(v)}")
        return dtype

    def _device(self, n: dict[str, Any], depth: int, key: bool) -> torch.device:
        v = n["v"]
        if type(v) is not str:
            self.fail(f"device node value must be a string, got {_short(v)}")
        try:
            return torch.device(v)
        except (RuntimeError, ValueError) as exc:
            self.fail(f"invalid torch device {v!r}: {exc}")

    def _np_scalar(self, n: dict[str, Any], depth: int, key: bool) -> np.generic:
        dtype = _np_dtype(n["dtype"])
        if dtype is None:
            self.fail(f"unsupported numpy scalar dtype {_short(n['dtype'])}")
        if "char" in n:
            char = n["char"]
            alt = np.dtype(char) if type(char) is str and len(char) == 1 and char in np.typecodes["All"] else None
            if alt is None or alt.kind != dtype.kind or alt.itemsize != dtype.itemsize:
                self.fail(f"numpy type code {_short(char)} does not match dtype {dtype.str}")
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
            self.fail(f"leaf index {_short(i)} out of range (there are {len(self.specs)} leaves)")
        spec = self.specs[i]
        where = f"leaf {i} ({spec.path!r})" if type(spec.path) is str else f"leaf {i}"
        dtype = _check_spec(spec, where)
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
