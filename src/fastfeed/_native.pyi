"""Native tar member indexing and batch gather (csrc/bindings.cpp).

Use :mod:`fastfeed.tario` and :mod:`fastfeed.gather`, not this module.
"""

from collections.abc import Iterable
from typing import Any, Final

from numpy.typing import NDArray
from typing_extensions import Buffer

#: Error kind name -> code, as returned in the error tuple of :func:`scan`.
ERROR_KINDS: Final[dict[str, int]]

def scan(
    buf: Buffer, pos: int, final: bool
) -> tuple[list[tuple[str, int, int]], int, bool, tuple[int, int, bytes | None, int, int] | None]:
    """Index the tar members in ``buf[pos:]`` with the GIL released.

    Returns ``(members, next_pos, end, error)``; ``error`` is ``None`` or
    ``(kind, offset, name_bytes_or_None, a, b)`` with ``kind`` from :data:`ERROR_KINDS`.
    Raises TypeError/BufferError for a non-contiguous or non-buffer ``buf`` and ValueError
    for a ``pos`` outside it.
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
    Semantics, checks and errors as :func:`fastfeed.gather.gather`.
    """
