#!/usr/bin/env python
"""Warm-epoch benchmark: fastfeed's node cache vs MosaicML Streaming vs LitData vs a raw disk read.

Starts a local SeaweedFS on 127.0.0.1 (free ports), writes synthetic WebDataset shards (100 KB
``bin`` payload per sample), uploads them, converts the same samples to MDS (MosaicML
Streaming) and to LitData's optimized format, uploads those under other prefixes, then for
each contender reads the dataset once from S3 (cold: fills the library's local cache) and
times the WARM epoch, data already on local disk:

* ``raw``: a plain sequential read of every shard file in fastfeed's cache (8 MiB chunks,
  ``readinto`` one reused buffer): the ceiling;
* ``fastfeed``: ``StreamingDataset(s3://..., cache_dir=..., cache_limit="20GB")``;
* ``mosaic``: ``streaming.StreamingDataset(remote="s3://.../mds/", local=...)``;
* ``litdata``: ``litdata.StreamingDataset("s3://.../litdata/", cache_dir=...)``.

Each library is timed in two settings: ``loop`` (plain single-process ``for s in ds``; each
sample's ``bin`` payload is touched by reading one byte per 4 KiB page, since LitData hands out
memoryviews into mmap'ed chunks that ``len`` alone would never read; ``--touch copy`` first
copies such a memoryview into ``bytes``) and ``loader`` (batch 64, 2 worker processes:
``fastfeed.DataLoader`` summing ``batch["bin"].data.numel()``, ``torch.utils.data.DataLoader``
for mosaic and ``litdata.StreamingDataLoader`` for litdata, both summing ``len`` of each
``bytes`` payload; workers start inside the timed span; each peer's loader gets its own
dataset object, never iterated in the main process). Every pass must deliver every sample:
its sample count and payload bytes are checked.
Nothing may be re-downloaded in a warm pass: fastfeed's ``bytes_fetched`` must not grow and
each peer's cache files (names, sizes, inodes) must not change; a violation fails the run.
The warm pass is repeated (contender order rotated each repeat) and medians are reported
(MB = 10**6 bytes of ``bin`` payload). A peer that is not importable, or whose conversion or
cold pass fails, is skipped with the reason printed. See README_peers.md for the peers' setup.

    python benchmarks/cache/bench_warm.py --size 1GiB --repeats 3 --json warm.json
    python benchmarks/cache/bench_warm.py --quick

Run it with an interpreter that has fastfeed, torch and the peers installed (README_peers.md).
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import fastfeed
from fastfeed.bench.peers import (
    Expected,
    LitdataCollate,
    cache_snapshot,
    convert_litdata,
    convert_mds,
    import_streaming,
    litdata_allow_http,
    open_litdata_dataset,
    open_streaming_dataset,
    shutdown_loader_iter,
    snapshot_diff,
)
from fastfeed.cache.admin import entry_files
from fastfeed.config import S3Config, format_size, parse_size
from fastfeed.testing.servers import SeaweedServer
from fastfeed.testing.shards import upload_dir, write_synthetic_shards

BUCKET = "bench"
BATCH = 64
WORKERS = 2
READ_CHUNK = 8 << 20
PAGE = 4096
LOADER_TIMEOUT_S = 300  # a peer loader's batch not ready in this long fails the run instead of hanging
PEERS = ("mosaic", "litdata")
SETTINGS = ("loop", "loader")
FIELDS = {"bin": "bytes", "cls": "int"}  # what the peers' copies hold (fastfeed.bench.peers field kinds)


@dataclass
class Run:
    """One timed pass."""

    name: str
    samples: int
    payload_bytes: int
    seconds: float
    cpu_s: float
    read_bytes: int = 0  # raw only: file bytes read
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / self.seconds / 1e6

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mb_per_s": self.mb_per_s, "samples_per_s": self.samples_per_s}


def _cpu_s() -> float:
    """CPU seconds of this process plus its reaped children (loader workers once joined)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _touch(payload: bytes | memoryview, copy: bool = False) -> int:
    """Read one byte of every 4 KiB page of a sample's payload and return its length: a
    memoryview into an mmap'ed file (LitData's samples) is otherwise never read at all, and
    ``len`` alone would time nothing. Costs next to nothing for a ``bytes`` object. With
    ``copy``, a payload that is not already ``bytes`` is first copied into one (``--touch copy``:
    what fastfeed and MosaicML Streaming deliver anyway)."""
    if copy and not isinstance(payload, bytes):
        payload = bytes(payload)
    memoryview(payload)[::PAGE].tobytes()
    return len(payload)


