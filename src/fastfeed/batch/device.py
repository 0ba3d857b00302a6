"""Device feeder: host batches -> device, copied on a side CUDA stream, overlapped with compute.

Protocol per batch (thread ownership in brackets):

1. [producer] ``copy(host_batch)``: on the feeder's side stream, every tensor is copied with
   ``non_blocking=True`` (the host memory is a pinned ring slot); an event is recorded after the
   copies. The host batch is kept alive until that event has fired, so its ring slot cannot be
   reused while the DMA engine still reads it.
2. [consumer] ``hand_over(device_batch, event)``: the consumer's current stream waits on the
   event (no host sync), and each device tensor is ``record_stream``-ed on it so the caching
   allocator does not recycle it early.
3. [producer] ``reap()``: host batches whose events have fired are dropped, returning their
   slots to the ring; ``wait_oldest()`` blocks on the oldest copy when the ring is full.

Everything except the CUDA calls themselves is plain Python over a small ``ops`` object, so CPU
tests drive the same bookkeeping with a simulated stream (see ``tests/test_loader.py``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Protocol

import torch

from fastfeed.batch.assemble import from_layout, layout_extent, to_layout, tree_map_tensors

__all__ = ["CudaOps", "DeviceFeeder", "DeviceOps", "HostPinner", "RegionCopy", "region_layout"]

log = logging.getLogger(__name__)


class DeviceOps(Protocol):
    """The few device operations the feeder needs."""

    def copy(self, batch: Any) -> tuple[Any, Any]:
        """Start copying ``batch`` to the device; return ``(device_batch, event)``."""

    def done(self, event: Any) -> bool:
        """Whether the copies before ``event`` have completed."""

    def synchronize(self, event: Any) -> None:
        """Block until ``event`` has fired."""

    def hand_over(self, batch: Any, event: Any) -> None:
        """Make the consumer's stream wait for ``event`` before using ``batch``."""

    # Optional: ``copy_region(region, layout) -> (device_batch, event)`` copies one contiguous
    # host region in one transfer; the device batch is ``from_layout(layout, device_region)``.


@dataclasses.dataclass
class RegionCopy:
    """The event of a one-region copy, and the device region its batch views."""

    event: Any
    region: torch.Tensor


