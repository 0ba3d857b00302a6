"""``fastfeed bench``: how fast a dataset can be fed, next to the ceilings and the peers.

:func:`run` measures, in one process and one run:

* the ceilings: concurrent ranged GETs of the dataset (same part size and concurrency as the
  loader), a sequential read of the node cache once it is warm, and pinned host-to-device
  bandwidth when a GPU is used;
* ``fastfeed.DataLoader`` epochs: the first reads the store and fills the cache (cold), the
  next ones read the cache (warm);
* each installed peer in ``compare`` (:mod:`fastfeed.bench.peers`), cold and, where it has a local
  cache, warm;
* with ``decode``: the loader decodes every sample (:class:`fastfeed.decode.Decoder` as its
  ``collate_fn``), and a decode ceiling is measured: the first samples of the dataset decoded in
  this process, single-threaded, scaled to the number of workers (peers are not run);
* optionally an async checkpoint round: :meth:`fastfeed.Checkpointer.save` stall vs a plain
  ``clone()`` of the same tensors, and the background upload.

The :class:`Report` holds every :class:`~fastfeed.bench.measure.Measurement`, renders the table, the
JSON and the plot, and checks fastfeed's performance targets, saying plainly which were missed.
:func:`demo` runs all of this against a local S3 server (SeaweedFS) with a synthetic dataset.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastfeed.bench.measure import (
    Measurement,
    measure_batches,
    measure_h2d,
    measure_raw_get,
    measure_raw_read,
    peak_rss_bytes,
)
from fastfeed.cache.admin import entry_files
from fastfeed.config import PrefetchConfig, S3Config, format_size
from fastfeed.errors import ConfigError

if TYPE_CHECKING:
    from fastfeed.decode import Decoder

__all__ = ["BenchConfig", "Report", "Target", "demo", "first_samples", "measure_decode", "run"]

log = logging.getLogger(__name__)

#: Progress callback: ``(run name, total bytes or None)`` starts a run; then ``(bytes, samples)``.
Progress = Callable[[str, int | None], Callable[[int, int], None]]

#: Key of the decode ceiling in :attr:`Report.ceilings` (its name says the workers it assumes).
DECODE_CEILING = "decode"
#: The decode ceiling decodes at most this many samples (and at most this many stored bytes).
DECODE_CEILING_SAMPLES = 256
DECODE_CEILING_BYTES = 256 << 20
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


@dataclass
class Target:
    """One of fastfeed's performance targets, checked against this run's figures."""

    name: str
    value: float | None
    threshold: float
    #: ``">="`` or ``"<="``.
    op: str
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "met": self.met}


@dataclass
class Report:
    """Every figure of one ``fastfeed bench`` run."""

    url: str
    config: dict[str, Any]
    setup: dict[str, Any] = field(default_factory=dict)
    ceilings: dict[str, Measurement] = field(default_factory=dict)
    runs: list[Measurement] = field(default_factory=list)
    checkpoint: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ figures

    def run_named(self, name: str) -> Measurement | None:
        return next((r for r in self.runs if r.name == name), None)

    def ceiling_of(self, run: Measurement) -> Measurement | None:
        """The ceiling a run is compared with: the raw read for warm runs, else the raw GET; for a
        decoding run, the lower of that and the decode ceiling (in samples/s, the I/O ceiling
        taken at the run's mean stored bytes per sample)."""
        key = "raw read" if run.extra.get("phase") == "warm" else "raw GET"
        io = self.ceilings.get(key)
        decode = self.ceilings.get(DECODE_CEILING) if run.extra.get("decode") else None
        if decode is None or io is None:
            return decode or io
        return min((io, decode), key=lambda c: _ceiling_samples_per_s(c, run))

    def best_peer(self, phase: str) -> Measurement | None:
        peers = [r for r in self.runs if r.extra.get("peer") and r.extra.get("phase") == phase]
        return max(peers, key=lambda r: r.mb_per_s, default=None)

    def _fastfeed(self, phase: str) -> Measurement | None:
        runs = [r for r in self.runs if not r.extra.get("peer") and r.extra.get("phase") == phase]
        if not runs:
            return None
        return runs[0] if phase == "cold" else max(runs, key=lambda r: r.mb_per_s)

    def targets(self) -> list[Target]:
        """fastfeed's performance targets, from this run's ratios."""
        out: list[Target] = []
        latency = float(self.config.get("latency_ms") or 0.0)
        where = (
            f" at {latency:g} ms emulated latency" if latency else " (no emulated latency: the target is set at 20 ms)"
        )
        per_connection = self.config.get("connection_bandwidth")
        if per_connection:
            where += f", {float(per_connection) / 1e6:g} MB/s per connection"
        # The targets bound the feeding of stored bytes: a decoding run is bound by its decoding.
        phases = () if self.config.get("decode") else (("cold", "raw GET", 0.9, 2.0), ("warm", "raw read", 0.8, 1.5))
        for phase, ceiling, ratio_min, peer_min in phases:
            run, top = self._fastfeed(phase), self.ceilings.get(ceiling)
            if run is not None and top is not None:
                out.append(Target(f"{phase} epoch / {ceiling} ceiling", _ratio(run, top), ratio_min, ">="))
            peer = self.best_peer(phase)
            if run is not None and peer is not None:
                detail = f"best peer: {peer.name}" + (where if phase == "cold" else "")
                out.append(Target(f"{phase} epoch / best peer", _ratio(run, peer), peer_min, ">=", detail))
        if self.checkpoint:
            out.append(
                Target(
                    "checkpoint save() stall / clone()",
                    self.checkpoint["stall_s"] / self.checkpoint["clone_s"],
                    1.5,
                    "<=",
                )
            )
        return out

    # ------------------------------------------------------------------ output

    def table(self) -> str:
        """The results as a plain-text table (MB = 10**6 bytes of payload)."""
        labels = [_ceiling_label(name, c) for name, c in self.ceilings.items()] + [r.name for r in self.runs]
        w = max([30, *map(len, labels)])  # names such as "fastfeed epoch 0 (cold, decode)" fit
        head = (
            f"{'run':<{w}} {'samples/s':>10} {'MB/s':>7} {'x ceil':>7} {'x peer':>7} {'1st batch':>9} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'wait':>6} {'hit':>5} {'CPU s/GiB':>9} {'RSS':>9}"
        )
        lines = [head, "-" * len(head)]
        for name, c in self.ceilings.items():
            label = _ceiling_label(name, c)
            # An I/O ceiling counts bytes only; the decode ceiling counts samples (and their stored bytes).
            per_s = f"{c.samples_per_s:>10,.0f}" if c.samples else f"{'-':>10}"
            lines.append(f"{label:<{w}} {per_s} {c.mb_per_s:>7.0f} {'1.00':>7} {'':>7}")
        for r in self.runs:
            ceiling = self.ceiling_of(r)
            x_ceil = f"{_ceiling_ratio(r, ceiling):.2f}" if ceiling is not None else "-"
            x_peer = "-"
            if not r.extra.get("peer"):
                peer = self.best_peer(str(r.extra.get("phase")))
                x_peer = f"{_ratio(r, peer):.2f}" if peer is not None else "-"
            hit = f"{r.cache_hit_rate:.0%}" if r.cache_hit_rate is not None else "-"
            rss = format_size(max(r.peak_rss_bytes, r.peak_child_rss_bytes)) if r.peak_rss_bytes else "-"
            lines.append(
                f"{r.name:<{w}} {r.samples_per_s:>10,.0f} {r.mb_per_s:>7.0f} {x_ceil:>7} {x_peer:>7} "
                f"{r.first_sample_s * 1000:>7.0f}ms {r.batch_p50_ms:>7.1f} {r.batch_p99_ms:>7.1f} "
                f"{r.wait_fraction:>6.1%} {hit:>5} {r.cpu_s_per_gib:>9.2f} {rss:>9}"
            )
        if self.checkpoint:
            ck = self.checkpoint
            lines.append("")
            lines.append(
                f"checkpoint {format_size(int(ck['bytes']))}: save() stall {ck['stall_s'] * 1000:.0f} ms vs clone() "
                f"{ck['clone_s'] * 1000:.0f} ms ({ck['stall_s'] / ck['clone_s']:.2f}x); background commit "
                f"{ck['commit_s']:.2f} s ({ck['bytes'] / 1e6 / ck['commit_s']:.0f} MB/s)"
            )
        lines.extend(self._decode_notes())
        for name, reason in self.skipped.items():
            lines.append(f"skipped {name}: {reason}")
        targets = self.targets()
        if targets:
            lines.append("")
            lines.append("targets (fastfeed vs the ceilings and the best peer):")
            for t in targets:
                verdict = {True: "met", False: "MISSED", None: "n/a"}[t.met]
                value = f"{t.value:.2f}" if t.value is not None else "-"
                extra = f"  [{t.detail}]" if t.detail else ""
                lines.append(f"  {t.name:<40} {value:>6} (target {t.op} {t.threshold:g}): {verdict}{extra}")
        return "\n".join(lines)

    def _decode_notes(self) -> list[str]:
        """For decoding runs: what bounds them, decoding or I/O (each ceiling in samples/s)."""
        runs = [r for r in self.runs if r.extra.get("decode") and not r.extra.get("peer") and r.samples]
        decode = self.ceilings.get(DECODE_CEILING)
        if not runs or decode is None:
            return []
        lines = [""]
        label = _ceiling_label(DECODE_CEILING, decode)
        for r in runs:
            io = self.ceiling_of(dataclasses.replace(r, extra={**r.extra, "decode": False}))
            if io is None:
                lines.append(f"{r.name}: {label} {decode.samples_per_s:,.0f} samples/s; no I/O ceiling (local files)")
                continue
            io_per_s = _ceiling_samples_per_s(io, r)
            bound = "decoding" if decode.samples_per_s < io_per_s else "I/O"
            lines.append(
                f"{r.name}: bound by {bound}: {label} {decode.samples_per_s:,.0f} samples/s vs "
                f"{_ceiling_label(io.name, io)} {io_per_s:,.0f} samples/s at {format_size(r.bytes // r.samples)}/sample"
            )
        if self.config.get("decode"):
            lines.append("the epoch targets are not checked with --decode: they bound feeding stored bytes")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "config": self.config,
            "setup": self.setup,
            "machine": self.machine,
            "ceilings": {k: v.as_dict() for k, v in self.ceilings.items()},
            "runs": [r.as_dict() for r in self.runs],
            "checkpoint": self.checkpoint,
            "skipped": self.skipped,
            "targets": [t.as_dict() for t in self.targets()],
        }

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Throughput over time of every run and ceiling, as a PNG (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ConfigError("--plot needs matplotlib", hint="pip install matplotlib (or fastfeed[bench])") from err
        fig, ax = plt.subplots(figsize=(10, 5.5))
        for name, c in self.ceilings.items():
            ax.axhline(c.mb_per_s, linestyle="--", linewidth=1, color="grey")
            ax.annotate(_ceiling_label(name, c), (0, c.mb_per_s), fontsize=8, color="grey", va="bottom")
        for r in self.runs:
            t, mb = _rate_series(r.timeline)
            if t:
                ax.plot(
                    t, mb, label=f"{r.name} ({r.mb_per_s:.0f} MB/s)", linewidth=1.5 if not r.extra.get("peer") else 1
                )
        ax.set_xlabel("seconds since the start of the epoch")
        ax.set_ylabel("MB/s (payload, moving window)")
        ax.set_title(f"fastfeed bench: {self.url}")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=110)
        plt.close(fig)


