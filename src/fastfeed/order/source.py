"""What the order modules need of a dataset, and the record of a resumed epoch.

:mod:`~fastfeed.order.streams` and :mod:`~fastfeed.order.reshard` read a dataset only through
:class:`PlannedDataset`, which :class:`~fastfeed.StreamingDataset` implements; they never see
its internals, and the dataset module is not imported by them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fastfeed.config import PrefetchConfig
    from fastfeed.order.plan import Piece
    from fastfeed.read.prefetch import Prefetcher
    from fastfeed.store.base import ObjectInfo

__all__ = ["PlannedDataset", "Segment"]


@dataclass(frozen=True)
class Segment:
    """A closed part of an epoch: its layout and how many samples each stream had consumed."""

    world_size: int
    num_streams: int
    batch_size: int
    consumed: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "num_streams": self.num_streams,
            "batch_size": self.batch_size,
            "consumed": list(self.consumed),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        return cls(
            int(d["world_size"]), int(d["num_streams"]), int(d["batch_size"]), tuple(int(c) for c in d["consumed"])
        )


class PlannedDataset(Protocol):
    """A dataset as the order modules see it: its shards and their sample counts, the epoch's
    settings and plan, and prefetchers over pieces of it."""

    @property
    def shards(self) -> Sequence[ObjectInfo]: ...

    @property
    def seed(self) -> int: ...

    @property
    def epoch(self) -> int: ...

    @property
    def rank(self) -> int: ...

    @property
    def shuffle(self) -> bool: ...

    @property
    def shuffle_buffer(self) -> int: ...

    @property
    def remainder(self) -> str: ...

    @property
    def shard_sample_counts(self) -> list[int]:
        """Samples per shard (counted once, on first use)."""
        ...

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The current epoch's closed segments."""
        ...

    def plan(
        self, worker: int = 0, num_workers: int = 1, epoch: int | None = None, segments: Sequence[Segment] | None = None
    ) -> list[Piece]:
        """The shard pieces a worker of this rank reads in ``epoch``."""
        ...

    def stream_prefetch_config(self, share: int = 1) -> PrefetchConfig:
        """The prefetch settings of one of ``share`` streams read at once."""
        ...

    def prefetching(
        self, pieces: list[Piece], share: int = 1, epoch: int | None = None
    ) -> contextlib.AbstractContextManager[Prefetcher]:
        """A prefetcher over ``pieces``' shards, closed on exit."""
        ...
