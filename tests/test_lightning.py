"""fastfeed.lightning.FastfeedCheckpoint: real Lightning Trainers on the CPU, checkpoints to a local
directory and to the real local S3 server; a run stopped (or crashed) and resumed ends with the
parameters of an uninterrupted run, bit for bit."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl

import fastfeed
from fastfeed.checkpoint.checkpointer import Checkpointer
from fastfeed.config import S3Config
from fastfeed.errors import CheckpointError, ConfigError
from fastfeed.lightning import FastfeedCheckpoint, _sharded_reason, load_checkpoint

pytestmark = [
    # Lightning's own warnings about this setup (tiny CPU runs, a sized iterable dataset, its
    # use of a torch pytree API that torch deprecates); not about fastfeed.
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore:.*You're resuming from a checkpoint that ended before the epoch ended.*"),
]

BATCH = 20
STREAMS = 2


def s3_config(bucket: Any) -> S3Config:
    return S3Config(
        endpoint_url=bucket.server.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
    )


@pytest.fixture(params=["local", "s3"])
def target(request: Any, tmp_path: Path) -> Iterator[Any]:
    """``make(name) -> (url, s3)``: checkpoint locations in a local directory or a fresh bucket."""
    if request.param == "local":
        yield lambda name: (str(tmp_path / "ckpt" / name), None)
    else:
        bucket = request.getfixturevalue("bucket")
        yield lambda name: (f"s3://{bucket.name}/runs/{name}/", s3_config(bucket))


class Net(pl.LightningModule):
    """Linear + dropout + Linear over a fastfeed.DataLoader of a shuffled StreamingDataset."""

    def __init__(self, shards: str, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(32, 4)
        )
        self.seen: list[tuple[int, list[str]]] = []  # (global_step, sample keys) of each step
        self.loader: fastfeed.DataLoader | None = None

    def train_dataloader(self) -> fastfeed.DataLoader:
        ds = fastfeed.StreamingDataset(self.hparams["shards"], shuffle=True, seed=3, shuffle_buffer=40)
        self.loader = fastfeed.DataLoader(ds, batch_size=BATCH, num_streams=STREAMS)
        return self.loader

    def on_train_epoch_start(self) -> None:
        assert self.loader is not None
        self.loader.dataset.set_epoch(self.current_epoch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.global_step, list(batch["__key__"])))
        x = batch["bin"].data.view(-1, 1024)[:, :16].float() / 255.0
        y = batch["cls"].to_ints() % 4
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)]


class Crash(pl.Callback):
    """Raises at the end of training step ``at`` (after the checkpoint callback ran)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError(f"simulated crash at step {self.at}")


def seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def train(
    module: pl.LightningModule, cb: FastfeedCheckpoint, root: Path, *, extra: list[pl.Callback] | None = None, **kw: Any
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=[cb, *(extra or [])],
        **kw,
    )
    try:
        trainer.fit(module)
    finally:
        loader = getattr(module, "loader", None)
        if loader is not None:
            loader.close()
    return trainer


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_saves_at_the_configured_steps_and_epochs_and_keeps_the_last(
    target: Any, shard_dir: Path, tmp_path: Path
) -> None:
    every, epochs = 4, 2
    results = {}
    for keep_last in (None, 2):
        url, s3 = target(f"keep-{keep_last}")
        seed()
        model = Net(str(shard_dir))
        cb = FastfeedCheckpoint(
            url, every_n_train_steps=every, every_n_epochs=1, keep_last=keep_last, s3=s3, metadata={"run": "a"}
        )
        trainer = train(model, cb, tmp_path, max_epochs=epochs)
        assert cb.checkpointer is None and cb.last_save is not None and cb.last_save.done()  # waited, closed
        per_epoch = trainer.num_training_batches
        assert per_epoch == len(model.seen) // epochs and trainer.global_step == per_epoch * epochs
        expected = sorted({s for s in range(1, trainer.global_step + 1) if s % every == 0 or s % per_epoch == 0})
        with Checkpointer(url, s3=s3) as ckpt:
            infos = ckpt.list()
        results[keep_last] = [i.step for i in infos]
        assert results[keep_last] == (expected if keep_last is None else expected[-keep_last:])
        for info in infos:
            assert info.metadata["global_step"] == info.step and info.metadata["run"] == "a"
            assert info.metadata["epoch"] == (info.step - 1) // per_epoch
        # The newest checkpoint is Lightning's own dictionary of the final state, without pickle.
        state = load_checkpoint(url, s3=s3)
        assert state["global_step"] == trainer.global_step and state["epoch"] == epochs - 1
        final = model.state_dict()
        assert list(state["state_dict"]) == list(final)
        assert all(torch.equal(state["state_dict"][k], final[k]) for k in final)
        assert type(state["hyper_parameters"]) is dict and state["hyper_parameters"]["shards"] == str(shard_dir)
        assert len(state["optimizer_states"]) == 1 and len(state["lr_schedulers"]) == 1
        assert "rng" in state["callbacks"]["FastfeedCheckpoint"]
    assert len(results[None]) > 2  # so that retention had something to delete


