"""The cache's entry format: how a file in the cache is named and what it holds, and the
writes that make one (the fill's parts, buffered or ``O_DIRECT``, and the trailer that seals
it). Every cache module reads and writes entries through these; the directories they live in
are :mod:`fastfeed.cache.files`'s.

An entry is ``v2/entries/<key>.tar``; while it is filled it is ``v2/tmp/<key>.part``. ``key``
is ``<sha256(url)[:24]>-<sha256(etag)[:12]>-<size>`` (:func:`entry_key`): a changed object
(another ETag) has another key, so a stale entry is never served, and every fill reads the
object with ``If-Match`` on its ETag. The size in the name is what the cache counts against its
limit (:func:`size_of`).

An entry is the object's ``size`` bytes followed by a trailer: the CRC32C of each ``chunk``
bytes of the object (the last chunk may be shorter), each a little-endian u32, then a 28-byte
footer ``<8sQIII``: ``b"ffcache2"``, ``size``, ``chunk`` (1 MiB), the number of CRCs, and the
CRC32C of the CRCs followed by the footer's first 24 bytes. A fill computes the CRC32Cs from
the bytes it writes (:class:`Checksums`) and appends the trailer last (:func:`seal`); a hit
checks the trailer when it opens the entry (:func:`read_trailer`) and each chunk before its
bytes are served (:func:`check_chunks`).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import struct
from collections.abc import Sequence
from typing import NamedTuple

from fastfeed import _native
from fastfeed.store.base import ObjectInfo

__all__ = [
    "ENTRY_SUFFIX",
    "PART_SUFFIX",
    "Checksums",
    "Damaged",
    "Entry",
    "check_chunks",
    "entry_key",
    "read_trailer",
    "seal",
    "size_of",
    "trailer_size",
    "url_hash_of",
    "write_part",
]

#: Suffixes of an entry (in ``v2/entries/``) and of a part file being filled (in ``v2/tmp/``).
ENTRY_SUFFIX, PART_SUFFIX = ".tar", ".part"
#: Bytes per CRC32C in an entry's trailer (each chunk is checked when first read).
_CHUNK = 1 << 20
_CHUNK_RANGE = (4096, 1 << 30)
_MAGIC = b"ffcache2"
_FOOTER = struct.Struct("<8sQIII")  # magic, object size, chunk, CRC count, CRC32C of the rest


# ------------------------------------------------------------------------ names


def entry_key(info: ObjectInfo) -> str:
    """The cache key of one version of an object."""
    url_hash = hashlib.sha256(info.url.encode()).hexdigest()[:24]
    etag_hash = hashlib.sha256((info.etag or "").encode()).hexdigest()[:12]
    return f"{url_hash}-{etag_hash}-{info.size}"


def url_hash_of(key: str) -> str:
    """The part of a cache key (or of a cache file name) that names the object, whatever its version."""
    return key.split("-", 1)[0]


def size_of(name: str) -> int:
    """The object size a cache file name records (0 if the name is not ours)."""
    stem = name.split(".", 1)[0]
    try:
        return int(stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


# ------------------------------------------------------------------------ entry checksums


def _chunks(size: int, chunk: int) -> int:
    return -(-size // chunk)


def trailer_size(size: int, chunk: int = _CHUNK) -> int:
    """Bytes of the trailer after an object of ``size`` bytes in its entry."""
    return 4 * _chunks(size, chunk) + _FOOTER.size


def _trailer(size: int, chunk: int, crcs: Sequence[int]) -> bytes:
    table = struct.pack(f"<{len(crcs)}I", *crcs)
    head = _FOOTER.pack(_MAGIC, size, chunk, len(crcs), 0)[:-4]
    return table + head + struct.pack("<I", _native.crc32c(table + head))


class Damaged(Exception):
    """An entry whose size or trailer is wrong (the message says how)."""


def read_trailer(fd: int, size: int) -> tuple[int, tuple[int, ...]]:
    """``(chunk, CRCs)`` from the trailer of the entry open at ``fd`` of an object of ``size``
    bytes; raises :class:`Damaged`."""
    length = os.fstat(fd).st_size
    if length < size + _FOOTER.size:
        raise Damaged(f"is truncated ({length} bytes; the shard alone has {size})")
    foot = os.pread(fd, _FOOTER.size, length - _FOOTER.size)
    magic, recorded, chunk, count, crc = _FOOTER.unpack(foot)
    low, high = _CHUNK_RANGE
    if magic != _MAGIC or recorded != size or not low <= chunk <= high or count != _chunks(size, chunk):
        raise Damaged(f"is truncated or its trailer is damaged ({length} bytes)")
    if length != size + 4 * count + _FOOTER.size:
        raise Damaged(f"is truncated or has extra bytes ({length} bytes, not {size + 4 * count + _FOOTER.size})")
    table = os.pread(fd, 4 * count, size)
    if len(table) != 4 * count or _native.crc32c(table + foot[:-4]) != crc:
        raise Damaged("has a damaged trailer (its CRC32C does not match)")
    return chunk, struct.unpack(f"<{count}I", table)


class Checksums:
    """The CRC32C of each ``chunk`` bytes of a stream of bytes fed in order (a fill's)."""

    def __init__(self, chunk: int = _CHUNK) -> None:
        self.chunk = chunk
        self.size = 0
        self.crcs: list[int] = []
        self._crc = 0
        self._filled = 0  # bytes of the current chunk

    def update(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            n = min(self.chunk - self._filled, len(data) - pos)
            self._crc = _native.crc32c(data[pos : pos + n], self._crc)
            self._filled += n
            pos += n
            if self._filled == self.chunk:
                self.crcs.append(self._crc)
                self._crc = self._filled = 0
        self.size += len(data)

    def trailer(self) -> bytes:
        return _trailer(self.size, self.chunk, self.crcs + ([self._crc] if self._filled else []))


def check_chunks(
    data: memoryview, base: int, chunk: int, crcs: Sequence[int], first: int, last: int, done: bytearray
) -> int | None:
    """[worker thread] Check chunks ``first..last-1`` of an entry whose bytes from offset
    ``base`` are ``data`` against ``crcs``, skipping the runs marked in ``done`` and marking
    those that pass; the first that fails, or None. Each run of unchecked chunks is one native
    call (the GIL is not taken between its chunks)."""
    i = first
    while i < last:
        if done[i]:
            i += 1
            continue
        j = i
        while j < last and not done[j]:
            j += 1
        lo = i * chunk - base
        got = _native.crc32c_chunks(data[lo : lo + (j - i) * chunk], chunk)
        for k, crc in enumerate(got, start=i):
            if crc != crcs[k]:
                return k
            done[k] = 1
        i = j
    return None


class Entry(NamedTuple):
    """An entry opened for a hit: its descriptor (holding LOCK_SH), its name in the directory
    ``dir_fd``, and its checksums."""

    fd: int
    dir_fd: int
    name: str
    chunk: int
    crcs: tuple[int, ...]


# ------------------------------------------------------------------------ writing a fill


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


#: Alignment of O_DIRECT writes (memory address, file offset and length): the page size, which
#: is a multiple of every common logical block size.
_DIRECT_ALIGN = mmap.PAGESIZE


def _address(view: memoryview) -> int | None:
    try:
        import numpy as np

        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
    except (TypeError, ValueError):
        return None


def write_part(fd: int, direct_fd: int | None, data: memoryview, offset: int) -> None:
    """Write a fill's part: through ``direct_fd`` (O_DIRECT) when the part is aligned in memory,
    offset and length (every part of a shard but its last, with pooled buffers), else buffered
    through ``fd``."""
    if (
        direct_fd is not None
        and offset % _DIRECT_ALIGN == 0
        and len(data) % _DIRECT_ALIGN == 0
        and (_address(data) or 1) % _DIRECT_ALIGN == 0
    ):
        try:
            _pwrite_all(direct_fd, data, offset)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _pwrite_all(fd, data, offset)


def seal(fd: int, sums: Checksums) -> None:
    """[worker thread] Append the trailer to a filled part file and make it durable."""
    _pwrite_all(fd, memoryview(sums.trailer()), sums.size)
    os.fsync(fd)
