#!/usr/bin/env python
"""Keeping batches: ``list(loader)`` with fastfeed.DataLoader vs torch's DataLoader, same run.

A training loop that keeps every batch (``list(loader)``, a validation loop collecting outputs)
holds every batch's memory. That must cost memory, not time: fastfeed's workers collate into
shared-memory slots that the main process releases when a batch is freed, and a worker whose
slots are all held must not wait for one.

For each repeat (order rotated) it times ``list(DataLoader(ds, batch_size=B, num_workers=W))``
for torch and fastfeed over the same map-style dataset of small records (a float tensor, a numpy
array and an int label per sample), and reports medians and the ratio fastfeed / torch.

    python benchmarks/loader/bench_hold.py --samples 100 --batch-size 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

import fastfeed


class Records(Dataset[dict[str, Any]]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": torch.full((16,), float(i)), "a": np.full(8, i, dtype=np.int32), "label": i}


def run(kind: str, ds: Records, batch: int, workers: int) -> float:
    cls: Any = torch.utils.data.DataLoader if kind == "torch" else fastfeed.DataLoader
    loader = cls(ds, batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    held = list(loader)
    seconds = time.perf_counter() - start
    if sum(len(b["label"]) for b in held) != len(ds):
        raise AssertionError("lost samples")
    if isinstance(loader, fastfeed.DataLoader):
        loader.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    ds = Records(args.samples)
    times: dict[str, list[float]] = {"torch": [], "fastfeed": []}
    order = list(times)
    for r in range(args.repeats):
        for kind in order[r % 2 :] + order[: r % 2]:
            s = run(kind, ds, args.batch_size, args.workers)
            times[kind].append(s)
            print(f"  repeat {r} {kind:<9} {s:7.3f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["fastfeed"] / med["torch"]
    print(f"median: torch {med['torch']:.3f} s, fastfeed {med['fastfeed']:.3f} s, ratio {ratio:.2f}")
    if args.json_path:
        Path(args.json_path).write_text(
            json.dumps(
                {
                    "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
                    "config": vars(args),
                    "median_s": med,
                    "runs": times,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
