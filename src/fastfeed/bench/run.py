"""``fastfeed bench``: how fast a dataset can be fed, next to the ceilings and the peers.

:func:`run` measures, in one process and one run:

* the ceilings: concurrent ranged GETs of the dataset (same part size and concurrency as the
  loader), a sequential read of the node cache once it is warm, and pinned host-to-device
  bandwidth when a GPU is used;
* ``fastfeed.DataLoader`` epochs: the first reads the store and fills the cache (cold), the
  next ones read the cache (warm);
* each installed peer in ``compare`` (:mod:`fastfeed.bench.peers`), cold and, where it has a local
  cache, warm;
* with ``decode``: the loader decodes the dataset's images (``DataLoader(decode=...)``, a
  :class:`fastfeed.vision.Decode` stage: Pillow on the CPU, DALI or nvJPEG on a ``--device``),
  and a decode ceiling is measured: the first samples of the dataset decoded in this process
  by the same backend, one thread scaled to the loader's decode threads on the CPU (peers are
  not run);
* optionally an async checkpoint round: :meth:`fastfeed.Checkpointer.save` stall vs a plain
  ``clone()`` of the same tensors, and the background upload.

Every figure goes into a :class:`~fastfeed.bench.report.Report` (the table, the JSON, the plot and
fastfeed's performance targets). :func:`fastfeed.bench.demo.demo` runs all of this against a
local S3 server (SeaweedFS) with a synthetic dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastfeed.bench.decoding import (
    BenchDecode,
    check_decode,
    first_samples,
    make_decoder,
    measure_decode,
)
from fastfeed.bench.measure import (
    measure_batches,
    measure_h2d,
    measure_raw_get,
    measure_raw_read,
    service_process,
)
from fastfeed.bench.report import DECODE_CEILING, Report, Target
from fastfeed.cache.admin import entry_files
from fastfeed.config import PrefetchConfig, S3Config
from fastfeed.errors import ConfigError

__all__ = [
    "DECODE_CEILING",
    "BenchConfig",
    "BenchDecode",
    "Progress",
    "Report",
    "Target",
    "batch_bytes",
    "batch_count",
    "check_decode",
    "check_device",
    "emulated",
    "first_samples",
    "make_decoder",
    "measure_decode",
    "run",
    "scenario",
]

log = logging.getLogger(__name__)

#: Progress callback: ``(run name, total bytes or None)`` starts a run; then ``(bytes, samples)``.
Progress = Callable[[str, int | None], Callable[[int, int], None]]

#: Why peers are not run with ``--decode``.
DECODE_SKIPS_PEERS = "--decode measures fastfeed's decoding only; run without --decode to compare peers"


@dataclass
class BenchConfig:
    """What ``fastfeed bench`` runs (the CLI flags)."""

    batch_size: int = 64
    workers: int = 2
    #: Keep fastfeed's worker processes from one epoch to the next. Off by default: every peer
    #: run starts its own workers, and so does each fastfeed epoch then.
    persistent_workers: bool = False
    #: ``fastfeed.DataLoader(worker_mode=...)``: threads of this process or worker processes.
    worker_mode: str = "auto"
    epochs: int = 2
    shuffle: bool = False
    part_size: int | str = "8MiB"
    max_requests: int = 16
    byte_budget: int | str = "256MiB"
    #: Cache directory (``None``: a temporary one, removed after the run) and its limit.
    cache_dir: str | None = None
    cache_limit: str = "20GB"
    #: Read without a node cache: every epoch streams from the store (and is cold).
    no_cache: bool = False
    #: How fills write to the cache (``StreamingDataset(cache_io=...)``).
    cache_io: str = "auto"
    #: ``"cpu"`` or a CUDA device: batches are copied there by the loader.
    device: str = "cpu"
    #: Synthetic training step per batch, in milliseconds (``time.sleep``).
    step_ms: float = 0.0
    #: Peers to read the same data (:data:`fastfeed.bench.peers.PEERS`).
    compare: tuple[str, ...] = ()
    #: Emulated store latency (ms, each response head) and bandwidth (bytes/s), via a proxy.
    latency_ms: float = 0.0
    bandwidth: float | None = None
    #: Emulated bandwidth of each connection (bytes/s), as object stores bound one connection.
    connection_bandwidth: float | None = None
    #: Size of the synthetic state of the checkpoint round (0: no round).
    checkpoint_bytes: int = 0
    progress: bool = True
    #: Decode every sample in the loader (:class:`fastfeed.decode.Decoder`), images resized to
    #: ``image_size`` (``(height, width)``) when given.
    decode: bool = False
    image_size: tuple[int, int] | None = None


def scenario(cfg: BenchConfig) -> str:
    """What a run does, in a user's words (the demo prints it before the table)."""
    workers = f"{cfg.workers} worker{'s' if cfg.workers != 1 else ''}"
    step = (
        f"a {cfg.step_ms:g} ms training step per batch"
        if cfg.step_ms
        else "no training step (the loaders at full speed)"
    )
    store = "the local S3 server" + (f" with {cfg.latency_ms:g} ms added latency" if cfg.latency_ms else "")
    if cfg.no_cache:
        epochs = f"{cfg.epochs} epoch(s), each streamed from {store}"
    else:
        warm = f", then {cfg.epochs - 1} warm from the node cache" if cfg.epochs > 1 else ""
        epochs = f"epoch 0 cold from {store} while filling fastfeed's node cache{warm}"
    peers = (
        f"; the peers ({', '.join(cfg.compare)}) read the same shards with the same batch size and workers, "
        "each in its recommended setup"
        if cfg.compare
        else ""
    )
    return f"scenario: batches of {cfg.batch_size} with {workers}, {step}; {epochs}{peers}"


