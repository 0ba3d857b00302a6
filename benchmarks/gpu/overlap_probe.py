#!/usr/bin/env python
"""Where does a training loop's per-step data wait come from? (GPU machine; see gpu_check.sh.)

Runs one epoch per variant of a consumer slower than the loader and reports, per step, the
time in ``next()`` (p50, p90, max), the part of it spent waiting on the loader's queue
(``stats().wait_s``; the rest is hand-over work in the training thread), and the time freeing
the previous batch takes.

Variants: ``cuda`` (device="cuda", matmul step ending in a host sync), ``cpu_batches`` (no
device; the loop copies the batch itself), ``sleep_step`` (device="cuda", the step only
sleeps), ``switch_0.5ms`` (as ``cuda`` with a 0.5 ms GIL switch interval), ``inprocess``
(``cuda`` without workers).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fastfeed
from fastfeed.testing.shards import write_synthetic_shards


def run(shards: list[str], variant: str) -> dict[str, Any]:
    workers = 0 if variant == "inprocess" else 4
    device = None if variant == "cpu_batches" else "cuda"
    old_switch = sys.getswitchinterval()
    if variant == "switch_0.5ms":
        sys.setswitchinterval(0.0005)
    ds = fastfeed.StreamingDataset(shards, shuffle=True, seed=1)
    loader = fastfeed.DataLoader(ds, batch_size=64, num_workers=workers, device=device)
    w = torch.randn(4096, 4096, device="cuda")
    it = iter(loader)
    for _ in range(loader.num_streams):  # warm-up round: one batch from each stream
        next(it)
    outer: list[float] = []
    inner: list[float] = []
    free: list[float] = []
    b: Any = None
    start = time.perf_counter()
    while True:
        f0 = time.perf_counter()
        b = None  # the previous batch dies here, as it would when the loop rebinds it
        free.append(time.perf_counter() - f0)
        q0 = loader.stats().wait_s
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            break
        outer.append(time.perf_counter() - t0)
        inner.append(loader.stats().wait_s - q0)
        x = b["bin"].data
        if device is None:
            x = x.cuda(non_blocking=True)
        if variant == "sleep_step":
            time.sleep(0.036)
            continue
        y = w * (x[:4096].float().mean())
        for _ in range(12):
            y = y @ w
        y.sum().item()
    total = time.perf_counter() - start
    loader.close()
    sys.setswitchinterval(old_switch)
    q = statistics.quantiles(outer, n=10)
    return {
        "steps": len(outer),
        "step_ms": 1000 * total / max(1, len(outer)),
        "wait_fraction": sum(outer) / total,
        "next_p50_ms": 1000 * statistics.median(outer),
        "next_p90_ms": 1000 * q[-1],
        "next_max_ms": 1000 * max(outer),
        "queue_p50_ms": 1000 * statistics.median(inner),
        "queue_max_ms": 1000 * max(inner),
        "free_prev_batch_p50_ms": 1000 * statistics.median(free),
        "free_prev_batch_max_ms": 1000 * max(free),
    }


def main() -> int:
    result: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_synthetic_shards(Path(tmp), num_shards=48, samples_per_shard=160, sample_bytes=128 << 10)
        shards = [str(p) for p in paths]
        for variant in ("cuda", "cpu_batches", "sleep_step", "switch_0.5ms", "inprocess"):
            try:
                result[variant] = run(shards, variant)
            except Exception as exc:  # keep the other variants
                result[variant] = {"error": repr(exc)}
            print(variant, json.dumps(result[variant]), file=sys.stderr, flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
