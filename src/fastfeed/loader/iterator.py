"""The training loop's side of an iteration: :class:`LoaderIterator`, what ``iter(loader)``
returns.

Without workers and with a dataset other than a StreamingDataset, its ``next()`` fetches and
collates each batch itself, in the calling thread, as torch's single-process iterator does.
Otherwise it starts the producer thread (:mod:`fastfeed.loader.producer`) and takes the
batches from a bounded hand-off queue; on the way it reports each batch to the loader's resume
trackers and stats, and hands a device batch over to the training stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader as TorchDataLoader

from fastfeed.batch.collate import collate_into
from fastfeed.batch.device import DeviceFeeder
from fastfeed.loader.items import END, Failure
from fastfeed.loader.pool import Workers
from fastfeed.loader.producer import POLL, collate_into_slot, decode_batch, produce
from fastfeed.loader.settings import IterationSettings, LoaderParts
from fastfeed.loader.stats import count_samples, tensor_bytes

__all__ = ["LoaderIterator"]

log = logging.getLogger(__name__)

_JOIN_TIMEOUT = 10.0


class _InlineSource:
    """``num_workers=0``, a dataset other than a StreamingDataset: each ``next()`` fetches and
    collates one batch in the calling thread, exactly as torch's single-process iterator does
    (``__getitems__`` when the dataset has it; an iterable dataset's iterator made now), so a
    dataset's random transforms draw from the global generators in torch's order."""

    def __init__(self, settings: IterationSettings) -> None:
        self.settings = settings
        self.dataset_iter: Iterator[Any] | None = iter(settings.dataset) if settings.iterable else None
        self.index_iter: Iterator[Any] | None = None
        if settings.index_batches is not None:
            self.index_iter = iter(settings.index_batches)
        self.started = False
        self.ended = False

    def fetch(self, owner: Any) -> Any:
        """The next batch's samples (one sample without auto-batching); ``StopIteration`` at the
        end. A map-style dataset's epoch is drawn by the first call, which makes ``owner`` the
        iteration its progress describes."""
        s = self.settings
        if self.dataset_iter is not None:
            if not s.auto_collation:
                return next(self.dataset_iter)
            if self.ended:
                raise StopIteration
            assert s.batch_size is not None
            data = []
            for _ in range(s.batch_size):
                try:
                    data.append(next(self.dataset_iter))
                except StopIteration:
                    self.ended = True
                    break
            if not data or (s.drop_last and len(data) < s.batch_size):
                raise StopIteration
            return data
        progress = s.sampler_progress
        assert progress is not None and self.index_iter is not None
        if not self.started:
            self.started = True
            progress.begin(owner, s.sampler_draw)
        index = next(self.index_iter)
        progress.consumed(owner)  # used up, whether the dataset delivers it or raises
        dataset = s.dataset
        if not s.auto_collation:
            return dataset[index]
        getitems = getattr(dataset, "__getitems__", None)
        return getitems(index) if getitems else [dataset[i] for i in index]

    def close(self) -> None:
        close = getattr(self.dataset_iter, "close", None)
        if close is not None:
            close()
        self.dataset_iter = None


def _collate(settings: IterationSettings, data: Any) -> Any:
    """``settings``' collate_fn over ``data``, or fastfeed's native default_collate into a ring
    slot; a user collate_fn's batch is pinned when torch's loader would pin it."""
    if settings.collate_fn is not None:
        batch = settings.collate_fn(data)
        if settings.pin_user:
            from torch.utils.data._utils.pin_memory import pin_memory

            batch = pin_memory(batch)  # type: ignore[no-untyped-call]
        return batch
    return collate_into_slot(settings.ring.acquire(), lambda slot: collate_into(data, slot.arena, slot.base))


class _HandoffQueue(queue.Queue[Any]):
    """A bounded queue whose ``get`` does not wake a producer blocked on a full queue: the
    consumer calls :meth:`space` once it is done with the item.

    With a device, handing a batch over (``wait_event``) releases the GIL; a producer woken by
    the ``get`` would take it and run its Python work for the next batch right then, inside the
    training loop's ``next()`` (measured on an H200: ~0.5-0.9 ms per step, see
    benchmarks/RESULTS.md). Woken after ``next()``, it runs while the loop waits on the GPU.
    A producer still polls every ``POLL`` seconds, so a missed :meth:`space` only delays it.
    """

    def get_quietly(self, timeout: float) -> Any:
        with self.not_empty:
            end = time.monotonic() + timeout
            while not self._qsize():
                remaining = end - time.monotonic()
                if remaining <= 0.0:
                    raise queue.Empty
                self.not_empty.wait(remaining)
            return self._get()

    def space(self) -> None:
        with self.mutex:
            self.not_full.notify()


def _warn_pin_memory(loader: TorchDataLoader[Any]) -> None:
    """torch's warnings about ``pin_memory`` when an iteration starts."""
    if not loader.pin_memory:
        return
    if loader.pin_memory_device:
        warnings.warn(
            "pin_memory_device is deprecated, the current accelerator will be used as the device,"
            f"ignore pin_memory_device='{loader.pin_memory_device}'.",
            stacklevel=3,
        )
    accelerator = getattr(torch, "accelerator", None)
    available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if not available:
        warnings.warn(
            "'pin_memory' argument is set as true but no accelerator is found, "
            "then device pinned memory won't be used.",
            stacklevel=3,
        )


