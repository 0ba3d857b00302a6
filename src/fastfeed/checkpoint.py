"""Asynchronous checkpoints to object storage (or a local directory).

``save()`` stalls the training loop only for a snapshot: every tensor and array of the state is
copied into one reused staging buffer of exactly the state's size (page-locked, and filled on a
side CUDA stream, when tensors live on a GPU); plain values are captured by the codec
(:mod:`fastfeed.ckpt_codec`, no pickle). A background thread then uploads it as one object
(multipart, parts in parallel, a CRC32C of each part computed on the way) and writes the
manifest last::

    <url>/step-000000000042/data-<random>.bin    every leaf, 64-byte aligned
    <url>/step-000000000042/MANIFEST.json        the commit record: format, step, time,
                                                 metadata, tree, leaf specs + offsets,
                                                 blob name, size and a CRC32C per part

A checkpoint exists if and only if its manifest does (written with ``If-None-Match: *``
where the store supports it). A crash at any moment leaves either the previous state of the
prefix or a new committed checkpoint: a partial upload has no manifest (and an aborted
multipart upload leaves no object). Retention deletes old checkpoints only after a newer one
committed, manifest first. Loading verifies the size and the per-part CRC32Cs of the data and falls back to
the previous committed checkpoint (with a warning) if the newest is corrupt or incomplete.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import secrets
import threading
import time
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastfeed import _loop
from fastfeed.ckpt_codec import LeafSpec, decode, encode, spec_from_json, spec_to_json
from fastfeed.ckpt_store import (
    CHECKSUM,
    CkptStore,
    StoredObject,
    checksum,
    open_ckpt_store,
    transfer_settings,
)
from fastfeed.config import S3Config
from fastfeed.errors import CheckpointError, ConfigError, CorruptCheckpointError, FastfeedError, NotFoundError

__all__ = ["CheckpointInfo", "CheckpointStats", "Checkpointer", "SaveHandle"]

log = logging.getLogger(__name__)

FORMAT = "fastfeed-checkpoint/1"
_ALIGN = 64
_MANIFEST = "MANIFEST.json"
_POLICIES = ("wait", "skip", "replace")


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


@dataclass
class CheckpointStats:
    """Counters of a :class:`Checkpointer` (cumulative)."""

    saves: int = 0
    committed: int = 0
    skipped: int = 0
    replaced: int = 0
    failures: int = 0
    #: Time ``save()`` held the training loop: snapshot plus any wait for an earlier save.
    stall_s: float = 0.0
    #: The part of ``stall_s`` spent waiting for an earlier save (policy ``"wait"``).
    wait_s: float = 0.0
    #: Background time from snapshot to commit, summed over saves.
    upload_s: float = 0.0
    bytes_uploaded: int = 0


class SaveHandle:
    """A pending save: :meth:`result` waits for its commit."""

    def __init__(self, step: int) -> None:
        self.step = step
        self._future: concurrent.futures.Future[CheckpointInfo | None] = concurrent.futures.Future()

    def result(self, timeout: float | None = None) -> CheckpointInfo | None:
        """The committed checkpoint (None if this save was skipped or replaced); raises the
        save's error if it failed."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    @property
    def skipped(self) -> bool:
        return self.done() and self._future.exception() is None and self._future.result() is None


@dataclass
class _Job:
    handle: SaveHandle
    step: int
    metadata: dict[str, Any]
    tree: dict[str, Any]
    specs: list[LeafSpec]
    offsets: list[int]
    total: int
    arena: torch.Tensor
    event: Any
    started: float = field(default_factory=time.perf_counter)