class CudaOps:
    """:class:`DeviceOps` on a dedicated side stream of a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]

    def copy(self, batch: Any) -> tuple[Any, Any]:
        with torch.cuda.stream(self.stream):
            out = tree_map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.stream)
        return out, event

    def copy_region(self, region: torch.Tensor, layout: Any) -> tuple[Any, Any]:
        with torch.cuda.stream(self.stream):
            dev = torch.empty(region.numel(), dtype=torch.uint8, device=self.device)
            dev.copy_(region, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.stream)
        return from_layout(layout, dev), RegionCopy(event, dev)

    def done(self, event: Any) -> bool:
        return bool(_event(event).query())

    def synchronize(self, event: Any) -> None:
        _event(event).synchronize()

    def hand_over(self, batch: Any, event: Any) -> None:
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(_event(event))
        if isinstance(event, RegionCopy):
            event.region.record_stream(stream)  # one allocation behind every field
        else:
            tree_map_tensors(batch, lambda t: t.record_stream(stream))


def _event(token: Any) -> Any:
    return token.event if isinstance(token, RegionCopy) else token


class SyncOps:
    """Plain synchronous ``.to(device)`` for devices without streams (e.g. ``cpu``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def copy(self, batch: Any) -> tuple[Any, Any]:
        return tree_map_tensors(batch, lambda t: t.to(self.device)), None

    def copy_region(self, region: torch.Tensor, layout: Any) -> tuple[Any, Any]:
        return from_layout(layout, region.to(self.device)), None

    def done(self, event: Any) -> bool:
        return True

    def synchronize(self, event: Any) -> None:
        return None

    def hand_over(self, batch: Any, event: Any) -> None:
        return None


class DeviceFeeder:
    """Bookkeeping of in-flight copies over some :class:`DeviceOps`."""

    def __init__(self, ops: DeviceOps) -> None:
        self.ops = ops
        # (event, host batch) in submission order; the host batch pins its ring slot.
        self._pending: collections.deque[tuple[Any, Any]] = collections.deque()

    @classmethod
    def for_device(cls, device: torch.device) -> DeviceFeeder:
        """A CUDA side-stream feeder for CUDA devices, synchronous copies otherwise."""
        return cls(CudaOps(device) if device.type == "cuda" else SyncOps(device))

    def copy(self, host_batch: Any) -> tuple[Any, Any]:
        """[producer] Start the copy; the host batch stays referenced until it completes.

        A batch whose tensors all view one host region (every batch fastfeed collates: a ring
        slot or a worker slot) is copied as that region, in one transfer into one device
        allocation; other batches tensor by tensor.
        """
        found = region_layout(host_batch)
        copy_region = getattr(self.ops, "copy_region", None)
        if found is not None and copy_region is not None:
            device_batch, event = copy_region(*found)
        else:
            device_batch, event = self.ops.copy(host_batch)
        if event is not None:
            self._pending.append((event, host_batch))
        return device_batch, event

    def reap(self) -> int:
        """[producer] Drop host batches whose copies completed; returns how many."""
        n = 0
        while self._pending and self.ops.done(self._pending[0][0]):
            self._pending.popleft()
            n += 1
        return n

    def wait_oldest(self) -> bool:
        """[producer] Block until the oldest copy completes and drop it; False if none pending."""
        if not self._pending:
            return False
        event, _ = self._pending.popleft()
        self.ops.synchronize(event)
        return True

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def hand_over(self, device_batch: Any, event: Any) -> None:
        """[consumer] Order the consumer's stream after the copy."""
        if event is not None:
            self.ops.hand_over(device_batch, event)

    def drain(self) -> None:
        """Wait for every pending copy (shutdown)."""
        while self._pending:
            self.wait_oldest()


class HostPinner:
    """Page-locks memory that torch did not allocate (``cudaHostRegister``), so copies from it
    to a CUDA device run asynchronously on the DMA engine instead of through a staging buffer.

    Used for the workers' shared-memory slots as the main process first receives them. Tests
    substitute an object with the same two methods.
    """

    def __init__(self) -> None:
        self.failures = 0

    def register(self, tensor: torch.Tensor) -> bool:
        """Page-lock ``tensor``'s memory; False (and a warning, once) if CUDA refuses."""
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        err = cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
        if int(err) != 0:
            self.failures += 1
            # Once per pinner (a loader iteration): the batches stay correct, only slower to copy.
            (log.warning if self.failures == 1 else log.debug)(
                "cudaHostRegister of a %d-byte worker slot at %#x failed (%s); copies from it are "
                "synchronous (check the locked-memory limit, ulimit -l)",
                tensor.numel(),
                tensor.data_ptr(),
                err,
            )
            return False
        return True

    def unregister(self, tensor: torch.Tensor) -> None:
        """Undo :meth:`register` (every copy from the memory must have completed)."""
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())  # type: ignore[no-untyped-call]


def region_layout(batch: Any) -> tuple[torch.Tensor, Any] | None:
    """``(region, layout)`` if every tensor of ``batch`` is a contiguous CPU view of one storage:
    ``region`` is that storage's bytes up to the last tensor's end, and
    ``from_layout(layout, region)`` rebuilds the batch. None otherwise (or without tensors)."""
    tensors: list[torch.Tensor] = []
    tree_map_tensors(batch, lambda t: tensors.append(t) or t)  # type: ignore[func-returns-value]
    if not tensors:
        return None
    ptr = tensors[0].untyped_storage().data_ptr()
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().data_ptr() != ptr:
            return None
    base = torch.empty(0, dtype=torch.uint8).set_(tensors[0].untyped_storage())
    layout = to_layout(batch, base)
    return base[: layout_extent(layout)], layout
