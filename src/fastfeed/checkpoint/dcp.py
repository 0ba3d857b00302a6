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

from fastfeed.checkpoint.dcp_base import FORMAT, MANIFEST, checkpoint_dir
from fastfeed.checkpoint.dcp_reader import FastfeedStorageReader
from fastfeed.checkpoint.dcp_writer import FastfeedStorageWriter

__all__ = ["FORMAT", "MANIFEST", "FastfeedStorageReader", "FastfeedStorageWriter", "checkpoint_dir"]
