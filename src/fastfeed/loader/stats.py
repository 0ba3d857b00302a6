"""What a loader counts: :class:`LoaderStats` (``DataLoader.stats()``), the thread-safe sink the
training loop, the producer thread and the workers' messages add to, and how samples, bytes and
I/O are counted for it.

Every stage adds here: the training loop (``wait_s``; without workers, the whole batch), the
producer thread "fastfeed-batch" (the stage times a batch's message carries, copy time), and
the end of each stream (its last reads). Imports nothing else of the loader.
"""

from __future__ import annotations

import collections
import math
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
    #: Over the last batches delivered (at most :data:`RECENT_BATCHES`; the fields below are
    #: zero until two were): their number, batches and samples per second, the median and 99th
    #: percentile of the training loop's wait per batch, and the fraction of that time it waited.
    recent_batches: int = 0
    batches_per_s: float = 0.0
    samples_per_s: float = 0.0
    wait_p50_s: float = 0.0
    wait_p99_s: float = 0.0
    wait_fraction: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def bound_by(self) -> str:
        """What bounds this loader's training loop: ``"step"`` (the loop waits for data less
        than 5 % of the time: the training step itself bounds it), or the loader's stage that
        takes the most time per batch: ``"fetch"`` (the store), ``"parse"`` (reading samples,
        user transforms), ``"collate"``, ``"copy"`` or ``"decode"``."""
        if self.recent_batches >= 2 and self.wait_fraction < STEP_BOUND_WAIT:
            return "step"
        stages = {name: getattr(self, f"{name}_s") for name in STAGES}
        return max(stages, key=lambda name: stages[name]) if any(stages.values()) else "step"


#: Batches :attr:`LoaderStats.recent_batches` covers at most.
RECENT_BATCHES = 256
#: Below this fraction of time waiting for data, a loop is bound by its own step.
STEP_BOUND_WAIT = 0.05
#: The loader's stages, as :meth:`LoaderStats.bound_by` names them.
STAGES = ("fetch", "parse", "collate", "copy", "decode")


class StatsSink:
    """Thread-safe accumulator behind :meth:`DataLoader.stats`: one per loader, shared by its
    iterations (the training loop, the producer thread)."""

    def __init__(self) -> None:
        self._stats = LoaderStats()
        self._lock = threading.Lock()
        #: ``(time next() returned, seconds it waited)`` of the last batches delivered.
        self._recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=RECENT_BATCHES)

    def delivered(self, wait_s: float, now: float) -> None:
        """[training loop] ``next()`` returned a batch at ``now`` after waiting ``wait_s``."""
        with self._lock:
            self._stats.wait_s += wait_s
            self._recent.append((now, wait_s))

    def add(self, **values: float) -> None:
        """Add ``values`` (:class:`LoaderStats` fields) to the counters."""
        with self._lock:
            for key, value in values.items():
                setattr(self._stats, key, getattr(self._stats, key) + value)

    def snapshot(self) -> LoaderStats:
        """A copy of the counters as they are now, with the recent rates and percentiles."""
        with self._lock:
            out = LoaderStats(**asdict(self._stats))
            recent = list(self._recent)
        if len(recent) >= 2:
            span = recent[-1][0] - recent[0][0]
            waits = sorted(w for _, w in recent[1:])  # the batches delivered within the span
            out.recent_batches = len(recent)
            if span > 0:
                out.batches_per_s = (len(recent) - 1) / span
                out.samples_per_s = out.batches_per_s * (out.samples / out.batches if out.batches else 0.0)
                out.wait_fraction = min(1.0, sum(waits) / span)
            out.wait_p50_s = _percentile(waits, 0.50)
            out.wait_p99_s = _percentile(waits, 0.99)
        return out


def _percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile of ``sorted_values`` (nearest rank)."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


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