class LoaderIterator:
    """One pass over the loader.

    Made by ``iter(loader)``, which draws what torch draws then (:class:`IterationSettings`). Without
    workers and with a dataset other than a StreamingDataset, ``next()`` makes each batch itself
    (:class:`_InlineSource`). Otherwise the first ``next()`` starts a producer thread that runs
    :func:`produce` over the settings and a bounded queue only, never this object, so an
    iterator (and its loader) that the training loop drops is collected and its ``__del__``
    stops the thread.
    """

    def __init__(self, loader: TorchDataLoader[Any], parts: LoaderParts) -> None:
        """``loader``: the fastfeed DataLoader being iterated; ``parts``: what it shares with the iteration."""
        self._done = True  # until it is made: __del__ of one whose IterationSettings refused has nothing to stop
        _warn_pin_memory(loader)
        self._settings: IterationSettings | None = IterationSettings(loader, parts)
        settings = self._settings
        self._inline = _InlineSource(settings) if not settings.streaming and settings.num_workers == 0 else None
        #: Worker processes start now, as torch's start when iter() is called.
        self._workerset = Workers(settings) if settings.num_workers > 0 else None
        self._queue = _HandoffQueue(maxsize=parts.prefetch_batches)
        self._stop = threading.Event()
        #: Names this iteration to the loader's progress (not the iterator itself: the producer
        #: thread reaches the progress, and must not keep the iterator alive).
        self._token = object()
        self._stats = parts.stats
        self._device = parts.device
        self._feeder: DeviceFeeder | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        #: Batches handed to the training loop.
        self.delivered = 0
        self._yielded = 0  # as torch counts them, for its IterableDataset length warning
        self._len_called: int | None = parts.iterable_len if settings.iterable else None
        self._dataset = loader.dataset  # named by the length warning
        self._num_workers = loader.num_workers
        self._done = False

    def _start(self) -> None:
        """The first ``next()``: this iteration becomes the one ``state_dict()`` describes."""
        settings = self._settings
        assert settings is not None
        self._started = True
        if settings.streaming:
            settings.progress.start(self._token, settings.streams, settings.stream_resume)
        elif settings.sampler_progress is not None and settings.num_workers > 0:
            settings.sampler_progress.begin(self._token, settings.sampler_draw)
        self._feeder = DeviceFeeder.for_device(self._device) if self._device is not None else None
        if self._inline is not None:
            return
        self._thread = threading.Thread(
            target=produce,
            args=(settings, self._workerset, self._feeder, self._queue, self._stop),
            name="fastfeed-batch",
            daemon=True,
        )
        self._thread.start()

    # ------------------------------------------------------------------ training loop side

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if not self._started:
            try:
                self._start()
            except BaseException:
                self.close()
                raise
        start = time.perf_counter()
        try:
            batch = self._next_inline() if self._inline is not None else self._next_queued()
        except BaseException:
            self._stats.add(wait_s=time.perf_counter() - start)
            raise
        now = time.perf_counter()
        self._stats.delivered(now - start, now)
        self.delivered += 1
        self._yielded += 1
        if self._len_called is not None and self._yielded > self._len_called:
            self._warn_length()
        return batch

    def _next_inline(self) -> Any:
        settings, inline = self._settings, self._inline
        assert settings is not None and inline is not None
        t0 = time.perf_counter()
        try:
            data = inline.fetch(self._token)
        except StopIteration:
            self.close()
            raise
        t1 = time.perf_counter()
        feeder = self._feeder
        if feeder is not None:
            feeder.reap()
            if settings.ring.free_slots() == 0:
                feeder.wait_oldest()  # a ring slot is free once its copy has completed
        batch = _collate(settings, data)
        if settings.decode is not None:
            batch = decode_batch(settings, feeder, batch)
        t2 = time.perf_counter()
        if feeder is not None:
            batch, event = feeder.copy(batch)
            feeder.hand_over(batch, event)
        t3 = time.perf_counter()
        n = count_samples(data) if settings.auto_collation else 1
        nbytes = tensor_bytes(batch)
        self._stats.add(batches=1, samples=n, bytes=nbytes, parse_s=t1 - t0, collate_s=t2 - t1, copy_s=t3 - t2)
        return batch

    def _next_queued(self) -> Any:
        thread = self._thread
        assert thread is not None
        settings = self._settings
        # Worker processes apply torch's ``timeout`` themselves; streams read in threads here.
        timeout = settings.timeout if settings is not None and settings.threads else 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait = min(POLL, max(0.0, deadline - time.monotonic())) if timeout else POLL
                item = self._queue.get_quietly(wait)
                break
            except queue.Empty:
                if not thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise StopIteration from None
                if timeout and time.monotonic() >= deadline:
                    # As torch's: the iteration goes on, and a later next() may get the batch.
                    raise RuntimeError(f"DataLoader timed out after {timeout} seconds") from None
            except Exception:
                # Raised in this thread while it waited: torch's SIGCHLD handler (installed in
                # the main thread by its worker iterator) reporting a dead worker. Stop the
                # producer and the workers now, as a fatal failure does, not when the iterator
                # is collected: the traceback the caller keeps holds this frame.
                self.close()
                raise
        if item is END:
            self.close()
            raise StopIteration
        if isinstance(item, Failure):
            if item.fatal:
                self.close()
            elif settings is not None and settings.sampler_progress is not None:
                settings.sampler_progress.consumed(self._token)  # the batch's indices were used up
            self._queue.space()
            exc, item = item.exc, None
            try:
                raise exc
            finally:
                # No reference from this frame to the exception, whose traceback holds the
                # frame: a cycle would keep this iterator (and its workers) alive until the
                # garbage collector happens to run.
                del exc
        batch, event, stream = item
        if settings is not None:
            if stream is not None:
                settings.progress.delivered(self._token, *stream)
            elif settings.sampler_progress is not None:
                settings.sampler_progress.consumed(self._token)
        if self._feeder is not None:
            self._feeder.hand_over(batch, event)
        self._queue.space()
        return batch

    def _warn_length(self) -> None:
        message = (
            f"Length of IterableDataset {self._dataset} was reported to be {self._len_called}"
            f"(when accessing len(dataloader)), but {self._yielded} samples have been fetched. "
        )
        if self._num_workers > 0:
            message += (
                "For multiprocessing data-loading, this could be caused by not properly configuring the "
                "IterableDataset replica at each worker. Please see "
                "https://pytorch.org/docs/stable/data.html#torch.utils.data.IterableDataset for examples."
            )
        warnings.warn(message, stacklevel=3)

    def close(self) -> None:
        """Stop the producer and its workers; returns within seconds."""
        self._done = True
        self._stop.set()
        if self._inline is not None:
            self._inline.close()
        while self._queue.qsize():  # unblock a producer waiting to put
            self._queue.get_nowait()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("fastfeed-batch thread did not stop within %.0fs", _JOIN_TIMEOUT)
        if self._workerset is not None:
            self._workerset.close()  # started by iter(), and no producer ran (else a no-op)
        self._settings = None

    @property
    def _workers(self) -> list[Any]:
        """The worker processes, under the name torch's multi-process iterator gives them (code
        that inspects them, e.g. to check that they exit, keeps working)."""
        return self._workerset.processes if self._workerset is not None else []

    def __del__(self) -> None:
        if not self._done:
            self.close()
