"""The DCP ``StorageReader`` (:class:`FastfeedStorageReader`): reads and validates the manifest,
then each rank's items with coalesced, parallel ranged reads, every item checked against its
CRC32C (see :mod:`fastfeed.checkpoint.dcp` for the layout and the guarantees).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import uuid
from typing import Any, Final

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from fastfeed.checkpoint.codec_format import LEAF_DTYPES
from fastfeed.checkpoint.dcp_base import (
    MANIFEST,
    MAX_MANIFEST,
    TAMPERED,
    Item,
    StoreClient,
    checkpoint_dir,
    valid_id,
)
from fastfeed.checkpoint.dcp_metadata import (
    Malformed,
    decode_value,
    metadata_from_json,
)
from fastfeed.config import S3Config
from fastfeed.errors import (
    CheckpointError,
    ConditionFailedError,
    CorruptCheckpointError,
    NotFoundError,
)
from fastfeed.store.upload import (
    checksum,
)

__all__ = ["FastfeedStorageReader"]

#: Items of one object closer than this are read with one ranged GET.
_MERGE_GAP: Final = 1 << 20


class FastfeedStorageReader(StoreClient, StorageReader):
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
            self._dir = checkpoint_dir(self.url, checkpoint_id)
        except BaseException:
            self.close()
            raise
        self.load_id = str(uuid.uuid4())
        self._items: dict[MetadataIndex, Item] = {}

    # -- StorageReader ------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load; ``checkpoint_id`` (relative to ``url``) picks the directory."""
        if checkpoint_id is not None:
            self._dir = checkpoint_dir(self.url, checkpoint_id)
        self._items = {}
        self.load_id = str(uuid.uuid4())

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's metadata of the checkpoint, rebuilt from its JSON manifest."""
        io_loop, store = self._open()
        url = self._object_url(MANIFEST)
        try:
            raw = io_loop.run(store.get(self._dir + MANIFEST, limit=MAX_MANIFEST))
        except NotFoundError as err:
            raise CheckpointError(
                f"no committed checkpoint at {self.checkpoint_id}: {MANIFEST} does not exist",
                url=self.checkpoint_id,
                hint="a checkpoint exists only once its manifest is written; the save never finished or failed",
            ) from err
        try:
            doc = json.loads(raw)
        except RecursionError as exc:
            raise CorruptCheckpointError(f"{url} is nested too deeply", url=url, hint=TAMPERED) from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(f"{url} is not valid JSON: {exc}", url=url, hint=TAMPERED) from exc
        try:
            metadata, items = metadata_from_json(doc, self.load_id)
        except Malformed as exc:
            raise CorruptCheckpointError(f"malformed checkpoint manifest {url}: {exc}", url=url, hint=TAMPERED) from exc
        self._items = items
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        items = metadata.storage_data
        if not isinstance(items, dict) or not all(isinstance(v, Item) for v in items.values()):
            raise CheckpointError("this metadata was not read by FastfeedStorageReader", url=self.checkpoint_id)
        self._items = items

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        wanted: dict[tuple[str, int, int], Item] = {}
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
        return valid_id(checkpoint_id)

    # -- internals -----------------------------------------------------------------------

    def _item(self, req: ReadItem) -> Item:
        try:
            return self._items[req.storage_index]
        except KeyError:
            raise CorruptCheckpointError(
                f"the manifest has no item {req.storage_index.fqn!r} at offset {req.storage_index.offset}",
                url=self._object_url(MANIFEST),
            ) from None

    def _fetch(self, items: list[Item]) -> dict[tuple[str, int, int], memoryview]:
        """Read and verify every item's bytes (ranged reads, nearby items coalesced)."""
        io_loop, store = self._open()
        by_object: dict[str, list[Item]] = {}
        for item in items:
            by_object.setdefault(item.object, []).append(item)

        async def fetch_all() -> dict[tuple[str, int, int], memoryview]:
            limit = asyncio.Semaphore(self.max_concurrency)
            out: dict[tuple[str, int, int], memoryview] = {}

            async def one_object(name: str, wanted: list[Item]) -> None:
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

    def _tensor(self, req: ReadItem, item: Item, data: memoryview) -> torch.Tensor:
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

    def _decode_value(self, req: ReadItem, item: Item, data: memoryview) -> Any:
        return decode_value(data, int(item.header or 0), req.storage_index.fqn, self._object_url(item.object))


def _span(item: Item) -> tuple[str, int, int]:
    """Identifies an item's bytes (zero-length items may share a start with the next one)."""
    return item.object, item.start, item.length


def _coalesce(items: list[Item]) -> list[tuple[int, int, list[Item]]]:
    """Byte ranges ``(start, end, items)`` covering ``items``, merging ones close together."""
    ranges: list[tuple[int, int, list[Item]]] = []
    for item in sorted(items, key=lambda i: i.start):
        end = item.start + item.length
        if ranges and item.start - ranges[-1][1] <= _MERGE_GAP:
            start, old_end, members = ranges[-1]
            ranges[-1] = (start, max(old_end, end), [*members, item])
        else:
            ranges.append((item.start, end, [item]))
    return ranges
