"""Throughput measurements shared by ``fastfeed bench`` and the scripts in ``benchmarks/``.

Each measurement returns a :class:`Measurement`; ceilings (raw concurrent ranged GETs of the same
objects, no parsing) are measured with the same part size and concurrency as the loader, in the
same run, so figures can be reported as fractions of what the machine and store can deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fastfeed import _loop
from fastfeed.config import PrefetchConfig, S3Config
from fastfeed.store import ObjectInfo, StoreSet
from fastfeed.urls import parse_url

__all__ = ["Measurement", "measure_iterable", "measure_raw_get", "peak_rss_bytes"]


@dataclass
class Measurement:
    """One timed pass over a dataset."""

    name: str
    samples: int
    bytes: int
    seconds: float
    #: Seconds from the start of iteration to the first sample.
    first_sample_s: float
    #: CPU seconds (user + system) this process spent, all threads included.
    cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.bytes / 2**30) if self.bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(samples_per_s=self.samples_per_s, mib_per_s=self.mib_per_s, cpu_s_per_gib=self.cpu_s_per_gib)
        return out


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Reads ``VmHWM`` from ``/proc/self/status`` where it exists: ``ru_maxrss`` survives
    ``fork`` + ``exec``, so in a child process it reports the parent's peak at fork time.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as f:  # no procfs: fall back below
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sample_bytes(sample: Any) -> int:
    """Payload bytes in a WebDataset-style sample dict (``bytes`` values only)."""
    if isinstance(sample, dict):
        return sum(len(v) for v in sample.values() if isinstance(v, bytes | bytearray | memoryview))
    return 0


def measure_iterable(
    name: str,
    make: Callable[[], Iterable[Any]],
    size_of: Callable[[Any], int] = sample_bytes,
    count_of: Callable[[Any], int] | None = None,
) -> Measurement:
    """Time one full pass over ``make()`` (construction included in the time to first sample).

    Each item counts as ``count_of(item)`` samples (default 1: items are samples) of
    ``size_of(item)`` bytes."""
    cpu0 = _cpu()
    t0 = time.perf_counter()
    first = 0.0
    samples = 0
    total = 0
    for sample in make():
        if not first:
            first = time.perf_counter() - t0
        samples += 1 if count_of is None else count_of(sample)
        total += size_of(sample)
    seconds = time.perf_counter() - t0
    return Measurement(name, samples, total, seconds, first, _cpu() - cpu0)


def measure_raw_get(
    shards: Sequence[ObjectInfo], s3: S3Config, config: PrefetchConfig, name: str = "raw GET ceiling"
) -> Measurement:
    """The ceiling: concurrent ranged GETs of every part of ``shards``, no parsing, no copies kept.

    Uses ``config.part_size`` and ``config.max_requests`` so it matches the loader's settings.
    """

    async def run() -> tuple[int, float, float]:
        stores = StoreSet(s3)
        sem = asyncio.Semaphore(config.max_requests)
        first: list[float] = []
        t0 = time.perf_counter()

        async def get(info: ObjectInfo, start: int, end: int) -> int:
            async with sem:
                loc = parse_url(info.url)
                store = await stores.get(loc)
                data = await store.read_range(loc, start, end, info.etag)
                if not first:
                    first.append(time.perf_counter() - t0)
                return len(data)

        try:
            jobs = [
                get(info, s, min(s + config.part_size, info.size))
                for info in shards
                for s in range(0, info.size, config.part_size)
            ]
            sizes = await asyncio.gather(*jobs)
        finally:
            await stores.aclose()
        return sum(sizes), time.perf_counter() - t0, first[0] if first else 0.0

    io = _loop.acquire()
    try:
        cpu0 = _cpu()
        total, seconds, first = io.run(run())
        return Measurement(name, 0, total, seconds, first, _cpu() - cpu0)
    finally:
        io.release()
