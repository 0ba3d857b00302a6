#!/usr/bin/env python
"""Large samples and lying headers (issue 13): time to read, before vs after, in the same run.

Shards (real tar files written by :mod:`tarfile` into a temporary directory, read from local
disk through the prefetcher; ``--s3`` reads them from a local SeaweedFS instead):

* ``big``: 24 samples of 1 MiB, one of 40 MiB, 8 of 10 KiB (the issue's valid shard);
* ``one``: a 48 MiB shard that is one sample;
* ``liar``: ``big`` with the 40 MiB member's header claiming 1 TB.

Cases, each timed in a child process (so a hang is a timeout, not a stuck benchmark), for this
checkout's fastfeed and, with ``--baseline DIR``, the one installed in DIR (e.g. main's, built
with ``pip install --no-deps --target DIR <checkout of main>``; it goes first on PYTHONPATH):

* ``big/loader-0``, ``big/loader-2``: ``fastfeed.DataLoader(ds, batch_size=4, num_workers=0|2)``
  with every setting at its default (a stream's byte budget is 32 MiB < the 40 MiB sample);
* ``big/samples``: per-sample iteration of ``StreamingDataset``, defaults;
* ``huge/loader-2``: ``huge`` (8 samples of 1 MiB, one of 80 MiB, 8 of 10 KiB) with 2 workers,
  defaults (a stream's budget is 64 MiB there);
* ``one/samples``, ``one/loader-0``: the 48 MiB one-sample shard with ``part_size=64KiB``,
  ``byte_budget=128KiB`` (the old carry-over buffer re-copied the sample at every part);
* ``liar/samples``, ``liar/loader-0``: time until ``TruncatedShardError``;
* ``torch``: torch's DataLoader over an IterableDataset that reads ``big`` with tarfile
  (``batch_size=4``), the reference the issue quotes.

Each child reports the seconds of its read loop only (imports and setup excluded). The parent
prints medians over ``--repeats`` (versions alternate), the ratio before / after, and writes
JSON rows with ``--json``.

    python benchmarks/streaming/bench_large_samples.py --baseline /tmp/i13-read-base-site --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

KiB = 1024
MiB = 1024 * KiB
CASES = [
    "big/loader-0",
    "big/loader-2",
    "big/samples",
    "huge/loader-2",
    "one/samples",
    "one/loader-0",
    "liar/samples",
    "liar/loader-0",
    "torch",
]
SMALL = {"part_size": "64KiB", "byte_budget": "128KiB"}


# ------------------------------------------------------------------------------------ shards


def write_shard(path: Path, sizes: list[int]) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for i, size in enumerate(sizes):
            for ext, data in (("bin", rng.bytes(size)), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def make_shards(root: Path) -> dict[str, Path]:
    big = root / "big.tar"
    write_shard(big, [MiB] * 24 + [40 * MiB] + [10 * KiB] * 8)
    huge = root / "huge.tar"
    write_shard(huge, [MiB] * 8 + [80 * MiB] + [10 * KiB] * 8)
    one = root / "one.tar"
    write_shard(one, [48 * MiB])
    liar = root / "liar.tar"
    data = bytearray(big.read_bytes())
    with tarfile.open(big) as tf:
        victim = next(m for m in tf.getmembers() if m.size == 40 * MiB)
    lie = tarfile.TarInfo(victim.name)
    lie.size = 2**40
    data[victim.offset : victim.offset + 512] = lie.tobuf(tarfile.GNU_FORMAT)
    liar.write_bytes(bytes(data))
    return {"big": big, "huge": huge, "one": one, "liar": liar}


# ------------------------------------------------------------------------------------ child


def child(case: str, urls: dict[str, str], s3: dict[str, str] | None) -> dict[str, Any]:
    """Run one case in this process; returns its row (seconds of the read loop)."""
    if case == "torch":
        return run_torch(urls["big"])
    import fastfeed
    from fastfeed.config import S3Config
    from fastfeed.errors import TruncatedShardError

    shard, how = case.split("/")
    options: dict[str, Any] = dict(SMALL) if shard == "one" else {}
    if s3 is not None:
        options["s3"] = S3Config(**s3)
    ds = fastfeed.StreamingDataset(urls[shard], **options)
    samples = nbytes = 0
    error = None
    start = time.perf_counter()
    try:
        if how == "samples":
            for sample in ds:
                samples += 1
                nbytes += len(sample["bin"])
        else:
            loader = fastfeed.DataLoader(ds, batch_size=4, num_workers=int(how.split("-")[1]))
            for batch in loader:
                samples += len(batch["__key__"])
                nbytes += int(batch["bin"].lengths().sum())
    except TruncatedShardError as exc:
        error = type(exc).__name__
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"seconds": seconds, "samples": samples, "bytes": nbytes, "error": error}
    io_stats = ds.io_stats()
    for key in ("bytes_copied", "held_peak", "copy_peak"):  # absent before the fix
        if key in io_stats:
            row[key] = io_stats[key]
    return row


def run_torch(url: str) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    class TarSamples(IterableDataset[dict[str, Any]]):
        def __iter__(self) -> Any:
            sample: dict[str, Any] = {}
            with tarfile.open(url.removeprefix("file://")) as tf:
                for member in tf:
                    key, ext = member.name.split(".", 1)
                    if sample and sample["__key__"] != key:
                        yield sample
                        sample = {}
                    f = tf.extractfile(member)
                    assert f is not None
                    sample.update({"__key__": key, ext: f.read()})
            if sample:
                yield sample

    samples = nbytes = 0
    start = time.perf_counter()
    for batch in DataLoader(TarSamples(), batch_size=4, collate_fn=lambda b: b):
        samples += len(batch)
        nbytes += sum(len(s["bin"]) for s in batch)
    assert torch.is_tensor(torch.zeros(1))
    return {"seconds": time.perf_counter() - start, "samples": samples, "bytes": nbytes, "error": None}


# ------------------------------------------------------------------------------------ parent


def run_child(case: str, version: str, args: argparse.Namespace, urls: dict[str, str], s3: Any) -> dict[str, Any]:
    env = dict(os.environ)
    if version == "before":
        env["PYTHONPATH"] = os.pathsep.join([args.baseline, *filter(None, [env.get("PYTHONPATH")])])
    spec = json.dumps({"case": case, "urls": urls, "s3": s3})
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", spec],
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return {"seconds": None, "timeout": args.timeout}
    except subprocess.CalledProcessError as exc:
        return {"seconds": None, "failed": exc.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="a directory holding another fastfeed (pip install --target)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as hung")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--s3", action="store_true", help="read the shards from a local SeaweedFS")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["case"], spec["urls"], spec["s3"])))
        return 0

    cases = args.cases.split(",")
    versions = ["after", "before"] if args.baseline else ["after"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_shards(Path(tmp))
        urls = {name: path.as_uri() for name, path in paths.items()}
        server = None
        s3 = None
        if args.s3:
            from fastfeed.testing.servers import SeaweedServer

            server = SeaweedServer()
            server.start()
            client = server.client()
            bucket = server.create_bucket("bench-large")
            for path in paths.values():
                client.put_object(Bucket=bucket, Key=path.name, Body=path.read_bytes())
            urls = {name: f"s3://{bucket}/{path.name}" for name, path in paths.items()}
            s3 = {
                "endpoint_url": server.endpoint_url,
                "access_key_id": server.access_key,
                "secret_access_key": server.secret_key,
                "region": "us-east-1",
            }
            urls["torch-file"] = paths["big"].as_uri()
        try:
            rows = measure(cases, versions, args, urls, s3)
        finally:
            if server is not None:
                server.stop()
    report(rows, cases, versions, args)
    return 0


def measure(
    cases: list[str], versions: list[str], args: argparse.Namespace, urls: dict[str, str], s3: Any
) -> list[dict[str, Any]]:
    rows = []
    for repeat in range(args.repeats):
        for case in cases:
            order = versions if repeat % 2 == 0 else versions[::-1]
            for version in order:
                if case == "torch" and version == "before":
                    continue  # torch does not depend on the fastfeed version
                case_urls = dict(urls, big=urls.get("torch-file", urls["big"])) if case == "torch" else urls
                row = {
                    "case": case,
                    "version": version,
                    "repeat": repeat,
                    **run_child(case, version, args, case_urls, s3),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def report(rows: list[dict[str, Any]], cases: list[str], versions: list[str], args: argparse.Namespace) -> None:
    def median(case: str, version: str) -> str | float:
        got = [r for r in rows if r["case"] == case and r["version"] == version]
        if not got:
            return "-"
        times = [r["seconds"] for r in got]
        if any(t is None for t in times):
            hung = sum(1 for r in got if "timeout" in r)
            return f"hang x{hung} (>{args.timeout:.0f}s)" if hung else "failed"
        return statistics.median(times)

    print(f"\n{platform.node()}, {os.cpu_count()} cores, {args.repeats} repeats (medians, seconds)")
    print(f"{'case':16} " + " ".join(f"{v:>20}" for v in versions) + "   before/after")
    for case in cases:
        meds = [median(case, v) for v in versions]
        cells = " ".join(f"{m:>20.3f}" if isinstance(m, float) else f"{m:>20}" for m in meds)
        ratio = ""
        if len(meds) == 2 and all(isinstance(m, float) for m in meds):
            ratio = f"{meds[1] / meds[0]:>10.1f}x"  # type: ignore[operator]
        print(f"{case:16} {cells}   {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.node(), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
