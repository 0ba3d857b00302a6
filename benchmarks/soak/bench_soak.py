#!/usr/bin/env python
"""Soak: many epochs through a faulty store; resources must stay flat, samples exactly once.

Starts SeaweedFS on 127.0.0.1 with a synthetic dataset (``fastfeed.bench.demo.demo_dataset``)
and a :class:`~fastfeed.testing.FaultProxy` in front of it that faults about ``--fault-rate`` of
the requests for good, spread evenly: GETs get a ``503 SlowDown``, a connection cut mid-body or
a short stall (in turn), PUTs (checkpoint parts and manifests) a ``503``. Then, for each mode, a
training job in a child process (so that what is measured is the job alone, not the store or
the proxy) runs ``--epochs`` epochs of ``fastfeed.DataLoader`` over a shuffled
``StreamingDataset`` with a node cache half the dataset's size (so every epoch fetches, and
fills), and after each epoch saves a checkpoint (multipart, ``keep_last=2``) and waits for it:

* ``fresh``: ``persistent_workers=False`` (new worker processes each epoch);
* ``persistent``: ``persistent_workers=True``.

After each epoch the job reports: samples delivered and distinct (each must be the dataset's
count: exactly once), and the resources of its process tree: RSS, open file descriptors,
threads, child processes; and of the machine: entries in ``/dev/shm``, files under its own
temporary directory, incomplete multipart uploads in the bucket. Flat means: after the first
epochs (which grow pools and caches), no count grows (the second half of the epochs never
exceeds the first half's peak), and resident anonymous memory (heap, arenas, buffers: what a
leak grows; RSS also counts mapped cache pages) levels off (its slope is reported, overall and
over the second half).

    python benchmarks/soak/bench_soak.py --size 64MiB --epochs 12 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------ the training job


def _tree_resources() -> dict[str, float]:
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    rss = anon = fds = threads = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            anon += _rss_anon(p.pid)
            fds += p.num_fds()
            threads += p.num_threads()
        except psutil.NoSuchProcess:
            continue
    return {"rss_mib": rss / 2**20, "anon_mib": anon / 2**20, "fds": fds, "threads": threads, "processes": len(procs)}


def _rss_anon(pid: int) -> int:
    """Resident anonymous memory (heap, arenas, pinned buffers): what a leak grows. RSS also
    counts the pages of mapped cache entries, which come and go with the page cache."""
    with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/status") as f:  # gone: 0
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _count_files(root: str) -> int:
    return sum(len(files) + len(dirs) for _, dirs, files in os.walk(root))


def _job(args: argparse.Namespace) -> int:
    import boto3
    import torch

    from fastfeed import Checkpointer, DataLoader, S3Config, StreamingDataset

    s3 = S3Config(endpoint_url=args.endpoint, region="us-east-1")  # keys from the environment
    direct = boto3.client("s3", endpoint_url=args.direct_endpoint, region_name="us-east-1")
    bucket = args.url.split("/")[2]
    ds = StreamingDataset(args.url, s3=s3, shuffle=True, seed=0, cache_dir=args.cache_dir, cache_limit=args.cache_limit)
    total = len(ds)
    loader = DataLoader(
        ds, batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.mode == "persistent"
    )
    ckpt = Checkpointer(f"s3://{bucket}/soak/{args.mode}/", keep_last=2, part_size="5MiB", s3=s3)
    state = {"w": torch.randn(args.state_bytes // 4)}
    try:
        for epoch in range(args.epochs):
            ds.set_epoch(epoch)
            start = time.perf_counter()
            keys: list[str] = []
            for batch in loader:
                keys += [f"{u}#{k}" for u, k in zip(batch["__url__"], batch["__key__"], strict=True)]
            seconds = time.perf_counter() - start
            t0 = time.perf_counter()
            ckpt.save(state, step=epoch).result(timeout=600)
            save_s = time.perf_counter() - t0
            uploads = direct.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            row = {
                "epoch": epoch,
                "samples": len(keys),
                "distinct": len(set(keys)),
                "expected": total,
                "seconds": seconds,
                "save_s": save_s,
                **_tree_resources(),
                "dev_shm": len(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else -1,
                "tmp_files": _count_files(tempfile.gettempdir()),
                "multipart_uploads": len(uploads),
                "checkpoints": len(ckpt.list()),
                "loader_wait_s": loader.stats().wait_s,
            }
            print(json.dumps(row), flush=True)
    finally:
        loader.close()
        ckpt.close()
    return 0


# ------------------------------------------------------------------------------ the harness


def _slope(ys: list[float]) -> float:
    """Least-squares slope of ``ys`` per step."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx = (n - 1) / 2
    my = statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sum((x - mx) ** 2 for x in range(n))


