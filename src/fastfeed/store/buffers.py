"""Part-sized buffers reused across ranged GETs, prefetchers and cache fills of a process.

A GET written into a reused buffer skips allocating, zero-filling and page-faulting a fresh
part-sized buffer (on a VM, page faults made that the largest single cost of reading a shard).
Buffers are anonymous memory maps, so they start on a page boundary: the node cache can write
them to disk with ``O_DIRECT``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading

__all__ = ["BufferPool", "pool_for"]


class BufferPool:
    """Buffers of one size, reused across parts, prefetchers and cache fills of this process.

    Buffers in use are bounded by their users (a prefetcher's byte budget, a fill's window);
    idle buffers kept for the next user (next epoch, next dataset) are bounded by
    ``_IDLE_LIMIT`` bytes per size. Thread-safe: successive prefetchers run on successive IO
    loop threads.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        """A buffer of ``size`` bytes, page-aligned; its contents are undefined."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return _new_buffer(self.size)

    @property
    def idle_bytes(self) -> int:
        """Bytes of the buffers kept for reuse."""
        with self._lock:
            return len(self._free) * self.size

    def trim(self) -> int:
        """Give every idle buffer's memory back to the system; returns the bytes released."""
        with self._lock:
            idle, self._free = self._free, []
        for buffer in idle:
            with contextlib.suppress(BufferError):  # a view of it still exists: the GC frees it
                buffer.close()
        return len(idle) * self.size

    def give(self, buffer: mmap.mmap | None) -> None:
        """Return ``buffer`` for reuse (only once nothing writes into it any more)."""
        if not isinstance(buffer, mmap.mmap) or len(buffer) != self.size:
            return
        with self._lock:
            # Never pool a buffer twice: two parts sharing one buffer would corrupt data.
            if len(self._free) * self.size < _IDLE_LIMIT and all(b is not buffer for b in self._free):
                self._free.append(buffer)


#: Linux: a new buffer's pages are allocated by the mmap call itself, not one page fault at a
#: time as the first GET writes into it: on the 2-core VM, 0.09 s instead of 0.15 s for the
#: 256 MiB a first epoch's prefetchers take (a sixth of a 400 MB cold epoch).
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _new_buffer(size: int) -> mmap.mmap:
    if _POPULATE:
        with contextlib.suppress(OSError):
            return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    return mmap.mmap(-1, size)


#: Idle pooled bytes kept per part size between prefetchers.
_IDLE_LIMIT = 256 * 1024**2
_pools: dict[tuple[int, int], BufferPool] = {}
_pools_lock = threading.Lock()


def pool_for(part_size: int) -> BufferPool:
    """This process's pool of ``part_size`` buffers."""
    key = (os.getpid(), part_size)  # a forked worker starts with its own (empty) pools
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = BufferPool(part_size)
        return pool


def _reset_after_fork() -> None:
    global _pools_lock
    _pools_lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
