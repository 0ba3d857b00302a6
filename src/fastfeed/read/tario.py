"""Tar member indexing: where the regular files of a (possibly partial) tar archive are.

:func:`scan` is native (``csrc/tar_index.cpp``, run with the GIL released); :func:`scan_py` is
a pure-Python reference with exactly the same semantics, results, error classes and messages.
The two are tested against each other, so change them together.

Streaming contract: ``buf[pos:]`` starts at a header boundary. A scan returns the complete
regular members, ``next_pos`` (where the next scan resumes) and ``end``. A caller that streams
a shard keeps ``buf[next_pos:]``, appends the bytes that arrive next and scans again; pass
``final=True`` once the buffer holds everything up to the end of the object. ``need`` says how
long the buffer must be before scanning again gets any further (the rest of the header, or the
member's data, that the scan stopped in), so a caller never rescans, or copies, in vain; and a
caller that knows the object's ``size`` learns at once when a header claims more bytes than the
object has (a :class:`~fastfeed.errors.TruncatedShardError`, as if it had read to the end).

What is read (compatible with Python's :mod:`tarfile` for archives that tarfile, GNU tar and
WebDataset write):

* v7, ustar/pax and GNU headers; the checksum must match the unsigned or the signed byte sum.
* Regular members are typeflags ``'0'``, ``'\\0'`` and ``'7'`` (an old-style ``'\\0'`` whose
  name ends in ``/`` is a directory). Hard links, symlinks, devices, FIFOs and directories
  carry no data (POSIX; their size field is ignored, as tarfile does); unknown types are skipped
  by their size. Nothing but regular members is returned.
* Names: ustar ``prefix + "/" + name``; GNU ``'L'`` long names and pax ``path`` records
  override (the first extension header wins, as in tarfile; trailing ``/`` is stripped from
  pax paths, as in tarfile). Decoded as UTF-8 with ``surrogateescape``.
* Sizes: octal or GNU base-256 header fields, overridden by a pax ``size`` record.
* Pax global headers (``'g'``) are validated and otherwise ignored; GNU ``'K'`` long link names
  are skipped. GNU sparse members (``'S'``, pax ``GNU.sparse.*``) raise
  :class:`~fastfeed.errors.CorruptShardError`: their data is not the file content.

Errors name byte offsets in the object: offsets within the buffer passed in, plus ``base``.
"""

from __future__ import annotations

import operator
import struct
from typing import TYPE_CHECKING, NamedTuple

from fastfeed import _native
from fastfeed.errors import CorruptShardError, ShardError, TruncatedShardError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["ScanResult", "scan", "scan_py"]


class ScanResult(NamedTuple):
    """What one scan of a buffer found."""

    #: ``(name, data_offset, size)`` of each complete regular member, in archive order;
    #: ``data_offset`` is an absolute offset into the buffer, ``size`` is in bytes.
    members: list[tuple[str, int, int]]
    #: Offset of the first header not consumed: where the next scan must resume.
    next_pos: int
    #: The end-of-archive marker (a zero block where a header is expected) is at ``next_pos``.
    end: bool
    #: Stopped for lack of bytes (not ``final``, not ``end``): the buffer length (an offset into
    #: the buffer, always past its end) a scan resumed at ``next_pos`` needs to get any further:
    #: the rest of the header, extension payload, or member data and padding it stopped in.
    #: Otherwise ``next_pos``.
    need: int


