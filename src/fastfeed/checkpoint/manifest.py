"""The manifest of a :class:`~fastfeed.checkpoint.checkpointer.Checkpointer` checkpoint: its
schema and strict parser, the names of the objects under a checkpoint prefix, the layout of the
data object and the check of its part checksums.

A checkpoint is the step directory ``step-<12+ digits>/`` holding one data object
``data-<hex>.bin`` (every leaf, :data:`ALIGN`-byte aligned) and :data:`MANIFEST`, the commit
record. :func:`parse_manifest` trusts nothing: see :mod:`fastfeed.checkpoint.checkpointer` for
what it checks and why.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from fastfeed.checkpoint.codec import LeafSpec, decode, spec_from_json, spec_to_json
from fastfeed.errors import ConfigError, CorruptCheckpointError
from fastfeed.store.upload import CHECKSUM, Uploaded, checksum

__all__ = [
    "ALIGN",
    "DATA_KEY",
    "FORMAT",
    "MANIFEST",
    "MAX_MANIFEST",
    "TAMPERED",
    "CheckpointInfo",
    "Manifest",
    "check_parts",
    "decode_state",
    "layout",
    "manifest_body",
    "parse_manifest",
    "step_dir",
    "step_of",
]

#: The manifest format this version writes and reads.
FORMAT = "fastfeed-checkpoint/1"
#: Every leaf starts at a multiple of this many bytes of the data object.
ALIGN = 64
#: The name of the commit record in a step directory.
MANIFEST = "MANIFEST.json"
#: The largest manifest read (about 200 bytes a leaf: real ones are kilobytes to megabytes).
MAX_MANIFEST = 64 << 20
_STEP_DIR = re.compile(r"step-([0-9]{12,20})")
#: Data object names: fresh ones are ``data-`` + 32 hex digits (12 in earlier versions).
_BLOB_NAME = re.compile(r"data-[0-9a-f]{8,64}\.bin")
#: The key of a data object (relative to the checkpoint URL).
DATA_KEY = re.compile(r"step-[0-9]{12,20}/data-[0-9a-f]{8,64}\.bin")
_MANIFEST_FIELDS = frozenset({"format", "step", "time", "metadata", "tree", "leaves", "blob"})
_BLOB_FIELDS = frozenset({"name", "size", "part_size"})
_CHECKSUMS = (CHECKSUM, "crc32")  # checkpoints written before the switch to CRC32C carry zlib CRC32s
#: The hint of a checkpoint that does not verify.
TAMPERED = "the checkpoint was damaged or tampered with; load() falls back to the previous one"


def layout(specs: Sequence[LeafSpec]) -> tuple[list[int], int]:
    """The offset of each leaf in the data object and the object's size (:data:`ALIGN`-ed)."""
    offsets, total = [], 0
    for spec in specs:
        offsets.append(total)
        total += -(-spec.nbytes // ALIGN) * ALIGN
    return offsets, total


def step_dir(step: int) -> str:
    """The directory of the checkpoint of ``step`` (``step-000000000042/``)."""
    return f"step-{step:012d}/"


def step_of(key: str) -> int | None:
    """The step of a key under a step directory (``step-000000000042/...``, canonical only)."""
    head = key.split("/", 1)[0]
    match = _STEP_DIR.fullmatch(head)
    if match is None:
        return None
    step = int(match.group(1))
    return step if step_dir(step) == head + "/" else None


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint."""

    step: int
    time: float
    #: Bytes of tensor and array data.
    size: int
    metadata: dict[str, Any]
    #: The checkpoint's own prefix (``<url>/step-.../``).
    url: str


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest (see :func:`parse_manifest`)."""

    key: str
    step: int
    time: float
    metadata: dict[str, Any]
    tree: dict[str, Any]
    specs: list[LeafSpec]
    offsets: list[int]
    blob: str  # the data object's name in the step directory
    size: int
    part_size: int
    algorithm: str
    crcs: list[int]

    @property
    def blob_key(self) -> str:
        """The key of the data object (relative to the checkpoint URL)."""
        return step_dir(self.step) + self.blob

    def info(self, url: str) -> CheckpointInfo:
        """The committed checkpoint this manifest describes, under the checkpoint URL ``url``."""
        return CheckpointInfo(self.step, self.time, self.size, dict(self.metadata), url + step_dir(self.step))


def parse_manifest(raw: bytes, key: str, url: str) -> Manifest:
    """Validate a manifest against the schema; :class:`CorruptCheckpointError` naming ``url``."""

    def bad(what: str) -> NoReturn:
        raise CorruptCheckpointError(f"malformed checkpoint manifest {url}: {what}", url=url, hint=TAMPERED)

    def integer(value: Any, what: str, low: int = 0, high: int = 2**63 - 1) -> int:
        if type(value) is not int or not low <= value <= high:
            bad(f"{what} must be an integer in [{low}, {high}], got {_short(value)}")
        return int(value)

    def fields(obj: Any, what: str, required: frozenset[str], optional: frozenset[str] = frozenset()) -> None:
        if type(obj) is not dict:
            bad(f"{what} must be a JSON object, got {type(obj).__name__}")
        missing = sorted(required - obj.keys())
        extra = sorted(str(k) for k in obj.keys() - required - optional)
        if missing or extra:
            bad(f"{what}: missing fields {missing}, unknown fields {_short(extra)}")

    try:
        doc = json.loads(raw)
    except RecursionError:
        bad("it is nested too deeply")
    except (ValueError, UnicodeDecodeError) as exc:
        bad(f"not valid JSON ({exc})")
    if type(doc) is not dict:
        bad(f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise CorruptCheckpointError(
            f"checkpoint manifest {url} has format {_short(doc.get('format'))}, expected {FORMAT!r}",
            url=url,
            hint="it was written by another version of fastfeed, or is not a fastfeed checkpoint",
        )
    fields(doc, "the manifest", _MANIFEST_FIELDS)
    step = integer(doc["step"], "step")
    if step != step_of(key):
        bad(f"it says step {step} but is stored under {key.split('/', 1)[0]}/")
    created = doc["time"]
    if type(created) not in (int, float) or not math.isfinite(created):
        bad(f"time must be a number, got {_short(created)}")
    if type(doc["metadata"]) is not dict:
        bad(f"metadata must be a JSON object, got {type(doc['metadata']).__name__}")
    if type(doc["tree"]) is not dict:
        bad(f"tree must be a JSON object, got {type(doc['tree']).__name__}")
    blob = doc["blob"]
    present = [a for a in _CHECKSUMS if type(blob) is dict and a in blob]
    fields(blob, "blob", _BLOB_FIELDS | frozenset(present[:1]))
    if not present:
        bad(f"blob has no checksums ({' or '.join(_CHECKSUMS)})")
    name = blob["name"]
    if type(name) is not str or not _BLOB_NAME.fullmatch(name):
        bad(f"the data object name {_short(name)} is not of the form data-<hex>.bin (never a path)")
    size = integer(blob["size"], "blob size")
    part_size = integer(blob["part_size"], "blob part_size", low=1)
    algorithm = present[0]
    crcs = blob[algorithm]
    if type(crcs) is not list:
        bad(f"blob {algorithm} must be a list, got {type(crcs).__name__}")
    parts = -(-size // part_size)
    if len(crcs) != parts and not (size == 0 and len(crcs) <= 1):
        bad(f"blob {algorithm} has {len(crcs)} checksums for {parts} part(s) of {size} bytes")
    crcs = [integer(c, f"a {algorithm} checksum", high=2**32 - 1) for c in crcs]
    leaves = doc["leaves"]
    if type(leaves) is not list:
        bad(f"leaves must be a list, got {type(leaves).__name__}")
    specs, offsets = [], []
    for i, leaf in enumerate(leaves):
        fields(leaf, f"leaf {i}", frozenset({"spec", "offset"}))
        try:
            spec = spec_from_json(leaf["spec"])
        except ConfigError as exc:
            bad(f"leaf {i}: {exc.message}")
        offset = integer(leaf["offset"], f"leaf {i} offset")
        if offset + spec.nbytes > size:
            bad(f"leaf {i} ({spec.path!r}) ends at byte {offset + spec.nbytes}, past the {size} bytes of data")
        specs.append(spec)
        offsets.append(offset)
    return Manifest(
        key, step, float(created), doc["metadata"], doc["tree"], specs, offsets, name, size, part_size, algorithm, crcs
    )


def _short(x: object) -> str:
    text = repr(x)
    return text if len(text) <= 120 else text[:120] + "..."


def check_parts(manifest: Manifest, data: memoryview, url: str) -> None:
    """Verify the checksum of every part of ``data`` (the data object read from ``url``)
    against ``manifest``; :class:`CorruptCheckpointError` for the first that differs."""
    step = manifest.step
    part = manifest.part_size
    compute = checksum if manifest.algorithm == CHECKSUM else zlib.crc32
    for i, expected in enumerate(manifest.crcs):
        if compute(data[i * part : (i + 1) * part]) != expected:
            raise CorruptCheckpointError(
                f"the data of step {step} fails its {manifest.algorithm.upper()} checksum"
                f" (bytes {i * part}-{min((i + 1) * part, manifest.size) - 1}): {url}",
                url=url,
            )


def manifest_body(
    step: int,
    created: float,
    metadata: dict[str, Any],
    tree: dict[str, Any],
    specs: Sequence[LeafSpec],
    offsets: Sequence[int],
    name: str,
    size: int,
    uploaded: Uploaded,
) -> bytes:
    """The manifest (compact JSON) of the checkpoint of ``step`` whose data object ``name`` of
    ``size`` bytes went up as ``uploaded``."""
    manifest = {
        "format": FORMAT,
        "step": step,
        "time": created,
        "metadata": metadata,
        "tree": tree,
        "leaves": [{"spec": spec_to_json(s), "offset": o} for s, o in zip(specs, offsets, strict=True)],
        "blob": {"name": name, "size": size, "part_size": uploaded.part_size, CHECKSUM: uploaded.crcs},
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def decode_state(manifest: Manifest, view: memoryview, url: str, map_location: str | torch.device | None) -> Any:
    """The state of a checkpoint from its verified data ``view``; a tree that does not decode
    is a :class:`CorruptCheckpointError` naming ``url`` (the manifest), unless only
    ``map_location`` cannot be used (then the :class:`ConfigError`)."""
    step = manifest.step
    buffers = [view[o : o + s.nbytes] for s, o in zip(manifest.specs, manifest.offsets, strict=True)]
    try:
        return decode(manifest.tree, manifest.specs, buffers, map_location=map_location)
    except ConfigError as exc:
        if map_location is not None and _decodes(manifest, buffers):
            raise  # the checkpoint is fine: map_location cannot be used here
        raise CorruptCheckpointError(
            f"the state of step {step} cannot be decoded: {exc.message}",
            url=url,
            hint=TAMPERED,
        ) from exc


def _decodes(manifest: Manifest, buffers: Sequence[memoryview]) -> bool:
    try:
        decode(manifest.tree, manifest.specs, buffers)
    except ConfigError:
        return False
    return True
