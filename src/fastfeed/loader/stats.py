"""What a loader counts: :class:`LoaderStats` (``DataLoader.stats()``), the thread-safe sink the
training loop, the producer thread and the workers' messages add to, and how samples, bytes and
I/O are counted for it.

Every stage adds here: the training loop (``wait_s``; without workers, the whole batch), the
producer thread "fastfeed-batch" (the stage times a batch's message carries, copy time), and
the end of each stream (its last reads). Imports nothing else of the loader.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

from fastfeed.batch.assemble import tree_leaves

__all__ = ["LoaderStats", "StatsSink", "count_samples", "io_delta", "tensor_bytes"]


@dataclass
class LoaderStats:
    """Counters of a loader, cumulative over its iterations.

    ``wait_s`` is the time the training loop spent blocked in ``next()``; the stage times are
    summed over the threads and processes that did the work (so they can exceed wall time).
    """

    samples: int = 0
    batches: int = 0
    #: Bytes of tensor data delivered (arena regions of the batches).
    bytes: int = 0
    #: Training loop blocked waiting for a batch.
    wait_s: float = 0.0
    #: Waiting for store bytes (fastfeed datasets only).
    fetch_s: float = 0.0
    #: Producing samples (reading, parsing, user transforms), fetch waits excluded.
    parse_s: float = 0.0
    #: Collating samples into arenas.
    collate_s: float = 0.0
    #: Copying into the ring / issuing device copies.
    copy_s: float = 0.0
    #: Decoding images (``DataLoader(decode=...)``).
    decode_s: float = 0.0
    #: Bytes read from the store (S3 or local files), and from the node's cache (fastfeed
    #: datasets with ``cache_dir``).
    bytes_fetched: int = 0
    bytes_from_cache: int = 0
    #: Shards found complete in the cache, and shards that were not (fetched, or waited for).
    cache_hits: int = 0
    cache_misses: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class StatsSink:
    """Thread-safe accumulator behind :meth:`DataLoader.stats`: one per loader, shared by its
    iterations (the training loop, the producer thread)."""

    def __init__(self) -> None:
        self._stats = LoaderStats()
        self._lock = threading.Lock()

    def add(self, **values: float) -> None:
        """Add ``values`` (:class:`LoaderStats` fields) to the counters."""
        with self._lock:
            for key, value in values.items():
                setattr(self._stats, key, getattr(self._stats, key) + value)

    def snapshot(self) -> LoaderStats:
        """A copy of the counters as they are now."""
        with self._lock:
            return LoaderStats(**asdict(self._stats))


def io_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The dataset's I/O counters between two ``io_stats()`` snapshots, as LoaderStats fields."""
    return {
        "fetch_s": after["fetch_wait_s"] - before["fetch_wait_s"],
        **{
            key: int(after.get(key, 0) - before.get(key, 0))
            for key in ("bytes_fetched", "cache_hits", "cache_misses", "bytes_from_cache")
        },
    }


def count_samples(samples: Any) -> int:
    """Samples in what a collate function was given (a list, or one sample when unbatched)."""
    return len(samples) if isinstance(samples, list) else 1


def tensor_bytes(batch: Any) -> int:
    """Bytes of tensor data in ``batch`` (its tensors, at any depth): ``LoaderStats.bytes``."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(batch))
