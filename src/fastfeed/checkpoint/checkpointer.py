"""Asynchronous checkpoints to object storage (or a local directory).

``save()`` stalls the training loop only for a snapshot: every tensor and array of the state is
copied into one reused staging buffer of exactly the state's size (page-locked, and filled on a
side CUDA stream, when tensors live on a GPU); plain values are captured by the codec
(:mod:`fastfeed.checkpoint.codec`, no pickle). A background thread then uploads it as one object
(multipart, parts in parallel, a CRC32C of each part computed on the way) and writes the
manifest last::

    <url>/step-000000000042/data-<32 random hex>.bin    every leaf, 64-byte aligned
    <url>/step-000000000042/MANIFEST.json               the commit record: format, step, time,
                                                        metadata, tree, leaf specs + offsets,
                                                        blob name, size and a CRC32C per part

Commit. A checkpoint exists if and only if its manifest does. Every save writes its data under
a fresh, unguessable name, so two writers never touch each other's data, and creates the
manifest with a conditional write (``If-None-Match: *``; locally a hard link), so of two
writers saving the same step exactly one commits: the other's save raises
:class:`~fastfeed.errors.CheckpointError`, deletes only its own data and leaves the committed
checkpoint as it was. Whether the store enforces conditional writes is probed once
(:attr:`Checkpointer.conditional_writes`); one that does not gets check-write-verify, which
detects most races but cannot prevent all of them (see :mod:`fastfeed.store.upload`). A crash at
any moment leaves either the previous state of the prefix or a new committed checkpoint: a
partial upload has no manifest (and an aborted multipart upload leaves no object).

Retention (``keep_last``) runs after a commit and deletes, manifest first, only checkpoints
older than the ``keep_last`` newest committed ones, and of each only the data its manifest names.
Objects that no manifest names (a save that died between its upload and its commit) and
incomplete multipart uploads (a writer killed mid-upload) are removed once older than
``orphan_age`` (by the store's clock): by the next :class:`Checkpointer` on the prefix and by
retention. A save whose upload took longer than half of ``orphan_age`` does not commit, so
another writer's cleanup never deletes data that is about to be committed. ``close()`` aborts
the multipart uploads of this Checkpointer that it failed to abort earlier.

Loading trusts nothing in the store. A manifest is at most 64 MiB, parsed against a strict
schema (every field present with its type, no unknown field, the step of its directory, a data
name of the form above: never a path, so it cannot name anything outside its checkpoint's
prefix), the data object's real size is checked against the manifest before any buffer is
allocated, every part's CRC32C is verified (the list must cover every byte), and the tree is
decoded without pickle. Anything else raises :class:`~fastfeed.errors.CorruptCheckpointError`
naming the object, and ``load()`` falls back to the previous committed checkpoint (with a
warning).
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
from dataclasses import dataclass, field
from typing import Any

import torch

from fastfeed import _loop
from fastfeed.checkpoint.codec import LeafSpec, encode
from fastfeed.checkpoint.handle import CheckpointStats, SaveHandle
from fastfeed.checkpoint.manifest import (
    MANIFEST,
    MAX_MANIFEST,
    TAMPERED,
    CheckpointInfo,
    Manifest,
    check_parts,
    decode_state,
    layout,
    manifest_body,
    parse_manifest,
    step_dir,
    step_of,
)
from fastfeed.checkpoint.retention import Retention
from fastfeed.checkpoint.staging import StagingBuffers
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
    StoredObject,
    check_age,
    open_ckpt_store,
    transfer_settings,
)

__all__ = ["CheckpointInfo", "CheckpointStats", "Checkpointer", "SaveHandle"]

log = logging.getLogger(__name__)

_POLICIES = ("wait", "skip", "replace")
#: Default ``orphan_age``: abandoned uploads and unreferenced data older than this are removed.
DEFAULT_ORPHAN_AGE = 24 * 3600.0


@dataclass
class _Job:
    handle: SaveHandle
    #: The handle's future: the Checkpointer settles it.
    future: concurrent.futures.Future[CheckpointInfo | None]
    step: int
    metadata: dict[str, Any]
    tree: dict[str, Any]
    specs: list[LeafSpec]
    offsets: list[int]
    total: int
    arena: torch.Tensor
    event: Any
    started: float = field(default_factory=time.perf_counter)


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
        orphan_age: seconds after which an incomplete multipart upload or a data object that
            no manifest names counts as abandoned (its writer died) and is removed, by this
            Checkpointer at construction and by retention. Default one day. A save whose
            upload takes longer than half of it fails instead of committing. Clocks of the
            writers of one prefix must agree to well within half of it.
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
        orphan_age: float = DEFAULT_ORPHAN_AGE,
        s3: S3Config | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1 or None, got {keep_last}")
        if on_busy not in _POLICIES:
            raise ConfigError(f"on_busy={on_busy!r} is invalid", hint=f"use one of {', '.join(_POLICIES)}")
        self.keep_last = keep_last
        self.on_busy = on_busy
        self.orphan_age = check_age(orphan_age)
        self.part_size, self.max_concurrency, s3 = transfer_settings(part_size, max_concurrency, s3, endpoint_url)
        self._io = _loop.acquire()
        try:
            self._store: CkptStore = self._io.run(open_ckpt_store(os.fspath(url), s3))
        except BaseException:
            self._io.release()
            raise
        try:
            # Reading is checked now; writing (a probe, and aborting abandoned uploads) when
            # this Checkpointer first saves: a process that only loads writes nothing.
            self._io.run(self._store.check_readable())
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
        #: Steps load() found corrupt and skipped -> the ETag of the manifest it read: a later
        #: save of the same step replaces that manifest (and only that one).
        self._unusable: dict[int, str | None] = {}
        self._staging = StagingBuffers()
        self._error: BaseException | None = None
        self._closed = False
        self._retention = Retention(
            self._io,
            self._store,
            self.url,
            keep_last=keep_last,
            orphan_age=self.orphan_age,
            read_manifest=self._read_manifest,
        )
        self._writable = False  # the write probe has passed
        self._swept = False  # abandoned uploads were looked for
        self._probe_lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="fastfeed-ckpt", daemon=True)
        self._thread.start()
        _register_exit(self)

    @property
    def conditional_writes(self) -> bool:
        """Whether the store enforces "create only if absent" for manifests (probed once, by
        the first save or by asking this). Without it, two writers racing to commit the same step are detected
        in most interleavings but not all (see :mod:`fastfeed.store.upload`)."""
        self._probe_writes()
        return self._store.conditional_writes

    # ------------------------------------------------------------------ saving

    def save(self, state: Any, *, step: int, metadata: dict[str, Any] | None = None) -> SaveHandle:
        """Snapshot ``state`` and upload it in the background; returns once the snapshot is
        taken (the training loop may change the model right after).

        ``state``: nested dicts / lists / tuples of tensors, numpy arrays and plain values
        (see :mod:`fastfeed.checkpoint.codec`). ``metadata``: JSON-serializable, kept in the
        manifest (visible to :meth:`list` without loading the data).
        """
        if self._closed:
            raise CheckpointError("this Checkpointer is closed", url=self.url)
        self._raise_background_error()
        start = time.perf_counter()
        future: concurrent.futures.Future[CheckpointInfo | None] = concurrent.futures.Future()
        handle = SaveHandle(step, future)
        meta = dict(metadata or {})
        json.dumps(meta)  # fails now, in the caller, if it cannot be stored
        with self._lock:
            self._stats.saves += 1
            busy = self._busy.is_set() or bool(self._pending)
        if busy and self.on_busy == "skip":
            with self._lock:
                self._stats.skipped += 1
            future.set_result(None)
            return handle
        if busy and self.on_busy == "wait":
            waited = time.perf_counter()
            self.wait()
            with self._lock:
                self._stats.wait_s += time.perf_counter() - waited
        tree, leaves, specs = encode(state)
        offsets, total = layout(specs)
        arena, event = self._staging.snapshot(leaves, specs, offsets, total)
        job = _Job(handle, future, int(step), meta, tree, specs, offsets, total, arena, event)
        with self._lock:
            if self.on_busy == "replace":
                for old in self._pending:
                    old.future.set_result(None)
                    self._staging.recycle(old.arena)
                    self._stats.replaced += 1
                self._pending = []
            self._pending.append(job)
            self._stats.stall_s += time.perf_counter() - start
        self._queue.put(job)
        return handle

    def _probe_writes(self) -> None:
        """Once, before anything is written (the first save, or asking :attr:`conditional_writes`):
        the write probe, a clear error if the prefix cannot be written, and whether the store
        enforces conditional writes."""
        with self._probe_lock:
            if not self._writable:
                self._io.run(self._store.check_writable())
                self._writable = True

    def _prepare_writes(self) -> None:
        """[worker thread] Before each upload: the write probe (once), then, before the first
        one, abort the multipart uploads that writers which died left under the prefix."""
        self._probe_writes()
        if not self._swept:
            self._swept = True
            self._retention.sweep_orphans()

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
                self._prepare_writes()
                info = self._commit(job)
            except BaseException as exc:
                log.error("checkpoint of step %d to %s failed: %s", job.step, self.url, exc)
                with self._lock:
                    self._stats.failures += 1
                    self._error = exc
                job.future.set_exception(exc)
            else:
                with self._lock:
                    self._stats.committed += 1
                    self._stats.upload_s += time.perf_counter() - job.started
                    self._stats.bytes_uploaded += job.total
                job.future.set_result(info)
                try:
                    self._retention.retain()  # only now that the newer checkpoint is committed
                except Exception as exc:  # the save itself succeeded; retry at the next one
                    log.warning("checkpoint retention under %s failed: %s", self.url, exc)
            finally:
                with self._lock:
                    self._staging.recycle(job.arena)
                    self._busy.clear()
                    self._idle.notify_all()

    def _commit(self, job: _Job) -> CheckpointInfo:
        if job.event is not None:
            job.event.synchronize()
        blob = memoryview(job.arena.numpy().data).cast("B")[: job.total]
        prefix = step_dir(job.step)
        existing = self._io.run(self._store.list_objects(prefix))
        committed = next((o for o in existing if o.key == prefix + MANIFEST), None)
        if committed is not None:
            if job.step in self._unusable and committed.etag == self._unusable[job.step]:
                # load() skipped this step as corrupt and training went on from an older one: the
                # new save of the same step replaces exactly the manifest load() rejected.
                log.warning("replacing the unusable checkpoint of step %d under %s", job.step, self.url)
                self._retention.delete_checkpoint(committed)
                self._unusable.pop(job.step, None)
            else:
                raise CheckpointError(
                    f"step {job.step} is already committed under {self.url}",
                    url=self.url + prefix,
                    hint="save each step once (or delete that checkpoint first)",
                )
        name = f"data-{secrets.token_hex(16)}.bin"  # unguessable: no other writer touches it
        created = time.time()
        started = time.monotonic()
        try:
            uploaded = self._io.run(
                self._store.put_large(prefix + name, blob, part_size=self.part_size, concurrency=self.max_concurrency)
            )
            took = time.monotonic() - started
            if took > self.orphan_age / 2:
                raise CheckpointError(
                    f"the upload of step {job.step} took {took:.0f} s, more than half of orphan_age "
                    f"({self.orphan_age:.0f} s): another writer's cleanup could count its data as abandoned, "
                    "so it is not committed",
                    url=self.url + prefix,
                    hint="pass a larger orphan_age to Checkpointer",
                )
            body = manifest_body(
                job.step, created, job.metadata, job.tree, job.specs, job.offsets, name, job.total, uploaded
            )
        except BaseException:
            self._discard(prefix + name)
            raise
        self._write_manifest(job.step, prefix, name, body)
        self._check_committed(job.step, prefix, name)
        return CheckpointInfo(job.step, created, job.total, job.metadata, self.url + prefix)

    def _discard(self, key: str) -> None:
        """Delete this save's own data object after the save failed (and nothing else)."""
        try:
            self._io.run(self._store.delete([key]))
        except Exception as cleanup:  # the save's error matters more; an old leftover is removed by age
            log.debug("could not remove %s%s after a failed save: %r", self.url, key, cleanup)

    def _write_manifest(self, step: int, prefix: str, name: str, body: bytes) -> None:
        """Commit: create the manifest only if the step has none. The data is deleted only when
        the manifest is certainly not this save's (a lost answer is checked, never guessed)."""
        key = prefix + MANIFEST
        try:
            self._io.run(self._store.put(key, memoryview(body), if_absent=True))
        except ConditionFailedError as err:
            self._discard(prefix + name)
            raise CheckpointError(
                f"step {step} was committed under {self.url} by another writer while this save was "
                "uploading; that checkpoint is kept and this save's data was removed",
                url=self.url + prefix,
                hint="two jobs are saving to the same URL: give each run its own prefix",
            ) from err
        except Exception:
            ours = self._holds(key, body)
            if ours is None:  # cannot tell: keep the data (a real leftover is removed by age)
                raise
            if not ours:
                self._discard(prefix + name)
                raise
            log.info("the manifest %s%s was written although its request failed", self.url, key)

    def _holds(self, key: str, body: bytes) -> bool | None:
        """Whether ``key`` holds exactly ``body`` (None: the store cannot tell now)."""
        try:
            return bool(self._io.run(self._store.get(key, limit=len(body))) == body)
        except (NotFoundError, CorruptCheckpointError):  # absent, or larger than ours
            return False
        except FastfeedError as err:
            log.debug("cannot tell whether %s%s holds this save's manifest: %r", self.url, key, err)
            return None

    def _check_committed(self, step: int, prefix: str, name: str) -> None:
        """After the commit: the data is still there (no cleanup took it for abandoned data)."""
        try:
            self._io.run(self._store.head(prefix + name))
        except NotFoundError as err:
            self._io.run(self._store.delete([prefix + MANIFEST]))  # our own manifest: uncommit
            raise CheckpointError(
                f"the data of step {step} disappeared before its commit completed, so it was uncommitted",
                url=self.url + prefix,
                hint="another process deleted it: give each run its own prefix, or raise orphan_age",
            ) from err
        except FastfeedError as err:  # committed; the check itself could not be made
            log.warning("could not check the data of step %d under %s after its commit: %s", step, self.url, err)

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

    def _scan(self) -> list[tuple[int, StoredObject, Manifest | CorruptCheckpointError]]:
        """Every committed checkpoint, oldest first: its step, manifest object and the parsed
        manifest (or why it is unusable)."""
        objects = self._io.run(self._store.list_objects())
        found = []
        for obj in objects:
            step = step_of(obj.key)
            if step is None or obj.key != step_dir(step) + MANIFEST:
                continue
            try:
                parsed: Manifest | CorruptCheckpointError = self._read_manifest(obj.key)
            except NotFoundError:
                continue  # deleted since the listing (retention of another writer)
            except CorruptCheckpointError as err:
                parsed = err
            found.append((step, obj, parsed))
        return sorted(found, key=lambda entry: entry[0])

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints with a valid manifest, oldest first (others are logged)."""
        infos = []
        for _, obj, parsed in self._scan():
            if isinstance(parsed, CorruptCheckpointError):
                log.warning("ignoring unreadable checkpoint manifest %s%s: %s", self.url, obj.key, parsed)
                continue
            infos.append(parsed.info(self.url))
        return infos

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
            CorruptCheckpointError: ``step`` was given and its manifest or data does not verify
                (naming the object).
        """
        entries = self._scan()
        if step is not None:
            entries = [e for e in entries if e[0] == step]
        if not entries:
            what = f"step {step}" if step is not None else "any committed checkpoint"
            raise NotFoundError(f"no {what} under {self.url}", url=self.url)
        for found, obj, parsed in reversed(entries):
            try:
                if isinstance(parsed, CorruptCheckpointError):
                    raise parsed
                state = self._load(parsed, map_location)
            except (CorruptCheckpointError, NotFoundError) as err:
                if step is not None:
                    raise
                log.warning("checkpoint of step %d is unusable (%s); falling back to the previous one", found, err)
                self._unusable[found] = obj.etag
                continue
            self.loaded = parsed.info(self.url)
            return state
        raise CorruptCheckpointError(f"no checkpoint under {self.url} verifies", url=self.url)

    loaded: CheckpointInfo | None = None

    def _read_manifest(self, key: str) -> Manifest:
        raw = self._io.run(self._store.get(key, limit=MAX_MANIFEST))
        return parse_manifest(raw, key, self.url + key)

    def _load(self, manifest: Manifest, map_location: str | torch.device | None) -> Any:
        step, key = manifest.step, manifest.blob_key
        url = self.url + key
        try:
            # The real size first: nothing is allocated for a size the manifest merely claims.
            stored = self._io.run(self._store.head(key))
        except NotFoundError as err:
            raise CorruptCheckpointError(
                f"the data of step {step} is missing: {url}", url=url, hint="it was deleted or never finished"
            ) from err
        if stored.size != manifest.size:
            raise CorruptCheckpointError(
                f"the data of step {step} has {stored.size} bytes where its manifest says {manifest.size}: {url}",
                url=url,
                hint=TAMPERED,
            )
        data = bytearray(manifest.size)
        view = memoryview(data)
        try:
            self._io.run(
                self._store.get_into(
                    key, view, part_size=self.part_size, concurrency=self.max_concurrency, etag=stored.etag
                )
            )
        except (NotFoundError, ConditionFailedError) as err:
            raise CorruptCheckpointError(
                f"the data of step {step} was deleted or replaced while it was read: {url}", url=url
            ) from err
        check_parts(manifest, view, url)
        return decode_state(manifest, view, self.url + manifest.key, map_location)

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
