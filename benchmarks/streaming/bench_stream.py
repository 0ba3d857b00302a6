#!/usr/bin/env python
"""Streaming benchmark: fastfeed vs the raw GET ceiling vs WebDataset, same server, same run.

Starts a local SeaweedFS on 127.0.0.1 (free ports), writes synthetic WebDataset shards, uploads
them, then for each repeat (order rotated) measures one pass of:

* ``raw``: concurrent ranged GETs of every part of every shard, no parsing (the ceiling), with
  the same part size and concurrency as fastfeed;
* ``fastfeed``: ``StreamingDataset`` over the ``s3://`` prefix;
* ``webdataset``: ``wds.WebDataset`` over presigned HTTP URLs of the same objects (WebDataset has
  no ``s3://`` opener; it streams each shard with ``curl``, whose CPU is counted).

Then peak RSS of fastfeed streaming two dataset sizes, each in a fresh child process, to show
memory is bounded by the byte budget, not the dataset size.

Reports medians and ratios against the ceiling and against WebDataset measured in the same run.

    python benchmarks/streaming/bench_stream.py --size 256MiB --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastfeed import StreamingDataset
from fastfeed.bench.measure import Measurement, measure_iterable, measure_raw_get
from fastfeed.config import PrefetchConfig, S3Config, format_size, parse_size
from fastfeed.testing.servers import SeaweedServer
from fastfeed.testing.shards import upload_dir, write_synthetic_shards


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_webdataset(urls: list[str]) -> Measurement:
    import webdataset as wds

    child0 = _cpu_children()
    result = measure_iterable("webdataset", lambda: wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    result.cpu_s += _cpu_children() - child0  # curl processes
    return result


def make_dataset(n_bytes: int, sample_bytes: int, shard_bytes: int, out: Path) -> list[Path]:
    per_shard = max(1, shard_bytes // sample_bytes)
    shards = max(1, n_bytes // (per_shard * sample_bytes))
    return write_synthetic_shards(out, num_shards=shards, samples_per_shard=per_shard, sample_bytes=sample_bytes)


def child_rss(url: str, s3: S3Config, prefetch: PrefetchConfig) -> dict[str, Any]:
    """Run in a fresh process: stream the dataset once, report peak RSS."""
    code = (
        "import json,sys;from fastfeed import StreamingDataset;from fastfeed.config import S3Config;"
        "from fastfeed.bench.measure import peak_rss_bytes;"
        "a=json.loads(sys.argv[1]);ds=StreamingDataset(a['url'],s3=S3Config(**a['s3']),part_size=a['part'],"
        "max_requests=a['req'],byte_budget=a['budget']);n=sum(len(s['bin']) for s in ds);"
        "print(json.dumps({'bytes':n,'peak_rss':peak_rss_bytes()}))"
    )
    s3_fields = {k: v for k, v in s3.__dict__.items() if k != "retry"}
    arg = json.dumps(
        {
            "url": url,
            "s3": s3_fields,
            "part": prefetch.part_size,
            "req": prefetch.max_requests,
            "budget": prefetch.byte_budget,
        }
    )
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True, timeout=600)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB", help="dataset size for the throughput runs")
    parser.add_argument("--rss-sizes", default="128MiB,512MiB", help="two dataset sizes for the RSS runs")
    parser.add_argument("--sample-size", default="100KiB")
    parser.add_argument("--shard-size", default="16MiB")
    parser.add_argument("--part-size", default="8MiB")
    parser.add_argument("--max-requests", type=int, default=16)
    parser.add_argument("--byte-budget", default="128MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-webdataset", action="store_true")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    prefetch = PrefetchConfig.from_args(
        part_size=args.part_size, max_requests=args.max_requests, byte_budget=args.byte_budget
    )
    sample_bytes = parse_size(args.sample_size)
    shard_bytes = parse_size(args.shard_size)
    rss_sizes = [parse_size(s) for s in args.rss_sizes.split(",")]
    rows: dict[str, list[Measurement]] = {"raw": [], "fastfeed": [], "webdataset": []}
    rss: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ff-bench-") as tmp, SeaweedServer(Path(tmp) / "store") as server:
        client = server.client()
        client.create_bucket(Bucket="bench")
        datasets = {"main": parse_size(args.size), **{f"rss{i}": s for i, s in enumerate(rss_sizes)}}
        for name, size in datasets.items():
            local = Path(tmp) / name
            paths = make_dataset(size, sample_bytes, shard_bytes, local)
            upload_dir(client, "bench", local, prefix=f"{name}/")
            print(f"dataset {name}: {len(paths)} shards, {format_size(sum(p.stat().st_size for p in paths))}")
            for p in paths:
                p.unlink()
        s3 = S3Config(
            endpoint_url=server.endpoint_url,
            access_key_id=server.access_key,
            secret_access_key=server.secret_key,
            region="us-east-1",
        )
        url = "s3://bench/main/"
        shards = StreamingDataset(url, s3=s3).shards
        presigned = [
            client.generate_presigned_url(
                "get_object", Params={"Bucket": "bench", "Key": s.url.split("/", 3)[3]}, ExpiresIn=3600
            )
            for s in shards
        ]

        def run_fastfeed() -> Measurement:
            return measure_iterable(
                "fastfeed",
                lambda: StreamingDataset(
                    url,
                    s3=s3,
                    part_size=prefetch.part_size,
                    max_requests=prefetch.max_requests,
                    byte_budget=prefetch.byte_budget,
                ),
            )

        runners = {
            "raw": lambda: measure_raw_get(shards, s3, prefetch, name="raw"),
            "fastfeed": run_fastfeed,
            "webdataset": lambda: measure_webdataset(presigned),
        }
        if args.no_webdataset:
            del runners["webdataset"]
        order = list(runners)
        for r in range(args.repeats):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                m = runners[name]()
                rows[name].append(m)
                print(f"  repeat {r} {name:<10} {m.mib_per_s:7.0f} MiB/s  {m.cpu_s_per_gib:5.2f} CPU s/GiB")
        for i, size in enumerate(rss_sizes):
            result = child_rss(f"s3://bench/rss{i}/", s3, prefetch)
            result["dataset_bytes"] = size
            rss.append(result)
            print(f"  RSS: dataset {format_size(size)} -> peak RSS {format_size(result['peak_rss'])}")

    med = {k: statistics.median(m.mib_per_s for m in v) for k, v in rows.items() if v}
    cpu = {k: statistics.median(m.cpu_s_per_gib for m in v) for k, v in rows.items() if v}
    sps = {k: statistics.median(m.samples_per_s for m in v) for k, v in rows.items() if v and v[0].samples}
    first = {k: statistics.median(m.first_sample_s for m in v) for k, v in rows.items() if v}
    print()
    print(f"{'run':<12} {'MiB/s':>8} {'x raw':>6} {'samples/s':>10} {'1st sample':>10} {'CPU s/GiB':>9}")
    for k in med:
        print(
            f"{k:<12} {med[k]:8.0f} {med[k] / med['raw']:6.2f} {sps.get(k, 0):10.0f} "
            f"{first[k] * 1000:8.0f}ms {cpu[k]:9.2f}"
        )
    if "webdataset" in med:
        print(f"fastfeed / webdataset: {med['fastfeed'] / med['webdataset']:.2f}x")
    report = {
        "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": vars(args),
        "median_mib_per_s": med,
        "median_cpu_s_per_gib": cpu,
        "median_samples_per_s": sps,
        "median_first_sample_s": first,
        "runs": {k: [m.as_dict() for m in v] for k, v in rows.items()},
        "rss": rss,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
