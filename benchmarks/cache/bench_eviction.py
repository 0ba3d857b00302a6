#!/usr/bin/env python
"""Cache at a fraction of the dataset: bytes fetched from the store per epoch, Belady vs LRU.

Writes a synthetic WebDataset (``--shards`` x ``--samples`` x ``--sample-size``), uploads it to a
local SeaweedFS, then for each policy reads ``--epochs`` epochs with
``fastfeed.DataLoader(StreamingDataset(..., cache_dir=..., cache_limit=fraction * dataset,
cache_policy=policy, shuffle=...), num_workers=W)`` and records, per epoch, the bytes fetched
from the store (``loader.stats().bytes_fetched``) as a fraction of the dataset, and the cache
hit rate. Byte counts do not depend on machine noise; one run is enough.

    python benchmarks/cache/bench_eviction.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import fastfeed
from fastfeed.config import S3Config, parse_size
from fastfeed.testing.servers import SeaweedServer
from fastfeed.testing.shards import upload_dir, write_synthetic_shards


def run_policy(
    url: str, s3: S3Config, cache_dir: str, limit: int, policy: str, args: argparse.Namespace, total: int
) -> list[dict[str, float]]:
    ds = fastfeed.StreamingDataset(
        url,
        s3=s3,
        cache_dir=cache_dir,
        cache_limit=limit,
        cache_policy=policy,
        shuffle=not args.no_shuffle,
        seed=1,
        shards_in_flight=args.shards_in_flight,
    )
    loader = fastfeed.DataLoader(ds, batch_size=64, num_workers=args.workers, num_streams=args.streams)
    epochs = []
    before = loader.stats()
    for epoch in range(args.epochs):
        ds.set_epoch(epoch)
        samples = sum(len(b["__key__"]) for b in loader)
        now = loader.stats()
        hits, misses = now.cache_hits - before.cache_hits, now.cache_misses - before.cache_misses
        epochs.append(
            {
                "epoch": epoch,
                "samples": samples,
                "fetched_fraction": (now.bytes_fetched - before.bytes_fetched) / total,
                "hit_rate": hits / max(1, hits + misses),
            }
        )
        before = now
        print(f"  {policy:7s} epoch {epoch}: fetched {epochs[-1]['fetched_fraction']:.2f} of the dataset, "
              f"hit rate {epochs[-1]['hit_rate']:.2f}", flush=True)  # fmt: skip
    loader.close()
    return epochs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--samples", type=int, default=40, help="samples per shard")
    parser.add_argument("--sample-size", default="25KiB")
    parser.add_argument("--fraction", type=float, default=0.5, help="cache_limit as a fraction of the dataset")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--shards-in-flight", type=int, default=1)
    parser.add_argument("--no-shuffle", action="store_true", help="the same order every epoch")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "command": " ".join(["benchmarks/cache/bench_eviction.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "config": vars(args),
        "policies": {},
    }
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer() as server:
        local = Path(tmp, "shards")
        paths = write_synthetic_shards(
            local, num_shards=args.shards, samples_per_shard=args.samples, sample_bytes=parse_size(args.sample_size)
        )
        total = sum(p.stat().st_size for p in paths)
        bucket = server.create_bucket("evict")
        upload_dir(server.client(), bucket, local, prefix="d/")
        s3 = S3Config(
            endpoint_url=server.endpoint_url, access_key_id=server.access_key, secret_access_key=server.secret_key
        )
        limit = int(total * args.fraction)
        result["dataset_bytes"], result["cache_limit"] = total, limit
        print(f"dataset {total / 2**20:.1f} MiB in {args.shards} shards, cache_limit {limit / 2**20:.1f} MiB")
        for policy in ("belady", "lru"):
            result["policies"][policy] = run_policy(
                f"s3://{bucket}/d/", s3, str(Path(tmp, f"cache-{policy}")), limit, policy, args, total
            )
    print("\nbytes fetched from the store per epoch, as a fraction of the dataset")
    print("policy   " + "  ".join(f"epoch {e}" for e in range(args.epochs)))
    for policy, epochs in result["policies"].items():
        print(f"{policy:8s} " + "  ".join(f"{e['fetched_fraction']:7.2f}" for e in epochs))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
