"""What :meth:`fastfeed.Checkpointer.save` hands back (:class:`SaveHandle`) and the counters
:meth:`fastfeed.Checkpointer.stats` reports (:class:`CheckpointStats`)."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

from fastfeed.checkpoint.manifest import CheckpointInfo

__all__ = ["CheckpointStats", "SaveHandle"]


@dataclass
class CheckpointStats:
    """Counters of a :class:`~fastfeed.Checkpointer` (cumulative)."""

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
    """A pending save: :meth:`result` waits for its commit. ``future`` is the Checkpointer's:
    it sets the commit's :class:`CheckpointInfo` (``None`` for a save skipped or replaced) or the
    save's error."""

    def __init__(self, step: int, future: concurrent.futures.Future[CheckpointInfo | None]) -> None:
        self.step = step
        self._future = future

    def result(self, timeout: float | None = None) -> CheckpointInfo | None:
        """The committed checkpoint (None if this save was skipped or replaced); raises the
        save's error if it failed."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    @property
    def skipped(self) -> bool:
        return self.done() and self._future.exception() is None and self._future.result() is None
