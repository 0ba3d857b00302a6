#!/usr/bin/env python
"""Warm epochs with and without ``persistent_workers``: fastfeed.DataLoader, same run, same cache.

Starts SeaweedFS on 127.0.0.1 with a synthetic dataset (``fastfeed.bench.demo.demo_dataset``),
fills a node cache once (untimed), then for each repeat (order rotated) runs ``--epochs`` warm
epochs (``set_epoch`` each) of one ``fastfeed.DataLoader(num_workers=W)``:

* ``fresh``: ``persistent_workers=False``: every epoch starts its worker processes;
* ``persistent``: ``persistent_workers=True``: the first epoch starts them, the next ones reuse
  them (and their shared-memory slots and pools).

Epoch 0 of each loader is left out of the figures (both start workers there). Also measured in
the same run: a sequential read of the cache entries (the warm ceiling). Reports medians of
the per-epoch MB/s and time to first batch, and the ratio persistent / fresh.

    python benchmarks/loader/bench_persistent.py --size 512MiB --epochs 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastfeed import DataLoader, StreamingDataset
from fastfeed.bench.demo import demo_dataset
from fastfeed.bench.measure import measure_raw_read
from fastfeed.cache.admin import entry_files
from fastfeed.config import parse_size


def _epoch(loader: DataLoader, ds: StreamingDataset, epoch: int) -> dict[str, float]:
    ds.set_epoch(epoch)
    start = time.perf_counter()
    first = 0.0
    nbytes = 0
    for i, batch in enumerate(loader):
        if i == 0:
            first = time.perf_counter() - start
        nbytes += sum(v.data.numel() for k, v in batch.items() if hasattr(v, "data"))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "first_s": first, "mb_per_s": nbytes / 1e6 / seconds, "bytes": nbytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per loader (the first is left out)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch of each loader is left out)")

    results: dict[str, list[dict[str, float]]] = {"fresh": [], "persistent": []}
    ceilings: list[float] = []
    with (
        demo_dataset(parse_size(args.size), 100 << 10, 16 << 20) as (url, s3, setup),
        tempfile.TemporaryDirectory(prefix="ff-persistent-cache-") as cache,
    ):
        ds = StreamingDataset(url, s3=s3, cache_dir=cache, cache_limit="20GB")
        for _ in ds:  # fill the cache, untimed
            pass
        entries = entry_files(cache)
        modes = ["fresh", "persistent"]
        for r in range(args.repeats):
            ceilings.append(measure_raw_read(entries).mb_per_s)
            for mode in modes[r % 2 :] + modes[: r % 2]:
                with DataLoader(
                    ds, batch_size=args.batch_size, num_workers=args.workers, persistent_workers=mode == "persistent"
                ) as loader:
                    runs = [_epoch(loader, ds, e) for e in range(args.epochs)]
                results[mode].extend(runs[1:])
                print(
                    f"repeat {r} {mode:<10} epochs 1..: "
                    + " ".join(f"{x['mb_per_s']:.0f}" for x in runs[1:])
                    + " MB/s",
                    file=sys.stderr,
                )

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in results[mode])

    ceiling = statistics.median(ceilings)
    summary: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "setup": setup,
        "raw_read_mb_per_s": ceiling,
        **{
            mode: {"mb_per_s": med(mode, "mb_per_s"), "first_batch_s": med(mode, "first_s"), "epochs": results[mode]}
            for mode in results
        },
    }
    summary["persistent_over_fresh"] = summary["persistent"]["mb_per_s"] / summary["fresh"]["mb_per_s"]
    print(f"{'':<12} {'MB/s':>8} {'x raw read':>11} {'1st batch':>10}")
    for mode in results:
        print(
            f"{mode:<12} {med(mode, 'mb_per_s'):>8.0f} {med(mode, 'mb_per_s') / ceiling:>11.2f} "
            f"{med(mode, 'first_s') * 1000:>8.0f}ms"
        )
    print(f"{'raw read':<12} {ceiling:>8.0f} {1.0:>11.2f}")
    print(f"persistent / fresh: {summary['persistent_over_fresh']:.2f}x (medians of warm epochs 1..{args.epochs - 1})")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
