"""The process's part buffers (:mod:`fastfeed.store.buffers`): reused, page-aligned, and on
Linux allocated whole by the mmap call (no page fault per 4 KiB when the first GET lands)."""

from __future__ import annotations

import mmap
import os
import sys

import pytest

from fastfeed.store.buffers import BufferPool


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_buffer_given_back_is_the_next_one_taken_and_never_pooled_twice() -> None:
    pool = BufferPool(1 << 20)
    a = pool.take()
    assert isinstance(a, mmap.mmap) and len(a) == 1 << 20
    pool.give(a)
    pool.give(a)  # twice: still one entry, or two parts would share it
    assert pool.take() is a
    assert pool.take() is not a
    pool.give(bytearray(1 << 20))  # not a pool buffer: ignored
    pool.give(mmap.mmap(-1, 4096))  # another size: ignored
    assert pool.take() is not a


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MAP_POPULATE and /proc are Linux's")
def test_new_buffers_are_resident_before_anything_is_written_into_them() -> None:
    pool = BufferPool(32 << 20)
    before = _resident_bytes()
    buffer = pool.take()
    grown = _resident_bytes() - before
    assert grown >= 30 << 20, f"only {grown} bytes of a 32 MiB buffer are resident"
    buffer[0] = 1  # and it is an ordinary writable buffer
    assert buffer[0] == 1
