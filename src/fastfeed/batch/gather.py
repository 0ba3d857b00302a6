"""Batch gather: copy many buffers back to back into one (the hot path of batch assembly).

:func:`gather` is native (``csrc/gather.cpp``; the GIL is released for copies of 64 KiB and
more); :func:`gather_py` is a pure-Python reference with the same semantics, results, exception
classes and messages. The two are tested against each other, so change them together.

Two uses::

    # fixed-size fields stacked into one [B, ...] array
    gather(batch.reshape(-1).view(np.uint8), images, item_size=image_bytes)

    # variable-size fields as one flat buffer plus B + 1 offsets
    offsets = np.empty(len(texts) + 1, dtype=np.int64)
    gather(flat, texts, offsets=offsets)          # texts[i] is flat[offsets[i]:offsets[i + 1]]

Buffers are addressed as bytes: a numpy array of any dtype counts ``arr.nbytes`` bytes.
``dst`` may be a bytearray, a writable memoryview, a numpy array, an mmap or a CPU torch
tensor's ``.numpy()``; sources may be anything with a C-contiguous buffer.

Checks, in this order; every one happens before a byte is written:

1. ``dst_offset`` / ``item_size`` / ``threads``: ``operator.index`` (TypeError), then the range
   (ValueError).
2. ``srcs`` is turned into a tuple (TypeError if it is not iterable).
3. ``dst``: no buffer -> TypeError; read-only -> TypeError; not C-contiguous -> BufferError.
4. each source in order: no buffer -> TypeError naming the index; not C-contiguous ->
   BufferError naming the index; ``item_size`` mismatch -> ValueError with the index and both
   sizes. (An exporter's own error, e.g. numpy's ValueError for a datetime array, passes through.)
5. ``offsets``: as ``dst``, then not int64 -> TypeError, fewer than ``len(srcs) + 1`` elements
   -> ValueError.
6. the total: more than ``sys.maxsize`` bytes, or ``dst_offset + total > nbytes(dst)`` ->
   ValueError (needed vs available).

Sources that overlap ``dst`` are copied one after the other (each as it is at that moment),
and the offsets are written after the data; with ``threads > 1`` the order is unspecified.
Another thread that writes to the buffers while a gather runs gets torn data, as with any copy.
"""

from __future__ import annotations

import operator
import sys
from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fastfeed import _native

if TYPE_CHECKING:
    from typing import TypeAlias

    from numpy.typing import NDArray
    from typing_extensions import Buffer

    #: What gather reads and writes. numpy arrays are listed as well: their stubs declare
    #: ``__buffer__`` (the Buffer protocol) only for Python >= 3.12.
    BufferLike: TypeAlias = "Buffer | NDArray[Any]"

__all__ = ["MAX_THREADS", "gather", "gather_py"]

#: Largest ``threads`` value accepted.
MAX_THREADS: int = _native.GATHER_MAX_THREADS


def gather(
    dst: BufferLike,
    srcs: Iterable[BufferLike],
    *,
    dst_offset: int = 0,
    offsets: BufferLike | None = None,
    item_size: int | None = None,
    threads: int = 1,
) -> int:
    """Copy ``srcs`` back to back into ``dst`` at byte ``dst_offset``; return the bytes written.

    Args:
        dst: a writable C-contiguous buffer, addressed as bytes.
        srcs: C-contiguous buffers (a list or tuple; any iterable is turned into a tuple).
        dst_offset: where the first source goes, in bytes.
        offsets: optional writable C-contiguous int64 buffer with at least ``len(srcs) + 1``
            elements; receives ``0`` and the running byte totals (relative to ``dst_offset``),
            so that source ``i`` lands at ``dst[dst_offset + offsets[i]:dst_offset + offsets[i + 1]]``.
            Elements past ``len(srcs)`` are left alone.
        item_size: if given, every source must be exactly this many bytes.
        threads: split copies of at least 8 MiB across up to this many threads (at most one
            per 4 MiB). Measured on a 2-core VM: ``threads=2`` copies 8-256 MiB 1.4-2x faster
            when the other core is idle, and gains nothing (0.95-1.4x) when it is busy, where
            it takes CPU time from whatever runs there. Leave it at 1 unless cores are idle.

    Raises:
        TypeError: a non-integer argument, a non-buffer ``dst``/source/``offsets`` (the message
            names it), a read-only ``dst``/``offsets``, ``offsets`` not int64.
        BufferError: a non-C-contiguous ``dst``/source/``offsets``.
        ValueError: a negative ``dst_offset``/``item_size``, an ``item_size`` mismatch, too short
            ``offsets`` or a too small ``dst`` (needed vs available bytes).
    """
    return _native.gather(dst, srcs, dst_offset, offsets, item_size, threads)


# --------------------------------------------------------------------------------------------
# The reference. Mirrors csrc/bindings.cpp gather() check by check.


