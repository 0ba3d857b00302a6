"""The report of one ``fastfeed bench`` run: every :class:`~fastfeed.bench.measure.Measurement`
(ceilings, fastfeed's epochs, the peers), the checkpoint round and what was skipped.

:class:`Report` renders the plain-text table, the JSON and the throughput plot, and checks
fastfeed's performance targets (:class:`Target`) against this run's ratios, saying plainly
which were missed. :mod:`fastfeed.bench.run` fills it; nothing here measures.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastfeed.bench.measure import Measurement
from fastfeed.config import format_size
from fastfeed.errors import ConfigError

__all__ = ["DECODE_CEILING", "Report", "Target"]

#: Key of the decode ceiling in :attr:`Report.ceilings` (its name says the workers it assumes).
DECODE_CEILING = "decode"


@dataclass
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
        phases = () if self.config.get("decode") else (("cold", "raw GET", 0.8, 1.5), ("warm", "raw read", 0.8, 1.5))
        for phase, ceiling, ratio_min, peer_min in phases:
            run, top = self._fastfeed(phase), self.ceilings.get(ceiling)
            if run is not None and top is not None:
                out.append(Target(f"{phase} epoch / {ceiling} ceiling", _ratio(run, top), ratio_min, ">="))
                if phase == "cold" and top.cpu_s_per_gib > 0 and run.cpu_s_per_gib > 0:
                    # The client CPU a GiB costs, next to the bare GETs' (the store shares the cores).
                    cpu = run.cpu_s_per_gib / top.cpu_s_per_gib
                    out.append(Target("cold epoch CPU per GiB / raw GET's", cpu, 1.5, "<="))
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
            f"{'p50 ms':>7} {'p99 ms':>7} {'wait':>6} {'hit':>5} {'CPU s/GiB':>9} {'peak PSS':>9}"
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
            # The loader's whole process tree (its workers too), shared pages counted once.
            rss = format_size(r.peak_tree_pss_bytes) if r.peak_tree_pss_bytes else "-"
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
        lines.extend(self._bound_notes())
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

    def _bound_notes(self) -> list[str]:
        """What bounded each fastfeed epoch's loop: the step (it waited for data under 5 % of
        the time) or the loader stage with the most seconds (as ``loader.stats().bound_by()``)."""
        runs = [r for r in self.runs if "bound_by" in r.extra]
        if not runs:
            return []
        parts = []
        for r in runs:
            stage = r.extra["bound_by"]
            what = "the training step" if stage == "step" else f"{stage} ({r.wait_fraction:.0%} of the loop waiting)"
            parts.append(f"{r.name}: {what}")
        return ["", "what bounds fastfeed's loop: " + "; ".join(parts)]

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