def _ratio(a: Measurement, b: Measurement | None) -> float:
    if b is None or b.mb_per_s <= 0:
        return 0.0
    return a.mb_per_s / b.mb_per_s


def _ceiling_label(key: str, ceiling: Measurement) -> str:
    """``"raw GET ceiling"``; the decode ceiling's own name says its workers."""
    return ceiling.name if "ceiling" in ceiling.name else f"{key} ceiling"


def _ceiling_samples_per_s(ceiling: Measurement, run: Measurement) -> float:
    """A ceiling in samples/s: its own count, or its bytes at ``run``'s mean stored sample size."""
    if ceiling.samples:
        return ceiling.samples_per_s
    if not run.samples or not run.bytes:
        return 0.0
    return ceiling.mb_per_s * 1e6 / (run.bytes / run.samples)


def _ceiling_ratio(run: Measurement, ceiling: Measurement) -> float:
    """``run`` as a fraction of ``ceiling``: in samples/s against a ceiling that counts samples
    (decoding), else in MB/s."""
    if ceiling.samples:
        return run.samples_per_s / ceiling.samples_per_s if ceiling.samples_per_s > 0 else 0.0
    return _ratio(run, ceiling)


def _rate_series(timeline: Sequence[Sequence[float]], points: int = 60) -> tuple[list[float], list[float]]:
    """Throughput over a moving time window of 1/``points`` of the run (at least 50 ms)."""
    pts = [(float(t), float(b)) for t, b in timeline]
    if len(pts) < 2 or pts[-1][0] <= 0:
        return [], []
    window = max(0.05, pts[-1][0] / points)
    ts, rates = [], []
    j = 0
    for t, b in pts:
        while pts[j][0] < t - window:
            j += 1
        dt = t - pts[j][0]
        if dt >= window / 2:
            ts.append(t)
            rates.append((b - pts[j][1]) / 1e6 / dt)
    return ts, rates


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


