"""The ``fastfeed`` command line.

``fastfeed bench --demo`` starts a local S3 server (SeaweedFS), writes a synthetic WebDataset,
streams it with :class:`fastfeed.StreamingDataset` and reports throughput next to the raw GET
ceiling measured in the same run. ``fastfeed bench URL`` measures an existing dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastfeed.batch import RaggedBytes
from fastfeed.bench import Measurement, measure_iterable, measure_raw_get, peak_rss_bytes
from fastfeed.config import PrefetchConfig, S3Config, format_size, parse_size
from fastfeed.dataset import StreamingDataset
from fastfeed.errors import FastfeedError
from fastfeed.loader import DataLoader

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastfeed", description="Keep GPUs fed from object storage.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="measure streaming throughput of a dataset")
    bench.add_argument("url", nargs="?", help="dataset: s3://bucket/prefix/, a brace pattern or a directory")
    bench.add_argument("--demo", action="store_true", help="start a local S3 server with a synthetic dataset")
    bench.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    bench.add_argument("--epochs", type=int, default=1)
    bench.add_argument("--batch-size", type=int, default=64, help="batch size of the DataLoader runs")
    bench.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    bench.add_argument("--shuffle", action="store_true")
    bench.add_argument("--part-size", default="8MiB")
    bench.add_argument("--max-requests", type=int, default=16)
    bench.add_argument("--byte-budget", default="256MiB")
    bench.add_argument("--demo-size", default="256MiB", help="synthetic dataset size (--demo)")
    bench.add_argument("--demo-sample-size", default="100KiB", help="bytes per synthetic sample (--demo)")
    bench.add_argument("--demo-shard-size", default="16MiB", help="bytes per synthetic shard (--demo)")
    bench.add_argument("--json", dest="json_path", help="write every figure and the config to this file")
    bench.add_argument("-v", "--verbose", action="store_true", help="log fastfeed's INFO messages")
    cache = sub.add_parser("cache", help="inspect or clear a node's shard cache (StreamingDataset(cache_dir=...))")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    info = cache_sub.add_parser("info", help="entries and bytes in a cache directory")
    info.add_argument("dir")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    clear = cache_sub.add_parser("clear", help="remove every entry no process is reading (safe while training)")
    clear.add_argument("dir")
    for p in (info, clear):
        p.add_argument("-v", "--verbose", action="store_true", help="log fastfeed's INFO messages")
    _add_shards_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastfeed`` command."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "bench":
            return _bench(args)
        if args.command == "cache":
            return _cache(args)
        if args.command == "shards":
            return _shards(args)
    except FastfeedError as err:
        print(f"fastfeed: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


def _cache(args: argparse.Namespace) -> int:
    from fastfeed.cache import cache_info, clear_cache

    if args.cache_command == "info":
        info = cache_info(args.dir)
        if args.json:
            print(json.dumps(info.__dict__, indent=2))
        else:
            print(f"{info.dir}: {info.entries} shard(s), {format_size(info.entry_bytes)}", end="")
            print(f"; {info.partial} being filled ({format_size(info.partial_bytes)} so far)" if info.partial else "")
        return 0
    removed, in_use = clear_cache(args.dir)
    print(f"removed {removed} file(s)" + (f"; {in_use} in use by running processes, kept" if in_use else ""))
    return 0


def _add_shards_parser(sub: Any) -> None:
    shards = sub.add_parser("shards", help="write WebDataset shards, or list a dataset's shards and ETags")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    write = shards_sub.add_parser("write", help="pack a directory of files into tar shards (locally or into a bucket)")
    write.add_argument("src", help="directory of files; <key>.<ext> files form one sample per key")
    write.add_argument("dest", help="s3://bucket/prefix/, file:// URL or a local directory")
    write.add_argument("--shard-size", default="256MiB", help="largest shard (default 256MiB)")
    write.add_argument("--name", default="shard-{:06d}.tar", help="shard names (default shard-{:06d}.tar)")
    write.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    write.add_argument("--manifest", help="where to write the manifest (default: DEST/manifest.json)")
    write.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run in DEST")
    write.add_argument("--part-size", default="16MiB", help="multipart part size of uploads (default 16MiB)")
    write.add_argument("--no-index", action="store_true", help="do not record sample counts in fastfeed's cache")
    manifest = shards_sub.add_parser("manifest", help="shards, sizes and ETags of a dataset (or print a manifest)")
    manifest.add_argument("url", help="dataset prefix, brace pattern, or a manifest .json to print")
    manifest.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    manifest.add_argument("--samples", action="store_true", help="also count samples (reads the tar headers)")
    manifest.add_argument("--json", action="store_true", help="print JSON instead of text")
    for p in (write, manifest):
        p.add_argument("-v", "--verbose", action="store_true", help="log fastfeed's INFO messages")


def _shards(args: argparse.Namespace) -> int:
    from fastfeed.shards import MANIFEST_NAME, dataset_manifest, load_manifest, write_from_directory

    if args.shards_command == "write":
        progress = _ShardProgress()
        try:
            manifest = write_from_directory(
                args.src,
                args.dest,
                shard_size=args.shard_size,
                name=args.name,
                endpoint_url=args.endpoint_url,
                manifest=args.manifest or True,
                overwrite=args.overwrite,
                part_size=args.part_size,
                index=not args.no_index,
                progress=progress,
            )
        finally:
            progress.close()
        print(
            f"wrote {len(manifest.shards)} shard(s), {manifest.total_samples} samples, "
            f"{format_size(manifest.total_bytes)} to {manifest.url}"
        )
        print(f"manifest: {args.manifest or manifest.url + MANIFEST_NAME}")
        return 0
    if args.url.endswith(".json"):
        manifest = load_manifest(args.url, endpoint_url=args.endpoint_url)
    else:
        manifest = dataset_manifest(args.url, endpoint_url=args.endpoint_url, count_samples=args.samples)
    if args.json:
        print(manifest.to_json())
        return 0
    for shard in manifest.shards:
        samples = "-" if shard.samples is None else str(shard.samples)
        print(f"{shard.url}  {shard.size}  {shard.etag or '-'}  {samples}")
    total = "?" if manifest.total_samples is None else str(manifest.total_samples)
    print(f"{len(manifest.shards)} shard(s), {format_size(manifest.total_bytes)}, {total} samples")
    return 0


class _ShardProgress:
    """A tqdm bar on stderr when tqdm is installed, else a line on stderr every few seconds."""

    _EVERY_S = 2.0

    def __init__(self) -> None:
        self._bar: Any = None
        self._latest: Any = None
        self._done = 0
        self._last = time.monotonic()
        self._tqdm: Any = None
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            # A subclass without tqdm's monitor thread, which would outlive the bar.
            self._tqdm = type("_ShardBar", (tqdm,), {"monitor_interval": 0})

    def __call__(self, p: Any) -> None:
        self._latest = p
        if self._tqdm is not None:
            if self._bar is None:
                self._bar = self._tqdm(
                    total=p.total_payload_bytes,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc="writing shards",
                    file=sys.stderr,
                )
            self._bar.update(p.payload_bytes - self._done)
            self._done = p.payload_bytes
            self._bar.set_postfix(shards=p.shards, samples=p.samples, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self._EVERY_S:
            self._last = now
            self._line(p)

    @staticmethod
    def _line(p: Any) -> None:
        total = f" of {format_size(p.total_payload_bytes)}" if p.total_payload_bytes else ""
        print(
            f"writing shards: {format_size(p.payload_bytes)}{total}, {p.samples} samples, {p.shards} shard(s) done",
            file=sys.stderr,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._tqdm is None and self._latest is not None:
            self._line(self._latest)


def _bench(args: argparse.Namespace) -> int:
    if args.demo == (args.url is not None):
        print("fastfeed bench: give either a dataset URL or --demo", file=sys.stderr)
        return 2
    prefetch = PrefetchConfig.from_args(
        part_size=args.part_size, max_requests=args.max_requests, byte_budget=args.byte_budget
    )
    if not args.demo:
        s3 = S3Config.resolve(endpoint_url=args.endpoint_url)
        return _run_bench(args.url, s3, prefetch, args, setup={})

    from fastfeed.testing.servers import SeaweedServer
    from fastfeed.testing.shards import upload_dir, write_synthetic_shards

    total = parse_size(args.demo_size, name="--demo-size")
    sample_size = parse_size(args.demo_sample_size, name="--demo-sample-size")
    shard_size = parse_size(args.demo_shard_size, name="--demo-shard-size")
    per_shard = max(1, shard_size // sample_size)
    num_shards = max(1, total // (per_shard * sample_size))
    with (
        tempfile.TemporaryDirectory(prefix="fastfeed-demo-") as tmp,
        SeaweedServer(Path(tmp) / "store") as server,
    ):
        print(f"local S3 endpoint (SeaweedFS): {server.endpoint_url}  [started in {server.start_seconds:.1f}s]")
        t0 = time.perf_counter()
        paths = write_synthetic_shards(
            Path(tmp) / "shards", num_shards=num_shards, samples_per_shard=per_shard, sample_bytes=sample_size
        )
        written = time.perf_counter() - t0
        client = server.client()
        client.create_bucket(Bucket="demo")
        t0 = time.perf_counter()
        upload_dir(client, "demo", Path(tmp) / "shards", prefix="train/")
        uploaded = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in paths)
        print(
            f"synthetic dataset: {num_shards} shards x {per_shard} samples x {format_size(sample_size)}"
            f" = {format_size(size)} (written in {written:.1f}s, uploaded in {uploaded:.1f}s)"
        )
        for path in paths:
            path.unlink()
        client.close()  # an idle keep-alive connection makes the store's shutdown wait
        s3 = S3Config(
            endpoint_url=server.endpoint_url,
            access_key_id=server.access_key,
            secret_access_key=server.secret_key,
            region="us-east-1",
        )
        setup = {"num_shards": num_shards, "samples_per_shard": per_shard, "sample_bytes": sample_size}
        return _run_bench("s3://demo/train/", s3, prefetch, args, setup=setup)


def _run_bench(
    url: str, s3: S3Config, prefetch: PrefetchConfig, args: argparse.Namespace, setup: dict[str, Any]
) -> int:
    def make_dataset(epoch: int) -> StreamingDataset:
        ds = StreamingDataset(
            url,
            s3=s3,
            shuffle=args.shuffle,
            part_size=prefetch.part_size,
            max_requests=prefetch.max_requests,
            byte_budget=prefetch.byte_budget,
        )
        ds.set_epoch(epoch)
        return ds

    shards = make_dataset(0).shards
    results: list[Measurement] = []
    ceiling = measure_raw_get(shards, s3, prefetch)
    results.append(ceiling)
    for epoch in range(args.epochs):
        results.append(measure_iterable(f"samples, epoch {epoch}", functools.partial(make_dataset, epoch)))
    for epoch in range(args.epochs):

        def batches(epoch: int = epoch) -> DataLoader:
            return DataLoader(make_dataset(epoch), batch_size=args.batch_size, num_workers=args.workers)

        results.append(
            measure_iterable(
                f"batches, epoch {epoch}", batches, size_of=_batch_bytes, count_of=lambda b: len(b["__key__"])
            )
        )
    _print_table(results, ceiling)
    print(f"peak RSS: {format_size(peak_rss_bytes())}")
    if args.json_path:
        report = {
            "url": url,
            "setup": setup,
            "config": {
                "part_size": prefetch.part_size,
                "max_requests": prefetch.max_requests,
                "byte_budget": prefetch.byte_budget,
                "shuffle": args.shuffle,
            },
            "machine": _machine(),
            "results": [r.as_dict() for r in results],
            "peak_rss_bytes": peak_rss_bytes(),
        }
        Path(args.json_path).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json_path}")
    return 0


def _batch_bytes(batch: Any) -> int:
    return sum(v.data.numel() for v in batch.values() if isinstance(v, RaggedBytes))


def _print_table(results: list[Measurement], ceiling: Measurement) -> None:
    header = f"{'run':<22} {'samples/s':>10} {'MiB/s':>8} {'x ceiling':>9} {'1st sample':>10} {'CPU s/GiB':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = r.mib_per_s / ceiling.mib_per_s if ceiling.mib_per_s else 0.0
        sps = f"{r.samples_per_s:,.0f}" if r.samples else "-"
        print(
            f"{r.name:<22} {sps:>10} {r.mib_per_s:>8.0f} {ratio:>9.2f} "
            f"{r.first_sample_s * 1000:>8.0f}ms {r.cpu_s_per_gib:>9.2f}"
        )


def _machine() -> dict[str, Any]:
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "commit": commit,
    }


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