def machine() -> dict[str, Any]:
    """The machine and commit, for the JSON report."""
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "commit": commit,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ---------------------------------------------------------------------- running


def batch_bytes(batch: Any) -> int:
    """Stored payload bytes of one fastfeed loader batch (what a decoding batch decoded)."""
    from fastfeed.batch.assemble import RaggedBytes
    from fastfeed.decode import NBYTES_KEY

    if NBYTES_KEY in batch:  # a Decoder batch: the stored bytes it decoded
        return int(batch[NBYTES_KEY])
    return sum(v.data.numel() for v in batch.values() if isinstance(v, RaggedBytes))


def batch_count(batch: Any) -> int:
    """Samples in one fastfeed loader batch."""
    return len(batch["__key__"])


def _bound_by(before: Any, after: Any, wait_fraction: float) -> str:
    """What bounded an epoch's loop: the step, or the stage whose seconds grew the most (as
    :meth:`fastfeed.LoaderStats.bound_by`, over the epoch)."""
    from fastfeed.loader.stats import STAGES, STEP_BOUND_WAIT

    if wait_fraction < STEP_BOUND_WAIT:
        return "step"
    grown = {stage: getattr(after, f"{stage}_s") - getattr(before, f"{stage}_s") for stage in STAGES}
    return max(grown, key=lambda stage: grown[stage]) if any(v > 0 for v in grown.values()) else "step"


def _cache_counts(loader: Any) -> tuple[int, int]:
    stats = loader.stats()
    return stats.cache_hits, stats.cache_misses