def _layout(specs: Sequence[LeafSpec]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for spec in specs:
        offsets.append(total)
        total += -(-spec.nbytes // _ALIGN) * _ALIGN
    return offsets, total


def _step_dir(step: int) -> str:
    return f"step-{step:012d}/"


def _step_of(key: str) -> int | None:
    head = key.split("/", 1)[0]
    if not head.startswith("step-"):
        return None
    try:
        return int(head[5:])
    except ValueError:
        return None


class Checkpointer:
    """Save training state to ``url`` in the background; load the newest committed state.

    Args:
        url: ``s3://bucket/runs/exp42/`` or a local directory (``file://`` or a path).
        keep_last: keep only this many committed checkpoints (older ones are deleted after a
            newer one committed); ``None`` keeps all.
        on_busy: what ``save()`` does while the previous save is still uploading: ``"wait"``
            (default; the wait is in :meth:`stats`), ``"skip"`` (return a skipped handle) or
            ``"replace"`` (queue this one instead of a queued one that has not started).
        part_size: multipart part size (and parallel ranged GETs when loading).
        max_concurrency: parts in flight per upload or download.
        s3, endpoint_url: as for :class:`~fastfeed.StreamingDataset` (AWS_* variables by default).

    Raises (at construction, within seconds): :class:`~fastfeed.errors.StoreError` subclasses
    for a missing bucket, denied access or an unreachable endpoint; nothing is left unsaved
    silently later either: a failed background save raises from its handle's ``result()``,
    from the next ``save()`` and from :meth:`wait` / :meth:`close`.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        on_busy: str = "wait",
        part_size: int | str = "32MiB",
        max_concurrency: int = 8,
        s3: S3Config | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1 or None, got {keep_last}")
        if on_busy not in _POLICIES:
            raise ConfigError(f"on_busy={on_busy!r} is invalid", hint=f"use one of {', '.join(_POLICIES)}")
        self.keep_last = keep_last
        self.on_busy = on_busy
        self.part_size, self.max_concurrency, s3 = transfer_settings(part_size, max_concurrency, s3, endpoint_url)
        self._io = _loop.acquire()
        try:
            self._store: CkptStore = self._io.run(open_ckpt_store(os.fspath(url), s3))
        except BaseException:
            self._io.release()
            raise
        try:
            self._io.run(self._store.check_writable())
        except BaseException:
            try:
                self._io.run(self._store.aclose())
            finally:
                self._io.release()
            raise
        self.url = self._store.url
        self._stats = CheckpointStats()
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending: list[_Job] = []  # queued, not started (at most one with "replace")
        self._busy = threading.Event()  # a job is being uploaded
        self._idle = threading.Condition(self._lock)
        self._free_arenas: list[torch.Tensor] = []
        #: Steps load() found corrupt and skipped: a later save of the same step replaces them.
        self._unusable: set[int] = set()
        self._error: BaseException | None = None
        self._closed = False
        self._side_stream: Any = None
        self._thread = threading.Thread(target=self._work, name="fastfeed-ckpt", daemon=True)
        self._thread.start()
        _register_exit(self)

    # ------------------------------------------------------------------ saving

    def save(self, state: Any, *, step: int, metadata: dict[str, Any] | None = None) -> SaveHandle:
        """Snapshot ``state`` and upload it in the background; returns once the snapshot is
        taken (the training loop may change the model right after).

        ``state``: nested dicts / lists / tuples of tensors, numpy arrays and plain values
        (see :mod:`fastfeed.ckpt_codec`). ``metadata``: JSON-serializable, kept in the
        manifest (visible to :meth:`list` without loading the data).
        """
        if self._closed:
            raise CheckpointError("this Checkpointer is closed", url=self.url)
        self._raise_background_error()
        start = time.perf_counter()
        handle = SaveHandle(step)
        meta = dict(metadata or {})
        json.dumps(meta)  # fails now, in the caller, if it cannot be stored
        with self._lock:
            self._stats.saves += 1
            busy = self._busy.is_set() or bool(self._pending)
        if busy and self.on_busy == "skip":
            with self._lock:
                self._stats.skipped += 1
            handle._future.set_result(None)
            return handle
        if busy and self.on_busy == "wait":
            waited = time.perf_counter()
            self.wait()
            with self._lock:
                self._stats.wait_s += time.perf_counter() - waited
        tree, leaves, specs = encode(state)
        offsets, total = _layout(specs)
        arena, event = self._snapshot(leaves, specs, offsets, total)
        job = _Job(handle, int(step), meta, tree, specs, offsets, total, arena, event)
        with self._lock:
            if self.on_busy == "replace":
                for old in self._pending:
                    old.handle._future.set_result(None)
                    self._free_arenas.append(old.arena)
                    self._stats.replaced += 1
                self._pending = []
            self._pending.append(job)
            self._stats.stall_s += time.perf_counter() - start
        self._queue.put(job)
        return handle

    def _snapshot(
        self, leaves: list[Any], specs: list[LeafSpec], offsets: list[int], total: int
    ) -> tuple[torch.Tensor, Any]:
        on_gpu = any(isinstance(x, torch.Tensor) and x.is_cuda for x in leaves)
        arena = self._arena(total, pinned=on_gpu)
        event = None
        stream: Any = None
        current: Any = None
        if on_gpu:
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            stream, current = self._side_stream, torch.cuda.current_stream()
            stream.wait_stream(current)  # the copies see every update queued so far
        for leaf, spec, offset in zip(leaves, specs, offsets, strict=True):
            if spec.nbytes == 0:
                continue
            region = arena[offset : offset + spec.nbytes]
            if isinstance(leaf, np.ndarray):
                np.copyto(region.numpy().view(leaf.dtype).reshape(leaf.shape), leaf)
                continue
            tensor = leaf.detach()
            dst = region.view(tensor.dtype).view(tensor.shape)
            if tensor.is_cuda:
                with torch.cuda.stream(stream):
                    dst.copy_(tensor, non_blocking=True)
            else:
                dst.copy_(tensor)
        if on_gpu:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
            current.wait_stream(stream)  # later updates wait for the copies, not the host
        return arena, event

    def _arena(self, total: int, *, pinned: bool) -> torch.Tensor:
        with self._lock:
            for i, arena in enumerate(self._free_arenas):
                if arena.numel() == total and arena.is_pinned() == pinned:
                    return self._free_arenas.pop(i)
            self._free_arenas.clear()  # another size: let those go
        return torch.empty(total, dtype=torch.uint8, pin_memory=pinned)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job not in self._pending:
                    continue  # replaced before it started
                self._pending.remove(job)
                self._busy.set()
            try:
                info = self._commit(job)
            except BaseException as exc:
                log.error("checkpoint of step %d to %s failed: %s", job.step, self.url, exc)
                with self._lock:
                    self._stats.failures += 1
                    self._error = exc
                job.handle._future.set_exception(exc)
            else:
                with self._lock:
                    self._stats.committed += 1
                    self._stats.upload_s += time.perf_counter() - job.started
                    self._stats.bytes_uploaded += job.total
                job.handle._future.set_result(info)
                try:
                    self._retain()  # only now that the newer checkpoint is committed
                except Exception as exc:  # the save itself succeeded; retry at the next one
                    log.warning("checkpoint retention under %s failed: %s", self.url, exc)
            finally:
                with self._lock:
                    self._free_arenas.append(job.arena)
                    self._busy.clear()
                    self._idle.notify_all()

    def _commit(self, job: _Job) -> CheckpointInfo:
        if job.event is not None:
            job.event.synchronize()
        blob = memoryview(job.arena.numpy().data).cast("B")[: job.total]
        prefix = _step_dir(job.step)
        existing = self._io.run(self._store.list_objects(prefix))
        if any(o.key == prefix + _MANIFEST for o in existing) and job.step in self._unusable:
            # load() skipped this step as corrupt and training went on from an older one: the
            # new save of the same step replaces it (manifest first, so it is never half-listed).
            log.warning("replacing the unusable checkpoint of step %d under %s", job.step, self.url)
            keys = sorted((o.key for o in existing), key=lambda k: k != prefix + _MANIFEST)
            self._io.run(self._store.delete(keys))
            self._unusable.discard(job.step)
        elif any(o.key == prefix + _MANIFEST for o in existing):
            raise CheckpointError(
                f"step {job.step} is already committed under {self.url}",
                url=self.url,
                hint="save each step once (or delete that checkpoint first)",
            )
        name = f"data-{secrets.token_hex(6)}.bin"
        created = time.time()

        try:
            crcs = self._io.run(
                self._store.put_large(prefix + name, blob, part_size=self.part_size, concurrency=self.max_concurrency)
            )
            manifest = {
                "format": FORMAT,
                "step": job.step,
                "time": created,
                "metadata": job.metadata,
                "tree": job.tree,
                "leaves": [{"spec": spec_to_json(s), "offset": o} for s, o in zip(job.specs, job.offsets, strict=True)],
                "blob": {"name": name, "size": job.total, "part_size": self.part_size, CHECKSUM: crcs},
            }
            body = json.dumps(manifest, separators=(",", ":")).encode()
            self._io.run(self._store.put(prefix + _MANIFEST, memoryview(body), if_absent=True))
        except BaseException:
            try:
                self._io.run(self._store.delete([prefix + name]))
            except Exception as cleanup:  # the upload error matters more
                log.debug("could not remove %s%s after a failed save: %r", prefix, name, cleanup)
            raise
        return CheckpointInfo(job.step, created, job.total, job.metadata, self.url + prefix)

    def _retain(self) -> None:
        objects = self._io.run(self._store.list_objects())
        by_step: dict[int, list[StoredObject]] = {}
        for obj in objects:
            step = _step_of(obj.key)
            if step is not None:
                by_step.setdefault(step, []).append(obj)
        committed = sorted(s for s, objs in by_step.items() if any(o.key.endswith("/" + _MANIFEST) for o in objs))
        if not committed:
            return
        doomed = committed[: -self.keep_last] if self.keep_last else []
        # Uncommitted leftovers (a crashed or failed save) older than the newest commit.
        doomed += [s for s in by_step if s not in committed and s < committed[-1]]
        for step in sorted(set(doomed)):
            keys = [o.key for o in by_step[step]]
            keys.sort(key=lambda k: not k.endswith(_MANIFEST))  # the manifest first: uncommit
            self._io.run(self._store.delete(keys))

    def wait(self) -> None:
        """Block until every save so far has committed (or failed: then raise its error)."""
        with self._idle:
            while self._busy.is_set() or self._pending:
                self._idle.wait(0.1)
        self._raise_background_error()

    def _raise_background_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise CheckpointError(
                f"an earlier checkpoint save failed: {error}",
                url=self.url,
                hint="the previous committed checkpoint is intact; fix the cause and save again",
            ) from error

    def stats(self) -> CheckpointStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    # ------------------------------------------------------------------ reading

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        objects = self._io.run(self._store.list_objects())
        manifests = sorted(o.key for o in objects if o.key.endswith("/" + _MANIFEST) and _step_of(o.key) is not None)
        infos = []
        for key in manifests:
            try:
                manifest = self._manifest(key)
            except CheckpointError as err:
                log.warning("ignoring unreadable checkpoint manifest %s%s: %s", self.url, key, err)
                continue
            infos.append(self._info(manifest, key))
        return sorted(infos, key=lambda i: i.step)

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None."""
        infos = self.list()
        return infos[-1] if infos else None

    def load(self, step: int | None = None, *, map_location: str | torch.device | None = None) -> Any:
        """The state saved at ``step`` (default: the newest committed checkpoint that verifies;
        a corrupt or incomplete newer one is skipped with a warning). Tensors come back on the
        CPU unless ``map_location`` says otherwise. :attr:`loaded` tells which one was read.

        Raises:
            NotFoundError: nothing committed under the URL (or not that step).
            CorruptCheckpointError: ``step`` was given and its data does not verify.
        """
        infos = self.list()
        if step is not None:
            infos = [i for i in infos if i.step == step]
        if not infos:
            what = f"step {step}" if step is not None else "any committed checkpoint"
            raise NotFoundError(f"no {what} under {self.url}", url=self.url)
        for info in reversed(infos):
            try:
                state = self._load(info, map_location)
            except (CorruptCheckpointError, NotFoundError) as err:
                if step is not None:
                    raise
                log.warning("checkpoint of step %d is unusable (%s); falling back to the previous one", info.step, err)
                self._unusable.add(info.step)
                continue
            self.loaded = info
            return state
        raise CorruptCheckpointError(f"no checkpoint under {self.url} verifies", url=self.url)

    loaded: CheckpointInfo | None = None

    def _manifest(self, key: str) -> dict[str, Any]:
        try:
            manifest: dict[str, Any] = json.loads(self._io.run(self._store.get(key)))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(f"manifest {key} is not valid JSON: {exc}", url=self.url + key) from exc
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"manifest {key} has format {manifest.get('format')!r}, expected {FORMAT}")
        return manifest

    def _info(self, manifest: dict[str, Any], key: str) -> CheckpointInfo:
        prefix = key[: -len(_MANIFEST)]
        return CheckpointInfo(
            int(manifest["step"]),
            float(manifest["time"]),
            int(manifest["blob"]["size"]),
            dict(manifest.get("metadata") or {}),
            self.url + prefix,
        )

    def _load(self, info: CheckpointInfo, map_location: str | torch.device | None) -> Any:
        prefix = _step_dir(info.step)
        manifest = self._manifest(prefix + _MANIFEST)
        blob_meta = manifest["blob"]
        size = int(blob_meta["size"])
        data = bytearray(size)
        view = memoryview(data)
        try:
            self._io.run(
                self._store.get_into(
                    prefix + blob_meta["name"], view, part_size=self.part_size, concurrency=self.max_concurrency
                )
            )
        except NotFoundError as err:
            raise CorruptCheckpointError(
                f"the data of step {info.step} is missing", url=info.url, hint="it was deleted or never finished"
            ) from err
        except FastfeedError as err:
            if "has" in str(err) and "bytes" in str(err):
                raise CorruptCheckpointError(f"the data of step {info.step} is truncated: {err}", url=info.url) from err
            raise
        part = int(blob_meta["part_size"])
        # Checkpoints written before the switch to CRC32C carry zlib CRC32s.
        algorithm, compute = (CHECKSUM, checksum) if CHECKSUM in blob_meta else ("crc32", zlib.crc32)
        for i, expected in enumerate(blob_meta[algorithm]):
            if compute(view[i * part : (i + 1) * part]) != int(expected):
                raise CorruptCheckpointError(
                    f"the data of step {info.step} fails its {algorithm.upper()} checksum"
                    f" (bytes {i * part}-{(i + 1) * part - 1})",
                    url=info.url,
                )
        specs = [spec_from_json(d["spec"]) for d in manifest["leaves"]]
        offsets = [int(d["offset"]) for d in manifest["leaves"]]
        buffers = [view[o : o + s.nbytes] for s, o in zip(specs, offsets, strict=True)]
        return decode(manifest["tree"], specs, buffers, map_location=map_location)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Wait for pending saves, then stop the background thread (also run at exit)."""
        if self._closed:
            return
        try:
            with self._idle:
                while self._busy.is_set() or self._pending:
                    self._idle.wait(0.1)
        finally:
            self._closed = True
            self._queue.put(None)
            self._thread.join(30)
            try:
                self._io.run(self._store.aclose())
            finally:
                self._io.release()
        self._raise_background_error()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _register_exit(ckpt: Checkpointer) -> None:
    ref = weakref.ref(ckpt)

    def flush() -> None:
        target = ref()
        if target is not None and not target._closed:
            try:
                target.close()
            except Exception as exc:
                log.error("flushing checkpoints at exit failed: %s", exc)

    atexit.register(flush)
