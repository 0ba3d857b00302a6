"""Columnar samples: whole WebDataset samples as byte spans of a tar buffer, and their gather.

Batching small records member by member costs a Python tuple per member, a regex per name and a
dict per sample. The columnar path does neither: :func:`scan_samples` turns a buffer of tar
bytes into the keys of its samples plus, per extension, an ``int64 [n, 2]`` array of
``(data_offset, size)`` spans; :func:`gather_spans` copies the spans of one field into a batch
arena in one call::

    scan = scan_samples(buf, final=True, url=url)
    images = scan.fields["jpg"]                       # [n, 2]: (offset, size) in buf
    offsets = np.empty(len(images) + 1, np.int64)
    gather_spans(arena, buf, images, offsets=offsets)  # sample i is arena[offsets[i]:offsets[i + 1]]

:func:`scan_samples` and :func:`gather_spans` are native (``csrc/samples.cpp``, ``csrc/gather.cpp``);
:func:`scan_samples_py` and :func:`gather_spans_py` are pure-Python references with the same
results, exception classes and messages (built on :func:`fastfeed.read.tario.scan_py` and
:func:`fastfeed.read.keys.split_key`). The two are tested against each other and against
:func:`fastfeed.read.reader.iter_samples`, so change them together.

Sample rules (those of :mod:`fastfeed.read.reader`): regular members only, names decoded as UTF-8
with ``surrogateescape``, split by :func:`~fastfeed.read.keys.split_key` (names it rejects belong to
no sample and are skipped); consecutive members with the same key form a sample; a repeated
extension in a sample raises :class:`~fastfeed.errors.CorruptShardError`. The native code splits
names on their bytes (exact: every rule splits at ASCII characters, which UTF-8 with
surrogateescape keeps as they are) and lower-cases ASCII letters itself; extensions with any
other character are lower-cased with Python's ``str.lower`` (so ``"JPÉG"`` is ``"jpég"``, and two
spellings that lower to the same text are the same field).
"""

from __future__ import annotations

import operator
import sys
from array import array
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from fastfeed import _native
from fastfeed.batch.gather import as_bytes, export_buffer, export_writable, index_arg, is_int64_format
from fastfeed.errors import CorruptShardError
from fastfeed.read.keys import split_key
from fastfeed.read.tario import RawScan, check_object_end, object_end_of, scan_raw, shard_error

if TYPE_CHECKING:
    from collections.abc import Callable

    from numpy.typing import NDArray
    from typing_extensions import Buffer

    from fastfeed.batch.gather import BufferLike

__all__ = ["SampleScan", "gather_spans", "gather_spans_py", "scan_samples", "scan_samples_py"]

#: The extensions every sample already has (``reader.iter_samples`` puts them in the sample
#: dict, so a member with one of them is a duplicate).
_RESERVED = frozenset({"__key__", "__url__"})


class SampleScan(NamedTuple):
    """The complete samples of one buffer, as spans."""

    #: ``__key__`` of each complete sample, in archive order.
    keys: list[str]
    #: Extension -> ``int64`` array of shape ``[len(keys), 2]``: ``(data_offset, size)`` of that
    #: member in the buffer, ``(-1, 0)`` where the sample lacks it. Extensions appear in order of
    #: first appearance; only those that some returned sample has.
    fields: dict[str, NDArray[np.int64]]
    #: Offset of the first header of the first sample not returned: where the next scan resumes.
    next_pos: int
    #: The end-of-archive marker was reached (it is at ``next_pos``).
    end: bool
    #: The tar scan's ``need`` (see :class:`fastfeed.read.tario.ScanResult`): the buffer length a
    #: scan resumed at ``next_pos`` needs to get further than this one; ``next_pos`` when it
    #: did not stop for lack of bytes.
    need: int


