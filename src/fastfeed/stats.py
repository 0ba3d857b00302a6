"""Which rank waits for data, and why: :func:`gather` over ``torch.distributed``.

In a data-parallel job every rank waits at each step's all-reduce for the slowest one, so one
rank starved of data slows them all, and from any one rank it looks like a slow step.
:func:`gather` collects every rank's :class:`~fastfeed.LoaderStats` (a collective: call it on
every rank at the same step) and names the straggler: the rank whose loop waits for data the
largest fraction of the time, with the loader stage that bounds it::

    if step % 500 == 0:
        report = fastfeed.stats.gather(loader)
        if dist.get_rank() == 0:
            log.info(report.summary())
            # rank 3 waits for data 41% of the time (p50 12 ms, p99 230 ms per batch), bound by
            # fetch (38 ms per batch); the other 7 ranks wait at most 2% (bound by their step)

Without an initialized process group it reports this process alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fastfeed.loader.stats import LoaderStats

__all__ = ["RankStats", "StallMonitor", "StallReport", "gather", "metrics"]


@dataclass(frozen=True)
class RankStats:
    """One rank's loader counters and what bounds its loop."""

    rank: int
    stats: LoaderStats
    bound_by: str

    def per_batch_s(self, stage: str) -> float:
        """Seconds per batch that ``stage`` (``fetch``, ``parse``, ...) took on this rank."""
        batches = self.stats.batches or 1
        return float(getattr(self.stats, f"{stage}_s")) / batches


@dataclass(frozen=True)
class StallReport:
    """Every rank's :class:`RankStats` and the slowest one (see :func:`gather`)."""

    ranks: list[RankStats]

    @property
    def slowest(self) -> RankStats:
        """The rank whose training loop waits for data the largest fraction of the time."""
        return max(self.ranks, key=lambda r: (r.stats.wait_fraction, r.stats.wait_p99_s))

    def summary(self) -> str:
        """One line a person reads: the straggler, how long it waits, and what bounds it."""
        worst = self.slowest
        s = worst.stats
        text = (
            f"rank {worst.rank} waits for data {s.wait_fraction:.0%} of the time "
            f"(p50 {1000 * s.wait_p50_s:.0f} ms, p99 {1000 * s.wait_p99_s:.0f} ms per batch)"
        )
        if worst.bound_by == "step":
            text += ", bound by its training step: the data keeps up"
        else:
            text += f", bound by {worst.bound_by} ({1000 * worst.per_batch_s(worst.bound_by):.0f} ms per batch)"
        others = [r for r in self.ranks if r is not worst]
        if others:
            most = max(r.stats.wait_fraction for r in others)
            step_bound = sum(r.bound_by == "step" for r in others)
            text += (
                f"; the other {len(others)} rank{'s' if len(others) != 1 else ''} wait at most {most:.0%}"
                f" ({step_bound} bound by their step)"
            )
        return text

    def as_dict(self) -> dict[str, Any]:
        """For loggers and JSON: per rank, the counters and the bounding stage."""
        return {
            "slowest_rank": self.slowest.rank,
            "ranks": [{"rank": r.rank, "bound_by": r.bound_by, **r.stats.as_dict()} for r in self.ranks],
        }


def gather(loader: Any, group: Any = None) -> StallReport:
    """Every rank's loader statistics and the straggler among them.

    A collective over ``group`` (the default process group) when ``torch.distributed`` is
    initialized: call it on every rank at the same point. ``loader`` is a
    :class:`fastfeed.DataLoader` (or anything with a ``stats()`` giving
    :class:`~fastfeed.LoaderStats`), or the stats themselves.
    """
    import torch.distributed as dist

    stats = loader if isinstance(loader, LoaderStats) else loader.stats()
    mine = dataclasses.asdict(stats)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine, group=group)
        ranks = [dist.get_global_rank(group, i) if group is not None else i for i in range(world)]
    else:
        gathered, ranks = [mine], [0]
    out = []
    for rank, values in zip(ranks, gathered, strict=True):
        s = LoaderStats(**values)
        out.append(RankStats(rank, s, s.bound_by()))
    return StallReport(out)


def metrics(report: StallReport, prefix: str = "data/") -> dict[str, float]:
    """The numbers of ``report`` a logger takes (TensorBoard scalars, CSV columns): the
    slowest rank, its wait fraction, wait percentiles and rate, and every rank's wait fraction."""
    worst = report.slowest
    out = {
        f"{prefix}slowest_rank": float(worst.rank),
        f"{prefix}wait_fraction": worst.stats.wait_fraction,
        f"{prefix}wait_p50_s": worst.stats.wait_p50_s,
        f"{prefix}wait_p99_s": worst.stats.wait_p99_s,
        f"{prefix}batches_per_s": worst.stats.batches_per_s,
    }
    for r in report.ranks:
        out[f"{prefix}wait_fraction/rank{r.rank}"] = r.stats.wait_fraction
    return out


class StallMonitor:
    """For a plain training loop: every ``every_n_steps`` calls of :meth:`step`, gather the ranks'
    loader statistics (:func:`gather`, a collective: call ``step()`` on every rank each step)
    and hand :func:`metrics` and the summary to ``log`` (on rank 0 only by default)::

        monitor = fastfeed.stats.StallMonitor(loader, 500, log=lambda m, text: writer.add_scalars("data", m, step))
        for step, batch in enumerate(loader):
            ...
            monitor.step()
    """

    def __init__(
        self,
        loader: Any,
        every_n_steps: int = 100,
        log: Any = None,
        *,
        all_ranks: bool = False,
        prefix: str = "data/",
    ) -> None:
        if every_n_steps < 1:
            from fastfeed.errors import ConfigError

            raise ConfigError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.loader = loader
        self.every_n_steps = every_n_steps
        self.log = log
        self.all_ranks = all_ranks
        self.prefix = prefix
        self.steps = 0
        #: The last report gathered (None before the first).
        self.last: StallReport | None = None

    def step(self) -> StallReport | None:
        """Count a training step; every ``every_n_steps`` steps gather, log and return the report."""
        self.steps += 1
        if self.steps % self.every_n_steps:
            return None
        report = self.last = gather(self.loader)
        if self.log is not None and (self.all_ranks or _rank() == 0):
            self.log(metrics(report, self.prefix), report.summary())
        return report


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