def test_a_run_stopped_after_an_epoch_resumes_bit_identical(target: Any, shard_dir: Path, tmp_path: Path) -> None:
    epochs, stop_after = 3, 1
    ref_url, s3 = target("reference")
    seed()
    reference = Net(str(shard_dir))
    cb = FastfeedCheckpoint(ref_url, s3=s3)  # every epoch by default
    train(reference, cb, tmp_path, max_epochs=epochs)
    assert cb.resumed_from is None  # nothing under the URL: a fresh start
    per_epoch = len(reference.seen) // epochs

    url, s3 = target("stopped")
    seed()
    first = Net(str(shard_dir))
    train(first, FastfeedCheckpoint(url, s3=s3), tmp_path, max_epochs=stop_after)
    assert not identical(params(first), params(reference))

    seed()  # a new process would start from the same seed, and build the same fresh model
    resumed = Net(str(shard_dir))
    cb = FastfeedCheckpoint(url, s3=s3)
    trainer = train(resumed, cb, tmp_path, max_epochs=epochs)
    assert cb.resumed_from is not None and cb.resumed_from.step == stop_after * per_epoch
    assert trainer.global_step == reference.seen[-1][0] + 1
    # Exactly the remaining steps ran, on exactly the batches the uninterrupted run had.
    assert resumed.seen == reference.seen[stop_after * per_epoch :]
    assert identical(params(resumed), params(reference)), "the resumed run must end bit-identical"
    with Checkpointer(url, s3=s3) as ckpt:
        assert [i.step for i in ckpt.list()] == [per_epoch * (e + 1) for e in range(epochs)]


@pytest.mark.parametrize(("every", "crash_at"), [(3, 7), (5, 12)], ids=["mid-epoch", "after-last-batch"])
def test_a_crashed_run_resumes_mid_epoch_bit_identical(
    every: int, crash_at: int, shard_dir: Path, tmp_path: Path
) -> None:
    epochs = 2
    seed()
    reference = Net(str(shard_dir))
    train(reference, FastfeedCheckpoint(tmp_path / "ref", every_n_train_steps=every), tmp_path, max_epochs=epochs)
    per_epoch = len(reference.seen) // epochs
    saved = crash_at // every * every
    # mid-epoch resumes inside epoch 0; the other from the checkpoint of epoch 0's last batch.
    assert (saved % per_epoch != 0) == (crash_at < per_epoch)

    url = tmp_path / "run"
    seed()
    crashed = Net(str(shard_dir))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            crashed,
            FastfeedCheckpoint(url, every_n_train_steps=every),
            tmp_path,
            extra=[Crash(crash_at)],
            max_epochs=epochs,
        )
    assert len(crashed.seen) == crash_at
    with Checkpointer(url) as ckpt:
        assert [i.step for i in ckpt.list()][-1] == saved

    seed()
    resumed = Net(str(shard_dir))
    cb = FastfeedCheckpoint(url, every_n_train_steps=every)
    train(resumed, cb, tmp_path, max_epochs=epochs)
    assert cb.resumed_from is not None and cb.resumed_from.step == saved
    assert resumed.seen == reference.seen[saved:]
    assert identical(params(resumed), params(reference))


