"""The main process's side of the loader's worker processes: starting them, reading their
messages, and stopping them or keeping them for the next iteration.

:class:`Workers`: the worker processes of one iteration (torch's DataLoader iterator over
them, made by ``iter(loader)``), read by the producer thread. :class:`WorkerPool`: persistent
workers (``persistent_workers=True``), kept idle between iterations by the loader's
:class:`~fastfeed.loader.settings.PoolHolder`. Both run torch's own worker machinery
(:class:`WorkerLoader`) over what :mod:`fastfeed.loader.worker` runs inside the workers.
"""

from __future__ import annotations

import multiprocessing.connection
import pickle
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader as TorchDataLoader

from fastfeed.batch.device import HostPinner
from fastfeed.loader.items import Failure
from fastfeed.loader.settings import IterationSettings, KeptPool, PoolHolder, generator_from
from fastfeed.loader.slots import Mailbox, SlotTable
from fastfeed.loader.streaming import in_stream_order, rotated
from fastfeed.loader.worker import CollatedStream, WorkerCollate

__all__ = ["WorkerLoader", "WorkerPool", "Workers"]


class _EpochIndices:
    """The index sampler of a persistent pool's torch DataLoader: each epoch's indices, drawn
    by the training thread, set before the epoch starts (torch reads it in ``_reset``)."""

    def __init__(self) -> None:
        self.indices: Iterable[Any] = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)  # type: ignore[arg-type]


class WorkerPool:
    """Persistent worker processes (``persistent_workers=True``): one torch DataLoader whose
    workers, slots and pinned slot memory are kept from one iteration to the next. Used by one
    iteration at a time (see :class:`PoolHolder`).

    StreamingDataset: each iteration posts its settings and seed to the workers' mailbox, and
    an iteration that does not run to its end shuts the pool down. Other datasets: torch's own
    persistent workers, which keep their seeds and their dataset replica across epochs as in
    torch; each epoch's indices are drawn by the training thread (:class:`_EpochIndices`), and
    a new epoch takes back the slots of batches an early-ended epoch left behind
    (:class:`~fastfeed.loader.slots.SlotFlags`)."""

    def __init__(self, settings: IterationSettings, mailbox_size: int = 0) -> None:
        self.key = settings.pool_key()
        self.streaming = settings.streaming
        self.flags = settings.new_flags()
        self.slot_table = SlotTable(self.flags, HostPinner() if settings.pin_slots else None)
        #: State of the generator the workers' base seed came from (map-style pools draw it
        #: once, when the pool starts; for a resumed run's state).
        self.seed_state = settings.seed_state
        self.mailbox: Mailbox | None = None
        self.indices: _EpochIndices | None = None
        kwargs = settings.torch_loader_kwargs()
        if self.streaming:
            self.mailbox = Mailbox(mailbox_size)
            dataset: Any = CollatedStream(None, self.flags, self.mailbox)
            kwargs.update(batch_size=None, collate_fn=_identity)
        else:
            dataset = settings.dataset
            if not settings.iterable:
                self.indices = _EpochIndices()
            kwargs.update(
                collate_fn=WorkerCollate(settings.collate_fn, self.flags), **settings.index_kwargs(self.indices)
            )
        self.loader = WorkerLoader(dataset, persistent_workers=True, **kwargs)
        self.iterator: Any = None
        self.started = False

    def start(self, settings: IterationSettings) -> Iterator[Any] | None:
        """Start an iteration of ``settings``; ``None`` if its settings do not fit the mailbox."""
        if self.mailbox is not None:
            if not self.mailbox.post(settings.streams):
                return None
        else:
            assert self.indices is not None or settings.iterable
            if self.indices is not None:
                assert settings.index_batches is not None  # drawn by iter(), as torch's workers need
                self.indices.indices = settings.index_batches
            if self.started:
                self.flags.new_epoch()
        if settings.worker_generator is not None:
            # What this iteration's torch loader draws (the workers' base seed when it starts
            # them, a datapipe's shared seed each epoch) comes from a copy of the user's
            # generator in the state torch's loader would have drawn it from.
            self.loader.generator = settings.worker_generator
        assert self.started or settings.worker_generator is not None
        self.started = True
        iterator = iter(self.loader)  # the first starts the workers; later ones resume them
        self.iterator = iterator
        return iterator

    def shutdown(self) -> None:
        """Stop and join the workers, then unpin the slots (after any copy from them is done)."""
        iterator, self.iterator = self.iterator, None
        if iterator is not None:
            _shutdown_workers(iterator)
        if self.slot_table.pinned:
            torch.cuda.synchronize()  # the training loop may still be copying from a slot
        self.slot_table.close()


