#!/usr/bin/env python
"""GPU checks of fastfeed's device path (run by benchmarks/gpu_check.sh on a CUDA machine).

1. Host-to-device bandwidth of the copy fastfeed issues (a pinned ring slot, side stream, event)
   vs a plain ``torch`` pinned ``copy_(non_blocking=True)`` of the same bytes, and the same for
   a worker's shared-memory slot page-locked with ``cudaHostRegister`` vs left pageable.
2. End-to-end loader throughput with ``device="cuda"`` (map-style and StreamingDataset, workers).
3. Overlap: a synthetic training step slower than the loader; the loop's data wait as a fraction
   of its wall time (target < 2 %).
4. Bit-identity: batches delivered on the device equal the CPU path's batches (map-style and
   StreamingDataset, in-process and with workers), and CPU batches are pinned.

Writes one JSON object (to argv[1] if given, and stdout); each check records its own error
instead of stopping the others. Exits non-zero if a correctness check fails.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

import fastfeed
from fastfeed.batch.assemble import RaggedBytes
from fastfeed.batch.device import CudaOps, DeviceFeeder, HostPinner
from fastfeed.batch.ring import HostRing
from fastfeed.testing.shards import write_synthetic_shards


class Blocks(Dataset[dict[str, Any]]):
    """Fixed-size uint8 blocks plus a variable-size bytes field."""

    def __init__(self, n: int, nbytes: int) -> None:
        self.n, self.nbytes = n, nbytes
        self.base = np.random.default_rng(0).integers(0, 255, size=nbytes + n + 200, dtype=np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.base[i : i + self.nbytes], "raw": self.base[i : i + 100 + i % 50].tobytes(), "i": i}


def _median_copy_gbps(nbytes: int, copy: Callable[[], Any], reps: int = 30) -> float:
    copy()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        copy()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def h2d_bandwidth(nbytes: int = 64 << 20) -> dict[str, Any]:
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    plain_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    plain = _median_copy_gbps(nbytes, lambda: dev.copy_(plain_host, non_blocking=True))

    # fastfeed's path: a batch in a pinned ring slot, copied by the feeder on its side stream.
    ring = HostRing(2, pin=True)
    slot = ring.acquire()
    slot.arena.ensure(nbytes)
    batch = {"x": slot.base()[:nbytes]}
    feeder = DeviceFeeder(CudaOps(torch.device("cuda")))

    def feeder_copy() -> None:
        out, event = feeder.copy(batch)
        feeder.hand_over(out, event)
        feeder.reap()

    ours = _median_copy_gbps(nbytes, feeder_copy)
    feeder.drain()

    # A worker slot: shared memory, page-locked by the main process, vs left pageable.
    shm = torch.empty(nbytes, dtype=torch.uint8).share_memory_()  # type: ignore[no-untyped-call]
    pageable = _median_copy_gbps(nbytes, lambda: dev.copy_(shm, non_blocking=True))
    pinner = HostPinner()
    registered = pinner.register(shm)
    pinned_shm = _median_copy_gbps(nbytes, lambda: dev.copy_(shm, non_blocking=True))
    is_pinned = bool(shm.is_pinned())
    if registered:
        pinner.unregister(shm)
    return {
        "bytes": nbytes,
        "plain_pinned_GBps": plain,
        "fastfeed_ring_slot_GBps": ours,
        "ratio_ring_vs_plain": ours / plain,
        "worker_slot_pageable_GBps": pageable,
        "worker_slot_registered_GBps": pinned_shm,
        "worker_slot_registered": registered and is_pinned,
        "ratio_registered_vs_plain": pinned_shm / plain,
    }


def _drain(loader: fastfeed.DataLoader, field: str) -> dict[str, Any]:
    it = iter(loader)
    first = next(it)
    torch.cuda.synchronize()
    start = time.perf_counter()
    nbytes = samples = 0
    for b in it:
        t = b[field]
        t = t.data if isinstance(t, RaggedBytes) else t
        nbytes += t.numel() * t.element_size()
        samples += len(b["__key__"]) if "__key__" in b else int(t.shape[0])
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    stats = loader.stats()
    loader.close()
    del first
    return {"GBps": nbytes / elapsed / 1e9, "samples_per_s": samples / elapsed, "stats": stats.as_dict()}


def loader_throughput(shards: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ds = Blocks(64 * 41, 1 << 20)  # 64 MiB batches
    out["map_style_1MiB_x64_4workers"] = _drain(
        fastfeed.DataLoader(ds, batch_size=64, num_workers=4, device="cuda"), "x"
    )
    out["streaming_local_4workers"] = _drain(
        fastfeed.DataLoader(fastfeed.StreamingDataset(shards), batch_size=64, num_workers=4, device="cuda"), "bin"
    )
    out["streaming_local_inprocess"] = _drain(
        fastfeed.DataLoader(fastfeed.StreamingDataset(shards), batch_size=64, device="cuda"), "bin"
    )
    return out


def overlap(shards: list[str], epochs: int = 2) -> dict[str, Any]:
    """A consumer slower than the loader: nearly all of the loop's time should be compute.

    Runs ``epochs`` whole epochs (workers restart each epoch, as by default in torch) and
    reports the data wait over all steps, and apart from it the warm-up: the first round of
    batches of an epoch, one from each stream, which waits for each stream's first shuffle block.
    """
    dataset = fastfeed.StreamingDataset(shards, shuffle=True, seed=1)
    loader = fastfeed.DataLoader(dataset, batch_size=64, num_workers=4, device="cuda")
    w = torch.randn(4096, 4096, device="cuda")
    waits: list[float] = []
    warmup = 0.0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        it = iter(loader)
        k = 0
        while True:
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                break
            wait = time.perf_counter() - t0
            if k < loader.num_streams:
                warmup += wait
            else:
                waits.append(wait)
            k += 1
            y = w * (b["bin"].data[:4096].float().mean())
            for _ in range(12):
                y = y @ w
            y.sum().item()  # the step ends with a host sync, as a loss.item() would
    total = time.perf_counter() - start
    loader.close()
    steps = len(waits) + epochs * loader.num_streams
    steady = sum(waits)
    return {
        "steps": steps,
        "loop_s": total,
        "step_ms": 1000 * total / max(steps, 1),
        "wait_fraction": (steady + warmup) / total,
        "warmup_wait_s": warmup,
        "steady_wait_s": steady,
        "steady_wait_fraction": steady / total,
        "steady_wait_p50_ms": 1000 * statistics.median(waits) if waits else 0.0,
        "steady_wait_max_ms": 1000 * max(waits) if waits else 0.0,
        "target_met": (steady + warmup) / total < 0.02,
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return bool(a.keys() == b.keys()) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, RaggedBytes):
        return bool(b.data.is_cuda) and a.tolist() == b.tolist()
    if isinstance(a, torch.Tensor):
        return bool(b.is_cuda) and torch.equal(a, b.cpu())
    return bool(a == b)


def _compare(cpu_loader: fastfeed.DataLoader, gpu_loader: fastfeed.DataLoader, field: str) -> dict[str, Any]:
    """Walk both loaders in lockstep (so neither holds more than a batch)."""
    batches = same = pinned = 0
    for c, g in zip(cpu_loader, gpu_loader, strict=True):
        batches += 1
        same += _same(c, g)
        t = c[field].data if isinstance(c[field], RaggedBytes) else c[field]
        pinned += bool(t.is_pinned())
    return {"batches": batches, "identical": batches > 0 and same == batches, "cpu_pinned": pinned == batches}


def identity(shards: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ds = Blocks(200, 4096)
    for w in (0, 2):
        mk = fastfeed.DataLoader
        out[f"map_style_w{w}"] = _compare(
            mk(ds, batch_size=16, num_workers=w), mk(ds, batch_size=16, num_workers=w, device="cuda"), "x"
        )
        out[f"streaming_w{w}"] = _compare(
            mk(fastfeed.StreamingDataset(shards[:8], shuffle=True, seed=5), batch_size=32, num_workers=w),
            mk(
                fastfeed.StreamingDataset(shards[:8], shuffle=True, seed=5), batch_size=32, num_workers=w, device="cuda"
            ),
            "bin",
        )
    return out


def _run(result: dict[str, Any], name: str, fn: Callable[..., Any], *args: Any) -> None:
    start = time.perf_counter()
    try:
        result[name] = fn(*args)
    except Exception:
        result[name] = {"error": traceback.format_exc()}
    result.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)
    print(f"{name}: done in {result['seconds'][name]} s", file=sys.stderr, flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "fastfeed": fastfeed.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        # 64 shards x 160 samples x 128 KiB (~1.3 GiB) on local disk.
        paths = write_synthetic_shards(Path(tmp), num_shards=64, samples_per_shard=160, sample_bytes=128 << 10)
        shards = [str(p) for p in paths]
        _run(result, "h2d", h2d_bandwidth)
        _run(result, "identity", identity, shards)
        _run(result, "overlap", overlap, shards)
        _run(result, "throughput", loader_throughput, shards)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
    ident = result.get("identity", {})
    ok = isinstance(ident, dict) and "error" not in ident and all(v["identical"] for v in ident.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
