#!/usr/bin/env python
"""Warm cache hits in a plain loop vs a raw read of the same cached files (quick, fastfeed only).

Writes ``--shards`` x 160 samples x 100 KB to a local SeaweedFS, reads them once through
``StreamingDataset(cache_dir=...)`` (cold, fills the cache), then ``--repeats`` times: a raw
sequential ``readinto`` of the cached entries (8 MiB chunks), then a plain ``for s in ds`` loop
with the default ``bytes`` values, then one with ``zero_copy=True`` (memoryviews of the mapped
entries). Both loops read one byte per 4 KiB page of every ``bin`` payload, as ``bench_warm.py``
does (a view that is never read would cost nothing). Prints MB/s of payload per pass and the
median ratio of each loop to the raw read. For the peers, see ``bench_warm.py``.

    python benchmarks/cache/bench_hit_path.py --shards 24 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fastfeed
from fastfeed.cache import entry_files
from fastfeed.config import S3Config
from fastfeed.testing.servers import SeaweedServer
from fastfeed.testing.shards import upload_dir, write_synthetic_shards

PAGE = 4096


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer() as server:
        bucket = server.create_bucket("warm")
        write_synthetic_shards(Path(tmp, "s"), num_shards=args.shards, samples_per_shard=160, sample_bytes=100_000)
        upload_dir(server.client(), bucket, Path(tmp, "s"), prefix="d/")
        s3 = S3Config(
            endpoint_url=server.endpoint_url, access_key_id=server.access_key, secret_access_key=server.secret_key
        )
        ds = {
            mode: fastfeed.StreamingDataset(
                f"s3://{bucket}/d/",
                s3=s3,
                cache_dir=f"{tmp}/cache",
                cache_limit="10GB",
                index_cache=None,
                zero_copy=mode == "zero_copy",
            )
            for mode in ("bytes", "zero_copy")
        }
        for _ in ds["bytes"]:  # cold: fills the cache
            pass
        files = [str(p) for p in entry_files(f"{tmp}/cache")]
        total = sum(os.path.getsize(f) for f in files)
        buf = bytearray(8 << 20)
        rates: dict[str, list[float]] = {"raw": [], "bytes": [], "zero_copy": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            for name in files:
                with open(name, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
            rates["raw"].append(total / (time.perf_counter() - start) / 1e6)
            for mode, dataset in ds.items():
                fetched = dataset.io_stats()["bytes_fetched"]
                start = time.perf_counter()
                payload = 0
                for s in dataset:
                    value = s["bin"]
                    payload += len(value)
                    for page in range(0, len(value), PAGE):
                        _ = value[page]
                rates[mode].append(payload / (time.perf_counter() - start) / 1e6)
                assert dataset.io_stats()["bytes_fetched"] == fetched, "a warm pass fetches nothing"
    raw = statistics.median(rates["raw"])
    for mode, values in rates.items():
        ratio = "" if mode == "raw" else f"  median / raw: {statistics.median(values) / raw:.2f}"
        print(f"{mode:<9} MB/s " + " ".join(f"{x:.0f}" for x in values) + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