# Error kinds shared with the native module (tar::ErrorKind in csrc/tar_index.h; the tests check
# that _native.ERROR_KINDS matches). Below 20: corrupt archive; 20 and above: truncated.
ERROR_KINDS: dict[str, int] = {
    "BAD_CHECKSUM": 1,  # offset: header; a: stored checksum; b: unsigned byte sum
    "BAD_FIELD": 2,  # offset: header; a: field offset in the header (124 size, 148 checksum)
    "BAD_PAX_RECORD": 3,  # offset: extension header; a: record offset in its payload
    "BAD_PAX_SIZE": 4,  # offset: extension header; a: record offset in its payload
    "SPARSE": 5,  # offset: the header declaring a GNU sparse member
    "DANGLING_EXTENSION": 6,  # offset: end-of-archive block; a: first extension header
    "TRUNCATED_HEADER": 20,  # offset: header; a: bytes present
    "TRUNCATED_EXTENSION": 21,  # offset: extension header; a: payload bytes present; b: size
    "TRUNCATED_DATA": 22,  # offset: member header; a: data bytes present; b: data size
}
_BAD_CHECKSUM = ERROR_KINDS["BAD_CHECKSUM"]
_BAD_FIELD = ERROR_KINDS["BAD_FIELD"]
_BAD_PAX_RECORD = ERROR_KINDS["BAD_PAX_RECORD"]
_BAD_PAX_SIZE = ERROR_KINDS["BAD_PAX_SIZE"]
_SPARSE = ERROR_KINDS["SPARSE"]
_DANGLING_EXTENSION = ERROR_KINDS["DANGLING_EXTENSION"]
_TRUNCATED_HEADER = ERROR_KINDS["TRUNCATED_HEADER"]
_TRUNCATED_EXTENSION = ERROR_KINDS["TRUNCATED_EXTENSION"]
_TRUNCATED_DATA = ERROR_KINDS["TRUNCATED_DATA"]

# (kind, offset, raw member name or None, a, b): an error as both implementations report it.
RawError = tuple[int, int, bytes | None, int, int]
# (members, next_pos, end, error, need, partial): a scan as both implementations report it;
# partial is the raw name of the regular member a scan that ran out of bytes stopped inside.
RawScan = tuple[list[tuple[str, int, int]], int, bool, RawError | None, int, bytes | None]

_CORRUPT_HINT = "the object is not a valid tar archive; re-create the shard"
_SPARSE_HINT = "fastfeed cannot read GNU sparse members; re-create the shard without sparse files"
_TRUNCATED_HINT = "the object was cut short (interrupted upload or partial copy); re-upload or re-create the shard"


def scan(
    buf: Buffer,
    pos: int = 0,
    *,
    final: bool = False,
    url: str | None = None,
    base: int = 0,
    size: int | None = None,
) -> ScanResult:
    """Index the tar members in ``buf[pos:]`` (native; the GIL is released while scanning).

    Args:
        buf: any C-contiguous buffer (bytes, bytearray, memoryview, mmap, numpy uint8 array).
        pos: offset of a header boundary in ``buf``.
        final: ``buf`` holds everything up to the end of the object, so stopping early on
            anything but zero bytes is a truncation (and trailing padding may be missing).
        url: the shard, for error messages.
        base: the offset of ``buf[0]`` in the object, for error messages and ``size``.
        size: the object's size, if known: a header whose data (or extension payload) would
            run past it raises at once, ``final`` or not.

    Raises:
        CorruptShardError: a bad checksum, numeric field or pax record, or a sparse member.
        TruncatedShardError: the object ends inside a header or a member (known from
            ``final``, or from ``size``).
        ValueError: ``pos`` is outside the buffer, or ``size`` ends before it.
    """
    end_at = object_end_of(base, size)
    members, next_pos, end, err, need, _ = _native.scan(buf, operator.index(pos), bool(final), end_at)
    if err is not None:
        raise shard_error(err, url, base)
    return ScanResult(members, next_pos, end, need)


def scan_py(
    buf: Buffer,
    pos: int = 0,
    *,
    final: bool = False,
    url: str | None = None,
    base: int = 0,
    size: int | None = None,
) -> ScanResult:
    """Pure-Python reference for :func:`scan`: same arguments, results and errors, but slow."""
    pos = operator.index(pos)
    end_at = object_end_of(base, size)
    with memoryview(buf) as view, view.cast("B") as mv:
        if not 0 <= pos <= len(mv):
            raise ValueError(f"pos={pos} is outside the buffer (0..{len(mv)})")
        check_object_end(end_at, len(mv))
        members, next_pos, end, err, need, _ = scan_raw(mv, pos, bool(final), end_at)
    if err is not None:
        raise shard_error(err, url, base)
    return ScanResult(members, next_pos, end, need)


