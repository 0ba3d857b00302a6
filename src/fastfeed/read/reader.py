"""Shard reader: a stream of byte chunks -> tar members -> WebDataset samples.

Samples are grouped exactly as WebDataset groups them (``webdataset.tariterators``):

* only regular files count; names like ``__meta__`` at the top level are skipped;
* a member ``dir/abc.seg.jpg`` belongs to sample ``__key__ = "dir/abc"`` under the extension
  ``"seg.jpg"`` (the basename is split at its first dot; the extension is lower-cased);
* consecutive members with the same key form one sample; a name without a dot is skipped;
* ``__url__`` is the shard URL; values are the members' raw bytes.

A sample never spans two shards. A repeated extension within one sample is an error (WebDataset
raises too), as is an object that is not a tar archive.

The chunk stream is consumed without concatenating whole chunks (:func:`_scan_stream`, the one
place that does it for members and samples alike): what lies inside a chunk is scanned and
sliced out of it directly; only an item (a member, or a sample) that straddles chunks is copied,
once, into a buffer of the size the tar headers say it needs, which grows geometrically if a
sample turns out to have more members. So every byte of a shard is copied a bounded number of
times whatever the chunk size, a sample larger than a chunk (or than the prefetcher's whole
byte budget) is read like any other, and memory is the chunks held plus that one copy. Given a
:class:`ChunkSource` that knows the object's size (the prefetcher's), a header that claims more
bytes than the object has raises :class:`~fastfeed.errors.TruncatedShardError` at once.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from fastfeed.errors import CorruptShardError, ShardError, TruncatedShardError
from fastfeed.read.columnar import SampleScan, scan_samples
from fastfeed.read.keys import split_key
from fastfeed.read.tario import ScanResult, scan

__all__ = ["ChunkSource", "Sample", "iter_members", "iter_sample_runs", "iter_samples"]

Sample = dict[str, Any]

#: Bytes allocated past what the headers say a straddling item needs: room for the headers and
#: small members (labels, metadata) that usually follow a large one, so that they do not make
#: the copy grow again.
_SLACK = 64 * 1024
#: A copy that must grow grows to at least this multiple of the bytes it holds, so that each
#: byte is copied a bounded number of times however many members a sample has.
_GROWTH = 1.5


@runtime_checkable
class ChunkSource(Protocol):
    """What the reader uses besides the ``(buffer, is_last)`` chunks themselves (in byte order).

    :meth:`fastfeed.read.prefetch.ShardFetch.chunks` returns one. Any other iterable of chunks works
    too; then the object's size is unknown (a lying header is found at the end of the object)
    and the copies are nobody's business.
    """

    #: The object's size in bytes, or ``None``: a header that claims more raises at once.
    size: int | None

    def __iter__(self) -> Iterator[tuple[Any, bool]]: ...

    def hold_copy(self, held: int, copied: int) -> None:
        """The reader now holds ``held`` bytes copied out of the chunks for an item it has not
        finished (0: none), having just copied ``copied`` more bytes."""

    def drop_last(self) -> None:
        """The reader keeps nothing of the last chunk it was given (its bytes went into the
        copy): its memory may be reused now, also by a caller that holds chunks."""


class _Plain:
    """A plain iterable of chunks as a :class:`ChunkSource`: size unknown, nothing told."""

    size = None

    def __init__(self, chunks: Iterable[tuple[Any, bool]]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Iterator[tuple[Any, bool]]:
        return iter(self._chunks)

    def hold_copy(self, held: int, copied: int) -> None:
        """Nobody to tell: a plain iterable keeps no budget."""

    def drop_last(self) -> None:
        """Nobody to tell: a plain iterable's chunks are the caller's."""


class _Copy:
    """Object bytes ``[start, start + filled)`` copied out of consecutive chunks into one
    buffer, for the item (member or sample) that straddles them: it begins at ``pos``, and a
    scan gets further once the copy reaches ``need`` (an object offset).

    Bytes once written are never written again (growing moves to a new buffer), so a view of
    the buffer handed out stays valid and unchanged for as long as it is referenced.
    """

    def __init__(self, start: int, need: int, room: int) -> None:
        self.start = start
        self.need = need
        self.filled = 0
        self.pos = 0
        self._buf = np.empty(room - start + _SLACK, np.uint8)

    @property
    def end(self) -> int:
        """Object offset one past the last byte copied."""
        return self.start + self.filled

    @property
    def held(self) -> int:
        """Bytes of the item being assembled."""
        return self.filled - self.pos

    def view(self) -> memoryview:
        return memoryview(self._buf[: self.filled].data).toreadonly()

    def append(self, data: memoryview) -> int:
        """Copy ``data`` in; returns the bytes copied (growing may move the item's first)."""
        moved = self.reserve(self.held + len(data))
        self._buf[self.filled : self.filled + len(data)] = np.frombuffer(data, np.uint8)
        self.filled += len(data)
        return moved + len(data)

    def resume(self, pos: int, need: int, room: int) -> int:
        """The next item begins at ``pos`` and needs the copy to reach ``need``; make room up
        to ``room`` (<= ``need``) and return the bytes moved to make it."""
        self.pos, self.need = pos, need
        return self.reserve(room - self.start - pos)

    def reserve(self, length: int) -> int:
        """Room for ``length`` bytes from ``pos``; returns the bytes moved to make it."""
        if self.pos + length <= len(self._buf):
            return 0
        live = self.held
        grown = np.empty(max(length + _SLACK, int(_GROWTH * live)), np.uint8)
        grown[:live] = self._buf[self.pos : self.filled]
        self._buf = grown
        self.start += self.pos
        self.filled = live
        self.pos = 0
        return live


class _Scanned(Protocol):
    """What :func:`_scan_stream` reads of a scan result (tario.ScanResult, columnar.SampleScan)."""

    @property
    def next_pos(self) -> int: ...
    @property
    def end(self) -> bool: ...
    @property
    def need(self) -> int: ...


_R = TypeVar("_R", bound=_Scanned)


def _scan_stream(
    url: str,
    chunks: Iterable[tuple[Any, bool]],
    scan_fn: Callable[[memoryview, int, bool, int, int | None], _R],
    found: Callable[[_R], bool],
    what: str,
) -> Iterator[tuple[memoryview, _R, bool]]:
    """Scan a tar object streamed as ``chunks``: ``(buffer, result, copied)`` for each scan
    that ``found`` something in ``buffer`` (a chunk, or with ``copied`` a private copy).

    ``scan_fn(buf, pos, final, base, size)`` is a tar scan (:func:`fastfeed.read.tario.scan` or
    :func:`fastfeed.read.columnar.scan_samples`): it returns what is complete in ``buf[pos:]``,
    ``next_pos`` (where the first incomplete item begins) and ``need`` (the buffer length that
    gets it further). What lies in one chunk is scanned in place. An item that straddles chunks
    is copied from ``next_pos`` up to exactly ``need`` (headers say how long a member is) and
    scanned again there, so it costs one copy and a few header scans however many chunks it
    spans; the chunks it consumed whole are dropped at once. ``what`` names the items in the
    error for an object that ends inside one.
    """
    source = chunks if isinstance(chunks, ChunkSource) else _Plain(chunks)
    size = source.size

    def clip(need: int) -> int:  # nothing past the end of the object is ever needed
        return need if size is None else min(need, size)

    def room(need: int, seen: int) -> int:
        # Bytes to allocate up to: all that is needed when the object's size bounds it (a
        # header claiming more has raised), else no more than twice the object seen so far.
        return need if size is not None else min(need, 2 * seen)

    copy: _Copy | None = None
    base = 0  # object offset of the current chunk
    saw_any = False
    try:
        for chunk, is_last in source:
            view = memoryview(chunk)
            n = len(view)
            saw_any = saw_any or n > 0
            last = is_last or (size is not None and base + n >= size)
            pos = 0  # where scanning this chunk in place resumes
            taken = 0  # bytes of this chunk copied
            viewed = False  # views of this chunk were handed out
            while True:
                if copy is None:
                    r, error = _scan(scan_fn, view, pos, last, base, size)
                    if found(r):
                        viewed = True
                        yield view, r, False
                    if error is not None:
                        raise error
                    if r.end:
                        return
                    if last or r.next_pos == n:
                        break
                    need = clip(base + r.need)
                    copy = _Copy(base + r.next_pos, need, room(need, base + n))
                    taken = r.next_pos
                if taken < n and copy.end < copy.need:
                    piece = view[taken : min(n, copy.need - base)]
                    copied = copy.append(piece)
                    source.hold_copy(copy.held, copied)
                    taken += len(piece)
                final = last and taken == n
                if copy.end < copy.need and not final:
                    break  # this chunk went into the copy whole: on to the next
                buf = copy.view()
                r, error = _scan(scan_fn, buf, copy.pos, final, copy.start, size)
                if found(r):
                    yield buf, r, True
                if error is not None:
                    raise error
                if r.end or final:
                    return
                if copy.start + r.next_pos >= base:
                    # The next item begins in this chunk: scan it in place from there.
                    pos, copy = copy.start + r.next_pos - base, None
                    source.hold_copy(0, 0)
                    continue
                need = clip(copy.start + r.need)
                moved = copy.resume(r.next_pos, need, room(need, base + n))
                source.hold_copy(copy.held, moved)
            if last:
                break
            if not viewed:
                source.drop_last()
            base += n
        if not saw_any:
            raise CorruptShardError("the object is empty, not a tar archive", url=url, hint="re-create the shard")
        if copy is not None and np.any(np.frombuffer(copy.view()[copy.pos :], np.uint8)):
            raise TruncatedShardError(
                f"the object ends inside {what} ({copy.held} unparsed bytes at the end)",
                url=url,
                hint="the upload was probably cut short; re-upload the shard",
            )
    finally:
        if copy is not None:
            source.hold_copy(0, 0)


def _scan(
    scan_fn: Callable[[memoryview, int, bool, int, int | None], _R],
    buf: memoryview,
    pos: int,
    final: bool,
    base: int,
    size: int | None,
) -> tuple[_R, TruncatedShardError | None]:
    """``scan_fn(buf, pos, final, base, size)``, or, where the object falls short (a cut object
    or a header that claims more than it has), what is complete before that point and the
    error to raise once it has been delivered, as it would have been from an earlier chunk."""
    try:
        return scan_fn(buf, pos, final, base, size), None
    except TruncatedShardError as exc:
        error = exc
    try:
        return scan_fn(buf, pos, False, base, None), error
    except ShardError:  # something else is wrong before that point: the truncation still wins
        raise error from None


def iter_members(
    url: str, chunks: Iterable[tuple[Any, bool]], *, data: str = "copy"
) -> Iterator[tuple[str, bytes | memoryview]]:
    """Yield ``(name, data)`` for each regular member of the tar archive streamed as ``chunks``.

    ``chunks`` yields ``(buffer, is_last)`` in byte order. ``data`` says what ``data`` is:

    * ``"copy"``: the member's bytes, copied out (chunks may be reused once the next is asked for);
    * ``"view"``: a memoryview into the chunk, valid only while the caller keeps that chunk
      (members that straddle chunks are views of a private copy, valid for as long as they
      are referenced);
    * ``"none"``: ``b""`` (only names are wanted).

    A :class:`ChunkSource` (what the prefetcher hands out) is told about the copies, and its
    size makes a header that claims more bytes than the object has an error at once.

    Raises:
        CorruptShardError: the bytes are not a valid tar archive (or the object is empty).
        TruncatedShardError: the object ends inside a header or member.
    """

    def scan_members(buf: memoryview, pos: int, final: bool, base: int, size: int | None) -> ScanResult:
        return scan(buf, pos, final=final, url=url, base=base, size=size)

    for view, result, _ in _scan_stream(url, chunks, scan_members, _has_members, "a tar member"):
        for name, off, size in result.members:
            if data == "copy":
                yield name, bytes(view[off : off + size])
            elif data == "view":
                yield name, view[off : off + size]
            else:
                yield name, b""


def _has_members(result: ScanResult) -> bool:
    return bool(result.members)


def iter_samples(
    url: str,
    chunks: Iterable[tuple[Any, bool]],
    *,
    skip: int = 0,
    limit: int | None = None,
    views: bool = False,
    zero_copy: bool = False,
) -> Iterator[Sample]:
    """Group the members of one shard into WebDataset samples.

    ``skip`` samples are dropped from the start, and at most ``limit`` samples are yielded after
    that (``None``: all); reading stops as soon as the limit is reached. Values are ``bytes``,
    except:

    * ``views=True``: memoryviews into the chunks (see :func:`iter_members`), for callers that
      gather them into batches before letting the chunks go;
    * ``zero_copy=True``: read-only memoryviews that stay valid for as long as they are
      referenced: views into chunks that cannot change (``bytes``, a read-only ``mmap`` such as
      a cache entry) or into the reader's copy of samples that straddled chunks, views of a
      ``bytes`` copy otherwise.

    The tar members are grouped into samples by the native scan (:func:`iter_sample_runs`), so
    the only Python work per sample is its dict and one copy per field.
    """
    if limit is not None and limit <= 0:
        return
    index = 0
    yielded = 0
    for buffer, run, copied in iter_sample_runs(url, chunks):
        n = len(run.keys)
        if index + n <= skip:
            index += n
            continue
        first = max(0, skip - index)
        index += n
        view = memoryview(buffer)
        as_view = views or (zero_copy and (copied or _immutable(view)))
        wrap = zero_copy and not as_view
        fields = [(ext, spans.tolist()) for ext, spans in run.fields.items()]
        keys = run.keys
        for i in range(first, n):
            sample: Sample = {"__key__": keys[i], "__url__": url}
            for ext, spans in fields:
                off, size = spans[i]
                if off < 0:
                    continue
                if as_view:
                    sample[ext] = view[off : off + size]
                elif wrap:
                    sample[ext] = memoryview(bytes(view[off : off + size]))
                else:
                    sample[ext] = bytes(view[off : off + size])
            yield sample
            yielded += 1
            if limit is not None and yielded >= limit:
                return


def _immutable(view: memoryview) -> bool:
    """Whether the memory behind ``view`` can never change: ``bytes``, or a read-only mmap."""
    owner = view.obj
    return isinstance(owner, bytes) or (isinstance(owner, mmap.mmap) and view.readonly)


def count_samples(names: Iterable[str]) -> int:
    """Number of samples WebDataset would form from these member names (in archive order)."""
    count = 0
    last: str | None = None
    for name in names:
        parts = split_key(name)
        if parts is None:
            continue
        if parts[0] != last:
            count += 1
            last = parts[0]
    return count


def iter_sample_runs(url: str, chunks: Iterable[tuple[Any, bool]]) -> Iterator[tuple[Any, SampleScan, bool]]:
    """Yield ``(buffer, scan, copied)`` runs of whole samples for a tar archive streamed as ``chunks``.

    The columnar counterpart of :func:`iter_samples`: each ``scan`` (a
    :class:`~fastfeed.read.columnar.SampleScan`) holds the keys of consecutive complete samples and,
    per extension, their ``(offset, size)`` spans in ``buffer``. ``buffer`` is the chunk itself
    (valid while the caller holds the chunk) or, with ``copied``, a read-only view of the
    reader's private copy of samples that straddled chunks, which is never written again and
    holds no chunk. No Python object is created per member. ``chunks`` as in
    :func:`iter_members`.
    """

    def scan_runs(buf: memoryview, pos: int, final: bool, base: int, size: int | None) -> SampleScan:
        return scan_samples(buf, pos, final=final, url=url, base=base, size=size)

    yield from _scan_stream(url, chunks, scan_runs, _has_samples, "a sample")


def _has_samples(result: SampleScan) -> bool:
    return bool(result.keys)