def _shutdown_workers(iterator: Any) -> None:
    """Stop and join the worker processes of a torch DataLoader iterator."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _identity(item: Any) -> Any:
    return item


class WorkerLoader(TorchDataLoader[Any]):
    """The torch DataLoader that runs a fastfeed loader's worker processes. Its worker-count
    warning is the user's loader's (at construction and at ``iter()``, as torch warns), not
    this one's, which is made later, in the producer thread."""

    def check_worker_number_rationality(self) -> None:
        """No warning here: the user's loader gives it (see the class)."""
        return None


class Workers:
    """The worker processes of one iteration: torch's DataLoader iterator over them, started by
    ``iter(loader)`` in the calling thread (as torch starts its workers, with its SIGCHLD
    handler in the main thread), read by the producer thread; the slot table of their batches;
    and the persistent pool they belong to, if any.

    A persistent pool goes back to the loader when the iteration ends: a StreamingDataset's only
    when it ran to its end, another dataset's also when it ended early (torch's loader drops
    what its workers still send), never after an error."""

    def __init__(self, settings: IterationSettings) -> None:
        self.settings = settings
        self.pool: KeptPool | None = None
        self.failed = False
        self.completed = False
        self._closed = False
        self._lock = threading.Lock()
        holder = settings.pool_holder
        if holder is not None:
            self.pool, self.iterator = self._from_pool(settings, holder)
            settings.slot_table, settings.owns_slot_table = self.pool.slot_table, False
            return
        flags = settings.new_flags()
        settings.slot_table = SlotTable(flags, HostPinner() if settings.pin_slots else None)
        kwargs = settings.torch_loader_kwargs()
        if settings.streaming:
            # Workers read their streams and collate whole batches; torch only moves messages.
            assert settings.streams is not None
            dataset: Any = CollatedStream(settings.streams, flags)
            kwargs.update(batch_size=None, collate_fn=_identity)
        else:
            dataset = settings.dataset
            collate = WorkerCollate(settings.collate_fn, flags)
            kwargs.update(collate_fn=collate, **settings.index_kwargs(settings.index_batches))
        self.iterator = iter(WorkerLoader(dataset, **kwargs))

    @staticmethod
    def _from_pool(settings: IterationSettings, holder: PoolHolder) -> tuple[KeptPool, Iterator[Any]]:
        """The loader's pool (or a new one) and its iterator for this iteration."""
        kept = holder.take(settings.pool_key())
        iterator = kept.start(settings) if kept is not None else None
        if kept is not None and iterator is not None:
            return kept, iterator
        if kept is not None:
            kept.shutdown()  # the settings outgrew its mailbox
        if settings.worker_generator is None:
            # The pool this iteration saw a moment ago is gone: a new one with its seed.
            assert settings.seed_state is not None
            settings.worker_generator = generator_from(settings.seed_state)
        size = 0
        if settings.streaming:
            size = max(1 << 20, 4 * len(pickle.dumps(settings.streams, protocol=pickle.HIGHEST_PROTOCOL)))
        pool = WorkerPool(settings, size)
        iterator = pool.start(settings)
        assert iterator is not None
        return pool, iterator

    @property
    def processes(self) -> list[Any]:
        """The worker processes (torch's ``multiprocessing`` process objects)."""
        return list(getattr(self.iterator, "_workers", ()))

    def messages(self) -> Iterator[Any]:
        """The workers' messages, and a :class:`Failure` in place of each batch whose worker
        raised (the iteration goes on, as torch's); StreamingDataset batches in stream order."""
        settings = self.settings
        try:
            if settings.streaming:
                assert settings.streams is not None
                order = rotated(settings.streams.num_streams, settings.streams.next_stream)
                yield from in_stream_order(self.iterator, order, lambda io: settings.stats.add(**io))
                if self.pool is not None:
                    for extra in self.iterator:  # each worker's end of iteration; nothing else may come
                        raise RuntimeError(f"a DataLoader worker sent {type(extra).__name__} after its streams ended")
            else:
                for item in _each_batch(self.iterator):
                    self.failed = self.failed or isinstance(item, Failure)
                    yield item
                    # Not held while waiting for the next: a failure's exception, raised in the
                    # training loop, has the loop's frames (and the iterator) in its traceback.
                    del item
        except GeneratorExit:
            raise
        except BaseException:
            self.failed = True
            raise
        self.completed = True

    def close(self) -> None:
        """Stop the workers, or give them back to the loader's pool (see the class)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        pool = self.pool
        if pool is None:
            # Now, not when the iterator is collected: an exception raised from a worker keeps
            # it (and so the workers) alive for as long as the exception is referenced.
            _shutdown_workers(self.iterator)
            return
        holder = self.settings.pool_holder
        assert holder is not None
        keep = not self.failed and (self.completed or not self.settings.streaming)
        if keep:
            holder.give_back(pool)
        else:
            pool.shutdown()


def _each_batch(it: Iterator[Any]) -> Iterator[Any]:
    """``it``'s items, with a :class:`Failure` in place of each one whose ``next()`` raised: a
    torch DataLoader iterator raises a worker's error for that batch and goes on. A worker that
    died ends the iteration, with the error torch raises in its main thread."""
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:
            # A broken connection to a worker (its shared memory handed over as it died): give
            # its exit a moment to show, so the error names the cause.
            dead = _dead_worker_error(it, wait=5.0 if isinstance(exc, ConnectionError | EOFError) else 0.0)
            if dead is not None:
                raise dead from exc
            yield Failure(exc)
        else:
            yield item


def _dead_worker_error(it: Any, wait: float = 0.0) -> RuntimeError | None:
    """torch's error for a worker process of ``it`` that died (its SIGCHLD handler's, which runs
    only in the main thread: here the iterator runs in the producer thread), waiting up to
    ``wait`` seconds for one to end."""
    workers = list(getattr(it, "_workers", ()))
    deadline = time.monotonic() + wait
    while True:
        found = _exit_error(workers)
        left = deadline - time.monotonic()
        if found is not None or left <= 0 or not workers:
            return found
        # A worker's sentinel can be ready a moment before its exit status is: poll both.
        multiprocessing.connection.wait([w.sentinel for w in workers], timeout=min(left, 0.05))
        time.sleep(0.01)


def _exit_error(workers: list[Any]) -> RuntimeError | None:
    """torch's error for the first of ``workers`` that exited with a signal or an error code."""
    for worker in workers:
        code = worker.exitcode
        if code is None or code == 0:
            continue
        if code < 0:
            try:
                name = signal.strsignal(-code) or f"signal {-code}"
            except ValueError:
                name = f"signal {-code}"
            return RuntimeError(f"DataLoader worker (pid {worker.pid}) is killed by signal: {name}. ")
        return RuntimeError(
            f"DataLoader worker (pid {worker.pid}) exited unexpectedly with exit code {code}. Details are lost due "
            "to multiprocessing. Rerunning with num_workers=0 may give better error trace."
        )
    return None
