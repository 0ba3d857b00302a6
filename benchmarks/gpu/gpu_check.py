#!/usr/bin/env python
"""GPU checks of fastfeed's device path (run by benchmarks/gpu_check.sh on a CUDA machine).

1. Pinned host-to-device bandwidth: fastfeed.DataLoader(device="cuda") moving fixed-size
   batches vs a plain ``torch`` pinned ``copy_(non_blocking=True)`` of the same bytes.
2. Overlap: a synthetic compute kernel (matmuls) per step, slower than the loader; reports the
   training loop's data wait as a fraction of step time.
3. Bit-identity: batches on the device equal the CPU path's batches.

Prints one JSON object; exits non-zero if a check fails.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils.data import Dataset

import fastfeed


class Blocks(Dataset[dict[str, np.ndarray]]):
    def __init__(self, n: int, nbytes: int) -> None:
        self.n, self.nbytes = n, nbytes
        self.base = np.random.default_rng(0).integers(0, 255, size=nbytes + n, dtype=np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"x": self.base[i : i + self.nbytes], "raw": self.base[i : i + 100 + i % 50].tobytes()}


def plain_pinned_bandwidth(nbytes: int, reps: int = 20) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def loader_bandwidth(batch: int, item: int, batches: int) -> float:
    ds = Blocks(batch * batches, item)
    loader = fastfeed.DataLoader(ds, batch_size=batch, num_workers=4, device="cuda", prefetch_batches=4)
    it = iter(loader)
    next(it)  # warm-up (ring sizing, workers)
    torch.cuda.synchronize()
    start = time.perf_counter()
    n = 0
    for b in it:
        n += b["x"].numel()
    torch.cuda.synchronize()
    loader.close()
    return n / (time.perf_counter() - start) / 1e9


def overlap(batch: int, item: int, steps: int) -> dict[str, float]:
    ds = Blocks(batch * (steps + 1), item)
    loader = fastfeed.DataLoader(ds, batch_size=batch, num_workers=4, device="cuda")
    w = torch.randn(4096, 4096, device="cuda")
    step_times = []
    it = iter(loader)
    next(it)
    for b in it:
        start = time.perf_counter()
        y = b["x"].float().sum() * w
        for _ in range(8):
            y = y @ w
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
    stats = loader.stats()
    loader.close()
    total = sum(step_times)
    return {"wait_s": stats.wait_s, "step_s": total, "wait_fraction": stats.wait_s / max(total, 1e-9)}


def identical() -> bool:
    ds = Blocks(64, 4096)
    cpu = list(fastfeed.DataLoader(ds, batch_size=16))
    gpu = list(fastfeed.DataLoader(ds, batch_size=16, device="cuda"))
    return all(
        torch.equal(c["x"], g["x"].cpu()) and c["raw"].tolist() == g["raw"].tolist()
        for c, g in zip(cpu, gpu, strict=True)
    )


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    batch, item = 64, 1 << 20  # 64 MiB batches
    plain = plain_pinned_bandwidth(batch * item)
    ours = loader_bandwidth(batch, item, 40)
    result = {
        "device": torch.cuda.get_device_name(),
        "plain_pinned_h2d_GBps": plain,
        "fastfeed_loader_GBps": ours,
        "ratio": ours / plain,
        "overlap": overlap(batch, item, 30),
        "bit_identical": identical(),
    }
    print(json.dumps(result, indent=2))
    return 0 if result["bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
