"""The vocabulary of the ``fastfeed-tree`` format that its encoder (:mod:`fastfeed.checkpoint.codec`)
and decoder (:mod:`fastfeed.checkpoint.codec_decode`) share: the array leaf specs
(:class:`LeafSpec`, their JSON and its validation), the dtypes a leaf may have, the nesting and
integer limits, and the paths that error messages name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import numpy as np
import torch

from fastfeed.errors import ConfigError

__all__ = [
    "FORMAT",
    "LEAF_DTYPES",
    "MAX_DEPTH",
    "MAX_SAFE_INT",
    "NP_KINDS",
    "TORCH_DTYPES",
    "Attr",
    "LeafSpec",
    "check_spec",
    "np_dtype",
    "render_path",
    "short_repr",
    "spec_from_json",
    "spec_to_json",
]

#: The ``format`` of the trees this module writes and reads.
FORMAT: Final = "fastfeed-tree/1"

#: Containers nested deeper than this are refused (both ways), well inside Python's recursion limit.
MAX_DEPTH: Final = 200
#: Integers with an absolute value up to this are bare JSON numbers (exact as IEEE doubles).
MAX_SAFE_INT: Final = 2**53 - 1
_HEX_INT: Final = re.compile(r"-?0x[0-9a-f]+")
_NP_DTYPE: Final = re.compile(r"[<>|][biufc][0-9]{1,2}")
#: The numpy dtype kinds an array leaf or numpy scalar may have (bool, ints, floats, complex).
NP_KINDS: Final = "biufc"
_NONFINITE: Final = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_QUANTIZED_DTYPES: Final = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})
_SPEC_FIELDS: Final = ("kind", "dtype", "shape", "nbytes", "device", "path")


def _torch_dtypes() -> dict[str, torch.dtype]:
    """Every dtype torch defines, by its canonical name (``str(dtype)`` without ``torch.``)."""
    # vars(), not getattr(): no lazy submodule import is ever triggered by a name in a checkpoint.
    return {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}


#: Every torch dtype by its canonical name (``"float32"``); a dtype node may name any of them.
TORCH_DTYPES: Final = _torch_dtypes()
#: The dtypes a tensor leaf may have (quantized tensors are refused, so are their dtypes).
LEAF_DTYPES: Final = {k: v for k, v in TORCH_DTYPES.items() if k not in _QUANTIZED_DTYPES}


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


class Attr(str):
    """A path component that is an attribute (``._metadata``), not a key or an index."""


def render_path(parts: Sequence[object], root: str = "state") -> str:
    """``state['optim']['state'][0]`` style, for error messages."""
    out = [root]
    for p in parts:
        if isinstance(p, Attr):
            out.append(f".{p}")
        else:
            text = repr(p)
            out.append(f"[{text[:60]}...]" if len(text) > 64 else f"[{text}]")
    return "".join(out)


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
        raise ConfigError(f"malformed leaf spec {short_repr(d)}: missing fields {missing}, unknown fields {extra}")
    shape = d["shape"]
    if type(shape) is not list:
        raise ConfigError(f"malformed leaf spec {short_repr(d)}: shape must be a list of integers")
    spec = LeafSpec(
        kind=d["kind"], dtype=d["dtype"], shape=tuple(shape), nbytes=d["nbytes"], device=d["device"], path=d["path"]
    )
    check_spec(spec, f"leaf spec {short_repr(d)}")
    return spec


def check_spec(spec: LeafSpec, where: str) -> torch.dtype | np.dtype[Any]:
    """Validate ``spec`` (every field's type, and nbytes against shape and dtype); its dtype.
    A problem is a :class:`~fastfeed.errors.ConfigError` naming ``where``."""

    def bad(what: str) -> NoReturn:
        raise ConfigError(f"malformed {where}: {what}")

    if type(spec.path) is not str:
        bad("path must be a string")
    if type(spec.shape) is not tuple or any(type(d) is not int or not 0 <= d < 2**63 for d in spec.shape):
        bad(f"shape must be a list of non-negative integers below 2**63, got {short_repr(spec.shape)}")
    if type(spec.nbytes) is not int or not 0 <= spec.nbytes < 2**63:
        bad(f"nbytes must be a non-negative integer below 2**63, got {short_repr(spec.nbytes)}")
    if type(spec.dtype) is not str:
        bad(f"dtype must be a string, got {spec.dtype!r}")
    dtype: torch.dtype | np.dtype[Any]
    if spec.kind == "tensor":
        if spec.device is not None and type(spec.device) is not str:
            bad(f"device must be a string or null, got {spec.device!r}")
        tdtype = LEAF_DTYPES.get(spec.dtype)
        if tdtype is None:
            bad(f"unknown tensor dtype {spec.dtype!r}")
        dtype, itemsize = tdtype, tdtype.itemsize
    elif spec.kind == "ndarray":
        if spec.device is not None:
            bad(f"an ndarray has no device, got {spec.device!r}")
        ndtype = np_dtype(spec.dtype)
        if ndtype is None:
            bad(f"unsupported ndarray dtype {spec.dtype!r} (expected a numeric dtype string such as '<f4')")
        dtype, itemsize = ndtype, ndtype.itemsize
    else:
        bad(f"kind must be 'tensor' or 'ndarray', got {spec.kind!r}")
    expected = math.prod(spec.shape) * itemsize
    if spec.nbytes != expected:
        bad(f"nbytes is {spec.nbytes} but shape {spec.shape} of {spec.dtype} takes {expected} bytes")
    return dtype


def np_dtype(text: object) -> np.dtype[Any] | None:
    """The numeric numpy dtype of a canonical ``dtype.str`` (``"<f4"``), else ``None``."""
    if type(text) is not str or not _NP_DTYPE.fullmatch(text):
        return None
    try:
        dtype = np.dtype(text)
    except TypeError:
        return None
    return dtype if dtype.kind in NP_KINDS and dtype.str == text else None


def short_repr(x: object) -> str:
    """``repr(x)``, cut to 200 characters (for error messages)."""
    text = repr(x)
    return text if len(text) <= 200 else text[:200] + "..."