def scan_samples(
    buf: Buffer,
    pos: int = 0,
    *,
    final: bool = False,
    url: str | None = None,
    max_samples: int | None = None,
    base: int = 0,
    size: int | None = None,
) -> SampleScan:
    """Group the tar members of ``buf[pos:]`` into complete WebDataset samples (native).

    The samples are exactly those ``reader.iter_samples(url, [(buf[pos:], final)])`` yields, as
    spans; a sample is returned once it is complete:

    * when the headers of the first member of the next sample have been seen, the
      end-of-archive marker is reached, or ``final`` is set and the buffer ends cleanly (then
      the last one too);
    * a sample cut by the end of a non-final buffer is not returned and ``next_pos`` is the
      first header of its first member (extension headers included): keep ``buf[next_pos:]``,
      append the bytes that follow and scan again (``tario.scan``'s contract, per sample).
      Members that belong to no sample (directories, ``__meta__`` files, names without a dot)
      between returned samples are consumed.
    * ``max_samples``: stop after that many samples; ``next_pos`` is the first header of the
      next one, and nothing after that member is read (errors there are not reported).

    Offsets are absolute offsets into ``buf``. Unlike ``iter_samples``, an empty buffer is not
    an error (whether the whole object was empty is the streaming caller's business).

    Args:
        buf: any C-contiguous buffer; the tar scan runs with the GIL released.
        pos: offset of a header boundary in ``buf``.
        final: ``buf`` holds everything up to the end of the object.
        url: the shard, for error messages.
        max_samples: at most this many samples (``>= 0``); ``None``: no limit.
        base, size: as :func:`fastfeed.read.tario.scan` (offsets in error messages, and a header
            that claims more bytes than the object has raising at once).

    Raises:
        CorruptShardError: as :func:`fastfeed.read.tario.scan`, or a repeated extension in a sample
            (also in the incomplete last one). Tar errors in the bytes scanned win.
        TruncatedShardError: as :func:`fastfeed.read.tario.scan` (``final``, or from ``size``).
        ValueError: ``pos`` is outside the buffer, ``max_samples`` is negative or ``size``
            ends before the buffer.
        TypeError: ``pos`` or ``max_samples`` is not an integer.
    """
    pos = operator.index(pos)
    limit = _limit(max_samples)
    end_at = object_end_of(base, size)
    keys, raw_fields, next_pos, end, err, dup, need = _native.scan_samples(
        buf, pos, bool(final), -1 if limit is None else min(limit, sys.maxsize), end_at
    )
    if err is not None:
        raise shard_error(err, url, base)
    if dup is not None:
        raise _duplicate_error(dup[0], dup[1], url)
    fields = {ext: np.frombuffer(rows, dtype=np.int64).reshape(-1, 2) for ext, rows in raw_fields.items()}
    return SampleScan(keys, fields, next_pos, end, need)


def scan_samples_py(
    buf: Buffer,
    pos: int = 0,
    *,
    final: bool = False,
    url: str | None = None,
    max_samples: int | None = None,
    base: int = 0,
    size: int | None = None,
) -> SampleScan:
    """Pure-Python reference for :func:`scan_samples`: same arguments, results and errors."""
    return _scan_samples_ref(buf, pos, final, url, max_samples, scan_raw, base, size)


def _limit(max_samples: int | None) -> int | None:
    if max_samples is None:
        return None
    limit = operator.index(max_samples)
    if limit < 0:
        raise ValueError(f"max_samples must be >= 0 or None, got {limit}")
    return limit


def _duplicate_error(name: str, key: str, url: str | None) -> CorruptShardError:
    """What ``reader.iter_samples`` raises for a repeated extension."""
    return CorruptShardError(
        f"duplicate file {name!r} in sample {key!r}",
        url=url,
        hint="each sample may hold one file per extension; fix the shard writer",
    )


# --------------------------------------------------------------------------------------------
# The reference: the members of a tar scan, grouped with keys.split_key.


