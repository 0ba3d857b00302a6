"""Retention of :class:`~fastfeed.checkpoint.checkpointer.Checkpointer` checkpoints: after a
commit, delete the checkpoints older than the ``keep_last`` newest committed ones (manifest
first, then only the data it names), the data objects no manifest names once older than
``orphan_age``, and the incomplete multipart uploads of dead writers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastfeed import _loop
from fastfeed.checkpoint.manifest import DATA_KEY, MANIFEST, Manifest, step_dir, step_of
from fastfeed.errors import CheckpointError, FastfeedError, NotFoundError
from fastfeed.store.upload import CkptStore, StoredObject

__all__ = ["Retention"]

log = logging.getLogger(__name__)


class Retention:
    """What a Checkpointer deletes under its prefix ``url`` (calls from its background thread
    and at construction); ``read_manifest`` reads and parses the manifest of a key."""

    def __init__(
        self,
        io: _loop.IOLoop,
        store: CkptStore,
        url: str,
        *,
        keep_last: int | None,
        orphan_age: float,
        read_manifest: Callable[[str], Manifest],
    ) -> None:
        self._io = io
        self._store = store
        self.url = url
        self.keep_last = keep_last
        self.orphan_age = orphan_age
        self._read_manifest = read_manifest
        #: Manifest key -> (its ETag, the data key it names or None if unreadable).
        self._names: dict[str, tuple[str | None, str | None]] = {}
        self._sweep_failed = False

    def delete_checkpoint(self, manifest: StoredObject) -> None:
        """Delete a committed checkpoint: its manifest first (uncommit), then the data object
        that manifest names (none if it is unreadable: unreferenced data is removed by age)."""
        blob = self.named_data(manifest)
        self._io.run(self._store.delete([manifest.key]))
        self._names.pop(manifest.key, None)
        if blob is not None:
            self._io.run(self._store.delete([blob]))

    def named_data(self, manifest: StoredObject) -> str | None:
        """The data key ``manifest`` names (cached by ETag); None if it cannot be read."""
        cached = self._names.get(manifest.key)
        if cached is not None and cached[0] == manifest.etag and manifest.etag is not None:
            return cached[1]
        try:
            parsed = self._read_manifest(manifest.key)
        except (CheckpointError, NotFoundError) as err:
            log.debug("cannot tell which data %s%s names: %s", self.url, manifest.key, err)
            return None
        self._names[manifest.key] = (manifest.etag, parsed.blob_key)
        return parsed.blob_key

    def retain(self) -> None:
        """Apply ``keep_last`` and remove abandoned data and uploads (after a commit)."""
        objects = self._io.run(self._store.list_objects())
        by_step: dict[int, list[StoredObject]] = {}
        for obj in objects:
            step = step_of(obj.key)
            if step is not None:
                by_step.setdefault(step, []).append(obj)
        manifests = {
            step: next(o for o in objs if o.key == step_dir(step) + MANIFEST)
            for step, objs in by_step.items()
            if any(o.key == step_dir(step) + MANIFEST for o in objs)
        }
        committed = sorted(manifests)
        doomed = committed[: -self.keep_last] if self.keep_last else []
        for step in doomed:  # oldest first; each after keep_last newer commits
            self.delete_checkpoint(manifests[step])
        # Data objects no manifest names (a writer died between upload and commit), once old:
        # never another writer's in-flight data, which is younger than orphan_age / 2.
        for step, objs in by_step.items():
            if step in doomed:
                continue
            old = [o for o in objs if DATA_KEY.fullmatch(o.key) and o.age is not None and o.age >= self.orphan_age]
            if not old:
                continue
            named = self.named_data(manifests[step]) if step in manifests else ""
            if named is None:
                continue  # a manifest we cannot read: keep everything of that step
            stale = [o.key for o in old if o.key != named]
            if stale:
                log.info("removing %d abandoned data object(s) of step %d under %s", len(stale), step, self.url)
                self._io.run(self._store.delete(stale))
        self.sweep_orphans()

    def sweep_orphans(self) -> None:
        """Abort multipart uploads of checkpoint data older than ``orphan_age`` (their writer
        died); a store that cannot list them only gets a warning."""
        try:
            self._io.run(self._store.abort_orphaned_uploads("", older_than=self.orphan_age, match=DATA_KEY.fullmatch))
        except FastfeedError as err:
            if not self._sweep_failed:  # once: it would fail the same way after every commit
                log.warning("could not look for abandoned uploads under %s: %s", self.url, err)
            self._sweep_failed = True
