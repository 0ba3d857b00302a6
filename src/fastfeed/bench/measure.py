"""Throughput measurements shared by ``fastfeed bench`` and the scripts in ``benchmarks/``.

Each measurement returns a :class:`Measurement`. Ceilings are measured in the same run as what
they bound, so figures can be reported as fractions of what the machine and store can deliver:

* :func:`measure_raw_get`: concurrent ranged GETs of every part of the objects, no parsing
  (same part size and concurrency as the loader);
* :func:`measure_raw_read`: a sequential ``readinto`` of local files (the node cache);
* :func:`measure_h2d`: pinned host memory to a GPU.

:func:`measure_batches` times one epoch of any loader batch by batch: time to the first batch,
batch latency percentiles, the fraction of the epoch the consumer spent waiting for data, a
throughput timeline, CPU (worker processes included) and peak memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fastfeed import _loop
from fastfeed.config import PrefetchConfig, S3Config
from fastfeed.store.base import ObjectInfo
from fastfeed.store.pool import StoreSet
from fastfeed.urls import parse_url

__all__ = [
    "Measurement",
    "PeakTreePss",
    "measure_batches",
    "measure_h2d",
    "measure_iterable",
    "measure_raw_get",
    "measure_raw_read",
    "peak_rss_bytes",
    "service_process",
    "settle",
    "tree_pss_bytes",
]

#: At most this many points are kept in a :attr:`Measurement.timeline`.
TIMELINE_POINTS = 400


@dataclass
class Measurement:
    """One timed pass (of a dataset, or of a ceiling)."""

    name: str
    samples: int
    bytes: int
    seconds: float
    #: Seconds from the start of iteration to the first sample (or batch).
    first_sample_s: float
    #: CPU seconds (user + system) of this process, all threads, plus its reaped children
    #: (DataLoader workers) during the pass.
    cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    #: Batch latency (time inside ``next()``), first batch excluded; 0 when not measured.
    batch_p50_ms: float = 0.0
    batch_p99_ms: float = 0.0
    #: Fraction of the pass the consumer spent waiting inside ``next()``.
    wait_fraction: float = 0.0
    #: Cache hits / shards opened, when the reader has a cache.
    cache_hit_rate: float | None = None
    #: Peak resident memory of this process, and of the largest child process (worker).
    peak_rss_bytes: int = 0
    peak_child_rss_bytes: int = 0
    #: Peak summed PSS of this process and its descendants (its workers) during the pass; 0
    #: where it cannot be read.
    peak_tree_pss_bytes: int = 0
    #: ``(seconds since start, cumulative bytes)``, at most :data:`TIMELINE_POINTS` points.
    timeline: list[tuple[float, int]] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """10**6 bytes per second."""
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.bytes / 2**30) if self.bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            samples_per_s=self.samples_per_s,
            mib_per_s=self.mib_per_s,
            mb_per_s=self.mb_per_s,
            cpu_s_per_gib=self.cpu_s_per_gib,
        )
        return out


def settle() -> None:
    """Before each timed pass (every ceiling, fastfeed's runs and each peer's): collect the
    garbage the set-up left. A full collection of a process that imported torch walks some
    300,000 objects (0.15 s on the 2-core VM); triggered by the set-up's allocations, it would
    land in whichever pass runs next, a third of a 400 MB epoch there. Then hand the freed heap
    back to the system (glibc's ``malloc_trim``), so a pass's peak memory does not carry what the
    set-up (writing the demo's shards, the ceilings' buffers) left in the allocator's free
    lists: a peer starts in a fresh process that never had it (about 30 MiB after the demo's
    set-up, measured)."""
    gc.collect()
    _malloc_trim()


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_with_children() -> float:
    """CPU seconds of this process, its reaped children, and its live forked children (the
    DataLoader's persistent workers, reaped only when the loader closes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return _cpu() + children.ru_utime + children.ru_stime + live_forked_children_cpu()


def live_forked_children_cpu() -> float:
    """CPU seconds of this process's live children that run the same command line, i.e. forked
    and not exec'ed: DataLoader workers, not the servers or proxies a benchmark starts (Linux;
    0 elsewhere)."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/cmdline", "rb") as f:
            command = f.read()
        tick = os.sysconf("SC_CLK_TCK")
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except (OSError, ValueError):
        return 0.0
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            # After the name: state, ppid (index 1), ... utime (index 11), stime (index 12).
            if int(fields[1]) != me:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() != command:
                    continue
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return total / tick


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


#: PIDs of the benchmark's own services (the demo's S3 server, the latency proxy): children of
#: this process, but not the loader's, so :func:`tree_pss_bytes` leaves their subtrees out (a
#: peer, run in its own process, never has them in its tree either).
_SERVICES: set[int] = set()


@contextlib.contextmanager
def service_process(pid: int) -> Iterator[None]:
    """Leave process ``pid`` (and its descendants) out of the memory measured while in the block."""
    _SERVICES.add(pid)
    try:
        yield
    finally:
        _SERVICES.discard(pid)


def _tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (Linux's ``/proc/PID/task/TID/children``), without the
    benchmark's services (:func:`service_process`)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in _SERVICES:
            continue
        out.append(pid)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def tree_pss_bytes(root: int | None = None) -> int:
    """Summed proportional set size of ``root`` (default: this process) and its descendants:
    each shared page counted once over the tree, unlike summed RSS. 0 where ``/proc`` has no
    ``smaps_rollup`` (not Linux, or a kernel before 4.14)."""
    total = 0
    for pid in _tree_pids(os.getpid() if root is None else root):
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


class PeakTreePss:
    """The peak of :func:`tree_pss_bytes` while the ``with`` block runs, sampled every
    ``interval`` seconds by a daemon thread (its reads cost about 1 % of a core at 0.1 s)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastfeed-bench-pss", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_pss_bytes())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakTreePss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_pss_bytes())


def _peak_child_rss_bytes() -> int:
    """Largest peak RSS of any reaped child process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def sample_bytes(sample: Any) -> int:
    """Payload bytes in a WebDataset-style sample dict (``bytes`` values only)."""
    if isinstance(sample, dict):
        return sum(len(v) for v in sample.values() if isinstance(v, bytes | bytearray | memoryview))
    return 0


def _thin(points: list[tuple[float, int]]) -> list[tuple[float, int]]:
    if len(points) <= TIMELINE_POINTS:
        return points
    step = len(points) / TIMELINE_POINTS
    kept = [points[int(i * step)] for i in range(TIMELINE_POINTS - 1)]
    return [*kept, points[-1]]


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_iterable(
    name: str,
    make: Callable[[], Iterable[Any]],
    size_of: Callable[[Any], int] = sample_bytes,
    count_of: Callable[[Any], int] | None = None,
) -> Measurement:
    """Time one full pass over ``make()`` (construction included in the time to first sample).

    Each item counts as ``count_of(item)`` samples (default 1: items are samples) of
    ``size_of(item)`` bytes."""
    return measure_batches(name, make, size_of=size_of, count_of=count_of or (lambda _: 1))


def measure_batches(
    name: str,
    make: Callable[[], Iterable[Any]],
    *,
    size_of: Callable[[Any], int],
    count_of: Callable[[Any], int],
    step_s: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    cache_hit_rate: Callable[[Any], float | None] | None = None,
    close: bool = True,
) -> Measurement:
    """Time one pass over ``make()`` item by item (construction and worker start-up included).

    ``step_s``: a synthetic training step after each item (``time.sleep``, which releases the
    GIL as a GPU step would), so :attr:`Measurement.wait_fraction` is the share of a training
    loop lost to data stalls. ``progress(bytes, samples)`` is called after each item.
    ``cache_hit_rate(loader)`` reads the loader's cache hit rate after the pass. The loader is
    closed after the pass when it has ``close()`` (unless ``close=False``: a loader reused for
    the next epoch, as a training loop does).
    """
    settle()
    cpu0 = _cpu_with_children()
    t0 = time.perf_counter()
    first = 0.0
    samples = total = 0
    waits: list[float] = []
    timeline: list[tuple[float, int]] = [(0.0, 0)]
    memory = PeakTreePss().__enter__()
    loader = make()
    try:
        it = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                break
            now = time.perf_counter()
            if not first:
                first = now - t0
            else:
                waits.append(now - start)
            size, count = size_of(item), count_of(item)
            samples += count
            total += size
            timeline.append((now - t0, total))
            del item
            if progress is not None:
                progress(size, count)
            if step_s > 0:
                time.sleep(step_s)
        seconds = time.perf_counter() - t0
        hit_rate = cache_hit_rate(loader) if cache_hit_rate is not None else None
    finally:
        memory.__exit__()
        closer = getattr(loader, "close", None) if close else None
        if callable(closer):
            closer()
    waited = first + sum(waits)
    return Measurement(
        name,
        samples,
        total,
        seconds,
        first,
        _cpu_with_children() - cpu0,
        batch_p50_ms=statistics.median(waits) * 1000 if waits else 0.0,
        batch_p99_ms=_percentile(waits, 0.99) * 1000,
        wait_fraction=waited / seconds if seconds > 0 else 0.0,
        cache_hit_rate=hit_rate,
        peak_rss_bytes=peak_rss_bytes(),
        peak_child_rss_bytes=_peak_child_rss_bytes(),
        peak_tree_pss_bytes=memory.peak,
        timeline=_thin(timeline),
    )


def measure_raw_get(
    shards: Sequence[ObjectInfo], s3: S3Config, config: PrefetchConfig, name: str = "raw GET ceiling"
) -> Measurement:
    """The ceiling: concurrent ranged GETs of every part of ``shards``, no parsing, no copies kept.

    Uses ``config.part_size`` and ``config.max_requests`` so it matches the loader's settings.
    """

    async def run() -> tuple[int, float, float, list[tuple[float, int]]]:
        stores = StoreSet(s3)
        sem = asyncio.Semaphore(config.max_requests)
        first: list[float] = []
        timeline: list[tuple[float, int]] = [(0.0, 0)]
        t0 = time.perf_counter()

        async def get(info: ObjectInfo, start: int, end: int) -> int:
            async with sem:
                loc = parse_url(info.url)
                store = await stores.get(loc)
                data = await store.read_range(loc, start, end, info.etag)
                now = time.perf_counter() - t0
                if not first:
                    first.append(now)
                timeline.append((now, timeline[-1][1] + len(data)))
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
        return sum(sizes), time.perf_counter() - t0, first[0] if first else 0.0, timeline

    io = _loop.acquire()
    try:
        settle()
        cpu0 = _cpu()
        total, seconds, first, timeline = io.run(run())
        return Measurement(name, 0, total, seconds, first, _cpu() - cpu0, timeline=_thin(timeline))
    finally:
        io.release()


def measure_raw_read(
    paths: Sequence[str | os.PathLike[str]], name: str = "raw read ceiling", chunk: int = 8 << 20, passes: int = 3
) -> Measurement:
    """The ceiling of a local read: each file read sequentially into one reused buffer; the
    median of ``passes`` passes (from the page cache a pass over a small dataset takes tens of
    milliseconds, short enough for one scheduling hiccup to halve it)."""
    buf = bytearray(chunk)
    runs: list[Measurement] = []
    for _ in range(max(1, passes)):
        settle()
        cpu0 = _cpu()
        t0 = time.perf_counter()
        total = 0
        timeline: list[tuple[float, int]] = [(0.0, 0)]
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
            timeline.append((time.perf_counter() - t0, total))
        seconds = time.perf_counter() - t0
        runs.append(Measurement(name, 0, total, seconds, 0.0, _cpu() - cpu0, timeline=_thin(timeline)))
    runs.sort(key=lambda m: m.seconds)
    return runs[len(runs) // 2]


def measure_h2d(
    device: str, nbytes: int = 256 << 20, repeats: int = 5, name: str = "pinned H2D ceiling"
) -> Measurement:
    """The ceiling of the host-to-device copy: ``nbytes`` from pinned memory, median of ``repeats``."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up
    torch.cuda.synchronize(device)
    times = []
    cpu0 = _cpu()
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return Measurement(name, 0, nbytes, seconds, 0.0, _cpu() - cpu0, extra={"repeats": repeats})
