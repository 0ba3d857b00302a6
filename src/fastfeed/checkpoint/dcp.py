"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), stored like
:class:`fastfeed.Checkpointer`'s: on S3 (any S3-compatible endpoint) or in a local directory,
committed by a JSON manifest written last, and loaded without unpickling anything from the store.

::

    writer = FastfeedStorageWriter("s3://bucket/runs/exp42/")
    dcp.save(state, storage_writer=writer, checkpoint_id="step-1000")     # every rank
    reader = FastfeedStorageReader("s3://bucket/runs/exp42/")
    dcp.load(state, storage_reader=reader, checkpoint_id="step-1000")     # every rank

Layout. ``url`` is a root; ``checkpoint_id`` (as DCP passes it, or the constructor's) names a
checkpoint directory *relative to it* (``"step-1000"``, ``"runs/a/3"``; an absolute URL or path
under ``url`` is accepted too; ``None`` or ``""``: ``url`` itself is the checkpoint)::

    <url>/<checkpoint_id>/rank-00000-<token>.data   every item planned to rank 0, 64-byte aligned
    <url>/<checkpoint_id>/rank-00001-<token>.data   ... one object per rank that has items
    <url>/<checkpoint_id>/MANIFEST.json             the commit record, written last by the coordinator

``<token>`` is 32 random hex digits the coordinator draws for each save (earlier versions wrote
``rank-00000.data``; the reader accepts both).

Commit protocol. Each rank writes its own object (a multipart upload with parts in parallel and
a CRC32C per part, :meth:`CkptStore.put_large`); the coordinator (rank 0) writes the manifest in
``finish()``, which DCP calls only after every rank's writes succeeded, as a conditional write
(``If-None-Match: *``; probed per store, see :mod:`fastfeed.store.upload`). A checkpoint exists if
and only if its manifest does: a failed rank leaves no manifest, and data objects without one are
invisible (the reader refuses them with a :class:`~fastfeed.errors.CheckpointError` naming the
URL). Saving to a checkpoint_id that is already committed fails in DCP's planning step, before
any data is written. Two jobs saving the same checkpoint_id at once write differently named
objects, so neither touches the other's data; the conditional manifest write lets exactly one
commit, and the other deletes its own objects and raises. Data of a failed attempt and incomplete
multipart uploads of dead writers are removed by the coordinator of a later save once older than
``orphan_age`` (see :class:`FastfeedStorageWriter`).

Reading trusts nothing in the store: the manifest (at most 64 MiB) is checked against a strict
schema (every field with its type, no unknown field, object names of the form above and never a
path, so nothing outside the checkpoint directory is read; sizes and offsets within bounds; a
CRC32C for every part); an object's real size is checked against the manifest before any buffer
is allocated; locally, symbolic links are refused. Anything else raises
:class:`~fastfeed.errors.CorruptCheckpointError` naming the manifest or the object.

Manifest ``fastfeed-dcp/1`` (JSON)::

    {"format": "fastfeed-dcp/1", "time": 1718000000.0, "checkpoint_id": "step-1000",
     "dcp_version": "1.0.0",
     "storage_meta": {"checkpoint_id": "s3://...", "save_id": "...", "modules": []},
     "planner_data": <fastfeed-tree/1 tree or null>,   # DCP's flatten mapping (fqn -> path)
     "state_dict_metadata": {
        "model.w": {"type": "tensor", "dtype": "float32", "layout": "strided",
                    "requires_grad": false, "memory_format": "contiguous_format",
                    "pin_memory": false, "size": [16, 8],
                    "chunks": [{"offsets": [0, 0], "sizes": [8, 8]}, ...]},
        "step": {"type": "bytes"}},
     "objects": {"rank-00000-<token>.data": {"size": 4352, "part_size": 33554432, "crc32c": [...]}},
     "items": [{"fqn": "model.w", "offset": [0, 0], "index": 0, "object": "rank-00000-<token>.data",
                "start": 0, "length": 256, "crc32c": 123, "kind": "tensor",
                "dtype": "float32", "shape": [8, 8]},
               {"fqn": "step", "offset": null, "index": null, ..., "kind": "value",
                "header": 97}]}

Tensors (``WriteItemType.TENSOR`` / ``SHARD``) are stored as their raw bytes (a C-contiguous
CPU copy, in their own dtype), with dtype and shape in the manifest. Every item has its own
CRC32C, checked whenever it is read: loading reads only the byte ranges of the items a rank
needs (ranged GETs, nearby items coalesced, at most ``max_concurrency`` in flight) and raises
:class:`~fastfeed.errors.CorruptCheckpointError` naming the object and the item on a mismatch,
a missing or truncated object.

Non-tensor values (``WriteItemType.BYTE_IO``). DCP's default save planner turns each into a
``torch.save`` (pickle) stream, and its default load planner's ``load_bytes`` calls
``torch.load(..., weights_only=False)`` on whatever bytes the storage layer hands it. Pickle is
never stored here: the writer takes the value itself from the planner (``lookup_object`` of
DCP's ``DefaultSavePlanner``; for other planners it reads the planner's stream back with
``torch.load(weights_only=True)``) and stores it with fastfeed's pickle-free codec
(:mod:`fastfeed.checkpoint.codec`: a JSON tree plus raw array leaves; values the codec cannot represent
are refused at save time, naming the key). The reader decodes that (validating everything,
executing nothing), and only then re-serializes the *decoded* value with ``torch.save`` in
memory for ``planner.load_bytes``: the one pickle stream DCP unpickles is produced locally from
plain values (None, bool, int, float, str, bytes, lists, tuples, dicts, torch.Size / dtype /
device, numpy scalars, tensors and numeric arrays), never read from the store. A tampered value
fails to decode with a :class:`~fastfeed.errors.CorruptCheckpointError`.

Errors. DCP runs these hooks inside its collectives and raises its own
``torch.distributed.checkpoint.api.CheckpointException`` (a ``BaseException``) on every rank;
its ``failures`` map each failed rank to the fastfeed error raised here.

Limits. ``use_collectives=False`` (per-rank metadata, experimental in DCP) is refused. Items are
staged into one CPU buffer per rank before the upload (like :class:`~fastfeed.Checkpointer`).
The writer and the reader hold a connection pool and a reference on fastfeed's IO thread: call
:meth:`close` (or use them as context managers); they are also closed at garbage collection and
at exit. Both can be pickled (e.g. for DCP's process-based ``async_save``): the copy reopens the
store on first use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import math
import os
import re
import secrets
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from fastfeed import _loop
from fastfeed.checkpoint.codec import decode, encode, spec_from_json, spec_to_json
from fastfeed.checkpoint.codec_format import LEAF_DTYPES, TORCH_DTYPES
from fastfeed.config import S3Config
from fastfeed.errors import (
    CheckpointError,
    ConditionFailedError,
    ConfigError,
    CorruptCheckpointError,
    FastfeedError,
    NotFoundError,
)
from fastfeed.store.upload import (
    CkptStore,
    check_age,
    checksum,
    open_ckpt_store,
    transfer_settings,
)
from fastfeed.urls import parse_url

try:  # torch >= 2.4
    from torch.distributed.checkpoint.metadata import StorageMeta
except ImportError:  # pragma: no cover - older torch
    StorageMeta = None  # type: ignore[assignment, misc]

try:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
except ImportError:  # pragma: no cover - every supported torch has it
    DefaultSavePlanner = None  # type: ignore[assignment, misc]

__all__ = ["FORMAT", "MANIFEST", "FastfeedStorageReader", "FastfeedStorageWriter"]

log = logging.getLogger(__name__)

#: The ``format`` of the manifests this module writes and reads.
FORMAT: Final = "fastfeed-dcp/1"
#: The commit record of a checkpoint directory.
MANIFEST: Final = "MANIFEST.json"
#: DCP's own metadata version (``torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION``).
_DCP_VERSION: Final = "1.0.0"
_ALIGN: Final = 64
#: Items of one object closer than this are read with one ranged GET.
_MERGE_GAP: Final = 1 << 20
#: The largest manifest read (real ones are kilobytes to a few megabytes).
_MAX_MANIFEST: Final = 64 << 20
#: Data object names (``rank-00003.data`` in earlier versions): one file name, never a path.
_OBJECT_NAME: Final = re.compile(r"rank-[0-9]{5,9}(-[0-9a-f]{8,64})?\.data")
#: Keys of data objects under the root (in any checkpoint directory), for the orphan sweep.
_DATA_KEY: Final = re.compile(r"(.+/)?rank-[0-9]{5,9}(-[0-9a-f]{8,64})?\.data")
_TAMPERED: Final = "the checkpoint was damaged or tampered with"
#: Default ``orphan_age`` (as for :class:`~fastfeed.Checkpointer`).
_DEFAULT_ORPHAN_AGE: Final = 24 * 3600.0

_LAYOUTS: Final = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_MEMORY_FORMATS: Final = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.memory_format)
}


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------
# What travels between ranks (pickled by DCP over the process group, never stored)