def _scan_samples_ref(
    buf: Buffer,
    pos: int,
    final: bool,
    url: str | None,
    max_samples: int | None,
    raw_scan: Callable[[memoryview, int, bool, int], RawScan],
    base: int = 0,
    size: int | None = None,
) -> SampleScan:
    """scan_samples_py over ``raw_scan(view, pos, final, object_end) -> (members, next_pos,
    end, error, need, partial)``: ``tario.scan_raw`` (pure Python), or ``_native.scan`` to
    time the member-by-member path."""
    pos = operator.index(pos)
    limit = _limit(max_samples)
    final = bool(final)
    end_at = object_end_of(base, size)
    with memoryview(buf) as view, view.cast("B") as mv:
        if not 0 <= pos <= len(mv):
            raise ValueError(f"pos={pos} is outside the buffer (0..{len(mv)})")
        check_object_end(end_at, len(mv))
        members, tar_next, tar_end, err, need, partial = raw_scan(mv, pos, final, end_at)
        if err is not None and limit is not None:
            # A limited scan stops at the first member of sample limit + 1 and reads nothing
            # after it. Every error lies at or after the first header of the member it concerns,
            # so the members before it are those of a non-final scan that ends there.
            with mv[: err[1]] as head:
                members = raw_scan(head, pos, False, -1)[0]

        # Group by key: (key, first member index, {ext: (offset, size)}) per sample.
        samples: list[tuple[str, int, dict[str, tuple[int, int]]]] = []
        stop: int | None = None  # index of the member that starts sample limit + 1
        dup: CorruptShardError | None = None
        for i, (name, off, size) in enumerate(members):
            parts = split_key(name)
            if parts is None:
                continue
            key, ext = parts
            if not samples or samples[-1][0] != key:
                if limit is not None and len(samples) == limit:
                    stop = i
                    break
                samples.append((key, i, {}))
            exts = samples[-1][2]
            if dup is None and (ext in exts or ext in _RESERVED):
                dup = _duplicate_error(name, key, url)
            exts.setdefault(ext, (off, size))

        if stop is not None:
            complete, next_pos, end = len(samples), _chain(raw_scan, mv, pos, members[stop][1]), False
            need = next_pos
        elif err is not None:
            raise shard_error(err, url, base)
        elif tar_end or final or not samples or _starts_sample(partial, samples[-1][0]):
            # (out of bytes inside a member of another sample: the last one is complete)
            complete, next_pos, end = len(samples), tar_next, tar_end
        else:  # out of bytes: the last sample may have more members to come
            complete, next_pos, end = len(samples) - 1, _chain(raw_scan, mv, pos, members[samples[-1][1]][1]), False
        if dup is not None:
            raise dup

    keys = [key for key, _, _ in samples[:complete]]
    fields: dict[str, NDArray[np.int64]] = {}
    for row, (_, _, exts) in enumerate(samples[:complete]):
        for ext, span in exts.items():
            if ext not in fields:
                fields[ext] = np.tile(np.array([-1, 0], dtype=np.int64), (complete, 1))
            fields[ext][row] = span
    return SampleScan(keys, fields, next_pos, end, need)


def _starts_sample(partial: bytes | None, last_key: str) -> bool:
    """Whether the member named ``partial`` (raw bytes; None: none) starts a sample other than
    the one with key ``last_key``."""
    if partial is None:
        return False
    parts = split_key(partial.decode("utf-8", "surrogateescape"))
    return parts is not None and parts[0] != last_key


def _chain(raw_scan: Callable[[memoryview, int, bool, int], RawScan], mv: memoryview, pos: int, data_off: int) -> int:
    """The first header (extension headers included) of the member whose data is at ``data_off``.

    A non-final scan of the bytes before the last byte of that member's own header stops exactly
    there (tario.scan's resume contract).
    """
    with mv[: data_off - 1] as head:
        return raw_scan(head, pos, False, -1)[1]


# --------------------------------------------------------------------------------------------
# gather_spans