def _batch_bytes(batch: Any) -> int:
    from fastfeed.batch.assemble import RaggedBytes
    from fastfeed.decode import NBYTES_KEY

    if NBYTES_KEY in batch:  # a Decoder batch: the stored bytes it decoded
        return int(batch[NBYTES_KEY])
    return sum(v.data.numel() for v in batch.values() if isinstance(v, RaggedBytes))


def _batch_count(batch: Any) -> int:
    return len(batch["__key__"])


def _cache_counts(loader: Any) -> tuple[int, int]:
    stats = loader.stats()
    return stats.cache_hits, stats.cache_misses


def _hit_rate(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    hits, misses = after[0] - before[0], after[1] - before[1]
    return hits / (hits + misses) if hits + misses else None


@contextlib.contextmanager
def _emulated(
    s3: S3Config, latency_ms: float, bandwidth: float | None, connection_bandwidth: float | None = None
) -> Iterator[S3Config]:
    """``s3`` itself, or ``s3`` through a delaying proxy when latency or a bandwidth is set. The
    proxy (:mod:`fastfeed.testing.proxy`) runs in its own process, stopped by PID on exit."""
    if not latency_ms and not bandwidth and not connection_bandwidth:
        yield s3
        return
    if not s3.endpoint_url or not s3.endpoint_url.startswith("http://"):
        raise ConfigError(
            "--latency-ms / --bandwidth / --connection-bandwidth put a proxy in front of a plain-HTTP endpoint",
            hint="give --endpoint-url http://host:port (or use --demo)",
        )
    run_proxy = "import sys; from fastfeed.testing.proxy import main; sys.exit(main(sys.argv[1:]))"
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

    _check_device(cfg.device)
    decoder = _decoder(cfg)
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
        s3_run = stack.enter_context(_emulated(s3, cfg.latency_ms, cfg.bandwidth, cfg.connection_bandwidth))

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
        if decoder is not None:
            # Before the epochs: a dataset without images (or a missing Pillow) shows here, at once.
            # Its own dataset without the cache, which the cold epoch must find empty.
            head = StreamingDataset(url, s3=s3_run, part_size=prefetch.part_size, max_requests=prefetch.max_requests)
            report.ceilings[DECODE_CEILING] = measure_decode(
                first_samples(head, batch_size=cfg.batch_size), decoder, workers=cfg.workers, batch_size=cfg.batch_size
            )

        device = None if cfg.device == "cpu" else cfg.device
        loader: DataLoader[Any] = stack.enter_context(
            contextlib.closing(
                DataLoader(
                    ds,
                    batch_size=cfg.batch_size,
                    num_workers=cfg.workers,
                    persistent_workers=cfg.persistent_workers and cfg.workers > 0,
                    device=device,
                    collate_fn=decoder,
                )
            )
        )
        for epoch in range(cfg.epochs):
            name = f"fastfeed epoch {epoch}"
            ds.set_epoch(epoch)
            before = _cache_counts(loader)
            result = measure_batches(
                name,
                lambda: loader,
                size_of=_batch_bytes,
                count_of=_batch_count,
                step_s=cfg.step_ms / 1000,
                progress=progress(name, total) if progress else None,
                close=False,
            )
            result.cache_hit_rate = _hit_rate(before, _cache_counts(loader))
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


def _decoder(cfg: BenchConfig) -> Decoder | None:
    """The loader's ``collate_fn`` for ``cfg.decode`` (``None`` without)."""
    from fastfeed.decode import Decoder

    if not cfg.decode:
        if cfg.image_size is not None:
            raise ConfigError("--image-size applies to decoded images", hint="add --decode")
        return None
    return Decoder(image_size=cfg.image_size)


def _usable_cores() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def first_samples(
    dataset: Any,
    *,
    batch_size: int = 64,
    max_samples: int = DECODE_CEILING_SAMPLES,
    max_bytes: int = DECODE_CEILING_BYTES,
) -> list[dict[str, Any]]:
    """The first ``max_samples`` samples of ``dataset`` (a :class:`~fastfeed.StreamingDataset`;
    fewer if they reach ``max_bytes`` stored bytes first), with ``bytes`` values.

    The dataset is iterated in one :class:`fastfeed.DataLoader` worker process, so the reads
    still in flight when it stops end with that process (a read stopped early in this process
    made the demo's SeaweedFS wait for them at shutdown)."""
    from fastfeed.loader.dataloader import DataLoader

    samples: list[dict[str, Any]] = []
    nbytes = 0
    loader: DataLoader[Any]
    with DataLoader(dataset, batch_size=max(1, min(batch_size, max_samples)), num_workers=1, collate_fn=list) as loader:
        for batch in loader:
            for sample in batch:
                samples.append(sample)
                nbytes += sum(len(v) for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes))
                if len(samples) >= max_samples or nbytes >= max_bytes:
                    return samples
    return samples


