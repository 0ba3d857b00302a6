#!/usr/bin/env python
"""What filling the node cache costs a cold epoch: fastfeed.DataLoader, same run, same store.

Starts SeaweedFS on 127.0.0.1 with a synthetic dataset (``fastfeed.bench.demo.demo_dataset``)
behind the delaying proxy of ``fastfeed bench`` (``--latency-ms``), then for each repeat (order
rotated) times one cold epoch of ``fastfeed.DataLoader(num_workers=W)`` in each mode:

* ``nocache``: ``StreamingDataset`` without a cache: the bytes go from the GETs to the batches;
* ``cache``: with a fresh ``cache_dir``: every shard is also written to the node cache (and
  fsync'ed) while it is read, through the page cache (``cache_io="buffered"``);
* ``direct``: as ``cache`` with ``cache_io="direct"``: the fill writes with ``O_DIRECT``;
* ``sparse`` (diagnostic, ``--sparse``): as ``cache``, but the fill extends the part file with
  ``ftruncate`` instead of writing the bytes (and skips the fsync). The entries are then holes,
  so this mode only measures what the rest of the cache machinery costs. It replaces a private
  function of ``fastfeed.cache.entries`` in this process and its forked workers.

Also measured per repeat: the raw GET ceiling (``fastfeed.bench.measure.measure_raw_get``). Reports the
medians of MB/s and of client CPU seconds per GiB (workers included).

    python benchmarks/cache/bench_cold_fill.py --size 1GiB --latency-ms 20 --repeats 3 --sparse
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import fastfeed.cache.entries as ff_entries
from fastfeed import DataLoader, StreamingDataset
from fastfeed.bench.demo import demo_dataset
from fastfeed.bench.measure import measure_batches, measure_raw_get
from fastfeed.bench.run import batch_bytes, batch_count, emulated
from fastfeed.config import PrefetchConfig, parse_size

_REAL_PWRITE = ff_entries._pwrite_all


def _extend_only(fd: int, data: memoryview, offset: int) -> None:
    """The ``sparse`` mode's stand-in for the fill's write: the file grows, no byte is written."""
    end = offset + len(data)
    if os.fstat(fd).st_size < end:
        os.ftruncate(fd, end)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sparse", action="store_true", help="also run the diagnostic sparse mode")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    modes = ["nocache", "cache", "direct"] + (["sparse"] if args.sparse else [])
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in ["raw GET", *modes]}
    prefetch = PrefetchConfig()
    with (
        demo_dataset(parse_size(args.size), 100 << 10, 16 << 20) as (url, s3, setup),
        emulated(s3, args.latency_ms, None) as s3_run,
    ):
        for r in range(args.repeats):
            raw = measure_raw_get(StreamingDataset(url, s3=s3_run).shards, s3_run, prefetch)
            runs["raw GET"].append({"mb_per_s": raw.mb_per_s, "cpu_s_per_gib": raw.cpu_s_per_gib})
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                ff_entries._pwrite_all = _extend_only if mode == "sparse" else _REAL_PWRITE
                with contextlib.ExitStack() as stack:
                    if mode == "sparse":
                        stack.enter_context(_no_fsync())
                    cache: dict[str, Any] = {}
                    if mode != "nocache":
                        cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ff-cold-fill-"))
                        cache = {
                            "cache_dir": cache_dir,
                            "cache_limit": "100GB",
                            "cache_io": "direct" if mode == "direct" else "buffered",
                        }
                    ds = StreamingDataset(url, s3=s3_run, **cache)
                    loader = stack.enter_context(
                        contextlib.closing(DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers))
                    )
                    m = measure_batches(
                        mode, lambda loader=loader: loader, size_of=batch_bytes, count_of=batch_count, close=False
                    )
                runs[mode].append({"mb_per_s": m.mb_per_s, "cpu_s_per_gib": m.cpu_s_per_gib})
                print(f"repeat {r} {mode:<8} {m.mb_per_s:7.0f} MB/s {m.cpu_s_per_gib:5.2f} CPU s/GiB", file=sys.stderr)
    ff_entries._pwrite_all = _REAL_PWRITE

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[mode])

    print(f"{'':<10} {'MB/s':>7} {'x raw GET':>10} {'CPU s/GiB':>10}")
    for mode in runs:
        print(
            f"{mode:<10} {med(mode, 'mb_per_s'):>7.0f} {med(mode, 'mb_per_s') / med('raw GET', 'mb_per_s'):>10.2f} "
            f"{med(mode, 'cpu_s_per_gib'):>10.2f}"
        )
    if args.json_path:
        summary = {
            "command": " ".join(sys.argv),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "setup": setup,
            "medians": {m: {k: med(m, k) for k in ("mb_per_s", "cpu_s_per_gib")} for m in runs},
            "runs": runs,
        }
        Path(args.json_path).write_text(json.dumps(summary, indent=2))
    return 0


@contextlib.contextmanager
def _no_fsync() -> Any:
    """The sparse mode skips the fill's fsync too (``fastfeed.cache.entries`` looks ``os.fsync`` up when
    it calls it)."""

    class _Os:
        def __getattr__(self, name: str) -> Any:
            return (lambda fd: None) if name == "fsync" else getattr(os, name)

    ff_entries.os = _Os()  # type: ignore[assignment]
    try:
        yield
    finally:
        ff_entries.os = os


if __name__ == "__main__":
    sys.exit(main())
