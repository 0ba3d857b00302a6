"""The producer thread "fastfeed-batch": it turns the raw batches of an iteration (the
worker processes' messages, :class:`~fastfeed.loader.pool.Workers`, or a StreamingDataset's
streams read in this thread) into batches (views of a worker's slot or of a ring slot; copied
to the device when the loader has one) and puts them on the iteration's bounded queue.

It runs over the iteration's :class:`~fastfeed.loader.settings.IterationSettings` and its queue
only, never the iterator, so a dropped iterator is collected and stops it. Failures travel to
the training loop as :class:`~fastfeed.loader.items.Failure` items; every wait polls a stop event.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fastfeed.batch.assemble import ColumnBatch, collate_columns_into, from_layout, layout_extent
from fastfeed.batch.device import DeviceFeeder
from fastfeed.batch.gather import gather
from fastfeed.loader.items import END, Failure, RegionBatch, RingBatch, SlotBatch, StreamEnd, UserBatch
from fastfeed.loader.pool import Workers
from fastfeed.loader.settings import IterationSettings
from fastfeed.loader.stats import tensor_bytes
from fastfeed.loader.streaming import SKIPPED, rotated

__all__ = ["POLL", "collate_into_slot", "decode_batch", "produce"]

#: Seconds between checks of the stop event while the producer (or the training loop) waits.
POLL = 0.1


def collate_into_slot(slot: Any, fill: Callable[[Any], Any]) -> Any:
    """``fill(slot)``; a slot whose batch failed goes back to its ring."""
    try:
        return fill(slot)
    except BaseException:
        slot.abandon()
        raise


def _stream_batches_in_process(settings: IterationSettings) -> Iterator[Any]:
    """StreamingDataset, no workers: batches collated into ring slots (or a user collate_fn's
    batches), in stream order, with the time spent producing them."""
    assert settings.streams is not None
    streams = settings.streams
    ring = settings.ring
    timing = {"collate_s": 0.0}
    user = streams.user

    def collate(columns: ColumnBatch) -> tuple[Any, int]:
        start = time.perf_counter()
        if user:
            batch = streams.user_collate(columns)
        else:
            slot = ring.acquire()
            batch = collate_into_slot(slot, lambda s: collate_columns_into(columns, s.arena, s.base))
        timing["collate_s"] = time.perf_counter() - start
        return batch, len(columns)

    source = streams.stream_source(rotated(streams.num_streams, streams.next_stream), collate)
    try:
        while True:
            start = time.perf_counter()
            item = next(source, None)
            if item is None:
                return
            if isinstance(item, StreamEnd):
                settings.stats.add(**item.io)
                continue
            v, (batch, n), after, io = item
            if batch is SKIPPED:  # the dataset's stages dropped every sample of it
                settings.stats.add(**io)
                continue
            elapsed = time.perf_counter() - start
            stage = {"n": n, **io, "collate_s": timing["collate_s"]}
            stage["parse_s"] = max(0.0, elapsed - io["fetch_s"] - timing["collate_s"])
            yield (UserBatch if user else RingBatch)(batch, stage, (v, after))
    finally:
        source.close()


def produce(
    settings: IterationSettings,
    workers: Workers | None,
    feeder: DeviceFeeder | None,
    out: queue.Queue[Any],
    stop: threading.Event,
) -> None:
    """Thread "fastfeed-batch": raw batches (from ``workers``, or read in this thread) -> batches
    (-> device) -> ``out``."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=POLL)
                return True
            except queue.Full:
                continue
        return False

    source: Iterator[Any] | None = None
    try:
        source = workers.messages() if workers is not None else _stream_batches_in_process(settings)
        for item in source:
            if stop.is_set():
                return
            if isinstance(item, Failure):
                if not put(item):
                    return
                del item  # the training loop raises it: hold no reference (see LoaderIterator._next_queued)
                continue
            batch, event, nbytes, n, times = _assemble(settings, feeder, item)
            settings.stats.add(batches=1, samples=n, bytes=nbytes, **times)
            if not put((batch, event, item.stream)):
                return
            del batch, item
        put(END)
    except BaseException as exc:  # delivered to the training loop and raised there
        put(Failure(exc, fatal=True))
    finally:
        if source is not None:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        if workers is not None:
            workers.close()
        if feeder is not None:
            feeder.drain()
        if settings.slot_table is not None and settings.owns_slot_table:
            if settings.pin_slots and settings.slot_table.pinned:
                # The training loop may still be copying from CPU batches it was handed.
                torch.cuda.synchronize()
            settings.slot_table.close()


def _assemble(
    settings: IterationSettings, feeder: DeviceFeeder | None, item: Any
) -> tuple[Any, Any, int, int, dict[str, float]]:
    """A message -> ``(batch, device event, bytes, samples, stage times)``."""
    times = dict(item.stage)
    n = int(times.pop("n", 0))
    if feeder is not None:
        feeder.reap()
        if settings.ring.free_slots() == 0:
            feeder.wait_oldest()
    start = time.perf_counter()
    if isinstance(item, SlotBatch):  # a worker's shared-memory slot: views of it, no copy
        assert settings.slot_table is not None
        base = settings.slot_table.base(item.worker, item.slot, item.generation, item.tensor)
        batch = from_layout(item.layout, base)
        nbytes = layout_extent(item.layout)
    elif isinstance(item, RegionBatch):
        region = item.region
        if settings.pin_slots:  # into a pinned ring slot, for an asynchronous device copy
            slot = settings.ring.acquire()
            slot.arena.ensure(region.numel())
            gather(slot.arena.array, [region.numpy()], dst_offset=0)
            region = slot.base()
        batch = from_layout(item.layout, region)
        nbytes = int(item.region.numel())
    else:  # a ring slot of this process, or a user collate_fn's batch
        batch = item.batch
        if isinstance(item, UserBatch) and settings.pin_user:
            from torch.utils.data._utils.pin_memory import pin_memory

            batch = pin_memory(batch)  # type: ignore[no-untyped-call]
        nbytes = tensor_bytes(batch)
    if settings.decode is not None:
        decode_start = time.perf_counter()
        batch = decode_batch(settings, feeder, batch)
        times["decode_s"] = times.get("decode_s", 0.0) + time.perf_counter() - decode_start
    event = None
    if feeder is not None:
        batch, event = feeder.copy(batch)
    times["copy_s"] = times.get("copy_s", 0.0) + time.perf_counter() - start - times.get("decode_s", 0.0)
    return batch, event, nbytes, n, times


def decode_batch(settings: IterationSettings, feeder: DeviceFeeder | None, batch: Any) -> Any:
    """The loader's decode stage over one host batch: on the host (before the device copy), or
    on the feeder's device and stream for a GPU backend (the copy then leaves those fields)."""
    decode = settings.decode
    assert decode is not None
    device = getattr(feeder, "device", None)
    if decode.resolve_backend(device) == "cpu":
        return decode(batch, epoch=settings.decode_epoch)
    stream = getattr(feeder, "stream", None)
    with torch.cuda.stream(stream):
        return decode(batch, epoch=settings.decode_epoch, device=device)
