#!/usr/bin/env python
"""Cost of DataLoader.stats() bookkeeping relative to the time of a batch, same run.

The loader always records its stage times. This measures (1) the time per batch of a real
``fastfeed.DataLoader`` pass over a local shard of small records (the cheapest batches there
are: 4 KiB records, in-process, columnar fast path), and (2) the bookkeeping one batch costs:
the ``time.perf_counter()`` calls the producer and the training loop make per batch, the two
``StreamingDataset.io_stats()`` snapshots and the two ``StatsSink.add`` calls (the real class
and dataset, with the real keyword sets), timed over many iterations. Reports (2) / (1) as the
overhead fraction, median of repeats.

    python benchmarks/loader/bench_stats_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fastfeed
from fastfeed.loader.stats import StatsSink
from fastfeed.testing.shards import write_synthetic_shards

#: perf_counter calls per batch: producer (source timing 2, fetch snapshot 2, collate 2, copy 2)
#: and training loop (wait 2).
_CLOCK_READS = 10


def bookkeeping_per_batch(ds: fastfeed.StreamingDataset, iterations: int = 100_000) -> float:
    sink = StatsSink()
    start = time.perf_counter()
    for _ in range(iterations):
        for _ in range(_CLOCK_READS):
            time.perf_counter()
        ds.io_stats()
        ds.io_stats()
        times = {"fetch_s": 0.001, "parse_s": 0.001, "collate_s": 0.001, "copy_s": 0.001}
        sink.add(batches=1, samples=256, bytes=1 << 20, **times)
        sink.add(wait_s=0.001)
    return (time.perf_counter() - start) / iterations


def batch_time(root: str, batch_size: int) -> float:
    loader = fastfeed.DataLoader(fastfeed.StreamingDataset(root), batch_size=batch_size)
    start = time.perf_counter()
    n = sum(1 for _ in loader)
    return (time.perf_counter() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=40_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ff-stats-") as tmp:
        write_synthetic_shards(Path(tmp), num_shards=1, samples_per_shard=args.samples, sample_bytes=4096)
        fractions, batch_s, book_s = [], [], []
        for _ in range(args.repeats):
            b = batch_time(tmp, args.batch_size)
            k = bookkeeping_per_batch(fastfeed.StreamingDataset(tmp))
            batch_s.append(b)
            book_s.append(k)
            fractions.append(k / b)
    print(f"time per batch (median): {statistics.median(batch_s) * 1e6:.0f} us")
    print(f"stats bookkeeping per batch (median): {statistics.median(book_s) * 1e6:.2f} us")
    print(f"overhead: {statistics.median(fractions) * 100:.2f} % (max {max(fractions) * 100:.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