def gather_spans(
    dst: BufferLike,
    src: BufferLike,
    spans: BufferLike,
    *,
    dst_offset: int = 0,
    offsets: BufferLike | None = None,
) -> int:
    """Copy ``src[off:off + size]`` for each row ``(off, size)`` of ``spans`` back to back into
    ``dst`` at byte ``dst_offset`` (native); return the bytes written.

    Args:
        dst: a writable C-contiguous buffer, addressed as bytes.
        src: a C-contiguous buffer, addressed as bytes (e.g. the buffer a scan ran over).
        spans: C-contiguous ``int64`` array of shape ``[n, 2]``, e.g. ``SampleScan.fields[ext]``;
            a row ``(-1, 0)`` is an absent field and copies nothing.
        dst_offset: where the first span goes, in bytes.
        offsets: optional writable C-contiguous int64 buffer with at least ``n + 1`` elements;
            receives ``0`` and the running byte totals (relative to ``dst_offset``). Elements past
            ``n`` are left alone.

    Checks, in this order, all before a byte is written: ``dst_offset`` (TypeError, then
    ValueError if negative); ``dst`` (TypeError: no buffer or read-only; BufferError: not
    C-contiguous); ``src`` (TypeError, BufferError); ``spans`` (TypeError, BufferError, TypeError
    if not int64, ValueError if not ``[n, 2]``); ``offsets`` (as ``dst``, then not int64 ->
    TypeError, too short -> ValueError); each row in order (ValueError: outside ``src``);
    the total (ValueError: more than ``sys.maxsize``, or ``dst`` too small). The GIL is released
    for copies of 64 KiB and more (as :func:`fastfeed.batch.gather.gather`); a ``src`` that overlaps
    ``dst`` is copied span after span.
    """
    return _native.gather_spans(dst, src, spans, dst_offset, offsets)


def gather_spans_py(
    dst: BufferLike,
    src: BufferLike,
    spans: BufferLike,
    *,
    dst_offset: int = 0,
    offsets: BufferLike | None = None,
) -> int:
    """Pure-Python reference for :func:`gather_spans`: same arguments, results and errors."""
    dst_offset = index_arg(dst_offset, "dst_offset", 0, sys.maxsize)
    views: list[memoryview] = []
    try:
        dmv = export_writable(dst, "dst", "", views)
        smv = _export_readable(src, "src", "", views)
        pmv = _export_readable(spans, "spans", "int64 ", views)
        if not is_int64_format(pmv.format, pmv.itemsize):
            raise TypeError(f"spans must hold int64 values, got format {pmv.format!r} with itemsize {pmv.itemsize}")
        shape = pmv.shape or ()  # None only for a released view
        if len(shape) != 2 or shape[1] != 2:
            raise ValueError(f"spans must have shape [n, 2], got {shape!r}")
        n = shape[0]

        omv: memoryview | None = None
        if offsets is not None:
            omv = export_writable(offsets, "offsets", "int64 ", views)
            if not is_int64_format(omv.format, omv.itemsize):
                raise TypeError(
                    f"offsets must hold int64 values, got format {omv.format!r} with itemsize {omv.itemsize}"
                )
            have = omv.nbytes // 8
            if have <= n:
                raise ValueError(f"offsets has {have} elements, needs at least {n + 1} (len(spans) + 1)")

        flat = array("q", pmv.tobytes())  # C order; native byte order (checked above)
        rows = [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]
        src_len = smv.nbytes
        for i, (off, size) in enumerate(rows):
            if off == -1 and size == 0:
                continue
            if off < 0 or size < 0 or off + size > src_len:
                raise ValueError(f"spans[{i}] = ({off}, {size}) is outside src ({src_len} bytes)")
        total = sum(size for off, size in rows if off != -1)
        if total > sys.maxsize:
            raise ValueError("the spans add up to more than sys.maxsize bytes")
        if dst_offset + total > dmv.nbytes:
            raise ValueError(
                f"dst too small: needs {dst_offset + total} bytes (dst_offset {dst_offset} + {total} "
                f"from {n} spans), has {dmv.nbytes}"
            )

        out = as_bytes(dmv)
        views.append(out)
        sbytes = as_bytes(smv)
        views.append(sbytes)
        pos = dst_offset
        ends = [0]
        for off, size in rows:
            if size:
                out[pos : pos + size] = sbytes[off : off + size]  # each span as src is now
            pos += size
            ends.append(pos - dst_offset)
        if omv is not None:
            obytes = as_bytes(omv)
            views.append(obytes)
            obytes[: 8 * len(ends)] = array("q", ends).tobytes()
        return total
    finally:
        for mv in reversed(views):
            mv.release()


def _export_readable(obj: object, what: str, kind: str, views: list[memoryview]) -> memoryview:
    mv = export_buffer(obj)
    if mv is None:
        raise TypeError(f"{what} must be a C-contiguous {kind}buffer, not {type(obj).__name__!r}")
    views.append(mv)
    if not mv.c_contiguous:
        raise BufferError(f"{what} is not C-contiguous")
    return mv