@dataclass(frozen=True)
class _RankObject:
    """``SavePlan.storage_data``: the object one rank writes (a name in the checkpoint dir)."""

    name: str


@dataclass(frozen=True)
class _Object:
    """One written data object: its size and the CRC32C of each ``part_size`` slice."""

    name: str
    size: int
    part_size: int
    crc32c: tuple[int, ...]


@dataclass(frozen=True)
class _Item:
    """Where one DCP item lives (``Metadata.storage_data`` values, and the manifest's items)."""

    object: str
    start: int
    length: int
    crc32c: int
    kind: str  # "tensor" (raw bytes) or "value" (a fastfeed-tree/1 header + array leaves)
    object_size: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    header: int | None = None


@dataclass(frozen=True)
class _Written:
    """``WriteResult.storage_data``: the item and the object it went into."""

    item: _Item
    obj: _Object


# ------------------------------------------------------------------------------------------
# Checkpoint ids


def _checkpoint_dir(root: str, checkpoint_id: str | os.PathLike[str] | None) -> str:
    """The checkpoint directory relative to ``root`` (``""`` or ``"a/b/"``)."""
    if checkpoint_id is None:
        return ""
    text = os.fspath(checkpoint_id)
    if not isinstance(text, str):
        raise ConfigError(f"checkpoint_id must be a str or a path, got {checkpoint_id!r}")
    if "://" in text or os.path.isabs(text):
        loc = parse_url(text)
        full = (loc.url if loc.scheme == "s3" else "file://" + os.path.abspath(loc.path)).rstrip("/") + "/"
        if not full.startswith(root):
            raise ConfigError(
                f"checkpoint_id {text!r} is not under this storage's URL {root}",
                url=root,
                hint="pass a checkpoint_id relative to the URL the writer/reader was created with",
            )
        text = full[len(root) :]
    parts = [p for p in text.replace(os.sep, "/").split("/") if p and p != "."]
    if ".." in parts:
        raise ConfigError(f"checkpoint_id {text!r} must not contain '..'", url=root)
    return "".join(p + "/" for p in parts)


