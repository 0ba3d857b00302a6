"""The DCP ``StorageWriter`` (:class:`FastfeedStorageWriter`): every rank writes its items into
one data object, the coordinator commits the checkpoint with the manifest (see
:mod:`fastfeed.checkpoint.dcp` for the layout and the guarantees).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from fastfeed.checkpoint.codec import encode, spec_to_json
from fastfeed.checkpoint.codec_format import LEAF_DTYPES
from fastfeed.checkpoint.dcp_base import (
    DATA_KEY,
    DCP_VERSION,
    DEFAULT_ORPHAN_AGE,
    FORMAT,
    MANIFEST,
    OBJECT_NAME,
    DataObject,
    Item,
    RankObject,
    StoreClient,
    Written,
    align,
    checkpoint_dir,
    dist_ready,
    dtype_name,
    valid_id,
)
from fastfeed.checkpoint.dcp_metadata import (
    item_to_json,
    planner_data_to_json,
    storage_md_to_json,
)
from fastfeed.config import S3Config
from fastfeed.errors import (
    CheckpointError,
    ConditionFailedError,
    ConfigError,
    FastfeedError,
)
from fastfeed.store.upload import (
    check_age,
    checksum,
)

try:  # torch >= 2.4
    from torch.distributed.checkpoint.metadata import StorageMeta
except ImportError:  # pragma: no cover - older torch
    StorageMeta = None  # type: ignore[assignment, misc]

try:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
except ImportError:  # pragma: no cover - every supported torch has it
    DefaultSavePlanner = None  # type: ignore[assignment, misc]

__all__ = ["FastfeedStorageWriter"]

log = logging.getLogger(__name__)


class FastfeedStorageWriter(StoreClient, StorageWriter):
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
        orphan_age: float = DEFAULT_ORPHAN_AGE,
    ) -> None:
        self.orphan_age = check_age(orphan_age)
        self._started = time.monotonic()
        self._configure(url, s3, endpoint_url, part_size, max_concurrency)
        try:
            io_loop, store = self._open()
            io_loop.run(store.check_writable())
            self._dir = checkpoint_dir(self.url, checkpoint_id)
        except BaseException:
            self.close()
            raise
        self.save_id = str(uuid.uuid4())
        self.is_coordinator = False
        self.rank = 0

    # -- StorageWriter ------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new save; ``checkpoint_id`` (relative to ``url``) picks the directory."""
        if checkpoint_id is not None:
            self._dir = checkpoint_dir(self.url, checkpoint_id)
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
            rank = torch.distributed.get_rank() if dist_ready() else 0
        self.rank = int(rank)

    def storage_meta(self) -> StorageMeta | None:
        """DCP's request metadata of this save: the checkpoint URL and a fresh save id."""
        if StorageMeta is None:  # pragma: no cover - older torch
            return None
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return dataclasses.replace(plan, storage_data=RankObject(f"rank-{self.rank:05d}.data"))

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
            dataclasses.replace(p, storage_data=RankObject(f"rank-{i:05d}-{token}.data")) for i, p in enumerate(plans)
        ]

    def _sweep(self) -> None:
        """Remove what dead writers left: multipart uploads of data objects under the root and
        data objects of this (uncommitted) directory, older than ``orphan_age``."""
        io_loop, store = self._open()
        try:
            io_loop.run(store.abort_orphaned_uploads("", older_than=self.orphan_age, match=DATA_KEY.fullmatch))
            stale = [
                o.key
                for o in io_loop.run(store.list_objects(self._dir))
                if OBJECT_NAME.fullmatch(o.key[len(self._dir) :]) and o.age is not None and o.age >= self.orphan_age
            ]
            if stale:
                log.info("removing %d abandoned data object(s) under %s", len(stale), self.checkpoint_id)
                io_loop.run(store.delete(stale))
        except FastfeedError as err:
            log.warning("could not look for abandoned uploads under %s: %s", self.url, err)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        target = plan.storage_data
        name = target.name if isinstance(target, RankObject) else f"rank-{self.rank:05d}-{secrets.token_hex(16)}.data"
        results = self._write(name, plan.items, planner) if plan.items else []
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        items: dict[MetadataIndex, Item] = {}
        objects: dict[str, DataObject] = {}
        for rank_results in results:
            for result in rank_results:
                written = result.storage_data
                if not isinstance(written, Written):
                    raise CheckpointError(
                        f"a rank's write result for {result.index.fqn!r} did not come from FastfeedStorageWriter",
                        url=self.checkpoint_id,
                        hint="every rank must save with a FastfeedStorageWriter of the same URL",
                    )
                items[result.index] = written.item
                objects[written.obj.name] = written.obj
        if hasattr(metadata, "version"):
            metadata.version = metadata.version or DCP_VERSION
        metadata.storage_data = items
        if hasattr(metadata, "storage_meta"):
            metadata.storage_meta = self.storage_meta()
        manifest = {
            "format": FORMAT,
            "time": time.time(),
            "checkpoint_id": self._dir.rstrip("/"),
            "dcp_version": getattr(metadata, "version", None) or DCP_VERSION,
            "storage_meta": {"checkpoint_id": self.checkpoint_id, "save_id": self.save_id, "modules": []},
            "planner_data": planner_data_to_json(metadata.planner_data),
            "state_dict_metadata": {
                fqn: storage_md_to_json(fqn, md) for fqn, md in metadata.state_dict_metadata.items()
            },
            "objects": {
                o.name: {"size": o.size, "part_size": o.part_size, "crc32c": list(o.crc32c)}
                for o in sorted(objects.values(), key=lambda o: o.name)
            },
            "items": [item_to_json(index, item) for index, item in items.items()],
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
        return valid_id(checkpoint_id)

    # -- internals -----------------------------------------------------------------------

    def _discard(self, objects: dict[str, DataObject]) -> None:
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
            total += align(entry.nbytes)
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
        obj = DataObject(name, total, uploaded.part_size, tuple(int(c) for c in uploaded.crcs))
        results = []
        for entry, start in zip(entries, starts, strict=True):
            stored = Item(
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
                WriteResult(index=entry.item.index, size_in_bytes=entry.nbytes, storage_data=Written(stored, obj))
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


def _copy_tensor(tensor: torch.Tensor, region: torch.Tensor, entry: _Entry, url: str) -> str:
    """Copy ``tensor`` (any device, any strides) into the uint8 ``region``; its dtype name."""
    fqn = entry.item.index.fqn
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        raise CheckpointError(f"{fqn!r} is a {tensor.layout} tensor; only dense tensors can be stored", url=url)
    name = dtype_name(tensor.dtype)
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
        blobs.append(blob + bytes(align(len(blob)) - len(blob)))
        offset += align(len(blob))
    header = json.dumps({"tree": tree, "leaves": layout}, separators=(",", ":"), allow_nan=False).encode()
    return header + bytes(align(len(header)) - len(header)) + b"".join(blobs), len(header)