def measure_decode(
    samples: Sequence[dict[str, Any]],
    decoder: Decoder,
    *,
    workers: int,
    batch_size: int,
    repeats: int = 3,
) -> Measurement:
    """The decode ceiling: ``samples`` (already read, e.g. by :func:`first_samples`) decoded and
    collated by ``decoder`` in batches of ``batch_size`` in this process, single-threaded and
    timed: the fastest of ``repeats`` passes, after one untimed batch of one sample (imports,
    codec set-up).

    The figure is that single-core rate times the loader's decoding processes: its workers (the
    main process when ``workers`` is 0), at most the cores this process may use. The
    :class:`Measurement` counts the samples and stored bytes those processes decode in the
    measured time; ``extra`` keeps the single-core figures.
    """
    if not samples:
        raise ConfigError("the decode ceiling found no samples in the dataset")
    nbytes = sum(
        len(v) for s in samples for k, v in s.items() if not k.startswith("__") and isinstance(v, bytes | bytearray)
    )
    decoder(samples[:1])  # warm-up: lazy imports (Pillow), codec tables
    step = max(1, batch_size)
    passes: list[tuple[float, float]] = []
    for _ in range(max(1, repeats)):
        cpu0 = time.thread_time()
        t0 = time.perf_counter()
        for start in range(0, len(samples), step):
            decoder(samples[start : start + step])
        passes.append((time.perf_counter() - t0, time.thread_time() - cpu0))
    seconds, cpu_s = min(passes)  # a ceiling: the pass least disturbed by the rest of the machine
    cores = _usable_cores()
    parallel = max(1, min(workers, cores))
    who = f"{parallel} worker{'s' if parallel != 1 else ''}" if workers else "main process"
    if workers > cores:
        who = f"{parallel} cores"
    per_core = len(samples) / seconds if seconds > 0 else 0.0
    log.info("decode ceiling: %d samples in %.3f s on one core (%.0f samples/s)", len(samples), seconds, per_core)
    return Measurement(
        f"decode ceiling ({who})",
        len(samples) * parallel,
        nbytes * parallel,
        seconds,
        0.0,
        cpu_s * parallel,
        extra={
            "decoded_samples": len(samples),
            "decoded_bytes": nbytes,
            "passes_s": [p[0] for p in passes],
            "per_core_samples_per_s": per_core,
            "processes": parallel,
            "workers": workers,
            "cores": cores,
        },
    )


