"""The JSON of a DCP checkpoint's manifest: DCP's ``Metadata`` (storage metadata, the place of
each item, the planner's data) to and from JSON, every field validated on the way back, and the
value items' own format. Nothing from the store is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from typing import Any, Final

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from fastfeed.checkpoint.codec import decode, encode, spec_from_json
from fastfeed.checkpoint.codec_format import LEAF_DTYPES, TORCH_DTYPES
from fastfeed.checkpoint.dcp_base import (
    FORMAT,
    OBJECT_NAME,
    Item,
    align,
    dtype_name,
)
from fastfeed.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
)

try:  # torch >= 2.4
    from torch.distributed.checkpoint.metadata import StorageMeta
except ImportError:  # pragma: no cover - older torch
    StorageMeta = None  # type: ignore[assignment, misc]

__all__ = [
    "Malformed",
    "decode_value",
    "item_to_json",
    "metadata_from_json",
    "planner_data_to_json",
    "storage_md_to_json",
]

log = logging.getLogger(__name__)

_LAYOUTS: Final = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_MEMORY_FORMATS: Final = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.memory_format)
}


class Malformed(Exception):
    """A manifest field of the wrong shape (reported as a CorruptCheckpointError)."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise Malformed(what)


def _int(value: Any, what: str, *, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    _check(
        type(value) is int and minimum <= value <= maximum,
        f"{what} must be an integer in [{minimum}, {maximum}], got {_short(value)}",
    )
    return int(value)


def _short(x: object) -> str:
    text = repr(x)
    return text if len(text) <= 120 else text[:120] + "..."


def _ints(value: Any, what: str) -> tuple[int, ...]:
    _check(type(value) is list, f"{what} must be a list of integers, got {_short(value)}")
    return tuple(_int(v, what) for v in value)


def _str(value: Any, what: str) -> str:
    _check(type(value) is str, f"{what} must be a string, got {_short(value)}")
    return str(value)


def _bool(value: Any, what: str) -> bool:
    _check(type(value) is bool, f"{what} must be true or false, got {_short(value)}")
    return bool(value)


def _obj(value: Any, what: str, fields: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Any]:
    """``value`` as a JSON object with every one of ``fields`` and nothing but those and ``optional``."""
    _check(type(value) is dict, f"{what} must be a JSON object")
    missing = [f for f in fields if f not in value]
    _check(not missing, f"{what} lacks {missing}")
    extra = sorted(str(k) for k in value if k not in fields and k not in optional)
    _check(not extra, f"{what} has unknown fields {_short(extra)}")
    return dict(value)


def _lookup(table: dict[str, Any], name: Any, what: str) -> Any:
    _check(type(name) is str and name in table, f"unknown {what} {_short(name)}")
    return table[name]


def storage_md_to_json(fqn: str, md: Any) -> dict[str, Any]:
    """The JSON of DCP's storage metadata ``md`` of ``fqn``."""
    if isinstance(md, BytesStorageMetadata):
        return {"type": "bytes"}
    if not isinstance(md, TensorStorageMetadata):
        raise CheckpointError(f"cannot store DCP metadata of type {type(md).__name__} for {fqn!r}")
    props = md.properties
    return {
        "type": "tensor",
        "dtype": dtype_name(props.dtype),
        "layout": str(props.layout).removeprefix("torch."),
        "requires_grad": bool(props.requires_grad),
        "memory_format": str(props.memory_format).removeprefix("torch."),
        "pin_memory": bool(props.pin_memory),
        "size": [int(s) for s in md.size],
        "chunks": [{"offsets": [int(o) for o in c.offsets], "sizes": [int(s) for s in c.sizes]} for c in md.chunks],
    }


def _storage_md_from_json(fqn: str, d: Any) -> TensorStorageMetadata | BytesStorageMetadata:
    what = f"state_dict_metadata[{_short(fqn)}]"
    tensor_fields = ["type", "dtype", "layout", "requires_grad", "memory_format", "pin_memory", "size", "chunks"]
    d = _obj(d, what, ["type"], optional=tensor_fields)
    if d["type"] == "bytes":
        _obj(d, what, ["type"])
        return BytesStorageMetadata()
    _check(d["type"] == "tensor", f"{what}.type must be 'tensor' or 'bytes'")
    d = _obj(d, what, tensor_fields)
    props = TensorProperties(
        dtype=_lookup(TORCH_DTYPES, d["dtype"], "dtype"),
        layout=_lookup(_LAYOUTS, d["layout"], "layout"),
        requires_grad=_bool(d["requires_grad"], f"{what}.requires_grad"),
        memory_format=_lookup(_MEMORY_FORMATS, d["memory_format"], "memory_format"),
        pin_memory=_bool(d["pin_memory"], f"{what}.pin_memory"),
    )
    _check(type(d["chunks"]) is list, f"{what}.chunks must be a list")
    chunks = []
    for chunk in d["chunks"]:
        chunk = _obj(chunk, f"{what}.chunks[]", ["offsets", "sizes"])
        chunks.append(
            ChunkStorageMetadata(
                offsets=torch.Size(_ints(chunk["offsets"], f"{what} chunk offsets")),
                sizes=torch.Size(_ints(chunk["sizes"], f"{what} chunk sizes")),
            )
        )
    return TensorStorageMetadata(properties=props, size=torch.Size(_ints(d["size"], f"{what}.size")), chunks=chunks)


def item_to_json(index: MetadataIndex, item: Item) -> dict[str, Any]:
    """The manifest entry of one item: its DCP index and where its bytes are."""
    out: dict[str, Any] = {
        "fqn": index.fqn,
        "offset": None if index.offset is None else [int(o) for o in index.offset],
        "index": index.index,
        "object": item.object,
        "start": item.start,
        "length": item.length,
        "crc32c": item.crc32c,
        "kind": item.kind,
    }
    if item.kind == "tensor":
        out["dtype"] = item.dtype
        out["shape"] = list(item.shape or ())
    else:
        out["header"] = item.header
    return out


_ITEM_FIELDS: Final = ("fqn", "offset", "index", "object", "start", "length", "crc32c", "kind")


def _item_from_json(d: Any, objects: dict[str, int]) -> tuple[MetadataIndex, Item]:
    d = _obj(d, "item", _ITEM_FIELDS, optional=("dtype", "shape", "header"))
    fqn = _str(d["fqn"], "item fqn")
    what = f"item {_short(fqn)}"
    offset = None if d["offset"] is None else _ints(d["offset"], f"{what} offset")
    index = None if d["index"] is None else _int(d["index"], f"{what} index")
    name = _str(d["object"], f"{what} object")
    _check(name in objects, f"{what} names the unknown object {_short(name)}")
    start, length = _int(d["start"], f"{what} start"), _int(d["length"], f"{what} length")
    _check(start + length <= objects[name], f"{what} ends past the end of {name}")
    crc = _int(d["crc32c"], f"{what} crc32c", maximum=2**32 - 1)
    kind = d["kind"]
    if kind == "tensor":
        d = _obj(d, what, [*_ITEM_FIELDS, "dtype", "shape"])
        dtype = _str(d["dtype"], f"{what} dtype")
        shape = _ints(d["shape"], f"{what} shape")
        tdtype = _lookup(LEAF_DTYPES, dtype, "tensor dtype")
        itemsize = torch.empty((), dtype=tdtype).element_size()
        _check(math.prod(shape) * itemsize == length, f"{what}: {length} bytes do not hold {dtype} {list(shape)}")
        item = Item(name, start, length, crc, kind, objects[name], dtype=dtype, shape=shape)
    else:
        _check(kind == "value", f"{what} kind must be 'tensor' or 'value', got {_short(kind)}")
        d = _obj(d, what, [*_ITEM_FIELDS, "header"])
        header = _int(d["header"], f"{what} header")
        _check(header <= length, f"{what} header is longer than the item")
        item = Item(name, start, length, crc, kind, objects[name], header=header)
    return MetadataIndex(fqn, offset, index), item


def planner_data_to_json(data: Any) -> Any:
    """The planner's data as a codec tree, or None where it cannot be stored without pickle."""
    if data is None:
        return None
    try:
        tree, leaves, _ = encode(data)
    except ConfigError as exc:
        log.debug("dropping DCP planner_data that cannot be stored without pickle: %s", exc)
        return None
    if leaves:
        log.debug("dropping DCP planner_data that holds arrays")
        return None
    return tree


_MANIFEST_FIELDS: Final = (
    "format",
    "time",
    "checkpoint_id",
    "dcp_version",
    "storage_meta",
    "planner_data",
    "state_dict_metadata",
    "objects",
    "items",
)


def metadata_from_json(doc: Any, load_id: str) -> tuple[Metadata, dict[MetadataIndex, Item]]:
    """DCP ``Metadata`` and each item's place from a manifest, every field validated (Malformed otherwise)."""
    doc = _obj(doc, "manifest", ["format"], optional=_MANIFEST_FIELDS)
    _check(doc["format"] == FORMAT, f"format is {_short(doc['format'])}, expected {FORMAT!r}")
    doc = _obj(doc, "manifest", _MANIFEST_FIELDS)
    _check(type(doc["time"]) in (int, float) and math.isfinite(doc["time"]), "time must be a number")
    _str(doc["checkpoint_id"], "checkpoint_id")
    _check(type(doc["state_dict_metadata"]) is dict, "state_dict_metadata must be a JSON object")
    sd_meta = {str(k): _storage_md_from_json(str(k), v) for k, v in doc["state_dict_metadata"].items()}
    _check(type(doc["objects"]) is dict, "objects must be a JSON object")
    objects = {str(name): _object_from_json(str(name), o) for name, o in doc["objects"].items()}
    _check(type(doc["items"]) is list, "items must be a list")
    items = dict(_item_from_json(d, objects) for d in doc["items"])
    planner_data = None
    if doc["planner_data"] is not None:
        try:
            planner_data = decode(doc["planner_data"], [], [])
        except ConfigError as exc:
            raise Malformed(f"planner_data: {exc}") from exc
    kwargs: dict[str, Any] = {"state_dict_metadata": sd_meta, "planner_data": planner_data, "storage_data": items}
    fields = {f.name for f in dataclasses.fields(Metadata)}
    meta = _obj(doc["storage_meta"], "storage_meta", ["checkpoint_id", "save_id", "modules"])
    _check(type(meta["modules"]) is list, "storage_meta modules must be a list")
    if "storage_meta" in fields and StorageMeta is not None:
        kwargs["storage_meta"] = StorageMeta(
            checkpoint_id=None if meta["checkpoint_id"] is None else _str(meta["checkpoint_id"], "checkpoint_id"),
            save_id=None if meta["save_id"] is None else _str(meta["save_id"], "save_id"),
            load_id=load_id,
        )
    version = doc["dcp_version"]
    version = None if version is None else _str(version, "dcp_version")
    if "version" in fields:
        kwargs["version"] = version
    return Metadata(**kwargs), items


def _object_from_json(name: str, d: Any) -> int:
    """The size of a data object of the manifest, after checking its name and checksums."""
    what = f"object {_short(name)}"
    _check(
        OBJECT_NAME.fullmatch(name) is not None,
        f"{what} is not a data object name of this checkpoint (rank-<n>-<hex>.data, never a path)",
    )
    d = _obj(d, what, ["size", "part_size", "crc32c"])
    size = _int(d["size"], f"{what} size")
    part_size = _int(d["part_size"], f"{what} part_size", minimum=1)
    crcs = d["crc32c"]
    _check(type(crcs) is list, f"{what} crc32c must be a list")
    parts = -(-size // part_size)
    _check(
        len(crcs) == parts or (size == 0 and len(crcs) <= 1),
        f"{what} has {len(crcs)} checksums for {parts} part(s) of {size} bytes",
    )
    for crc in crcs:
        _int(crc, f"{what} crc32c", maximum=2**32 - 1)
    return size


def decode_value(data: memoryview, header: int, fqn: str, url: str) -> Any:
    """The value item ``fqn`` from its bytes ``data`` (read from ``url``): a ``header``-byte
    JSON header (tree and leaf specs), then the leaves; :class:`CorruptCheckpointError` if they
    do not decode."""
    try:
        doc = json.loads(bytes(data[:header]))
        doc = _obj(doc, "value header", ["tree", "leaves"])
        _check(type(doc["leaves"]) is list, "value header leaves must be a list")
        base = align(header)
        specs, buffers = [], []
        for leaf in doc["leaves"]:
            leaf = _obj(leaf, "value leaf", ["spec", "offset"])
            spec = spec_from_json(leaf["spec"])
            start = base + _int(leaf["offset"], "leaf offset")
            _check(start + spec.nbytes <= len(data), "a leaf ends past the end of the value")
            specs.append(spec)
            buffers.append(data[start : start + spec.nbytes])
        return decode(doc["tree"], specs, buffers)
    except (ValueError, UnicodeDecodeError, RecursionError, Malformed) as exc:  # ConfigError is a ValueError
        raise CorruptCheckpointError(f"the value of {fqn!r} in {url} cannot be decoded: {exc}", url=url) from exc
