"""Checkpointing for a plain training loop: what to save, when, and how to resume exactly.

::

    ckpt = fastfeed.Checkpointer("s3://bucket/runs/exp42/", keep_last=3)
    cb = fastfeed.CheckpointCallback(ckpt, model=model, optimizer=opt, loader=loader, every_n_steps=500)
    progress = cb.resume()                    # None on a fresh start
    step = progress["step"] if progress else 0
    epoch = progress["epoch"] if progress else 0
    for epoch in range(epoch, epochs):
        loader.dataset.set_epoch(epoch)       # a resumed loader continues inside this epoch
        for batch in loader:
            ...; opt.step(); step += 1
            cb.step_end(step=step, epoch=epoch)
        cb.epoch_end(step=step, epoch=epoch + 1)
    ckpt.close()

A checkpoint holds the model, optimizer and scheduler ``state_dict()``, the
:class:`fastfeed.DataLoader` position, the torch (CPU and every CUDA device), numpy and Python
RNG states, the loop's ``step`` and ``epoch``, anything in ``extra`` with a ``state_dict()``,
and, for a :class:`fastfeed.StreamingDataset`, its shard list with sizes and ETags (so the
exact data of an experiment can be checked later). ``resume()`` restores all of it, so the
run continues as if it had never stopped: the same next batch, the same dropout masks.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch

from fastfeed.checkpoint.checkpointer import Checkpointer, SaveHandle
from fastfeed.errors import ConfigError, NotFoundError

__all__ = ["CheckpointCallback", "capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """The torch (CPU and each CUDA device), numpy and Python random states."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointCallback:
    """Saves the training state through a :class:`~fastfeed.Checkpointer` when due.

    Args:
        checkpointer: where checkpoints go.
        model, optimizer, scheduler, loader: saved and restored with their
            ``state_dict()`` / ``load_state_dict()`` (any may be None except ``model``).
        every_n_steps, every_n_epochs, every_seconds: when :meth:`step_end` /
            :meth:`epoch_end` save (any combination; at least one).
        metadata: JSON values stored in each manifest (hyperparameters...);
            :meth:`step_end` and :meth:`epoch_end` accept more per call (metrics).
        extra: more objects with ``state_dict()`` / ``load_state_dict()`` (an EMA, a scaler).
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        *,
        model: torch.nn.Module,
        optimizer: Any = None,
        scheduler: Any = None,
        loader: Any = None,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        every_seconds: float | None = None,
        metadata: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if every_n_steps is None and every_n_epochs is None and every_seconds is None:
            raise ConfigError("CheckpointCallback needs every_n_steps, every_n_epochs or every_seconds")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        self.checkpointer = checkpointer
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loader = loader
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.every_seconds = every_seconds
        self.metadata = dict(metadata or {})
        self.extra = dict(extra or {})
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------ saving

    def state(self, *, step: int, epoch: int) -> dict[str, Any]:
        """Everything a checkpoint holds, as a state tree."""
        state: dict[str, Any] = {"progress": {"step": int(step), "epoch": int(epoch)}, "rng": capture_rng()}
        state["model"] = self.model.state_dict()
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.loader is not None:
            state["loader"] = self.loader.state_dict()
            shards = getattr(getattr(self.loader, "dataset", None), "shards", None)
            if shards is not None:
                state["dataset"] = [{"url": s.url, "size": s.size, "etag": s.etag} for s in shards]
        if self.extra:
            state["extra"] = {name: obj.state_dict() for name, obj in self.extra.items()}
        return state

    def save(self, *, step: int, epoch: int, metadata: dict[str, Any] | None = None) -> SaveHandle:
        """Save now (the snapshot is taken before this returns)."""
        self._last_save = time.monotonic()
        meta = {**self.metadata, **(metadata or {}), "step": int(step), "epoch": int(epoch)}
        return self.checkpointer.save(self.state(step=step, epoch=epoch), step=step, metadata=meta)

    def step_end(self, *, step: int, epoch: int, metadata: dict[str, Any] | None = None) -> SaveHandle | None:
        """Call after each optimizer step (``step`` counts completed steps); saves when due."""
        due = self.every_n_steps is not None and step % self.every_n_steps == 0
        due |= self.every_seconds is not None and time.monotonic() - self._last_save >= self.every_seconds
        return self.save(step=step, epoch=epoch, metadata=metadata) if due else None

    def epoch_end(self, *, step: int, epoch: int, metadata: dict[str, Any] | None = None) -> SaveHandle | None:
        """Call after an epoch; ``epoch`` is the number of completed epochs (the next to run)."""
        due = self.every_n_epochs is not None and epoch % self.every_n_epochs == 0
        return self.save(step=step, epoch=epoch, metadata=metadata) if due else None

    # ------------------------------------------------------------------ resuming

    def resume(self, step: int | None = None) -> dict[str, int] | None:
        """Restore the newest committed checkpoint (or ``step``); returns its
        ``{"step", "epoch"}``, or None if there is none yet (a fresh start)."""
        try:
            # On the CPU: RNG states must be, and load_state_dict moves the rest where it belongs.
            state = self.checkpointer.load(step)
        except NotFoundError:
            if step is not None:
                raise
            return None
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.loader is not None and "loader" in state:
            self.loader.load_state_dict(state["loader"])
        for name, obj in self.extra.items():
            obj.load_state_dict(state["extra"][name])
        restore_rng(state["rng"])
        progress = state["progress"]
        return {"step": int(progress["step"]), "epoch": int(progress["epoch"])}