class UploadProbe(pl.Callback):
    """Records, at the start of each training batch, whether the latest save has committed."""

    def __init__(self, cb: FastfeedCheckpoint) -> None:
        self.cb = cb
        self.done_at_batch_start: dict[int, bool] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.cb.last_save is not None:
            self.done_at_batch_start[trainer.global_step] = self.cb.last_save.done()


def test_training_goes_on_while_the_upload_runs(bucket: Any, fault_proxy: Any, shard_dir: Path, tmp_path: Path) -> None:
    fault_proxy.set_latency(200)  # every request to the store takes 0.2 s or more
    s3 = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
    )
    url = f"s3://{bucket.name}/runs/slow/"
    seed()
    model = Net(str(shard_dir))
    cb = FastfeedCheckpoint(url, every_n_train_steps=5, s3=s3)
    probe = UploadProbe(cb)
    train(model, cb, tmp_path, extra=[probe], max_steps=10)
    # The next step started while the checkpoint of step 5 was still uploading.
    assert probe.done_at_batch_start[5] is False
    assert cb.last_save is not None and cb.last_save.done()  # fit() waited for the last one
    with Checkpointer(url, s3=s3) as ckpt:
        assert [i.step for i in ckpt.list()] == [5, 10]


def test_every_seconds_saves_on_the_first_batch_due(shard_dir: Path, tmp_path: Path) -> None:
    url = tmp_path / "timed"
    seed()
    model = Net(str(shard_dir))
    train(model, FastfeedCheckpoint(url, every_seconds=1e-9), tmp_path, max_steps=4)
    with Checkpointer(url) as ckpt:
        assert [i.step for i in ckpt.list()] == [1, 2, 3, 4]
    seed()
    url = tmp_path / "hourly"
    train(Net(str(shard_dir)), FastfeedCheckpoint(url, every_seconds=3600), tmp_path, max_steps=4)
    with Checkpointer(url) as ckpt:
        assert ckpt.list() == []


class TensorNet(pl.LightningModule):
    """The same shape of model over torch's own DataLoader (shuffled from the global generator)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
        self.seen: list[torch.Tensor] = []

    def train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(60, 8, generator=g), torch.randn(60, 1, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=12, shuffle=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append(x.clone())
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_torch_dataloader_resumes_bit_identical_at_epoch_boundaries(tmp_path: Path) -> None:
    seed()
    reference = TensorNet()
    train(reference, FastfeedCheckpoint(tmp_path / "ref"), tmp_path, max_epochs=3)
    seed()
    train(TensorNet(), FastfeedCheckpoint(tmp_path / "run"), tmp_path, max_epochs=2)
    seed()
    resumed = TensorNet()
    cb = FastfeedCheckpoint(tmp_path / "run")
    train(resumed, cb, tmp_path, max_epochs=3)
    per_epoch = len(reference.seen) // 3
    assert cb.resumed_from is not None and cb.resumed_from.step == 2 * per_epoch
    # The order of the resumed epoch is drawn from the restored global generator.
    assert len(resumed.seen) == per_epoch
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, reference.seen[2 * per_epoch :], strict=True))
    assert identical(params(resumed), params(reference))


class Pairs(torch.utils.data.Dataset[dict[str, Any]]):
    """A small map-style dataset of (x, y) pairs, with each sample's index."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(60, 8, generator=g), torch.randn(60, 1, generator=g)

    def __len__(self) -> int:
        return 60

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"i": i, "x": self.x[i], "y": self.y[i]}


