"""Native tar member indexing and batch gather (csrc/bindings.cpp).

Use :mod:`fastfeed.read.tario` and :mod:`fastfeed.batch.gather`, not this module.
"""

from collections.abc import Iterable
from typing import Any, Final

from numpy.typing import NDArray
from typing_extensions import Buffer

#: Error kind name -> code, as returned in the error tuple of :func:`scan`.
ERROR_KINDS: Final[dict[str, int]]

def scan(
    buf: Buffer, pos: int, final: bool, object_end: int = -1
) -> tuple[list[tuple[str, int, int]], int, bool, tuple[int, int, bytes | None, int, int] | None, int, bytes | None]:
    """Index the tar members in ``buf[pos:]`` with the GIL released.

    Returns ``(members, next_pos, end, error, need, partial)``; ``error`` is ``None`` or
    ``(kind, offset, name_bytes_or_None, a, b)`` with ``kind`` from :data:`ERROR_KINDS`;
    ``need`` is :attr:`fastfeed.read.tario.ScanResult.need`; ``partial`` is ``None`` or the raw
    name of the regular member a scan that ran out of bytes stopped inside. ``object_end``:
    where the object ends in the buffer's coordinates (``-1``: unknown), see
    :func:`fastfeed.read.tario.scan`. Raises TypeError/BufferError for a non-contiguous or
    non-buffer ``buf`` and ValueError for a ``pos`` outside it or an ``object_end`` before its
    end.
    """

#: Largest ``threads`` value :func:`gather` accepts.
GATHER_MAX_THREADS: Final[int]

def gather(
    dst: Buffer | NDArray[Any],
    srcs: Iterable[Buffer | NDArray[Any]],
    dst_offset: int,
    offsets: Buffer | NDArray[Any] | None,
    item_size: int | None,
    threads: int,
) -> int:
    """Copy the C-contiguous buffers ``srcs`` back to back into ``dst`` at byte ``dst_offset``.

    Returns the number of bytes written; the GIL is released for copies of 64 KiB and more.
    Semantics, checks and errors as :func:`fastfeed.batch.gather.gather`.
    """

def scan_samples(
    buf: Buffer, pos: int, final: bool, max_samples: int, object_end: int = -1
) -> tuple[
    list[str],
    dict[str, bytearray],
    int,
    bool,
    tuple[int, int, bytes | None, int, int] | None,
    tuple[str, str] | None,
    int,
]:
    """Group the tar members in ``buf[pos:]`` into WebDataset samples (``max_samples < 0``: all).

    Returns ``(keys, fields, next_pos, end, error, duplicate, need)``: ``fields`` maps each
    extension to a bytearray of native int64 ``(data_offset, size)`` rows, one per key;
    ``error`` is a tar error as in :func:`scan`; ``duplicate`` is ``None`` or ``(member name,
    key)`` of a repeated extension; ``need`` as in :func:`scan`. ``object_end`` as in
    :func:`scan`. Semantics as :func:`fastfeed.read.columnar.scan_samples`.
    """

def gather_spans(
    dst: Buffer | NDArray[Any],
    src: Buffer | NDArray[Any],
    spans: Buffer | NDArray[Any],
    dst_offset: int,
    offsets: Buffer | NDArray[Any] | None,
) -> int:
    """Copy ``src[off:off + size]`` for each int64 row ``(off, size)`` of ``spans`` into ``dst``.

    Returns the number of bytes written; semantics, checks and errors as
    :func:`fastfeed.read.columnar.gather_spans`.
    """

def parse_ints(data: Buffer | NDArray[Any], offsets: Buffer | NDArray[Any], out: Buffer | NDArray[Any]) -> int:
    """Parse each ``data[offsets[i]:offsets[i + 1]]`` as an ASCII integer into ``out[i]``.

    Returns the index of the first item that is not an integer, or -1. Semantics as
    :meth:`fastfeed.batch.assemble.RaggedBytes.to_ints`.
    """

CRC32C_HARDWARE: bool

def crc32c(buf: Buffer | NDArray[Any], value: int = 0, portable: bool = False) -> int:
    """The CRC32C (Castagnoli) of ``buf``, continuing from ``value`` (GIL released); the CPU's
    CRC32 instruction where it has one, unless ``portable``."""

def crc32c_chunks(buf: Buffer | NDArray[Any], chunk: int) -> list[int]:
    """The CRC32C of each ``chunk`` bytes of ``buf`` (the last piece may be shorter), computed
    with the GIL released once (ValueError for ``chunk <= 0``)."""