def index_arg(value: object, name: str, lo: int, hi: int) -> int:
    v = operator.index(value)  # type: ignore[arg-type]
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {v!r}")
    return v


def export_buffer(obj: object) -> memoryview | None:
    """``memoryview(obj)``, or ``None`` if ``obj`` has no buffer (other exporter errors pass)."""
    try:
        return memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        return None


def _export_source(obj: object) -> memoryview | None:
    """As the native code exports a source: ``None`` if it has no buffer.

    The native code asks for a plain contiguous buffer first (``PyBUF_SIMPLE``) and falls back
    to memoryview()'s request. A few exporters serve the first but refuse the second (numpy
    datetime64 arrays: "cannot include dtype 'M' in a buffer"); ``b"".join`` makes the plain
    request, so it reads those the same way.
    """
    try:
        return memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        return None
    except Exception as exc:
        try:
            data = b"".join([obj])  # type: ignore[list-item]
        except Exception:
            raise exc from None
        return memoryview(data)


def export_writable(obj: object, what: str, kind: str, views: list[memoryview]) -> memoryview:
    mv = export_buffer(obj)
    if mv is None:
        raise TypeError(f"{what} must be a writable C-contiguous {kind}buffer, not {type(obj).__name__!r}")
    views.append(mv)
    if mv.readonly:
        raise TypeError(f"{what} is read-only")
    if not mv.c_contiguous:
        raise BufferError(f"{what} is not C-contiguous")
    return mv


def as_bytes(mv: memoryview) -> memoryview:
    """A flat unsigned-byte view of a C-contiguous memoryview (which may have zeros in shape)."""
    if mv.nbytes == 0:
        return memoryview(b"")
    return mv.cast("B")


_INT64_CODES = frozenset("qln")
_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"


def is_int64_format(fmt: str, itemsize: int) -> bool:
    if itemsize != 8:
        return False
    if fmt[:1] in ("@", "=", _NATIVE_ORDER) or (fmt[:1] == "!" and sys.byteorder == "big"):
        fmt = fmt[1:]
    return fmt in _INT64_CODES


def gather_py(
    dst: BufferLike,
    srcs: Iterable[BufferLike],
    *,
    dst_offset: int = 0,
    offsets: BufferLike | None = None,
    item_size: int | None = None,
    threads: int = 1,
) -> int:
    """Pure-Python reference for :func:`gather`: same arguments, results and errors, but slow."""
    dst_offset = index_arg(dst_offset, "dst_offset", 0, sys.maxsize)
    if item_size is not None:
        item_size = index_arg(item_size, "item_size", 0, sys.maxsize)
    index_arg(threads, "threads", 1, MAX_THREADS)  # validated; the reference copies serially
    items = tuple(srcs)
    views: list[memoryview] = []
    try:
        dmv = export_writable(dst, "dst", "", views)
        pieces: list[memoryview] = []
        for i, obj in enumerate(items):
            smv = _export_source(obj)
            if smv is None:
                raise TypeError(f"srcs[{i}] must be a C-contiguous buffer, not {type(obj).__name__!r}")
            views.append(smv)
            if not smv.c_contiguous:
                raise BufferError(f"srcs[{i}] is not C-contiguous")
            if item_size is not None and smv.nbytes != item_size:
                raise ValueError(f"srcs[{i}] has {smv.nbytes} bytes, expected item_size={item_size}")
            pieces.append(smv)

        omv: memoryview | None = None
        if offsets is not None:
            omv = export_writable(offsets, "offsets", "int64 ", views)
            if not is_int64_format(omv.format, omv.itemsize):
                raise TypeError(
                    f"offsets must hold int64 values, got format {omv.format!r} with itemsize {omv.itemsize}"
                )
            have = omv.nbytes // 8
            if have <= len(items):
                raise ValueError(f"offsets has {have} elements, needs at least {len(items) + 1} (len(srcs) + 1)")

        total = sum(p.nbytes for p in pieces)
        if total > sys.maxsize:
            raise ValueError("the sources add up to more than sys.maxsize bytes")
        if dst_offset + total > dmv.nbytes:
            raise ValueError(
                f"dst too small: needs {dst_offset + total} bytes (dst_offset {dst_offset} + {total} "
                f"from {len(items)} sources), has {dmv.nbytes}"
            )

        out = as_bytes(dmv)
        views.append(out)
        pos = dst_offset
        ends = array("q", [0])
        for p in pieces:
            n = p.nbytes
            if n:
                src = as_bytes(p)
                views.append(src)
                out[pos : pos + n] = src
            pos += n
            ends.append(pos - dst_offset)
        if omv is not None:
            obytes = as_bytes(omv)
            views.append(obytes)
            ends_view = memoryview(ends).cast("B")
            views.append(ends_view)
            obytes[: len(ends_view)] = ends_view
        return total
    finally:
        for mv in reversed(views):
            mv.release()
