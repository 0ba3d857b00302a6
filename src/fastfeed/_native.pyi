"""Native tar member indexing (csrc/bindings.cpp). Use :mod:`fastfeed.tario`, not this module."""

from typing import Final

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
