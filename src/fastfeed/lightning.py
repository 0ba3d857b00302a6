"""PyTorch Lightning integration: asynchronous checkpoints to object storage, and exact resume.

::

    from lightning.pytorch import Trainer
    from fastfeed.lightning import FastfeedCheckpoint

    cb = FastfeedCheckpoint("s3://bucket/runs/exp42/", every_n_train_steps=500, keep_last=3)
    trainer = Trainer(callbacks=[cb], enable_checkpointing=False)
    trainer.fit(model, train_loader)   # continues from the newest committed checkpoint, if any

Needs ``lightning`` (``pip install lightning`` or ``pip install 'fastfeed[lightning]'``); the
older ``pytorch_lightning`` package is used when ``lightning`` is not installed. Importing
:mod:`fastfeed` never imports Lightning.

**What is saved.** Exactly what Lightning's own ``ModelCheckpoint`` would save (the dictionary
of ``trainer.save_checkpoint``: model, optimizers, LR schedulers, loop progress, precision
plugin, callback states, datamodule state, hyper-parameters, ``on_save_checkpoint`` additions),
plus, through this callback's own state, the torch (CPU and CUDA), numpy and Python random
states. A :class:`fastfeed.DataLoader` used as the train dataloader is part of Lightning's loop
state (Lightning saves the ``state_dict()`` of every stateful train dataloader), so a run stopped
mid-epoch resumes at the next batch; after a checkpoint taken at the end of an epoch, this
callback moves fastfeed loaders to the start of the next epoch (Lightning would not). With a
:class:`~fastfeed.StreamingDataset`, call ``ds.set_epoch(self.current_epoch)`` in the
LightningModule's ``on_train_epoch_start`` (Lightning does not). It is written through a
:class:`fastfeed.Checkpointer`: the
training step waits only for a memory snapshot, the upload runs in the background, and nothing
is pickled (mappings such as Lightning's ``AttributeDict`` are stored as plain dicts).

**When.** ``every_n_train_steps`` (at the end of a training batch whose optimizer step made
``trainer.global_step`` a multiple of it), ``every_n_epochs`` (at the end of the training epoch)
and ``every_seconds`` (at the end of the first training batch that many seconds after the
previous save), in any combination; every epoch if none is given. The checkpoint's step is
``trainer.global_step``; a step is saved at most once.

**Resume.** With ``resume=True`` (the default), ``fit()`` first loads the newest committed
checkpoint under the URL (corrupt or incomplete ones are skipped with a warning) and hands it to
Lightning's own restore path, exactly as ``fit(ckpt_path=...)`` would: the model, optimizers,
schedulers, loops (epoch, step, position in the epoch, dataloader state) and callbacks are
restored, and training continues where the checkpoint was taken. A ``ckpt_path`` passed to
``fit()`` takes precedence. Random states are restored before the train dataloader is created, and once more just before
the first training step when every train dataloader is a :class:`fastfeed.DataLoader`: an
iteration of one that resumes a saved position draws nothing (it replays the saved seeds and
sampler draws), and one that starts the next epoch is started after that restore, drawing what
the uninterrupted run drew, so dropout masks match too.

**Distributed training.** Every rank builds the Lightning checkpoint (some strategies gather
state collectively) and reads the checkpoint to resume, but only global rank 0 uploads. That is
complete for strategies whose checkpoint is the full state on rank 0: single device, DDP, and
``FSDPStrategy(state_dict_type="full")``. Sharded checkpoints (FSDP with
``state_dict_type="sharded"``, DeepSpeed, ``ModelParallelStrategy`` distributed checkpoints)
hold a different shard on every rank and are refused at ``setup`` with a
:class:`~fastfeed.errors.ConfigError`.

**Errors.** A failed background upload is raised by the next save, and at the end of training
(``on_train_end`` waits for the last upload); the previous committed checkpoint stays intact.
If training itself fails, pending uploads are finished (the snapshots were taken) and upload
errors are logged, not raised over the training error.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fastfeed.callbacks import capture_rng, restore_rng
from fastfeed.checkpoint.checkpointer import Checkpointer, CheckpointInfo, SaveHandle
from fastfeed.config import S3Config
from fastfeed.errors import CheckpointError, ConfigError, NotFoundError
from fastfeed.loader.dataloader import DataLoader

if TYPE_CHECKING:
    import lightning.pytorch as pl
else:
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError as exc:
            raise ImportError(
                "fastfeed.lightning needs PyTorch Lightning: pip install lightning "
                "(or pip install 'fastfeed[lightning]')"
            ) from exc

__all__ = ["FastfeedCheckpoint", "FastfeedStallLogger", "load_checkpoint"]

log = logging.getLogger(__name__)

_POLICIES = ("wait", "skip", "replace")
_STATE_VERSION = 1


class FastfeedCheckpoint(pl.Callback):
    """Save Lightning checkpoints to object storage in the background; resume from the newest.

    Args:
        url: ``s3://bucket/runs/exp42/`` or a local directory (``file://`` or a path).
        every_n_train_steps: save when ``trainer.global_step`` reaches a multiple of this.
        every_n_epochs: save at the end of every this many training epochs.
        every_seconds: save at the end of the first training batch this long after the last save.
            With none of the three, every epoch is saved.
        keep_last: keep only this many committed checkpoints (``None``: all).
        on_busy: what a save does while the previous one is still uploading: ``"wait"``,
            ``"skip"`` or ``"replace"`` (see :class:`~fastfeed.Checkpointer`).
        resume: at the start of ``fit()``, restore the newest committed checkpoint under ``url``
            (a fresh start when there is none).
        metadata: JSON values stored in every manifest (visible to ``Checkpointer.list()``
            without loading the data); each manifest also records ``epoch``, ``global_step``
            and the scalar ``trainer.callback_metrics``.
        s3, endpoint_url, part_size, max_concurrency: as for :class:`~fastfeed.Checkpointer`.

    The :class:`~fastfeed.Checkpointer` is opened in ``setup`` (so the callback can be pickled
    to spawned processes before) and closed at the end of ``fit()``; it is :attr:`checkpointer`
    in between.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        every_seconds: float | None = None,
        keep_last: int | None = None,
        on_busy: str = "wait",
        resume: bool = True,
        metadata: dict[str, Any] | None = None,
        s3: S3Config | None = None,
        endpoint_url: str | None = None,
        part_size: int | str = "32MiB",
        max_concurrency: int = 8,
    ) -> None:
        super().__init__()
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if every_seconds is not None and not every_seconds > 0:
            raise ConfigError(f"every_seconds must be > 0 or None, got {every_seconds!r}")
        if keep_last is not None and keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1 or None, got {keep_last}")
        if on_busy not in _POLICIES:
            raise ConfigError(f"on_busy={on_busy!r} is invalid", hint=f"use one of {', '.join(_POLICIES)}")
        if every_n_train_steps is None and every_n_epochs is None and every_seconds is None:
            every_n_epochs = 1
        self.url = os.fspath(url)
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.every_seconds = every_seconds
        self.keep_last = keep_last
        self.on_busy = on_busy
        self.resume = resume
        self.metadata = dict(metadata or {})
        json.dumps(self.metadata)  # fails now, not at the first save
        self.s3 = s3
        self.endpoint_url = endpoint_url
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        #: The open :class:`~fastfeed.Checkpointer` (between ``setup`` and the end of ``fit()``).
        self.checkpointer: Checkpointer | None = None
        #: The checkpoint this ``fit()`` resumed from (None: a fresh start, or ``fit(ckpt_path=...)``).
        self.resumed_from: CheckpointInfo | None = None
        #: The handle of the latest save started on this rank (None on ranks other than 0).
        self.last_save: SaveHandle | None = None
        self._last_saved_step: int | None = None
        self._last_time = time.monotonic()
        self._rng_to_restore: dict[str, Any] | None = None
        self._loader_states: list[Any] = []

    # ------------------------------------------------------------------ Lightning state

    def state_dict(self) -> dict[str, Any]:
        """This callback's part of a Lightning checkpoint: the random states (taken when the
        checkpoint is built, i.e. at the point training will resume from)."""
        return {"version": _STATE_VERSION, "rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the random states (Lightning calls this while restoring a checkpoint)."""
        rng = state_dict.get("rng")
        if rng is None:
            return
        restore_rng(rng)
        self._rng_to_restore = rng  # once more before the first step: see on_train_start

    # ------------------------------------------------------------------ lifetime

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Open the :class:`~fastfeed.Checkpointer` and, with ``resume``, load the newest checkpoint."""
        if stage != "fit":
            return
        reason = _sharded_reason(trainer.strategy)
        if reason is not None:
            raise ConfigError(
                f"FastfeedCheckpoint cannot save {reason}: every rank holds a different shard, and only rank 0 uploads",
                hint="use a strategy whose checkpoint is the full state on rank 0 (DDP, FSDPStrategy("
                "state_dict_type='full')), or Lightning's ModelCheckpoint",
            )
        if self.checkpointer is None:
            self.checkpointer = Checkpointer(
                self.url,
                keep_last=self.keep_last,
                on_busy=self.on_busy,
                part_size=self.part_size,
                max_concurrency=self.max_concurrency,
                s3=self.s3,
                endpoint_url=self.endpoint_url,
            )
        self.resumed_from = None
        self.last_save = None
        self._last_saved_step = None
        self._rng_to_restore = None
        self._loader_states = []
        if self.resume:
            self._load_for_resume(trainer)

    def _load_for_resume(self, trainer: pl.Trainer) -> None:
        assert self.checkpointer is not None
        try:
            state = self.checkpointer.load()
        except NotFoundError:
            log.info("no committed checkpoint under %s yet: training starts fresh", self.checkpointer.url)
            return
        info = self.checkpointer.loaded
        assert info is not None
        checkpoint = _as_lightning_checkpoint(state, info.url)
        # Lightning restores from the checkpoint its connector holds: fit() passes ckpt_path=None
        # on, which keeps it, and then restores the model, datamodule and callbacks (after this
        # hook), the precision plugin, loops, optimizers and schedulers, exactly as for a file.
        # A ckpt_path given to fit() replaces it.
        trainer._checkpoint_connector._loaded_checkpoint = checkpoint
        self.resumed_from = info
        self._last_saved_step = info.step
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        if fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch"):
            # Taken after the last batch of an epoch: see _start_next_epoch.
            self._loader_states = list(fit_loop.get("state_dict", {}).get("combined_loader") or [])
        log.info("resuming from the checkpoint of step %d (epoch %s) at %s", info.step, checkpoint["epoch"], info.url)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_time = time.monotonic()
        if trainer.ckpt_path:
            if self.resumed_from is not None:
                log.info("fit(ckpt_path=%s) took precedence over %s", trainer.ckpt_path, self.resumed_from.url)
            self.resumed_from = None
            self._loader_states = []
        loaders = _flatten(trainer.train_dataloader)
        states, self._loader_states = self._loader_states, []
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng is not None and not (loaders and all(isinstance(dl, DataLoader) for dl in loaders)):
            rng = None  # another loader's iterator drew from the restored states: leave them
        # Restore the random states once more, right before the first step: building the train
        # dataloader (and anything train_dataloader() draws) ran after the first restore. The
        # iteration Lightning already started drew nothing if it resumed a loaded loader state
        # (fastfeed replays the saved draws); an iteration of a new epoch draws what the
        # uninterrupted run drew when that epoch started, so it is started after the restore.
        if states and self._start_next_epoch(trainer, loaders, states, rng):
            return
        if rng is not None:
            restore_rng(rng)

    def _start_next_epoch(
        self, trainer: pl.Trainer, loaders: list[Any], states: list[Any], rng: dict[str, Any] | None
    ) -> bool:
        """The checkpoint was taken after the last batch of an epoch, so the next batch is the
        first of the next epoch. Lightning either does not load the saved dataloader states (a
        checkpoint from the end of the epoch) and iterates fresh loaders, or loads them (one from
        the last batch) and iterates what is left of the saved epoch, nothing, as the next epoch.
        For fastfeed loaders either repeats the wrong order (a fresh loader's own generator is
        where it was at construction; an iteration of a StreamingDataset reads the epoch set when
        it was created, and Lightning creates this iterator before ``on_train_epoch_start``).
        Move them to the start of the next epoch, restore ``rng`` (if given) and let Lightning
        iterate again. Returns whether it did."""
        stateful = [dl for dl in loaders if callable(getattr(dl, "state_dict", None))]
        if len(stateful) != len(states):
            return False
        moved = False
        for loader, state in zip(stateful, states, strict=True):
            if not isinstance(loader, DataLoader):
                continue
            if isinstance(state, dict) and state.get("kind") == "sampler":
                # Every batch of the saved epoch was delivered: replaying it (sampler indices only,
                # no data is read) advances the loader's generator to the next epoch's order.
                loader.load_state_dict(state)  # ends the iteration Lightning created
                for _ in loader:
                    pass
                moved = True
            elif callable(getattr(loader.dataset, "set_epoch", None)):
                dataset: Any = loader.dataset
                dataset.set_epoch(trainer.current_epoch)
                moved = True
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if not moved or fetcher is None:
            return False
        if rng is not None:
            restore_rng(rng)
        iter(fetcher)  # Lightning's iterator of this epoch, now over the moved loaders
        return True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wait for the last upload; raises if a background save failed."""
        if self.checkpointer is not None:
            self.checkpointer.wait()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Close the checkpointer (waits for pending uploads; raises a failed one's error)."""
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Training failed: finish the uploads already snapshotted, then close; upload errors
        are logged so that they do not hide the training error."""
        try:
            self._close()
        except Exception as exc:
            log.error("closing the checkpointer for %s after a training error failed: %s", self.url, exc)

    def _close(self) -> None:
        ckpt, self.checkpointer = self.checkpointer, None
        if ckpt is not None:
            ckpt.close()

    # ------------------------------------------------------------------ saving

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._may_save(trainer):
            return
        step = trainer.global_step
        due = self.every_n_train_steps is not None and step % self.every_n_train_steps == 0
        if self.every_seconds is not None:
            late = time.monotonic() - self._last_time >= self.every_seconds
            # Ranks' clocks differ; rank 0 decides, as every rank must take part in building it.
            due = bool(trainer.strategy.broadcast(late)) or due
        if due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._may_save(trainer):
            return
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.save(trainer)

    def _may_save(self, trainer: pl.Trainer) -> bool:
        return (
            not getattr(trainer, "fast_dev_run", False)
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and trainer.global_step > 0
            and trainer.global_step != self._last_saved_step  # once per step (and not the resumed one)
        )

    def save(self, trainer: pl.Trainer) -> SaveHandle | None:
        """Save now, at ``trainer.global_step``; returns once the snapshot is taken. Call it on
        every rank (the checkpoint is built on all of them); returns None on ranks other than 0."""
        if self.checkpointer is None:
            raise CheckpointError(f"FastfeedCheckpoint for {self.url} is not set up: save() works during fit()")
        step = trainer.global_step
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        self._last_saved_step = step
        self._last_time = time.monotonic()
        if not trainer.is_global_zero:
            return None
        meta = {**self.metadata, "epoch": trainer.current_epoch, "global_step": step}
        metrics = _scalar_metrics(trainer.callback_metrics)
        if metrics:
            meta["metrics"] = metrics
        handle = self.checkpointer.save(_for_codec(checkpoint), step=step, metadata=meta)
        self.last_save = handle
        return handle


class FastfeedStallLogger(pl.Callback):
    """Log which rank waits for data, and why, every ``every_n_steps`` training steps: every
    rank's fastfeed loader statistics are gathered (:func:`fastfeed.stats.gather`) and rank 0
    logs :func:`fastfeed.stats.metrics` to the trainer's logger (TensorBoard, CSV, ...) and the
    one-line summary to the ``fastfeed`` log. The training loader must be a
    :class:`fastfeed.DataLoader`; :attr:`last` keeps the last report."""

    def __init__(self, every_n_steps: int = 100, prefix: str = "data/") -> None:
        if every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.last: Any = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps:
            return
        loader = trainer.train_dataloader
        if not hasattr(loader, "stats"):
            return
        from fastfeed.stats import gather, metrics

        report = self.last = gather(loader)
        if trainer.global_rank == 0:
            log.info("data loading at step %d: %s", step, report.summary())
        if trainer.logger is not None:
            pl_module.log_dict(metrics(report, self.prefix), rank_zero_only=True)


def load_checkpoint(
    url: str | os.PathLike[str],
    *,
    step: int | None = None,
    map_location: str | torch.device | None = None,
    s3: S3Config | None = None,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """The Lightning checkpoint dictionary that :class:`FastfeedCheckpoint` saved under ``url``
    (the newest committed one, or ``step``), e.g. for ``model.load_state_dict(ckpt["state_dict"])``
    outside of ``fit()``. Tensors are on the CPU unless ``map_location`` says otherwise.

    Raises:
        NotFoundError: nothing committed under ``url`` (or not that step).
        CheckpointError: the checkpoint was not written by :class:`FastfeedCheckpoint`.
    """
    with Checkpointer(url, s3=s3, endpoint_url=endpoint_url) as ckpt:
        state = ckpt.load(step, map_location=map_location)
        assert ckpt.loaded is not None
        return _as_lightning_checkpoint(state, ckpt.loaded.url)


# ---------------------------------------------------------------------- helpers


def _as_lightning_checkpoint(state: Any, url: str) -> dict[str, Any]:
    if not isinstance(state, dict) or "state_dict" not in state or "pytorch-lightning_version" not in state:
        raise CheckpointError(
            "this checkpoint is not a Lightning checkpoint",
            url=url,
            hint="it was not written by fastfeed.lightning.FastfeedCheckpoint; use fastfeed.Checkpointer.load()",
        )
    try:  # upgrade a checkpoint written by an older Lightning, as Lightning does for its files
        migration = importlib.import_module(pl.__name__ + ".utilities.migration.utils")
    except ImportError:  # pragma: no cover - present in every supported version
        return state
    migrated: dict[str, Any] = migration._pl_migrate_checkpoint(state, None)
    return migrated


def _for_codec(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint as the codec stores it: without ``hparams_type`` (omegaconf's container
    class, when hyper-parameters are an omegaconf config: a class cannot be stored without
    pickle), with other mappings (Lightning's ``AttributeDict``, omegaconf's ``DictConfig``)
    as dicts and paths as strings. Everything else is kept; the codec refuses what it cannot
    store, naming its place."""
    out: dict[str, Any] = _plain({k: v for k, v in checkpoint.items() if not isinstance(v, type)})
    return out


def _plain(value: Any) -> Any:
    t = type(value)
    if t is dict or t is OrderedDict:
        out = t((k, _plain(v)) for k, v in value.items())
        if t is OrderedDict and "_metadata" in vars(value):
            vars(out)["_metadata"] = value._metadata  # module versions, kept by the codec
        return out
    if t is list or t is tuple:
        return t(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            number = float(value.detach().float().item())
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        else:
            continue
        if math.isfinite(number):
            out[str(name)] = number
    return out


def _flatten(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    if isinstance(loaders, list | tuple):
        return [x for item in loaders for x in _flatten(item)]
    if isinstance(loaders, Mapping):
        return [x for item in loaders.values() for x in _flatten(item)]
    return [loaders]


def _sharded_reason(strategy: Any) -> str | None:
    """Why the strategy's checkpoint is sharded across ranks, or None if rank 0 holds all of it."""
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        return f"{name} checkpoints (ZeRO-partitioned state)"
    if getattr(strategy, "_state_dict_type", None) == "sharded":
        return f"{name}(state_dict_type='sharded') checkpoints"
    if getattr(strategy, "_save_distributed_checkpoint", False):
        return f"{name}(save_distributed_checkpoint=True) checkpoints"
    return None
