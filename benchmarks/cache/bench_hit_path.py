#!/usr/bin/env python
"""Warm cache hits in a plain loop, with and without the entries' CRC32C check, vs a raw read of
the same cached files (quick, fastfeed only).

Writes ``--shards`` x 160 samples x 100 KB to a local SeaweedFS, reads them once through
``StreamingDataset(cache_dir=...)`` (cold, fills the cache), then ``--repeats`` times, in an
order that rotates each repeat:

* ``raw``: a sequential ``readinto`` of the cached entry files (8 MiB chunks);
* ``crc32c``: the checksum pass alone: CRC32C of every 1 MiB chunk of every mapped entry, in
  one thread (what the check adds per byte, at most);
* ``bytes`` / ``bytes-nocheck``: a plain ``for s in ds`` loop with the default ``bytes`` values,
  with the check (the default: every chunk of a hit is checked against its CRC32C before it is
  served) and with it switched off (``fastfeed.cache.reading._VERIFY = False``, for this measurement
  only);
* ``zero_copy`` / ``zero_copy-nocheck``: the same with ``zero_copy=True`` (memoryviews of the
  mapped entries).

The loops read one byte per 4 KiB page of every ``bin`` payload, as ``bench_warm.py`` does (a
view that is never read would cost nothing). Prints MB/s of payload per pass, the median ratio
of each to the raw read and of each checked loop to its unchecked twin, and the CPU seconds
the process spent per GB of payload (every thread: the check runs in worker threads, beside
the loop where a core is free); ``--json`` writes the rows. For the peers, see ``bench_warm.py``.

    python benchmarks/cache/bench_hit_path.py --shards 24 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fastfeed
import fastfeed.cache.reading
from fastfeed import _native
from fastfeed.cache.admin import entry_files
from fastfeed.config import S3Config
from fastfeed.testing.servers import SeaweedServer
from fastfeed.testing.shards import upload_dir, write_synthetic_shards

PAGE = 4096
CHUNK = 1 << 20


class Pass:
    """One timed pass: payload MB/s of wall time, and CPU seconds of the process (every
    thread) per GB of payload."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def done(self, payload: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return payload / wall / 1e6, cpu / (payload / 1e9)


def raw_read(files: list[Path], buf: bytearray) -> tuple[float, float]:
    total = 0
    timer = Pass()
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return timer.done(total)


def crc_pass(files: list[Path]) -> tuple[float, float]:
    total = 0
    timer = Pass()
    for name in files:
        size = int(name.stem.rsplit("-", 1)[1])
        with open(name, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            for lo in range(0, size, CHUNK):
                _native.crc32c(view[lo : lo + CHUNK])
            view.release()
        total += size
    return timer.done(total)


def loop(dataset: fastfeed.StreamingDataset, check: bool) -> tuple[float, float]:
    fastfeed.cache.reading._VERIFY = check  # read when a hit serves a part: the whole pass runs with it
    fetched = dataset.io_stats()["bytes_fetched"]
    timer = Pass()
    payload = 0
    for s in dataset:
        value = s["bin"]
        payload += len(value)
        for page in range(0, len(value), PAGE):
            _ = value[page]
    result = timer.done(payload)
    fastfeed.cache.reading._VERIFY = True
    assert dataset.io_stats()["bytes_fetched"] == fetched, "a warm pass fetches nothing"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    modes = ["raw", "crc32c", "bytes", "bytes-nocheck", "zero_copy", "zero_copy-nocheck"]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer() as server:
        bucket = server.create_bucket("warm")
        write_synthetic_shards(Path(tmp, "s"), num_shards=args.shards, samples_per_shard=160, sample_bytes=100_000)
        upload_dir(server.client(), bucket, Path(tmp, "s"), prefix="d/")
        s3 = S3Config(
            endpoint_url=server.endpoint_url, access_key_id=server.access_key, secret_access_key=server.secret_key
        )
        ds = {
            zero_copy: fastfeed.StreamingDataset(
                f"s3://{bucket}/d/",
                s3=s3,
                cache_dir=f"{tmp}/cache",
                cache_limit="10GB",
                index_cache=None,
                zero_copy=zero_copy,
            )
            for zero_copy in (False, True)
        }
        for _ in ds[False]:  # cold: fills the cache
            pass
        files = entry_files(f"{tmp}/cache")
        buf = bytearray(8 << 20)
        for r in range(args.repeats):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                if mode == "raw":
                    rate, cpu_s = raw_read(files, buf)
                elif mode == "crc32c":
                    rate, cpu_s = crc_pass(files)
                else:
                    rate, cpu_s = loop(ds[mode.startswith("zero_copy")], check=not mode.endswith("-nocheck"))
                rates[mode].append(rate)
                cpu[mode].append(cpu_s)
    medians = {m: statistics.median(v) for m, v in rates.items()}
    raw = medians["raw"]
    rows: list[dict[str, Any]] = []
    for mode, values in rates.items():
        cpu_median = statistics.median(cpu[mode])
        row: dict[str, Any] = {
            "mode": mode,
            "mb_per_s": values,
            "median": medians[mode],
            "x_raw": medians[mode] / raw,
            "cpu_s_per_gb": cpu[mode],
            "cpu_s_per_gb_median": cpu_median,
        }
        line = f"{mode:<18} MB/s " + " ".join(f"{x:.0f}" for x in values) + f"  median {medians[mode]:.0f}"
        line += f"  x raw {medians[mode] / raw:.2f}  CPU s/GB {cpu_median:.3f}"
        if mode in ("bytes", "zero_copy"):
            row["x_nocheck"] = medians[mode] / medians[f"{mode}-nocheck"]
            line += f"  checked / unchecked {row['x_nocheck']:.2f}"
        rows.append(row)
        print(line)
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {
            "shards": args.shards,
            "repeats": args.repeats,
            "crc32c_hardware": _native.CRC32C_HARDWARE,
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "commit": commit,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