def object_end_of(base: int, size: int | None) -> int:
    """The object's end in the coordinates of a buffer that starts at ``base``; -1: unknown."""
    if size is None:
        return -1
    end = operator.index(size) - operator.index(base)
    if end < 0:
        raise ValueError(f"size={size} is before base={base}")
    return end


def check_object_end(object_end: int, length: int) -> None:
    """The native scans' check of ``object_end`` (-1: unknown) against a buffer's length."""
    if object_end != -1 and not object_end >= length:
        raise ValueError(f"object_end={object_end} is before the end of the buffer ({length} bytes)")


# --------------------------------------------------------------------------------------------
# The reference scanner. Mirrors csrc/tar_index.cpp step by step (same checks, same order).

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_USTAR_MAGIC = b"ustar\0"  # POSIX ustar/pax; GNU headers have b"ustar  \0"
_EXT_TYPES = frozenset(b"xXgLK")  # pax extended / global, GNU long name / long link name
_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)
_SIGNED_BYTES = struct.Struct("148b8x356b")  # a header minus its checksum field, signed


def _padded(size: int) -> int:
    return (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _parse_number(f: bytes) -> int | None:
    """A numeric header field: GNU base-256 or octal ASCII; ``None`` if invalid or not int64."""
    if f[0] in (0x80, 0xFF):
        v = int.from_bytes(f[1:], "big")
        if f[0] == 0xFF:
            v -= 1 << (8 * (len(f) - 1))
        return v if _INT64_MIN <= v <= _INT64_MAX else None
    n = len(f)
    i = 0
    while i < n and f[i] == 0x20:  # leading spaces
        i += 1
    j = i
    while j < n and 0x30 <= f[j] <= 0x37:
        j += 1
    if j < n and f[j] not in (0, 0x20):  # must end with NUL, space or the field
        return None
    v = int(f[i:j], 8) if j > i else 0  # no digits (e.g. all NUL) reads as 0, like tarfile
    return v if v <= _INT64_MAX else None


def _parse_pax(p: bytes, is_global: bool) -> tuple[int, int, bytes | None, int | None]:
    """Pax records ``"<len> <keyword>=<value>\\n"``: ``(error kind or 0, bad record, path, size)``.

    A NUL where a record should start ends the list. Empty values delete the keyword (POSIX).
    Global headers are only validated.
    """
    n = len(p)
    path: bytes | None = None
    size: int | None = None
    i = 0
    while i < n:
        if p[i] == 0:
            break
        j = i
        while j < n and j - i < 20 and 0x30 <= p[j] <= 0x39:
            j += 1
        if j == i or j >= n or p[j] != 0x20:
            return _BAD_PAX_RECORD, i, None, None
        length = int(p[i:j])
        if length < 5 or length > n - i:
            return _BAD_PAX_RECORD, i, None, None
        end = i + length
        kv = j + 1
        if kv >= end or p[end - 1] != 0x0A:
            return _BAD_PAX_RECORD, i, None, None
        eq = p.find(b"=", kv, end - 1)
        if eq <= kv:  # no '=' (-1) or an empty keyword
            return _BAD_PAX_RECORD, i, None, None
        key = p[kv:eq]
        value = p[eq + 1 : end - 1]
        if not is_global:
            if key == b"path":
                path = value.rstrip(b"/") if value else None
            elif key == b"size":
                if not value:
                    size = None
                elif not value.isdigit() or int(value) > _INT64_MAX:
                    return _BAD_PAX_SIZE, i, None, None
                else:
                    size = int(value)
            elif key.startswith(b"GNU.sparse."):
                return _SPARSE, i, None, None
        i = end
    return 0, 0, path, size


def _all_zero(mv: memoryview, start: int) -> bool:
    step = 1 << 16
    for i in range(start, len(mv), step):
        piece = mv[i : i + step].tobytes()
        if piece.count(0) != len(piece):
            return False
    return True


def _fail(kind: int, offset: int, a: int = 0, b: int = 0, name: bytes | None = None) -> RawScan:
    return [], offset, False, (kind, offset, name, a, b), offset, None


def _stop(
    mv: memoryview,
    members: list[tuple[str, int, int]],
    chain: int,
    final: bool,
    kind: int,
    offset: int,
    a: int,
    b: int,
    name: bytes | None,
    need: int,
    partial: bytes | None = None,
) -> RawScan:
    """Out of bytes inside the member chain starting at ``chain``: wait, or (final) truncated.

    ``need``: the buffer length that gets a resumed scan past it; ``partial``: the name of the
    regular member whose data it stopped in."""
    if final and not _all_zero(mv, chain):
        return _fail(kind, offset, a, b, name)
    if final:
        return members, chain, False, None, chain, None
    return members, chain, False, None, need, partial


def scan_raw(mv: memoryview, pos: int, final: bool, object_end: int = -1) -> RawScan:
    n = len(mv)
    if object_end == -1:
        object_end = 2**64 - 1  # the native kUnknownEnd
    object_end = max(object_end, n)
    members: list[tuple[str, int, int]] = []
    p = pos
    while True:
        # One member: optional extension headers, then its own header.
        chain = p  # where a resumed scan restarts
        in_chain = False  # extension headers seen for this member
        name: bytes | None = None  # from GNU 'L' / pax path
        size_override: int | None = None  # from pax size
        while True:
            if n - p < _BLOCK:
                return _stop(mv, members, chain, final, _TRUNCATED_HEADER, p, n - p, 0, name, p + _BLOCK)
            h = mv[p : p + _BLOCK].tobytes()
            if h == _ZERO_BLOCK:
                if in_chain:
                    return _fail(_DANGLING_EXTENSION, p, chain)
                return members, p, True, None, p, None

            stored = _parse_number(h[148:156])
            if stored is None:
                return _fail(_BAD_FIELD, p, 148)
            unsigned_sum = sum(h) - sum(h[148:156]) + 8 * 0x20
            if stored != unsigned_sum:
                signed_sum = sum(_SIGNED_BYTES.unpack(h)) + 8 * 0x20
                if stored != signed_sum:
                    return _fail(_BAD_CHECKSUM, p, stored, unsigned_sum)

            header_size = _parse_number(h[124:136])
            if header_size is None or header_size < 0:
                return _fail(_BAD_FIELD, p, 124)
            typeflag = h[156]
            data_off = p + _BLOCK
            avail = n - data_off
            in_object = object_end - data_off  # of which the object can hold

            if typeflag in _EXT_TYPES:
                total = _padded(header_size)
                if not final and header_size > in_object:
                    return _fail(_TRUNCATED_EXTENSION, p, in_object, header_size)
                if not final and total > in_object:
                    return _fail(_TRUNCATED_EXTENSION, p, header_size, header_size)
                if header_size > avail:
                    return _stop(
                        mv, members, chain, final, _TRUNCATED_EXTENSION, p, avail, header_size, None, data_off + total
                    )
                if total > avail:
                    return _stop(
                        mv,
                        members,
                        chain,
                        final,
                        _TRUNCATED_EXTENSION,
                        p,
                        header_size,
                        header_size,
                        None,
                        data_off + total,
                    )
                payload = mv[data_off : data_off + header_size].tobytes()
                if typeflag == ord("L"):
                    if name is None:
                        name = payload.split(b"\0", 1)[0]
                elif typeflag != ord("K"):
                    kind, bad_at, path, pax_size = _parse_pax(payload, typeflag == ord("g"))
                    if kind == _SPARSE:
                        return _fail(kind, p)
                    if kind:
                        return _fail(kind, p, bad_at)
                    if path is not None and name is None:
                        name = path
                    if pax_size is not None and size_override is None:
                        size_override = pax_size
                nxt = data_off + total
                if typeflag == ord("g") and not in_chain:
                    chain = nxt  # a global header on its own is consumed like a member
                else:
                    in_chain = True
                p = nxt
                continue
            if typeflag == ord("S"):
                return _fail(_SPARSE, p)

            header_name = h[:100].split(b"\0", 1)[0]
            v7_dir = typeflag == 0 and header_name.endswith(b"/")
            regular = typeflag in (0x30, 0x37) or (typeflag == 0 and not v7_dir)
            no_data = v7_dir or 0x31 <= typeflag <= 0x36  # '1'..'6' never carry data
            if name is None:
                name = header_name
                if h[257:263] == _USTAR_MAGIC:
                    prefix = h[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix + b"/" + header_name
            member_size = header_size if size_override is None else size_override
            data_len = 0 if no_data else member_size
            total = _padded(data_len)
            partial = name if regular else None
            # Padding cut off by the end of the object is accepted (see below), data is not.
            if not final and data_len > in_object:
                return _fail(_TRUNCATED_DATA, p, in_object, data_len, name)
            if data_len > avail:
                return _stop(
                    mv, members, chain, final, _TRUNCATED_DATA, p, avail, data_len, name, data_off + total, partial
                )
            if total <= avail:
                nxt = data_off + total
            elif not final:
                return _stop(
                    mv, members, chain, final, _TRUNCATED_DATA, p, data_len, data_len, name, data_off + total, partial
                )
            else:
                nxt = n  # final: the object ends inside the padding; accept
            if regular:
                members.append((name.decode("utf-8", "surrogateescape"), data_off, member_size))
            p = nxt
            break


# --------------------------------------------------------------------------------------------


def shard_error(err: RawError, url: str | None, base: int = 0) -> ShardError:
    """The fastfeed error for an error tuple from either implementation, its buffer offsets
    shifted by ``base`` (the offset of the buffer in the object)."""
    kind, offset, raw_name, a, b = err
    offset += base
    if kind == _DANGLING_EXTENSION:
        a += base
    name = raw_name.decode("utf-8", "surrogateescape") if raw_name is not None else None
    at = f"at offset {offset}"
    if kind == _BAD_CHECKSUM:
        msg = f"bad tar header checksum {at} (stored {a}, computed {b})"
    elif kind == _BAD_FIELD:
        field = {124: "size", 148: "checksum"}.get(a, f"byte {a}")
        msg = f"invalid {field} field in the tar header {at}"
    elif kind == _BAD_PAX_RECORD:
        msg = f"malformed pax record at offset {offset + _BLOCK + a} in the extended header {at}"
    elif kind == _BAD_PAX_SIZE:
        msg = f"invalid pax size value at offset {offset + _BLOCK + a} in the extended header {at}"
    elif kind == _SPARSE:
        return CorruptShardError(f"unsupported sparse member {at}", url=url, hint=_SPARSE_HINT)
    elif kind == _DANGLING_EXTENSION:
        msg = (
            f"the extension header at offset {a} is followed by the end-of-archive marker {at} "
            "instead of the member it describes"
        )
    elif kind == _TRUNCATED_HEADER:
        what = f"the header of member {name!r}" if name is not None else "a tar header"
        msg = f"the object ends inside {what} {at} ({a} of {_BLOCK} bytes present)"
        return TruncatedShardError(msg, url=url, hint=_TRUNCATED_HINT)
    elif kind == _TRUNCATED_EXTENSION:
        if a < b:
            msg = f"the object ends inside the extension header {at} ({a} of {b} payload bytes present)"
        else:
            msg = f"the object ends after the extension header {at}, before the member it describes"
        return TruncatedShardError(msg, url=url, hint=_TRUNCATED_HINT)
    elif kind == _TRUNCATED_DATA:
        msg = f"the object ends inside the data of member {name!r} {at} ({a} of {b} bytes present)"
        return TruncatedShardError(msg, url=url, hint=_TRUNCATED_HINT)
    else:  # pragma: no cover - the two tables are tested to agree
        msg = f"tar scan failed {at} (unknown error kind {kind})"
    return CorruptShardError(msg, url=url, hint=_CORRUPT_HINT)
