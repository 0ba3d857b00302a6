"""The ``fastfeed`` command line.

* ``fastfeed bench --demo``: start a local S3 server (SeaweedFS), write a synthetic WebDataset,
  and run :mod:`fastfeed.bench.run` on it (:mod:`fastfeed.bench.demo`): cold and warm epochs,
  ceilings, peers, a checkpoint round; ``fastfeed bench URL`` measures an existing dataset.
* ``fastfeed shards write|manifest``: write WebDataset shards, list a dataset's shards.
* ``fastfeed cache info|clear``: a node's shard cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastfeed import __version__
from fastfeed.config import S3Config, format_size, parse_size
from fastfeed.errors import FastfeedError

__all__ = ["main"]

#: The peers ``fastfeed bench --compare`` knows (:data:`fastfeed.bench.peers.PEERS`; not imported here,
#: so that ``fastfeed --help`` stays fast).
_PEERS = ("torch", "webdataset", "litdata", "streaming", "s3torchconnector")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastfeed", description="Keep GPUs fed from object storage.")
    parser.add_argument("--version", action="version", version=f"fastfeed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="measure how fast a dataset feeds a training loop, next to the ceilings and the peers",
        description=(
            "Stream a dataset through fastfeed.DataLoader (cold epoch from the store, warm epochs from the node "
            "cache) and report samples/s, MB/s, time to first batch, batch latency, data wait, cache hit rate, "
            "CPU and memory, next to ceilings measured in the same run (raw GETs, raw cache read, pinned "
            "host-to-device copy) and to the peers in --compare."
        ),
    )
    bench.add_argument("url", nargs="?", help="dataset: s3://bucket/prefix/, a brace pattern or a directory")
    bench.add_argument("--demo", action="store_true", help="start a local S3 server with a synthetic dataset")
    bench.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    bench.add_argument("--epochs", type=int, default=2, help="epochs of fastfeed (the first is cold)")
    bench.add_argument("--batch-size", type=int, default=64)
    bench.add_argument("--workers", type=int, default=2, help="the DataLoader's num_workers")
    bench.add_argument(
        "--worker-mode",
        choices=("auto", "thread", "process"),
        default="auto",
        help="where fastfeed reads the streams: in this process's threads or in worker processes "
        "(auto: threads unless Python code must run in workers)",
    )
    bench.add_argument(
        "--persistent-workers",
        action="store_true",
        help="keep fastfeed's workers between epochs (each peer run starts its own workers)",
    )
    bench.add_argument("--shuffle", action="store_true")
    bench.add_argument("--part-size", default="8MiB")
    bench.add_argument("--max-requests", type=int, default=16)
    bench.add_argument("--byte-budget", default="256MiB")
    bench.add_argument("--cache-dir", help="node cache directory (default: a temporary one, removed after)")
    bench.add_argument("--no-cache", action="store_true", help="no node cache: every epoch streams from the store")
    bench.add_argument(
        "--cache-io",
        choices=("auto", "buffered", "direct"),
        default="auto",
        help="how fills write to the cache: O_DIRECT, or through the page cache (auto: direct where the "
        "file system takes it)",
    )
    bench.add_argument("--cache-limit", default="20GB")
    bench.add_argument("--device", default="cpu", help="cpu, or a CUDA device the batches are copied to")
    bench.add_argument("--step-ms", type=float, default=0.0, help="synthetic training step per batch")
    bench.add_argument(
        "--decode",
        action="store_true",
        help="decode the images in the loader (fastfeed.vision.Decode: Pillow on the CPU, DALI or nvJPEG with "
        "--device cuda) to uint8 NCHW batches and measure a decode ceiling; --demo then writes JPEG samples; "
        "peers are not run",
    )
    bench.add_argument("--image-size", help="with --decode: center crops of HxW (default 224x224)")
    bench.add_argument(
        "--compare",
        default=None,
        help="peers reading the same data in the same run: all, none, or some of "
        + ",".join(_PEERS)
        + " (default: all with --demo, none with a URL; peers that are not installed are skipped)",
    )
    bench.add_argument("--latency-ms", type=float, default=0.0, help="emulated first-byte latency (delaying proxy)")
    bench.add_argument("--bandwidth", help="emulated store bandwidth, e.g. 1GB (per second, all connections)")
    bench.add_argument("--connection-bandwidth", help="emulated bandwidth of each connection, e.g. 100MB (per second)")
    bench.add_argument(
        "--checkpoint-size", help="an async checkpoint round with a state of this size (--demo default: 256MiB)"
    )
    bench.add_argument("--demo-size", default="256MiB", help="synthetic dataset size (--demo)")
    bench.add_argument("--demo-sample-size", default="100KiB", help="bytes per synthetic sample (--demo)")
    bench.add_argument("--demo-shard-size", default="16MiB", help="bytes per synthetic shard (--demo)")
    bench.add_argument("--json", dest="json_path", help="write every figure, the config and the machine here")
    bench.add_argument("--plot", dest="plot_path", help="write a PNG of throughput over time here (matplotlib)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    from fastfeed.cache.admin import cache_info, clear_cache

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
    from fastfeed.bench import demo as bench_demo
    from fastfeed.bench import run as benchmark

    if args.demo == (args.url is not None):
        print("fastfeed bench: give either a dataset URL or --demo", file=sys.stderr)
        return 2
    # --decode runs no peers: those asked for are listed as skipped, --demo's default is none.
    chosen = args.compare if args.compare is not None else ("all" if args.demo and not args.decode else "none")
    compare: tuple[str, ...]
    if chosen.strip() in ("all", "none"):
        compare = _PEERS if chosen.strip() == "all" else ()
    else:
        compare = tuple(p.strip() for p in chosen.split(",") if p.strip())
    unknown = [p for p in compare if p not in _PEERS]
    if unknown:
        print(f"fastfeed bench: unknown peer(s) {', '.join(unknown)}; choose from {', '.join(_PEERS)}", file=sys.stderr)
        return 2
    image_size = None
    if args.image_size is not None:
        image_size = _parse_image_size(args.image_size)
        if image_size is None:
            print(f"fastfeed bench: --image-size {args.image_size!r}: give HxW, e.g. 224x224", file=sys.stderr)
            return 2
        if not args.decode:
            print("fastfeed bench: --image-size applies with --decode", file=sys.stderr)
            return 2
    if args.no_cache and args.cache_dir:
        print("fastfeed bench: --no-cache and --cache-dir contradict each other: give one", file=sys.stderr)
        return 2
    checkpoint = args.checkpoint_size or ("256MiB" if args.demo else None)
    cfg = benchmark.BenchConfig(
        batch_size=args.batch_size,
        workers=args.workers,
        persistent_workers=args.persistent_workers,
        worker_mode=args.worker_mode,
        epochs=args.epochs,
        shuffle=args.shuffle,
        part_size=args.part_size,
        max_requests=args.max_requests,
        byte_budget=args.byte_budget,
        cache_dir=args.cache_dir,
        no_cache=args.no_cache,
        cache_io=args.cache_io,
        cache_limit=args.cache_limit,
        device=args.device,
        step_ms=args.step_ms,
        compare=compare,
        latency_ms=args.latency_ms,
        bandwidth=float(parse_size(args.bandwidth, name="--bandwidth")) if args.bandwidth else None,
        connection_bandwidth=(
            float(parse_size(args.connection_bandwidth, name="--connection-bandwidth"))
            if args.connection_bandwidth
            else None
        ),
        checkpoint_bytes=parse_size(checkpoint, name="--checkpoint-size") if checkpoint else 0,
        progress=not args.no_progress,
        decode=args.decode,
        image_size=image_size,
    )
    if cfg.epochs < 1:
        print("fastfeed bench: --epochs must be >= 1", file=sys.stderr)
        return 2
    progress = _BenchProgress() if cfg.progress else None
    try:
        if args.demo:
            report = bench_demo.demo(
                cfg,
                size=parse_size(args.demo_size, name="--demo-size"),
                sample_size=parse_size(args.demo_sample_size, name="--demo-sample-size"),
                shard_size=parse_size(args.demo_shard_size, name="--demo-shard-size"),
                progress=progress,
                say=print,
            )
        else:
            s3 = S3Config.resolve(endpoint_url=args.endpoint_url)
            report = benchmark.run(args.url, s3, cfg, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    print(report.table())
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report.as_dict(), indent=2))
        print(f"wrote {args.json_path}")
    if args.plot_path:
        report.plot(args.plot_path)
        print(f"wrote {args.plot_path}")
    return 0


def _parse_image_size(text: str) -> tuple[int, int] | None:
    """``"224x160"`` -> ``(224, 160)`` (height, width); ``"224"`` -> ``(224, 224)``; else ``None``."""
    match = re.fullmatch(r"\s*([0-9]+)\s*(?:[xX]\s*([0-9]+)\s*)?", text)
    if match is None:
        return None
    height = int(match.group(1))
    width = int(match.group(2) or height)
    return (height, width) if height > 0 and width > 0 else None


class _BenchProgress:
    """One progress bar per run on stderr (tqdm when installed and stderr is a terminal)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._tqdm: Any = None
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            # A subclass without tqdm's monitor thread, which would outlive the bar.
            self._tqdm = type("_BenchBar", (tqdm,), {"monitor_interval": 0})

    def __call__(self, name: str, total: int | None) -> Any:
        self.close()
        if self._tqdm is None or not sys.stderr.isatty():
            print(f"running: {name}", file=sys.stderr)
            return lambda nbytes, samples: None
        bar = self._bar = self._tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=name, file=sys.stderr, leave=False
        )

        def update(nbytes: int, samples: int) -> None:
            bar.update(nbytes)

        return update

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