class MapNet(pl.LightningModule):
    """The same shape of model over a shuffled fastfeed.DataLoader of a map-style dataset (its
    own generator, seeded from the global one when the loader is built)."""

    def __init__(self, workers: int) -> None:
        super().__init__()
        self.workers = workers
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
        self.seen: list[list[int]] = []
        self.loader: fastfeed.DataLoader | None = None

    def train_dataloader(self) -> fastfeed.DataLoader:
        self.loader = fastfeed.DataLoader(Pairs(), batch_size=12, shuffle=True, num_workers=self.workers)
        return self.loader

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["i"].tolist())
        return torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shuffled_map_style_fastfeed_loader_resumes_bit_identical(workers: int, tmp_path: Path) -> None:
    """Lightning probes the loader with an iter() it drops, loads its state, and (after a
    checkpoint at the end of an epoch) this callback replays the saved epoch: the orders of the
    resumed epochs must be the uninterrupted run's, mid-epoch and at epoch boundaries."""
    seed()
    reference = MapNet(workers)
    train(reference, FastfeedCheckpoint(tmp_path / "ref"), tmp_path, max_epochs=3)
    per_epoch = len(reference.seen) // 3
    assert per_epoch == 5 and reference.seen[:per_epoch] != reference.seen[per_epoch : 2 * per_epoch]
    seed()
    train(MapNet(workers), FastfeedCheckpoint(tmp_path / "epoch"), tmp_path, max_epochs=1)
    seed()
    resumed = MapNet(workers)
    cb = FastfeedCheckpoint(tmp_path / "epoch")
    train(resumed, cb, tmp_path, max_epochs=3)
    assert cb.resumed_from is not None and cb.resumed_from.step == per_epoch
    assert resumed.seen == reference.seen[per_epoch:]
    assert identical(params(resumed), params(reference))

    seed()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            MapNet(workers),
            FastfeedCheckpoint(tmp_path / "crash", every_n_train_steps=3),
            tmp_path,
            extra=[Crash(8)],
            max_epochs=3,
        )
    seed()
    resumed = MapNet(workers)
    cb = FastfeedCheckpoint(tmp_path / "crash", every_n_train_steps=3)
    train(resumed, cb, tmp_path, max_epochs=3)
    assert cb.resumed_from is not None and cb.resumed_from.step == 6  # inside epoch 1
    assert resumed.seen == reference.seen[6:]
    assert identical(params(resumed), params(reference))


class BlockStep(pl.Callback):
    """Puts a file where the checkpoint of step ``step`` must go, so that its upload fails."""

    def __init__(self, url: Path, step: int) -> None:
        self.url, self.step = url, step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step - 1:
            self.url.mkdir(parents=True, exist_ok=True)  # the first save may still be on its way
            (self.url / f"step-{self.step:012d}").write_bytes(b"in the way")


def test_a_failed_background_save_fails_the_run(shard_dir: Path, tmp_path: Path) -> None:
    url = tmp_path / "run"
    seed()
    model = Net(str(shard_dir))
    cb = FastfeedCheckpoint(url, every_n_train_steps=2)
    with pytest.raises(CheckpointError, match=r"step 4|earlier checkpoint save failed"):
        train(model, cb, tmp_path, extra=[BlockStep(url, 4)], max_epochs=1)
    assert cb.checkpointer is None  # closed (the leak check would catch its thread otherwise)
    assert len(model.seen) < 10  # raised by the next save, not only at the end of training
    with Checkpointer(url) as ckpt:
        assert [i.step for i in ckpt.list()] == [2]  # the earlier checkpoint is intact


def test_options_are_checked_at_construction(tmp_path: Path) -> None:
    url = tmp_path / "ckpt"
    for kwargs in ({"every_n_train_steps": 0}, {"every_n_epochs": -1}, {"every_seconds": 0}, {"keep_last": 0}):
        with pytest.raises(ConfigError):
            FastfeedCheckpoint(url, **kwargs)
    with pytest.raises(ConfigError, match="on_busy"):
        FastfeedCheckpoint(url, on_busy="later")
    with pytest.raises(TypeError):
        FastfeedCheckpoint(url, metadata={"x": object()})
    cb = FastfeedCheckpoint(url)
    assert cb.every_n_epochs == 1 and cb.every_n_train_steps is None  # the default when no trigger is given
    assert not url.exists() and cb.checkpointer is None  # storage is opened in setup(), not here


def test_sharded_strategies_are_refused() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    assert _sharded_reason(FSDPStrategy(state_dict_type="sharded")) is not None
    assert _sharded_reason(FSDPStrategy(state_dict_type="full")) is None
    assert _sharded_reason(DDPStrategy()) is None


def test_lightning_is_optional() -> None:
    code = "import sys, fastfeed; assert not {'lightning', 'pytorch_lightning'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    blocked = (
        "import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
        "try:\n    import fastfeed.lightning\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", blocked], check=True, timeout=120, capture_output=True, text=True)
    assert "pip install lightning" in out.stdout