def _hit_rate(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    hits, misses = after[0] - before[0], after[1] - before[1]
    return hits / (hits + misses) if hits + misses else None


@contextlib.contextmanager
def emulated(
    s3: S3Config, latency_ms: float, bandwidth: float | None, connection_bandwidth: float | None = None
) -> Iterator[S3Config]:
    """``s3`` itself, or ``s3`` through a delaying proxy when latency or a bandwidth is set. The
    proxy (:mod:`fastfeed.testing.proxy_process`) runs in its own process, stopped by PID on exit."""
    if not latency_ms and not bandwidth and not connection_bandwidth:
        yield s3
        return
    if not s3.endpoint_url or not s3.endpoint_url.startswith("http://"):
        raise ConfigError(
            "--latency-ms / --bandwidth / --connection-bandwidth put a proxy in front of a plain-HTTP endpoint",
            hint="give --endpoint-url http://host:port (or use --demo)",
        )
    run_proxy = "import sys; from fastfeed.testing.proxy_process import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", run_proxy, s3.endpoint_url, "--latency-ms", str(latency_ms)]
    if bandwidth:
        cmd += ["--bandwidth", str(bandwidth)]
    if connection_bandwidth:
        cmd += ["--connection-bandwidth", str(connection_bandwidth)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = select.select([proc.stdout], [], [], 30)[0]
        line = proc.stdout.readline().strip() if ready else ""
        if not line.startswith("http://"):
            raise ConfigError(f"the delaying proxy did not start (exit status {proc.poll()})")
        log.info("emulating %g ms latency via %s (pid %d)", latency_ms, line, proc.pid)
        with service_process(proc.pid):
            yield dataclasses.replace(s3, endpoint_url=line)
    finally:
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()  # the proxy's signal to stop
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run(
    url: str,
    s3: S3Config,
    cfg: BenchConfig,
    *,
    progress: Progress | None = None,
    setup: dict[str, Any] | None = None,
) -> Report:
    """Measure ``url`` as described in the module docstring."""
    from fastfeed.dataset import StreamingDataset
    from fastfeed.loader.dataloader import DataLoader

    check_device(cfg.device)
    check_decode(cfg)
    decoder: BenchDecode | None = None
    prefetch = PrefetchConfig.from_args(
        part_size=cfg.part_size, max_requests=cfg.max_requests, byte_budget=cfg.byte_budget
    )
    report = Report(
        url, {**dataclasses.asdict(cfg), "compare": list(cfg.compare)}, setup=dict(setup or {}), machine=machine()
    )
    with contextlib.ExitStack() as stack:
        if cfg.no_cache and cfg.cache_dir:
            raise ConfigError("--no-cache and --cache-dir contradict each other", hint="give one of them")
        cache_dir = cfg.cache_dir
        if cache_dir is None and not cfg.no_cache:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastfeed-bench-cache-"))
        s3_run = stack.enter_context(emulated(s3, cfg.latency_ms, cfg.bandwidth, cfg.connection_bandwidth))

        # As a training loop does: one dataset and one loader, set_epoch before each epoch.
        ds = StreamingDataset(
            url,
            s3=s3_run,
            shuffle=cfg.shuffle,
            part_size=prefetch.part_size,
            max_requests=prefetch.max_requests,
            byte_budget=prefetch.byte_budget,
            cache_dir=cache_dir,
            cache_limit=cfg.cache_limit if cache_dir is not None else None,
            cache_io=cfg.cache_io,
        )
        shards = ds.shards
        total = sum(s.size for s in shards)
        remote = [s for s in shards if not s.url.startswith("file://")]
        if remote:
            report.ceilings["raw GET"] = measure_raw_get(remote, s3_run, prefetch)
        if cfg.device != "cpu":
            report.ceilings["pinned H2D"] = measure_h2d(cfg.device)
        if cfg.decode:
            # Before the epochs: a dataset without images (or a missing Pillow) shows here, at once.
            # Its own dataset without the cache, which the cold epoch must find empty.
            head = StreamingDataset(url, s3=s3_run, part_size=prefetch.part_size, max_requests=prefetch.max_requests)
            samples = first_samples(head, batch_size=cfg.batch_size)
            decoder = make_decoder(cfg, samples)
            assert decoder is not None
            report.ceilings[DECODE_CEILING] = measure_decode(
                samples, decoder, batch_size=cfg.batch_size, device=cfg.device
            )

        device = None if cfg.device == "cpu" else cfg.device
        loader: DataLoader[Any] = stack.enter_context(
            contextlib.closing(
                DataLoader(
                    ds,
                    batch_size=cfg.batch_size,
                    num_workers=cfg.workers,
                    persistent_workers=cfg.persistent_workers and cfg.workers > 0,
                    worker_mode=cfg.worker_mode,
                    device=device,
                    decode=decoder,
                )
            )
        )
        for epoch in range(cfg.epochs):
            name = f"fastfeed epoch {epoch}"
            ds.set_epoch(epoch)
            before = _cache_counts(loader)
            stages_before = loader.stats()
            result = measure_batches(
                name,
                lambda: loader,
                size_of=batch_bytes,
                count_of=batch_count,
                step_s=cfg.step_ms / 1000,
                progress=progress(name, total) if progress else None,
                close=False,
            )
            result.cache_hit_rate = _hit_rate(before, _cache_counts(loader))
            result.extra["bound_by"] = _bound_by(stages_before, loader.stats(), result.wait_fraction)
            # Cold: some shards came from the store (a --cache-dir may already be warm at epoch 0).
            phase = "cold" if remote and (result.cache_hit_rate or 0.0) < 1.0 else "warm"
            result.name = f"{name} ({phase}, decode)" if decoder is not None else f"{name} ({phase})"
            result.extra.update(phase=phase, epoch=epoch, decode=decoder is not None)
            report.runs.append(result)
        if cache_dir is not None and any(r.extra.get("phase") == "warm" for r in report.runs):
            # After the epochs, so that it finds the page cache as the warm epochs left it: with
            # direct fills, a read before them would be the one to bring the entries into memory.
            entries = entry_files(cache_dir)
            if entries:
                report.ceilings["raw read"] = measure_raw_read(entries)

        if cfg.compare and decoder is not None:
            report.skipped.update(dict.fromkeys(cfg.compare, DECODE_SKIPS_PEERS))
        elif cfg.compare:
            _run_peers(report, url, s3_run, cfg, progress, stack)
        if cfg.checkpoint_bytes:
            report.checkpoint = checkpoint_round(f"{_bucket_root(url)}fastfeed-bench-ckpt/", s3, cfg.checkpoint_bytes)
    return report


def check_device(device: str) -> None:
    """Raise :class:`~fastfeed.errors.ConfigError` unless ``device`` is ``cpu`` or a usable CUDA device."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device!r} is not a torch device", hint="use cpu or cuda[:N]") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no usable CUDA device", hint="use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: only cpu and cuda are supported")


def _bucket_root(url: str) -> str:
    if not url.startswith("s3://"):
        raise ConfigError("the checkpoint round needs an s3:// dataset (it writes next to it)", url=url)
    return "s3://" + url[len("s3://") :].split("/", 1)[0] + "/"


def _run_peers(
    report: Report, url: str, s3: S3Config, cfg: BenchConfig, progress: Progress | None, stack: contextlib.ExitStack
) -> None:
    from fastfeed.bench import peers

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastfeed-bench-peers-")))
    ctx = peers.PeerContext.from_url(url, s3=s3, work_dir=work, batch_size=cfg.batch_size, num_workers=cfg.workers)
    try:
        # The peers read the fields the dataset has (fastfeed's loader delivers every field).
        ctx.fields = peers.sample_fields(ctx.source_shards()[0])
    except Exception as err:  # each peer then reports its own failure
        log.warning("could not read the sample fields of %s for the peers: %s", url, err)
    for name in cfg.compare:
        # WebDataset's documented way to read from a web server: presigned URLs through curl.
        options = {"opener": "curl"} if name == "webdataset" and shutil.which("curl") else {}
        peer = peers.make_peer(name, **options)
        reason = peer.available()
        if reason is not None:
            report.skipped[name] = reason
            continue
        try:
            peer.prepare(ctx)
            phases = ["cold", "warm"] if peer.has_cache else ["cold"]
            for phase in phases:
                label = f"{name} ({phase})"
                if progress is not None:
                    progress(label, None)
                result = peer.run(ctx, epoch=0, warm=phase == "warm")
                result.name = label
                result.extra.update(peer=name, phase=phase)
                report.runs.append(result)
        except Exception as err:  # a peer's failure is reported, not fatal to the run
            log.warning("peer %s failed: %s", name, err)
            report.skipped[name] = f"failed: {type(err).__name__}: {err}"
        finally:
            peer.cleanup()


def checkpoint_round(url: str, s3: S3Config, nbytes: int, repeats: int = 5) -> dict[str, float]:
    """``Checkpointer.save()`` stall vs ``clone()`` of the same tensors, and the upload: medians
    of ``repeats`` rounds after one warm-up round, clone and save alternating."""
    import torch

    from fastfeed.checkpoint.checkpointer import Checkpointer

    n = 8
    state = {f"w{i}": torch.rand(max(1, nbytes // 4 // n)) for i in range(n)}
    size = sum(t.numel() * t.element_size() for t in state.values())
    clones, stalls, commits = [], [], []
    ckpt = Checkpointer(url, s3=s3, keep_last=1)
    try:
        for step in range(repeats + 1):  # round 0 warms up both (allocations, the staging buffer)
            t0 = time.perf_counter()
            copies = {k: v.clone() for k, v in state.items()}
            clone_s = time.perf_counter() - t0
            del copies
            t0 = time.perf_counter()
            handle = ckpt.save(state, step=step)
            stall_s = time.perf_counter() - t0
            handle.result()
            if step:
                clones.append(clone_s)
                stalls.append(stall_s)
                commits.append(time.perf_counter() - t0)
    finally:
        ckpt.close()
        with contextlib.suppress(Exception):
            _delete_prefix(url, s3)
    return {
        "bytes": float(size),
        "clone_s": statistics.median(clones),
        "stall_s": statistics.median(stalls),
        "commit_s": statistics.median(commits),
        "repeats": float(repeats),
    }


def _delete_prefix(url: str, s3: S3Config) -> None:
    from fastfeed.testing.servers import make_s3_client

    bucket, _, prefix = url[len("s3://") :].partition("/")
    client = make_s3_client(s3.endpoint_url or "", s3.access_key_id or "", s3.secret_access_key or "")
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
    finally:
        client.close()
