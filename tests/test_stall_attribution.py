"""Rolling loader statistics (rates, wait percentiles) and the cross-rank straggler report, with
real gloo process groups where one rank is slowed on purpose."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import default_collate

import fastfeed
from fastfeed import DataLoader
from fastfeed.testing.servers import free_port


class SlowCollate:
    """torch's default_collate, ``seconds`` slower per batch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, batch: list[Any]) -> Any:
        time.sleep(self.seconds)
        return default_collate(batch)


def _run(loader: DataLoader, step_s: float) -> int:
    n = 0
    for _ in loader:
        time.sleep(step_s)
        n += 1
    return n


def test_a_loop_bound_by_its_step_waits_little() -> None:
    loader = DataLoader(list(range(400)), batch_size=8)
    batches = _run(loader, step_s=0.01)
    s = loader.stats()
    assert s.recent_batches == batches == 50 and s.bound_by() == "step"
    assert s.wait_fraction < 0.05 and s.wait_p50_s <= s.wait_p99_s
    assert 40 < s.batches_per_s < 110 and s.samples_per_s == pytest.approx(8 * s.batches_per_s)


def test_a_loop_bound_by_its_collate_names_it() -> None:
    loader = DataLoader(list(range(160)), batch_size=8, collate_fn=SlowCollate(0.02))
    _run(loader, step_s=0.0)
    s = loader.stats()
    assert s.bound_by() == "collate" and s.wait_fraction > 0.8
    assert 0.015 < s.wait_p50_s < 0.2 and s.batches_per_s < 60


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        slow = rank == 1
        loader = DataLoader(list(range(240)), batch_size=8, collate_fn=SlowCollate(0.03 if slow else 0.0))
        _run(loader, step_s=0.0 if slow else 0.03)
        report = fastfeed.stats.gather(loader)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"summary": report.summary(), **report.as_dict()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_names_the_slow_rank_and_its_stage(tmp_path: Path) -> None:
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0] == reports[1]  # every rank gets the whole picture
    report = reports[0]
    assert report["slowest_rank"] == 1
    bound = {r["rank"]: r["bound_by"] for r in report["ranks"]}
    assert bound == {0: "step", 1: "collate"}
    assert report["summary"].startswith("rank 1 waits for data") and "bound by collate" in report["summary"]


def test_without_a_process_group_it_reports_this_process() -> None:
    loader = DataLoader(torch.arange(64), batch_size=8)
    _run(loader, step_s=0.0)
    report = fastfeed.stats.gather(loader)
    assert [r.rank for r in report.ranks] == [0] and report.slowest.stats.batches == 8
    assert "rank 0 waits for data" in report.summary()


def test_the_plain_loop_monitor_logs_every_n_steps() -> None:
    loader = DataLoader(list(range(160)), batch_size=8, collate_fn=SlowCollate(0.005))
    logged: list[tuple[dict[str, float], str]] = []
    monitor = fastfeed.stats.StallMonitor(loader, every_n_steps=5, log=lambda m, text: logged.append((m, text)))
    reports = [monitor.step() for _ in loader]
    assert [i for i, r in enumerate(reports) if r is not None] == [4, 9, 14, 19] and len(logged) == 4
    metrics, text = logged[-1]
    assert metrics["data/slowest_rank"] == 0.0 and 0.0 < metrics["data/wait_fraction"] <= 1.0
    assert metrics["data/wait_fraction/rank0"] == metrics["data/wait_fraction"] and text.startswith("rank 0 waits")
    with pytest.raises(fastfeed.ConfigError):
        fastfeed.stats.StallMonitor(loader, every_n_steps=0)


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
@pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*")  # Lightning's, with torch 2.13
def test_the_lightning_callback_logs_to_the_trainers_logger(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from fastfeed.lightning import FastfeedStallLogger

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(torch.randn(64, 4), batch_size=4, collate_fn=SlowCollate(0.002))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.net(batch).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callback = FastfeedStallLogger(every_n_steps=4)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=CSVLogger(str(tmp_path)), callbacks=[callback],
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(Tiny())
    assert callback.last is not None and callback.last.slowest.stats.batches >= 12
    (metrics_csv,) = list(tmp_path.rglob("metrics.csv"))
    header = metrics_csv.read_text().splitlines()[0].split(",")
    assert {"data/wait_fraction", "data/wait_p99_s", "data/slowest_rank", "data/wait_fraction/rank0"} <= set(header)