# ------------------------------------------------------------------------------------------
# Store access shared by the writer and the reader


def _shutdown(io_loop: _loop.IOLoop, store: CkptStore) -> None:
    try:
        io_loop.run(store.aclose(), timeout=60)
    except Exception as exc:  # closing must not mask anything
        log.debug("closing the checkpoint store failed: %r", exc)
    finally:
        io_loop.release()


class _StoreClient:
    """Opens the :class:`CkptStore` of ``url`` on fastfeed's IO loop (lazily after unpickling)."""

    url: str
    part_size: int
    max_concurrency: int
    _spec: str
    _s3: S3Config
    _io: _loop.IOLoop | None
    _store: CkptStore | None
    _finalizer: Any
    _dir: str

    def _configure(
        self,
        url: str | os.PathLike[str],
        s3: S3Config | None,
        endpoint_url: str | None,
        part_size: int | str,
        max_concurrency: int,
    ) -> None:
        self.part_size, self.max_concurrency, s3 = transfer_settings(part_size, max_concurrency, s3, endpoint_url)
        self._spec = os.fspath(url)
        self._s3 = s3
        self._io = None
        self._store = None
        self._finalizer = None
        self._dir = ""
        self.url = self._open()[1].url

    def _open(self) -> tuple[_loop.IOLoop, CkptStore]:
        if self._io is None or self._store is None:
            io_loop = _loop.acquire()
            try:
                store = io_loop.run(open_ckpt_store(self._spec, self._s3))
            except BaseException:
                io_loop.release()
                raise
            self._io, self._store = io_loop, store
            self._finalizer = weakref.finalize(self, _shutdown, io_loop, store)
        return self._io, self._store

    def close(self) -> None:
        """Release the store's connections and the IO thread reference (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()
        self._io = self._store = self._finalizer = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_io=None, _store=None, _finalizer=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def checkpoint_id(self) -> str:
        """The URL of the current checkpoint directory."""
        return self.url + self._dir

    def _object_url(self, name: str) -> str:
        return self.url + self._dir + name

    def _manifest(self) -> bytes | None:
        """The current checkpoint's manifest, or None if it is not committed."""
        io_loop, store = self._open()
        try:
            return io_loop.run(store.get(self._dir + MANIFEST, limit=_MAX_MANIFEST))
        except NotFoundError:
            return None


# ------------------------------------------------------------------------------------------
# Writing