def _summary(rows: list[dict[str, Any]], settle: int) -> dict[str, Any]:
    steady = rows[settle:] or rows
    half = len(steady) // 2
    counts = ("fds", "threads", "processes", "dev_shm", "tmp_files", "multipart_uploads")
    return {
        "exactly_once": all(r["samples"] == r["distinct"] == r["expected"] for r in rows),
        "rss_mib_first": rows[0]["rss_mib"],
        "rss_mib_settled": steady[0]["rss_mib"],
        "rss_mib_last": rows[-1]["rss_mib"],
        "rss_mib_max": max(r["rss_mib"] for r in rows),
        "rss_mib_per_epoch": _slope([r["rss_mib"] for r in steady]),
        "anon_mib_settled": steady[0]["anon_mib"],
        "anon_mib_last": rows[-1]["anon_mib"],
        "anon_mib_per_epoch": _slope([r["anon_mib"] for r in steady]),
        "anon_mib_per_epoch_second_half": _slope([r["anon_mib"] for r in steady[half:]]),
        **{f"{k}_range": [min(r[k] for r in steady), max(r[k] for r in steady)] for k in counts},
        # No growth: the second half of the settled epochs never exceeds the first half's peak
        # (sockets in a keep-alive pool come and go by one or two).
        "counts_flat": all(
            max(r[k] for r in steady[half:]) <= max(r[k] for r in steady[: max(half, 1)]) for k in counts
        ),
        "epoch_s_median": statistics.median(r["seconds"] for r in rows),
        "save_s_median": statistics.median(r["save_s"] for r in rows),
    }


def _progress_line(row: dict[str, Any]) -> str:
    return (
        f"  epoch {row['epoch']:>3}: {row['samples']} samples ({row['distinct']} distinct), {row['seconds']:.1f} s, "
        f"RSS {row['rss_mib']:.0f} MiB (anon {row['anon_mib']:.0f}), fds {row['fds']}, threads {row['threads']}, "
        f"/dev/shm {row['dev_shm']}, tmp {row['tmp_files']}, uploads {row['multipart_uploads']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="64MiB")
    parser.add_argument("--sample-size", default="64KiB")
    parser.add_argument("--shard-size", default="2MiB")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--modes", default="fresh,persistent")
    parser.add_argument("--fault-rate", type=float, default=0.10, help="fraction of requests faulted")
    parser.add_argument("--state-size", default="12MiB", help="checkpoint size (multipart, 5 MiB parts)")
    parser.add_argument("--settle", type=int, default=2, help="first epochs left out of the flatness checks")
    parser.add_argument("--json", dest="json_path")
    # The training job (run by this script in a child process):
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--direct-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--cache-limit", help=argparse.SUPPRESS)
    parser.add_argument("--state-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return _job(args)

    from fastfeed.bench.demo import demo_dataset
    from fastfeed.config import parse_size
    from fastfeed.testing.proxy import FaultProxy

    if not 0 < args.fault_rate <= 0.5:
        parser.error("--fault-rate must be in (0, 0.5]")
    size = parse_size(args.size)
    # Half the dataset (so every epoch fetches), but what a reader keeps in flight at least.
    cache_limit = max(size // 2, 6 * parse_size(args.shard_size))
    results: dict[str, Any] = {"runs": {}, "summary": {}}
    # Three GET fault kinds in turn, each on every n-th GET: about fault_rate of the GETs.
    every_get = max(1, round(3 / args.fault_rate))
    every_put = max(1, round(1 / args.fault_rate))
    with demo_dataset(size, parse_size(args.sample_size), parse_size(args.shard_size), say=print) as (url, s3, setup):
        assert s3.endpoint_url is not None
        with FaultProxy(s3.endpoint_url) as proxy:
            proxy.inject(count=None, every=every_get, method="GET")
            proxy.inject_reset(after_bytes=4096, count=None, every=every_get, method="GET")
            proxy.inject_stall(0.3, count=None, every=every_get, method="GET")
            proxy.inject(count=None, every=every_put, method="PUT")
            for mode in args.modes.split(","):
                with tempfile.TemporaryDirectory(prefix=f"fastfeed-soak-{mode}-") as work:
                    tmp = Path(work) / "tmp"
                    tmp.mkdir()
                    env = {
                        **os.environ,
                        "TMPDIR": str(tmp),
                        "AWS_ACCESS_KEY_ID": s3.access_key_id or "",
                        "AWS_SECRET_ACCESS_KEY": s3.secret_access_key or "",
                    }
                    command = [
                        sys.executable, str(_HERE), "--job", "--mode", mode, "--url", url,
                        "--endpoint", proxy.endpoint_url, "--direct-endpoint", s3.endpoint_url,
                        "--cache-dir", str(Path(work) / "cache"), "--cache-limit", str(cache_limit),
                        "--epochs", str(args.epochs), "--workers", str(args.workers),
                        "--batch-size", str(args.batch_size), "--state-bytes", str(parse_size(args.state_size)),
                    ]  # fmt: skip
                    print(
                        f"{mode}: {args.epochs} epochs, {args.workers} workers, faults on 1 in {every_get / 3:.0f} GETs"
                    )
                    rows: list[dict[str, Any]] = []
                    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as job:
                        try:
                            assert job.stdout is not None
                            for line in job.stdout:
                                row = json.loads(line)
                                rows.append(row)
                                print(_progress_line(row))
                        finally:
                            if job.poll() is None:
                                job.kill()
                    if job.returncode != 0 or len(rows) != args.epochs:
                        raise SystemExit(f"{mode}: the job failed (exit status {job.returncode})")
                    results["runs"][mode] = rows
                    results["summary"][mode] = _summary(rows, args.settle)
            faults = sum(1 for r in proxy.requests() if r.fault)
            results["requests"] = {"total": len(proxy.requests()), "faulted": faults}
    print(json.dumps(results["summary"], indent=2))
    print(f"requests through the proxy: {results['requests']}")
    if args.json_path:
        results.update(
            command=" ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
            machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            config={k: v for k, v in vars(args).items() if k in ("size", "sample_size", "shard_size", "epochs",
                    "workers", "batch_size", "modes", "fault_rate", "state_size", "settle")},
            setup=setup,
        )  # fmt: skip
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