def _check_device(device: str) -> None:
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


# ---------------------------------------------------------------------- demo

#: The members of each synthetic sample: random bytes, or (``--decode``) a noise JPEG.
DEMO_EXTENSIONS = ("bin", "cls", "json")
DEMO_DECODE_EXTENSIONS = ("jpg", "cls", "json")


@contextlib.contextmanager
def demo_dataset(
    size: int,
    sample_size: int,
    shard_size: int,
    *,
    extensions: Sequence[str] = DEMO_EXTENSIONS,
    say: Callable[[str], None] = lambda _: None,
) -> Iterator[tuple[str, S3Config, dict[str, Any]]]:
    """A local SeaweedFS on 127.0.0.1 with a synthetic dataset; yields ``(url, s3, setup)`` and
    stops the server (by PID) and removes everything on exit, also on errors.

    ``extensions``: the members of each sample (:func:`fastfeed.testing.shards.write_synthetic_shards`);
    with ``"jpg"``, each sample has a noise JPEG of about ``sample_size`` bytes."""
    from fastfeed.testing.servers import SeaweedServer
    from fastfeed.testing.shards import upload_dir, write_synthetic_shards

    per_shard = max(1, shard_size // sample_size)
    num_shards = max(1, size // (per_shard * sample_size))
    with (
        tempfile.TemporaryDirectory(prefix="fastfeed-demo-") as tmp,
        # Its data is thrown away: no point in waiting long for a clean stop (SeaweedFS
        # sometimes takes over 10 s to act on SIGTERM; then it is killed).
        SeaweedServer(Path(tmp) / "store", stop_timeout=3.0) as server,
    ):
        say(f"local S3 endpoint (SeaweedFS): {server.endpoint_url}  [started in {server.start_seconds or 0:.1f}s]")
        t0 = time.perf_counter()
        paths = write_synthetic_shards(
            Path(tmp) / "shards",
            num_shards=num_shards,
            samples_per_shard=per_shard,
            sample_bytes=sample_size,
            extensions=tuple(extensions),
        )
        written = time.perf_counter() - t0
        client = server.client()
        client.create_bucket(Bucket="demo")
        t0 = time.perf_counter()
        upload_dir(client, "demo", Path(tmp) / "shards", prefix="train/")
        uploaded = time.perf_counter() - t0
        total = sum(p.stat().st_size for p in paths)
        members = "" if tuple(extensions) == DEMO_EXTENSIONS else f" ({', '.join(extensions)})"
        say(
            f"synthetic dataset: {num_shards} shards x {per_shard} samples x {format_size(sample_size)}{members}"
            f" = {format_size(total)} (written in {written:.1f}s, uploaded in {uploaded:.1f}s)"
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
        setup = {
            "store": "SeaweedFS (weed mini) on 127.0.0.1",
            "num_shards": num_shards,
            "samples_per_shard": per_shard,
            "sample_bytes": sample_size,
            "dataset_bytes": total,
            "extensions": list(extensions),
        }
        yield "s3://demo/train/", s3, setup


def demo(
    cfg: BenchConfig,
    *,
    size: int,
    sample_size: int,
    shard_size: int,
    progress: Progress | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Report:
    """:func:`run` on a synthetic dataset in a local S3 server started (and stopped) here."""
    _check_device(cfg.device)  # before anything is started
    _decoder(cfg)  # --image-size without --decode fails here too
    extensions = DEMO_DECODE_EXTENSIONS if cfg.decode else DEMO_EXTENSIONS
    with demo_dataset(size, sample_size, shard_size, extensions=extensions, say=say) as (url, s3, setup):
        report = run(url, s3, cfg, progress=progress, setup=setup)
    report.setup["peak_rss_bytes"] = peak_rss_bytes()
    return report