class FastfeedStorageWriter(_StoreClient, StorageWriter):
    """A DCP ``StorageWriter`` for ``s3://bucket/prefix/`` or a local directory.

    Args:
        url: the root under which checkpoints are written (``s3://...``, ``file://...`` or a
            path); a ``checkpoint_id`` given to ``dcp.save`` is a directory relative to it.
        checkpoint_id: the checkpoint directory used when ``dcp.save`` gets none (default: ``url``
            itself).
        s3, endpoint_url: as for :class:`~fastfeed.Checkpointer` (AWS_* variables by default).
        part_size: multipart part size of the per-rank upload (at least 5 MiB).
        max_concurrency: parts in flight per upload.
        orphan_age: as for :class:`~fastfeed.Checkpointer`: incomplete multipart uploads of data
            objects under ``url``, and data objects of an uncommitted checkpoint directory,
            older than this many seconds are removed by the coordinator before it saves; a
            save that takes longer than half of it does not commit.

    Raises (at construction): :class:`~fastfeed.errors.StoreError` subclasses for a missing
    bucket, denied access or an unreachable endpoint. See the module docstring for the layout,
    the manifest and the commit protocol.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        checkpoint_id: str | os.PathLike[str] | None = None,
        s3: S3Config | None = None,
        endpoint_url: str | None = None,
        part_size: int | str = "32MiB",
        max_concurrency: int = 8,
        orphan_age: float = _DEFAULT_ORPHAN_AGE,
    ) -> None:
        self.orphan_age = check_age(orphan_age)
        self._started = time.monotonic()
        self._configure(url, s3, endpoint_url, part_size, max_concurrency)
        try:
            io_loop, store = self._open()
            io_loop.run(store.check_writable())
            self._dir = _checkpoint_dir(self.url, checkpoint_id)
        except BaseException:
            self.close()
            raise
        self.save_id = str(uuid.uuid4())
        self.is_coordinator = False
        self.rank = 0

    def __enter__(self) -> FastfeedStorageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- StorageWriter ------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new save; ``checkpoint_id`` (relative to ``url``) picks the directory."""
        if checkpoint_id is not None:
            self._dir = _checkpoint_dir(self.url, checkpoint_id)
        self.save_id = str(uuid.uuid4())

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise CheckpointError(
                "FastfeedStorageWriter needs DCP's collectives (use_collectives=True)",
                url=self.checkpoint_id,
                hint="a checkpoint is committed by one manifest that the coordinator writes",
            )
        self.is_coordinator = is_coordinator
        rank = kwargs.get("rank")
        if rank is None:
            rank = torch.distributed.get_rank() if _dist_ready() else 0
        self.rank = int(rank)

    def storage_meta(self) -> StorageMeta | None:
        """DCP's request metadata of this save: the checkpoint URL and a fresh save id."""
        if StorageMeta is None:  # pragma: no cover - older torch
            return None
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return dataclasses.replace(plan, storage_data=_RankObject(f"rank-{self.rank:05d}.data"))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # The coordinator, before any rank writes a byte: never overwrite a committed checkpoint.
        if self._manifest() is not None:
            raise CheckpointError(
                f"a checkpoint is already committed at {self.checkpoint_id}",
                url=self.checkpoint_id,
                hint="save each checkpoint_id once (or delete that checkpoint first)",
            )
        self._started = time.monotonic()
        self._sweep()
        # Names unique to this save: two jobs saving the same checkpoint_id never write (or
        # delete) each other's data; the conditional manifest write picks one of them.
        token = secrets.token_hex(16)
        return [
            dataclasses.replace(p, storage_data=_RankObject(f"rank-{i:05d}-{token}.data")) for i, p in enumerate(plans)
        ]

    def _sweep(self) -> None:
        """Remove what dead writers left: multipart uploads of data objects under the root and
        data objects of this (uncommitted) directory, older than ``orphan_age``."""
        io_loop, store = self._open()
        try:
            io_loop.run(store.abort_orphaned_uploads("", older_than=self.orphan_age, match=_DATA_KEY.fullmatch))
            stale = [
                o.key
                for o in io_loop.run(store.list_objects(self._dir))
                if _OBJECT_NAME.fullmatch(o.key[len(self._dir) :]) and o.age is not None and o.age >= self.orphan_age
            ]
            if stale:
                log.info("removing %d abandoned data object(s) under %s", len(stale), self.checkpoint_id)
                io_loop.run(store.delete(stale))
        except FastfeedError as err:
            log.warning("could not look for abandoned uploads under %s: %s", self.url, err)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        target = plan.storage_data
        name = target.name if isinstance(target, _RankObject) else f"rank-{self.rank:05d}-{secrets.token_hex(16)}.data"
        results = self._write(name, plan.items, planner) if plan.items else []
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        items: dict[MetadataIndex, _Item] = {}
        objects: dict[str, _Object] = {}
        for rank_results in results:
            for result in rank_results:
                written = result.storage_data
                if not isinstance(written, _Written):
                    raise CheckpointError(
                        f"a rank's write result for {result.index.fqn!r} did not come from FastfeedStorageWriter",
                        url=self.checkpoint_id,
                        hint="every rank must save with a FastfeedStorageWriter of the same URL",
                    )
                items[result.index] = written.item
                objects[written.obj.name] = written.obj
        if hasattr(metadata, "version"):
            metadata.version = metadata.version or _DCP_VERSION
        metadata.storage_data = items
        if hasattr(metadata, "storage_meta"):
            metadata.storage_meta = self.storage_meta()
        manifest = {
            "format": FORMAT,
            "time": time.time(),
            "checkpoint_id": self._dir.rstrip("/"),
            "dcp_version": getattr(metadata, "version", None) or _DCP_VERSION,
            "storage_meta": {"checkpoint_id": self.checkpoint_id, "save_id": self.save_id, "modules": []},
            "planner_data": _planner_data_to_json(metadata.planner_data),
            "state_dict_metadata": {
                fqn: _storage_md_to_json(fqn, md) for fqn, md in metadata.state_dict_metadata.items()
            },
            "objects": {
                o.name: {"size": o.size, "part_size": o.part_size, "crc32c": list(o.crc32c)}
                for o in sorted(objects.values(), key=lambda o: o.name)
            },
            "items": [_item_to_json(index, item) for index, item in items.items()],
        }
        body = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
        io_loop, store = self._open()
        took = time.monotonic() - self._started
        if took > self.orphan_age / 2:
            self._discard(objects)
            raise CheckpointError(
                f"the save of {self.checkpoint_id} took {took:.0f} s, more than half of orphan_age "
                f"({self.orphan_age:.0f} s): another writer could count its data as abandoned, so it is not committed",
                url=self.checkpoint_id,
                hint="pass a larger orphan_age to FastfeedStorageWriter",
            )
        try:
            io_loop.run(store.put(self._dir + MANIFEST, memoryview(body), if_absent=True))
        except ConditionFailedError as err:
            self._discard(objects)
            raise CheckpointError(
                f"a checkpoint was committed at {self.checkpoint_id} while this one was being written",
                url=self.checkpoint_id,
                hint="two jobs saved the same checkpoint_id: the other one's commit is kept, this one's data removed",
            ) from err
        log.info(
            "committed DCP checkpoint %s: %d items in %d objects, %d bytes",
            self.checkpoint_id,
            len(items),
            len(objects),
            sum(o.size for o in objects.values()),
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _valid_id(checkpoint_id)

    # -- internals -----------------------------------------------------------------------

    def _discard(self, objects: dict[str, _Object]) -> None:
        """Delete this save's data objects (and nothing else) after it lost or gave up."""
        io_loop, store = self._open()
        try:
            io_loop.run(store.delete([self._dir + name for name in objects]))
        except Exception as exc:  # the commit error matters more
            log.warning("could not remove the data of an uncommitted save under %s: %s", self.checkpoint_id, exc)

    def _write(self, name: str, write_items: Sequence[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        # Plan the layout first (values are encoded now, tensors resolved one by one below).
        entries: list[_Entry] = []
        for item in write_items:
            if item.type == WriteItemType.BYTE_IO:
                region, header = _encode_value(planner, item, self.checkpoint_id)
                entries.append(_Entry(item, "value", len(region), region=region, header=header))
                continue
            data = item.tensor_data
            if data is None:
                raise CheckpointError(f"tensor item {item.index.fqn!r} has no tensor_data", url=self.checkpoint_id)
            shape = tuple(int(s) for s in data.chunk.sizes)
            itemsize = torch.empty((), dtype=data.properties.dtype).element_size()
            entries.append(_Entry(item, "tensor", math.prod(shape) * itemsize, shape=shape))
        starts, total = [], 0
        for entry in entries:
            starts.append(total)
            total += _align(entry.nbytes)
        arena = torch.empty(total, dtype=torch.uint8)
        view = memoryview(arena.numpy().data).cast("B")
        for entry, start in zip(entries, starts, strict=True):
            if entry.region is not None:  # a value, encoded above
                view[start : start + entry.nbytes] = entry.region
                continue
            tensor = planner.resolve_data(entry.item)
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(
                    f"the planner resolved tensor item {entry.item.index.fqn!r} to {type(tensor).__name__}",
                    url=self.checkpoint_id,
                )
            entry.dtype = _copy_tensor(tensor, arena[start : start + entry.nbytes], entry, self.checkpoint_id)
            del tensor
        key = self._dir + name
        io_loop, store = self._open()
        uploaded = io_loop.run(
            store.put_large(key, view[:total], part_size=self.part_size, concurrency=self.max_concurrency)
        )
        obj = _Object(name, total, uploaded.part_size, tuple(int(c) for c in uploaded.crcs))
        results = []
        for entry, start in zip(entries, starts, strict=True):
            stored = _Item(
                object=name,
                start=start,
                length=entry.nbytes,
                crc32c=checksum(view[start : start + entry.nbytes]),
                kind=entry.kind,
                object_size=total,
                dtype=entry.dtype,
                shape=entry.shape if entry.kind == "tensor" else None,
                header=entry.header,
            )
            results.append(
                WriteResult(index=entry.item.index, size_in_bytes=entry.nbytes, storage_data=_Written(stored, obj))
            )
        log.debug("wrote %s%s: %d items, %d bytes", self.url, key, len(entries), total)
        return results


@dataclass
class _Entry:
    item: WriteItem
    kind: str
    nbytes: int
    region: bytes | None = None
    header: int | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None


def _dist_ready() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def _valid_id(checkpoint_id: str | os.PathLike[str]) -> bool:
    try:
        text = os.fspath(checkpoint_id)
        if not isinstance(text, str) or not text:
            return False
        if "://" in text:
            parse_url(text)
    except (TypeError, ConfigError):
        return False
    return True


def _copy_tensor(tensor: torch.Tensor, region: torch.Tensor, entry: _Entry, url: str) -> str:
    """Copy ``tensor`` (any device, any strides) into the uint8 ``region``; its dtype name."""
    fqn = entry.item.index.fqn
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        raise CheckpointError(f"{fqn!r} is a {tensor.layout} tensor; only dense tensors can be stored", url=url)
    name = _dtype_name(tensor.dtype)
    if name not in LEAF_DTYPES:
        raise CheckpointError(f"{fqn!r} has dtype {tensor.dtype}, which cannot be stored as raw bytes", url=url)
    nbytes = tensor.numel() * tensor.element_size()
    if tuple(tensor.shape) != entry.shape or nbytes != entry.nbytes:
        raise CheckpointError(
            f"the planner resolved {fqn!r} to a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, "
            f"but planned {entry.nbytes} bytes of shape {entry.shape}",
            url=url,
        )
    if nbytes:
        region.view(tensor.dtype).view(tensor.shape).copy_(tensor)
    return name


def _value_of(planner: SavePlanner, item: WriteItem, url: str) -> Any:
    """The Python value of a BYTE_IO item, without unpickling anything from outside."""
    if (
        DefaultSavePlanner is not None
        and isinstance(planner, DefaultSavePlanner)
        and type(planner).resolve_data is DefaultSavePlanner.resolve_data
        and type(planner).transform_object is DefaultSavePlanner.transform_object
    ):
        return planner.lookup_object(item.index)  # what resolve_data would torch.save
    data = planner.resolve_data(item)
    if not isinstance(data, io.BytesIO):
        raise CheckpointError(
            f"the planner resolved bytes item {item.index.fqn!r} to {type(data).__name__}, not io.BytesIO", url=url
        )
    data.seek(0)
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"the planner's bytes for {item.index.fqn!r} are not a torch.save stream of plain values: {exc}",
            url=url,
            hint="FastfeedStorageWriter stores non-tensor values with fastfeed's pickle-free codec",
        ) from exc


def _encode_value(planner: SavePlanner, item: WriteItem, url: str) -> tuple[bytes, int]:
    """A value's region: a JSON header (tree + leaf specs), then its array leaves, aligned."""
    value = _value_of(planner, item, url)
    try:
        tree, leaves, specs = encode(value)
    except ConfigError as exc:
        raise CheckpointError(
            f"cannot store the value of {item.index.fqn!r} without pickle: {exc.message}",
            url=url,
            hint="store plain values (numbers, strings, lists, dicts, tensors, numeric arrays) or tensors",
        ) from exc
    blobs: list[bytes] = []
    layout: list[dict[str, Any]] = []
    offset = 0
    for leaf, spec in zip(leaves, specs, strict=True):
        if isinstance(leaf, torch.Tensor):
            flat = leaf.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
            blob = flat.cpu().numpy().tobytes()
        else:
            blob = np.ascontiguousarray(leaf).tobytes()
        layout.append({"spec": spec_to_json(spec), "offset": offset})
        blobs.append(blob + bytes(_align(len(blob)) - len(blob)))
        offset += _align(len(blob))
    header = json.dumps({"tree": tree, "leaves": layout}, separators=(",", ":"), allow_nan=False).encode()
    return header + bytes(_align(len(header)) - len(header)) + b"".join(blobs), len(header)


# ------------------------------------------------------------------------------------------
# Manifest (de)serialization


class _Malformed(Exception):
    """A manifest field of the wrong shape (reported as a CorruptCheckpointError)."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise _Malformed(what)


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


def _storage_md_to_json(fqn: str, md: Any) -> dict[str, Any]:
    if isinstance(md, BytesStorageMetadata):
        return {"type": "bytes"}
    if not isinstance(md, TensorStorageMetadata):
        raise CheckpointError(f"cannot store DCP metadata of type {type(md).__name__} for {fqn!r}")
    props = md.properties
    return {
        "type": "tensor",
        "dtype": _dtype_name(props.dtype),
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


def _item_to_json(index: MetadataIndex, item: _Item) -> dict[str, Any]:
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


def _item_from_json(d: Any, objects: dict[str, int]) -> tuple[MetadataIndex, _Item]:
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
        item = _Item(name, start, length, crc, kind, objects[name], dtype=dtype, shape=shape)
    else:
        _check(kind == "value", f"{what} kind must be 'tensor' or 'value', got {_short(kind)}")
        d = _obj(d, what, [*_ITEM_FIELDS, "header"])
        header = _int(d["header"], f"{what} header")
        _check(header <= length, f"{what} header is longer than the item")
        item = _Item(name, start, length, crc, kind, objects[name], header=header)
    return MetadataIndex(fqn, offset, index), item


def _planner_data_to_json(data: Any) -> Any:
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


# ------------------------------------------------------------------------------------------
# Reading


class FastfeedStorageReader(_StoreClient, StorageReader):
    """A DCP ``StorageReader`` for checkpoints written by :class:`FastfeedStorageWriter`.

    Args:
        url: the root given to the writer (a ``checkpoint_id`` passed to ``dcp.load`` is
            relative to it).
        checkpoint_id: the checkpoint directory read when ``dcp.load`` gets none (default:
            ``url`` itself).
        s3, endpoint_url: as for :class:`~fastfeed.Checkpointer`.
        part_size: the largest ranged GET.
        max_concurrency: ranged GETs in flight.

    :meth:`read_metadata` raises :class:`~fastfeed.errors.CheckpointError` naming the URL when
    the directory holds no committed checkpoint (no manifest), and
    :class:`~fastfeed.errors.CorruptCheckpointError` for a malformed manifest; ``read_data``
    raises :class:`~fastfeed.errors.CorruptCheckpointError` naming the object and the item for
    missing, truncated or corrupt data. Nothing read from the store is unpickled.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        checkpoint_id: str | os.PathLike[str] | None = None,
        s3: S3Config | None = None,
        endpoint_url: str | None = None,
        part_size: int | str = "32MiB",
        max_concurrency: int = 8,
    ) -> None:
        self._configure(url, s3, endpoint_url, part_size, max_concurrency)
        try:
            self._dir = _checkpoint_dir(self.url, checkpoint_id)
        except BaseException:
            self.close()
            raise
        self.load_id = str(uuid.uuid4())
        self._items: dict[MetadataIndex, _Item] = {}

    def __enter__(self) -> FastfeedStorageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- StorageReader ------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load; ``checkpoint_id`` (relative to ``url``) picks the directory."""
        if checkpoint_id is not None:
            self._dir = _checkpoint_dir(self.url, checkpoint_id)
        self._items = {}
        self.load_id = str(uuid.uuid4())

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's metadata of the checkpoint, rebuilt from its JSON manifest."""
        io_loop, store = self._open()
        url = self._object_url(MANIFEST)
        try:
            raw = io_loop.run(store.get(self._dir + MANIFEST, limit=_MAX_MANIFEST))
        except NotFoundError as err:
            raise CheckpointError(
                f"no committed checkpoint at {self.checkpoint_id}: {MANIFEST} does not exist",
                url=self.checkpoint_id,
                hint="a checkpoint exists only once its manifest is written; the save never finished or failed",
            ) from err
        try:
            doc = json.loads(raw)
        except RecursionError as exc:
            raise CorruptCheckpointError(f"{url} is nested too deeply", url=url, hint=_TAMPERED) from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(f"{url} is not valid JSON: {exc}", url=url, hint=_TAMPERED) from exc
        try:
            metadata, items = _metadata_from_json(doc, self.load_id)
        except _Malformed as exc:
            raise CorruptCheckpointError(
                f"malformed checkpoint manifest {url}: {exc}", url=url, hint=_TAMPERED
            ) from exc
        self._items = items
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        items = metadata.storage_data
        if not isinstance(items, dict) or not all(isinstance(v, _Item) for v in items.values()):
            raise CheckpointError("this metadata was not read by FastfeedStorageReader", url=self.checkpoint_id)
        self._items = items

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        wanted: dict[tuple[str, int, int], _Item] = {}
        for req in plan.items:
            item = self._item(req)
            wanted[_span(item)] = item
        buffers = self._fetch(list(wanted.values()))
        for req in plan.items:
            item = self._item(req)
            data = buffers[_span(item)]
            if req.type == LoadItemType.BYTE_IO:
                if item.kind != "value":
                    raise CorruptCheckpointError(
                        f"{req.storage_index.fqn!r} is stored as a tensor, but the planner asks for bytes",
                        url=self._object_url(item.object),
                    )
                value = self._decode_value(req, item, data)
                stream = io.BytesIO()
                torch.save(value, stream)  # a stream made here, from decoded plain values
                stream.seek(0)
                planner.load_bytes(req, stream)
                continue
            if item.kind != "tensor":
                raise CorruptCheckpointError(
                    f"{req.storage_index.fqn!r} is stored as a value, but the planner asks for a tensor",
                    url=self._object_url(item.object),
                )
            tensor = self._tensor(req, item, data)
            for dim, (offset, length) in enumerate(zip(req.storage_offsets, req.lengths, strict=True)):
                tensor = tensor.narrow(dim, int(offset), int(length))
            target = planner.resolve_tensor(req).detach()
            if target.size() != tensor.size():
                raise CheckpointError(
                    f"{req.storage_index.fqn!r}: the checkpoint has a slice of size {tuple(tensor.size())} "
                    f"where the state dict has {tuple(target.size())}",
                    url=self.checkpoint_id,
                )
            target.copy_(tensor)
            planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _valid_id(checkpoint_id)

    # -- internals -----------------------------------------------------------------------

    def _item(self, req: ReadItem) -> _Item:
        try:
            return self._items[req.storage_index]
        except KeyError:
            raise CorruptCheckpointError(
                f"the manifest has no item {req.storage_index.fqn!r} at offset {req.storage_index.offset}",
                url=self._object_url(MANIFEST),
            ) from None

    def _fetch(self, items: list[_Item]) -> dict[tuple[str, int, int], memoryview]:
        """Read and verify every item's bytes (ranged reads, nearby items coalesced)."""
        io_loop, store = self._open()
        by_object: dict[str, list[_Item]] = {}
        for item in items:
            by_object.setdefault(item.object, []).append(item)

        async def fetch_all() -> dict[tuple[str, int, int], memoryview]:
            limit = asyncio.Semaphore(self.max_concurrency)
            out: dict[tuple[str, int, int], memoryview] = {}

            async def one_object(name: str, wanted: list[_Item]) -> None:
                key, url = self._dir + name, self._object_url(name)
                try:
                    stored = await store.head(key)
                except NotFoundError as err:
                    raise CorruptCheckpointError(
                        f"data object {url} is missing", url=url, hint="it was deleted or never finished"
                    ) from err
                # The real size before any buffer is allocated for the one the manifest claims.
                if stored.size != wanted[0].object_size:
                    raise CorruptCheckpointError(
                        f"data object {url} has {stored.size} bytes, the manifest says {wanted[0].object_size}",
                        url=url,
                    )
                jobs = []
                for start, end, members in _coalesce(wanted):
                    buf = memoryview(bytearray(end - start))
                    for item in members:
                        out[_span(item)] = buf[item.start - start : item.start - start + item.length]
                    for s in range(start, end, self.part_size):
                        e = min(s + self.part_size, end)
                        jobs.append((s, e, buf[s - start : e - start]))

                async def part(s: int, e: int, view: memoryview) -> None:
                    async with limit:
                        try:
                            await store.read_range(key, s, e, view, stored.etag)
                        except (NotFoundError, ConditionFailedError) as err:
                            raise CorruptCheckpointError(
                                f"data object {url} was deleted or replaced while it was read", url=url
                            ) from err

                await asyncio.gather(*(part(s, e, v) for s, e, v in jobs))

            await asyncio.gather(*(one_object(n, w) for n, w in by_object.items()))
            return out

        buffers = io_loop.run(fetch_all())
        for item in items:
            data = buffers[_span(item)]
            if checksum(data) != item.crc32c:
                raise CorruptCheckpointError(
                    f"data object {self._object_url(item.object)} fails its CRC32C checksum "
                    f"(bytes {item.start}-{item.start + item.length - 1})",
                    url=self._object_url(item.object),
                )
        return buffers

    def _tensor(self, req: ReadItem, item: _Item, data: memoryview) -> torch.Tensor:
        dtype = LEAF_DTYPES[str(item.dtype)]
        shape = tuple(item.shape or ())
        if not item.length:
            return torch.empty(shape, dtype=dtype)
        tensor = torch.frombuffer(data, dtype=torch.uint8)
        if dtype == torch.bool and int(tensor.max()) > 1:
            raise CorruptCheckpointError(
                f"{req.storage_index.fqn!r} holds bytes other than 0 and 1 for a bool tensor",
                url=self._object_url(item.object),
            )
        return tensor.view(dtype).view(shape)

    def _decode_value(self, req: ReadItem, item: _Item, data: memoryview) -> Any:
        url = self._object_url(item.object)
        fqn = req.storage_index.fqn
        header = int(item.header or 0)
        try:
            doc = json.loads(bytes(data[:header]))
            doc = _obj(doc, "value header", ["tree", "leaves"])
            _check(type(doc["leaves"]) is list, "value header leaves must be a list")
            base = _align(header)
            specs, buffers = [], []
            for leaf in doc["leaves"]:
                leaf = _obj(leaf, "value leaf", ["spec", "offset"])
                spec = spec_from_json(leaf["spec"])
                start = base + _int(leaf["offset"], "leaf offset")
                _check(start + spec.nbytes <= len(data), "a leaf ends past the end of the value")
                specs.append(spec)
                buffers.append(data[start : start + spec.nbytes])
            return decode(doc["tree"], specs, buffers)
        except (ValueError, UnicodeDecodeError, RecursionError, _Malformed) as exc:  # ConfigError is a ValueError
            raise CorruptCheckpointError(f"the value of {fqn!r} in {url} cannot be decoded: {exc}", url=url) from exc


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


def _metadata_from_json(doc: Any, load_id: str) -> tuple[Metadata, dict[MetadataIndex, _Item]]:
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
            raise _Malformed(f"planner_data: {exc}") from exc
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
        _OBJECT_NAME.fullmatch(name) is not None,
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


def _span(item: _Item) -> tuple[str, int, int]:
    """Identifies an item's bytes (zero-length items may share a start with the next one)."""
    return item.object, item.start, item.length


def _coalesce(items: list[_Item]) -> list[tuple[int, int, list[_Item]]]:
    """Byte ranges ``(start, end, items)`` covering ``items``, merging ones close together."""
    ranges: list[tuple[int, int, list[_Item]]] = []
    for item in sorted(items, key=lambda i: i.start):
        end = item.start + item.length
        if ranges and item.start - ranges[-1][1] <= _MERGE_GAP:
            start, old_end, members = ranges[-1]
            ranges[-1] = (start, max(old_end, end), [*members, item])
        else:
            ranges.append((item.start, end, [item]))
    return ranges
