#!/usr/bin/env python
"""Small-record batching: fastfeed.DataLoader vs torch.utils.data.DataLoader, same run.

Writes one local WebDataset shard of small records (default 40,000 x 4 KiB), then for each
worker count and each repeat (order rotated) measures batches/s of one full pass of:

* ``torch``: ``torch.utils.data.DataLoader(Decoded(ds), batch_size=B, num_workers=W)`` with its
  ``default_collate``, where ``Decoded`` turns each sample's record into a ``uint8`` array and
  its ``.cls`` into an int (the per-sample way to get fixed-size tensors);
* ``fastfeed-samples``: ``fastfeed.DataLoader`` over the same ``Decoded(ds)`` (its native
  collation, same per-sample dataset);
* ``fastfeed``: ``fastfeed.DataLoader(ds)`` on the ``StreamingDataset`` itself: records are
  gathered from the fetched bytes into one flat buffer (``RaggedBytes``) and viewed as
  ``[B, 4096]``; labels parsed from the ``.cls`` field per batch by ``RaggedBytes.to_ints()``.

Every contender ends each batch with the same tensors (records ``[B, 4096]`` uint8, labels
``[B]`` int64). Reports medians and ratios to torch.

    python benchmarks/loader/bench_loader.py --workers 0,2 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

import fastfeed
from fastfeed.config import parse_size
from fastfeed.testing.shards import write_synthetic_shards


class Decoded(IterableDataset[dict[str, Any]]):
    """The streaming dataset with each record decoded to a fixed-size array (picklable)."""

    def __init__(self, base: fastfeed.StreamingDataset, as_array: bool) -> None:
        self.base = base
        self.as_array = as_array

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for s in self.base:
            rec = np.frombuffer(s["bin"], dtype=np.uint8) if self.as_array else s["bin"]
            yield {"rec": rec, "label": int(s["cls"]), "__key__": s["__key__"]}


def run(kind: str, ds: Decoded, batch: int, workers: int, record: int) -> dict[str, float]:
    """One pass; every contender ends with the same tensors per batch: records [B, record]
    uint8 and labels [B] int64."""
    if kind == "torch":
        loader: Any = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    elif kind == "fastfeed-samples":  # the same per-sample dataset as torch, fastfeed's collation
        loader = fastfeed.DataLoader(ds, batch_size=batch, num_workers=workers)
    else:  # fastfeed reading the shards itself: records gathered from fetched bytes, no per-sample copies
        loader = fastfeed.DataLoader(ds.base, batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    cpu0 = time.process_time()
    n = 0
    nbytes = 0
    for b in loader:
        if kind == "fastfeed":
            rec = b["bin"].data.view(-1, record)
            label = b["cls"].to_ints()  # one native parse of the ASCII labels
        else:
            rec, label = b["rec"], b["label"]
        if not isinstance(rec, torch.Tensor) or rec.shape[0] != label.shape[0]:
            raise AssertionError("bad batch")
        nbytes += rec.numel()
        n += 1
    seconds = time.perf_counter() - start
    if isinstance(loader, fastfeed.DataLoader):
        loader.close()
    return {
        "batches": n,
        "seconds": seconds,
        "batches_per_s": n / seconds,
        "bytes": nbytes,
        "main_cpu_s": time.process_time() - cpu0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=40_000)
    parser.add_argument("--record-size", default="4KiB")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    size = parse_size(args.record_size)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="ff-loader-") as tmp:
        write_synthetic_shards(Path(tmp), num_shards=1, samples_per_shard=args.samples, sample_bytes=size)
        ds = Decoded(fastfeed.StreamingDataset(tmp), as_array=True)
        for workers in (int(w) for w in args.workers.split(",")):
            rows: dict[str, list[dict[str, float]]] = {"torch": [], "fastfeed-samples": [], "fastfeed": []}
            order = list(rows)
            for r in range(args.repeats):
                for kind in order[r % 3 :] + order[: r % 3]:
                    m = run(kind, ds, args.batch_size, workers, size)
                    rows[kind].append(m)
                    print(f"  workers={workers} repeat {r} {kind:<16} {m['batches_per_s']:8.1f} batches/s")
            results[str(workers)] = rows
    print()
    print(f"{'workers':>7} {'torch b/s':>10} {'ff-samples b/s':>14} {'ratio':>6} {'fastfeed b/s':>12} {'ratio':>6}")
    summary = {}
    for workers, rows in results.items():
        med = {k: statistics.median(m["batches_per_s"] for m in v) for k, v in rows.items()}
        t, fs, f = med["torch"], med["fastfeed-samples"], med["fastfeed"]
        summary[workers] = {**med, "ratio_samples": fs / t, "ratio": f / t}
        print(f"{workers:>7} {t:10.1f} {fs:14.1f} {fs / t:6.2f} {f:12.1f} {f / t:6.2f}")
    if args.json_path:
        Path(args.json_path).write_text(
            json.dumps(
                {
                    "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
                    "config": vars(args),
                    "median": summary,
                    "runs": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