def _check(name: str, samples: int, payload: int, expected: Expected) -> None:
    if samples != expected.samples or payload != expected.payload_bytes:
        raise AssertionError(
            f"{name}: read {samples} samples / {payload} payload bytes, "
            f"expected {expected.samples} / {expected.payload_bytes}"
        )


def _dir_stats(root: Path) -> dict[str, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


# -- contenders ------------------------------------------------------------------------------


class Contender(abc.ABC):
    """A library under test: ``setup`` converts/uploads, ``cold`` fills its cache, ``warm``
    times one pass in a setting, ``cache_root`` is where its local copy lives."""

    name = ""
    cache_root: Path
    #: The settings this contender is timed in.
    settings: tuple[str, ...] = SETTINGS

    def setup(self) -> None:
        return None

    @abc.abstractmethod
    def cold(self) -> Run: ...

    @abc.abstractmethod
    def warm(self, setting: str) -> Run: ...

    def close(self) -> None:
        return None


class FastfeedContender(Contender):
    name = "fastfeed"

    def __init__(
        self,
        url: str,
        s3: S3Config,
        cache_dir: Path,
        expected: Expected,
        *,
        zero_copy: bool = False,
        copy: bool = False,
    ) -> None:
        self.copy = copy  # --touch copy: views are copied into bytes first, as for the peers
        self.cache_dir = self.cache_root = cache_dir
        self.expected = expected
        self.ds = fastfeed.StreamingDataset(
            url, s3=s3, cache_dir=cache_dir, cache_limit="20GB", index_cache=None, zero_copy=zero_copy
        )

    def _loop(self) -> tuple[int, int]:
        n = nbytes = 0
        for s in self.ds:
            nbytes += _touch(s["bin"], self.copy)
            n += 1
        return n, nbytes

    def cold(self) -> Run:
        start, cpu0 = time.perf_counter(), _cpu_s()
        n, nbytes = self._loop()
        run = Run("fastfeed-cold", n, nbytes, time.perf_counter() - start, _cpu_s() - cpu0)
        _check(run.name, n, nbytes, self.expected)
        run.extra = {"io": self.ds.io_stats()}
        return run

    def warm(self, setting: str) -> Run:
        io0 = self.ds.io_stats()
        start, cpu0 = time.perf_counter(), _cpu_s()
        extra: dict[str, Any] = {}
        if setting == "loop":
            n, nbytes = self._loop()
            seconds = time.perf_counter() - start
        else:
            n = nbytes = 0
            loader = fastfeed.DataLoader(self.ds, batch_size=BATCH, num_workers=WORKERS)
            try:
                for batch in loader:
                    bins = batch["bin"]
                    nbytes += bins.data.numel()
                    if not n:
                        extra["first_batch_s"] = time.perf_counter() - start
                    n += len(bins)
                seconds = time.perf_counter() - start
                extra.update({f"loader_{k}": v for k, v in loader.stats().as_dict().items()})
            finally:
                loader.close()
        run = Run(f"{self.name}-{setting}", n, nbytes, seconds, _cpu_s() - cpu0, extra=extra)
        _check(run.name, n, nbytes, self.expected)
        io1 = self.ds.io_stats()
        fetched = io1["bytes_fetched"] - io0["bytes_fetched"] + extra.get("loader_bytes_fetched", 0)
        run.extra.update(
            bytes_fetched=fetched,
            bytes_from_cache=io1["bytes_from_cache"] - io0["bytes_from_cache"],
            cache_misses=io1["cache_misses"] - io0["cache_misses"] + extra.get("loader_cache_misses", 0),
        )
        if fetched:
            raise AssertionError(f"{run.name}: warm pass fetched {fetched:.0f} bytes from the store")
        return run

    def entries(self) -> list[Path]:
        return entry_files(self.cache_dir)


class FastfeedZeroCopyContender(FastfeedContender):
    """``StreamingDataset(zero_copy=True)``: samples are memoryviews of the mapped cache entries
    (as LitData's are); plain loop only (the DataLoader's batches do not change)."""

    name = "ffzerocopy"
    settings = ("loop",)


class RawContender(Contender):
    """Sequential read of fastfeed's cached shard files: the local-disk ceiling."""

    name = "raw"

    def __init__(self, files: list[Path], expected: Expected) -> None:
        self.files = files
        self.expected = expected
        self.buf = bytearray(READ_CHUNK)

    def cold(self) -> Run:
        # Never called: raw reads the files fastfeed's cold pass put in its cache.
        raise NotImplementedError("raw has no cold pass")

    def warm(self, setting: str) -> Run:
        view = memoryview(self.buf)
        start, cpu0 = time.perf_counter(), _cpu_s()
        total = 0
        for path in self.files:
            with open(path, "rb", buffering=0) as fh:
                while True:
                    got = fh.readinto(view)
                    if not got:
                        break
                    total += got
        seconds = time.perf_counter() - start
        # Payload-equivalent: the same samples' payload delivered at this file-read speed.
        return Run("raw", self.expected.samples, self.expected.payload_bytes, seconds, _cpu_s() - cpu0, total)


class PeerContender(Contender):
    """Common shape of the two peers: a converted copy under ``prefix`` and a local cache dir."""

    def __init__(
        self, tmp: Path, server: SeaweedServer, s3: S3Config, shard_paths: list[Path], args: argparse.Namespace
    ) -> None:
        self.tmp = tmp
        self.server = server
        self.s3 = s3
        self.shard_paths = shard_paths
        self.args = args
        self.expected = Expected(0, 0)
        self.cache_root = tmp / f"{self.name}-cache"
        self.ds: Any = None  # cold pass and the in-process loop
        self.ds_loader: Any = None  # the loader setting's (see cold())
        self.format_stats: dict[str, int] = {}

    @abc.abstractmethod
    def open_dataset(self) -> Any: ...

    @abc.abstractmethod
    def make_loader(self) -> Any: ...

    def _loop(self) -> tuple[int, int]:
        n = nbytes = 0
        copy = self.args.touch == "copy"
        for s in self.ds:
            nbytes += _touch(s["bin"], copy)
            n += 1
        return n, nbytes

    def cold(self) -> Run:
        start, cpu0 = time.perf_counter(), _cpu_s()
        self.ds = self.open_dataset()
        n, nbytes = self._loop()
        run = Run(f"{self.name}-cold", n, nbytes, time.perf_counter() - start, _cpu_s() - cpu0)
        _check(run.name, n, nbytes, self.expected)
        # A second dataset object over the same (now filled) cache for the loader setting, never
        # iterated in this process: an object iterated here and then forked into loader workers
        # carries this process' iteration state into them (MosaicML Streaming's thread pool is
        # inherited without its threads and its workers hang), which is not how either peer is used.
        self.ds_loader = self.open_dataset()
        return run

    def warm(self, setting: str) -> Run:
        before = cache_snapshot(self.cache_root)
        start, cpu0 = time.perf_counter(), _cpu_s()
        if setting == "loop":
            n, nbytes = self._loop()
        else:
            n = nbytes = 0
            first = 0.0
            it = iter(self.make_loader())
            try:
                for batch in it:
                    bins = batch["bin"]
                    nbytes += sum(len(b) for b in bins)
                    if not n:
                        first = time.perf_counter() - start
                    n += len(bins)
            finally:
                shutdown_loader_iter(it)
        seconds = time.perf_counter() - start
        run = Run(f"{self.name}-{setting}", n, nbytes, seconds, _cpu_s() - cpu0)
        if setting == "loader":
            run.extra["first_batch_s"] = first
        _check(run.name, n, nbytes, self.expected)
        diff = snapshot_diff(before, cache_snapshot(self.cache_root))
        run.extra.update(diff)
        if any(diff.values()):
            raise AssertionError(f"{run.name}: the local cache changed during a warm pass: {diff}")
        return run


class MosaicContender(PeerContender):
    name = "mosaic"

    def setup(self) -> None:
        out = self.tmp / "mds-out"
        # Same samples per file as the tar shards: size_limit a little above one shard's encoded samples.
        self.expected = convert_mds(self.shard_paths, out, FIELDS, self.args.samples_per_shard)
        self.format_stats = _dir_stats(out)
        upload_dir(self.server.client(), BUCKET, out, prefix="mds/")
        _rmtree(out)

    def open_dataset(self) -> Any:
        return open_streaming_dataset(f"s3://{BUCKET}/mds/", self.cache_root, BATCH)

    def make_loader(self) -> Any:
        return torch.utils.data.DataLoader(
            self.ds_loader, batch_size=BATCH, num_workers=WORKERS, timeout=LOADER_TIMEOUT_S
        )

    def close(self) -> None:
        self.ds = self.ds_loader = None
        with contextlib.suppress(Exception):
            from streaming.base.util import clean_stale_shared_memory

            clean_stale_shared_memory()


class LitdataContender(PeerContender):
    name = "litdata"

    def setup(self) -> None:
        out = self.tmp / "litdata-out"
        # Same samples per file (chunk_size) as the tar shards.
        convert_litdata(self.shard_paths, out, FIELDS, self.args.samples_per_shard)
        self.format_stats = _dir_stats(out)
        n = len(self.shard_paths) * self.args.samples_per_shard
        self.expected = Expected(n, n * self.args.sample_bytes)
        upload_dir(self.server.client(), BUCKET, out, prefix="litdata/")
        _rmtree(out)

    def open_dataset(self) -> Any:
        return open_litdata_dataset(f"s3://{BUCKET}/litdata/", self.cache_root, self.s3, max_cache_size="20GB")

    def make_loader(self) -> Any:
        import litdata

        return litdata.StreamingDataLoader(
            self.ds_loader,
            batch_size=BATCH,
            num_workers=WORKERS,
            timeout=LOADER_TIMEOUT_S,
            collate_fn=LitdataCollate(FIELDS),
        )

    def close(self) -> None:
        self.ds = self.ds_loader = None


# -- this script's own process ------------------------------------------------------------------
# The peers run in this process here (fastfeed bench runs each in a process of its own): the
# environment and temporary directory they need are set for the whole run.


@contextlib.contextmanager
def env_vars(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (children forked in it inherit them), then
    restore the previous values."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def tempdir_redirect(path: Path) -> Iterator[None]:
    """Point :func:`tempfile.gettempdir` (and ``TMPDIR`` for child processes) at ``path`` for
    the block: MosaicML Streaming puts its file locks and ``litdata.optimize`` its working
    folders there, so they stay in (and are removed with) the work dir."""
    import multiprocessing.util

    # multiprocessing makes its own temporary directory (for the sockets that pass tensors
    # between loader workers) once per process, on first use: make it now, in the real temp
    # dir, not in ``path`` (deleted later, and maybe too long for an AF_UNIX socket path).
    multiprocessing.util.get_temp_dir()
    path.mkdir(parents=True, exist_ok=True)
    old = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        with env_vars({"TMPDIR": str(path)}):
            yield
    finally:
        tempfile.tempdir = old


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _exit_on_signals(deadline_s: int) -> None:
    """Turn SIGTERM, and SIGALRM after ``deadline_s``, into SystemExit in this process so every
    ``finally`` and context manager runs (server stopped, temp dirs removed); forked children
    keep the default actions."""

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGALRM:
            print(f"deadline of {deadline_s} s reached; stopping", file=sys.stderr)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGALRM, handler)
    signal.alarm(deadline_s)
    os.register_at_fork(after_in_child=_default_signals)


def _default_signals() -> None:
    signal.alarm(0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return None


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", help="dataset payload size (rounded down to whole shards)")
    parser.add_argument("--quick", action="store_true", help="a ~200 MiB dataset (overrides --size)")
    parser.add_argument("--samples-per-shard", type=int, default=160)
    parser.add_argument("--sample-bytes", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers to try (empty: none)")
    parser.add_argument(
        "--touch",
        choices=("pages", "copy"),
        default="pages",
        help="loop setting: read one byte per 4 KiB page of each payload (pages), or first copy a payload "
        "that is not already bytes into bytes (copy; only LitData yields memoryviews)",
    )
    parser.add_argument("--deadline", type=int, default=3600, help="seconds before the whole run is stopped")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if args.quick:
        args.size = "200MiB"
    per_shard = args.samples_per_shard * args.sample_bytes
    num_shards = max(1, parse_size(args.size) // per_shard)
    wanted_peers = [p for p in args.peers.split(",") if p]
    for p in wanted_peers:
        if p not in PEERS:
            parser.error(f"unknown peer {p!r}; choose from {', '.join(PEERS)}")
    _exit_on_signals(args.deadline)
    warnings.filterwarnings("ignore", module="streaming")  # mosaic's "predownload not set"-style notices

    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    importers = {"mosaic": import_streaming, "litdata": litdata_allow_http}
    for peer in wanted_peers:
        try:
            note = importers[peer]()
        except Exception as exc:
            skipped[peer] = f"not importable: {type(exc).__name__}: {exc}"
            print(f"SKIP {peer}: {skipped[peer]}")
        else:
            if note:
                notes[peer] = note
                print(f"note {peer}: {note}")

    rows: dict[str, list[Run]] = {}
    cold: dict[str, dict[str, Any]] = {}
    fmt: dict[str, dict[str, int]] = {}
    contenders: dict[str, Contender] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ff-warm-", dir="/tmp")))
        stack.enter_context(tempdir_redirect(tmp / "tmp"))
        server = stack.enter_context(SeaweedServer(tmp / "store"))
        server.create_bucket(BUCKET)
        # Mosaic reads the endpoint and credentials from the environment (forked workers inherit it).
        stack.enter_context(
            env_vars(
                {
                    "S3_ENDPOINT_URL": server.endpoint_url,
                    "AWS_ACCESS_KEY_ID": server.access_key,
                    "AWS_SECRET_ACCESS_KEY": server.secret_key,
                    "AWS_DEFAULT_REGION": "us-east-1",
                }
            )
        )
        local = tmp / "shards"
        t0 = time.perf_counter()
        shard_paths = write_synthetic_shards(
            local, num_shards=num_shards, samples_per_shard=args.samples_per_shard, sample_bytes=args.sample_bytes
        )
        upload_dir(server.client(), BUCKET, local, prefix="wds/")
        expected = Expected(num_shards * args.samples_per_shard, num_shards * per_shard)
        fmt["wds"] = _dir_stats(local)
        print(
            f"dataset: {num_shards} shards x {args.samples_per_shard} samples x {args.sample_bytes} B payload "
            f"({format_size(fmt['wds']['bytes'])} of tar) written and uploaded in {time.perf_counter() - t0:.1f} s"
        )

        s3 = S3Config(
            endpoint_url=server.endpoint_url,
            access_key_id=server.access_key,
            secret_access_key=server.secret_key,
            region="us-east-1",
        )
        ff = FastfeedContender(f"s3://{BUCKET}/wds/", s3, tmp / "fastfeed-cache", expected)
        contenders["fastfeed"] = ff
        peer_classes: dict[str, type[PeerContender]] = {"mosaic": MosaicContender, "litdata": LitdataContender}
        for peer in wanted_peers:
            if peer in skipped:
                continue
            peer_c = peer_classes[peer](tmp, server, s3, shard_paths, args)
            stack.callback(peer_c.close)
            try:
                t0 = time.perf_counter()
                peer_c.setup()
                fmt[peer] = peer_c.format_stats
                print(f"{peer}: converted and uploaded in {time.perf_counter() - t0:.1f} s ({fmt[peer]})")
                contenders[peer] = peer_c
            except Exception as exc:
                skipped[peer] = f"conversion/upload failed: {type(exc).__name__}: {exc}"
                print(f"SKIP {peer}: {skipped[peer]}")
                traceback.print_exc()
        _rmtree(local)  # the peers' copies are converted; warm reads must come from each library's cache

        for name, c in list(contenders.items()):
            try:
                run = c.cold()
            except Exception as exc:
                if name == "fastfeed":
                    raise
                skipped[name] = f"cold pass failed: {type(exc).__name__}: {exc}"
                print(f"SKIP {name}: {skipped[name]}")
                traceback.print_exc()
                c.close()
                del contenders[name]
                continue
            cold[name] = {**run.as_dict(), "cache": _dir_stats(c.cache_root)}
            print(
                f"  cold {name:<9} {run.mb_per_s:8.0f} MB/s  {run.samples_per_s:8.0f} samples/s  ({run.seconds:.1f} s)"
            )

        entries = ff.entries()
        if len(entries) != num_shards:
            raise AssertionError(f"fastfeed cache holds {len(entries)} entries, expected {num_shards}")
        zc = FastfeedZeroCopyContender(
            f"s3://{BUCKET}/wds/", s3, ff.cache_dir, expected, zero_copy=True, copy=args.touch == "copy"
        )
        contenders = {"raw": RawContender(entries, expected), **contenders, zc.name: zc}

        keys = [("raw", "read")] + [(n, s) for n in contenders if n != "raw" for s in contenders[n].settings]
        rows = {f"{n}-{s}" if n != "raw" else "raw": [] for n, s in keys}
        names = list(contenders)
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                for setting in ("read",) if name == "raw" else contenders[name].settings:
                    run = contenders[name].warm(setting)
                    rows[run.name].append(run)
                    note = ""
                    if name == "raw":
                        note = f"  ({run.read_bytes / run.seconds / 1e6:.0f} MB/s of file bytes)"
                    elif name == "fastfeed":
                        note = f"  (fetched {run.extra['bytes_fetched']:.0f} B)"
                    if "first_batch_s" in run.extra:
                        note += f"  (first batch {run.extra['first_batch_s'] * 1000:.0f} ms)"
                    print(
                        f"  repeat {r} {run.name:<16} {run.mb_per_s:8.0f} MB/s  {run.samples_per_s:8.0f} samples/s"
                        f"  {run.cpu_s / run.seconds:4.2f} CPU/s{note}"
                    )
        for c in contenders.values():
            c.close()

    med = {k: statistics.median(m.mb_per_s for m in v) for k, v in rows.items() if v}
    sps = {k: statistics.median(m.samples_per_s for m in v) for k, v in rows.items() if v}
    raw_file = statistics.median(m.read_bytes / m.seconds / 1e6 for m in rows["raw"])
    first = {
        k: statistics.median(m.extra["first_batch_s"] for m in v)
        for k, v in rows.items()
        if v and "first_batch_s" in v[0].extra
    }
    ratios: dict[str, dict[str, float]] = {}
    print()
    print(f"warm epoch, median of {args.repeats} (MB = 1e6 B of payload; raw: payload-equivalent)")
    print(f"{'run':<16} {'MB/s':>8} {'samples/s':>10} {'x raw':>6} {'ff / this':>9} {'1st batch':>9}")
    for k in med:
        setting = k.rsplit("-", 1)[-1]
        ff_key = f"fastfeed-{setting}"
        ratio = (
            med[ff_key] / med[k] if ff_key in med and not k.startswith(("fastfeed", "ffzero")) and k != "raw" else None
        )
        ratios[k] = {"x_raw": med[k] / med["raw"], **({"fastfeed_over": ratio} if ratio else {})}
        shown = f"{ratio:9.2f}" if ratio else f"{'':>9}"
        fb = f"{first[k] * 1000:7.0f}ms" if k in first else ""
        print(f"{k:<16} {med[k]:8.0f} {sps[k]:10.0f} {med[k] / med['raw']:6.2f} {shown} {fb}")
    print(f"raw file-bytes read speed: {raw_file:.0f} MB/s")
    if "ffzerocopy-loop" in med and "litdata-loop" in med:
        zc_over = med["ffzerocopy-loop"] / med["litdata-loop"]
        ratios["ffzerocopy-loop"]["litdata_loop_over"] = 1 / zc_over
        print(f"fastfeed zero_copy loop / LitData loop (both views): {zc_over:.2f}")
    for peer, why in skipped.items():
        print(f"skipped {peer}: {why}")

    report = {
        "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {
                "fastfeed": fastfeed.__version__,
                "torch": torch.__version__,
                "mosaicml-streaming": _version("streaming"),
                "litdata": _version("litdata"),
            },
        },
        "config": {
            **vars(args),
            "num_shards": num_shards,
            "batch_size": BATCH,
            "num_workers": WORKERS,
            "read_chunk": READ_CHUNK,
        },
        "formats": fmt,
        "skipped": skipped,
        "peer_notes": notes,
        "cold": cold,
        "median_mb_per_s": med,
        "median_samples_per_s": sps,
        "median_raw_file_mb_per_s": raw_file,
        "median_first_batch_s": first,
        "ratios": ratios,
        "runs": {k: [m.as_dict() for m in v] for k, v in rows.items()},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
