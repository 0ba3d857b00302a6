"""Shard reader: a stream of byte chunks -> tar members -> WebDataset samples.

Samples are grouped exactly as WebDataset groups them (``webdataset.tariterators``):

* only regular files count; names like ``__meta__`` at the top level are skipped;
* a member ``dir/abc.seg.jpg`` belongs to sample ``__key__ = "dir/abc"`` under the extension
  ``"seg.jpg"`` (the basename is split at its first dot; the extension is lower-cased);
* consecutive members with the same key form one sample; a name without a dot is skipped;
* ``__url__`` is the shard URL; values are the members' raw bytes.

A sample never spans two shards. A repeated extension within one sample is an error (WebDataset
raises too), as is an object that is not a tar archive.

The chunk stream is consumed without concatenating whole parts: members inside a chunk are
sliced out of it directly; only a member that straddles a chunk boundary is assembled in a
small carry-over buffer.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from fastfeed.errors import CorruptShardError, TruncatedShardError
from fastfeed.tario import scan

if TYPE_CHECKING:
    from fastfeed.columnar import SampleScan

__all__ = ["Sample", "iter_members", "iter_sample_runs", "iter_samples", "split_key"]

Sample = dict[str, Any]

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_SKIP_META_RE = re.compile(r"__[^/]*__($|/)")
#: First read of a straddling member's continuation; doubles until the member is complete.
_STRADDLE_STEP = 64 * 1024


def split_key(name: str) -> tuple[str, str] | None:
    """``"dir/abc.seg.JPG"`` -> ``("dir/abc", "seg.jpg")``; ``None`` for names WebDataset skips."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _SKIP_META_RE.match(name):
        return None
    match = _KEY_RE.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def iter_members(
    url: str, chunks: Iterable[tuple[Any, bool]], *, data: str = "copy"
) -> Iterator[tuple[str, bytes | memoryview]]:
    """Yield ``(name, data)`` for each regular member of the tar archive streamed as ``chunks``.

    ``chunks`` yields ``(buffer, is_last)`` in byte order. ``data`` says what ``data`` is:

    * ``"copy"``: the member's bytes, copied out (chunks may be reused once the next is asked for);
    * ``"view"``: a memoryview into the chunk, valid only while the caller keeps that chunk
      (members that straddle two chunks are copies);
    * ``"none"``: ``b""`` (only names are wanted).

    Raises:
        CorruptShardError: the bytes are not a valid tar archive (or the object is empty).
        TruncatedShardError: the object ends inside a header or member.
    """
    pending = bytearray()  # unconsumed tail, starting at a header boundary
    saw_any = False
    for chunk, is_last in chunks:
        view = memoryview(chunk)
        if len(view):
            saw_any = True
        pos = 0
        if pending:
            # Complete the straddling member from the head of this chunk, growing the slice we
            # copy until the scanner gets past the old tail (or the chunk is exhausted).
            taken = 0
            step = _STRADDLE_STEP
            while True:
                n = min(step, len(view) - taken)
                pending += view[taken : taken + n]
                taken += n
                final = is_last and taken == len(view)
                result = scan(pending, 0, final=final, url=url)
                for name, off, size in result.members:
                    # `pending` is rewritten below: straddling members are always copies.
                    yield name, bytes(pending[off : off + size]) if data != "none" else b""
                if result.end:
                    return
                old_tail = len(pending) - taken  # bytes of `pending` that predate this chunk
                if result.next_pos >= old_tail:
                    pos = result.next_pos - old_tail
                    pending.clear()
                    break
                del pending[: result.next_pos]
                if taken == len(view):
                    break
                step *= 2
            if pending:
                continue
        result = scan(view, pos, final=is_last, url=url)
        for name, off, size in result.members:
            if data == "copy":
                yield name, bytes(view[off : off + size])
            elif data == "view":
                yield name, view[off : off + size]
            else:
                yield name, b""
        if result.end:
            return
        if result.next_pos < len(view):
            pending += view[result.next_pos :]
    if not saw_any:
        raise CorruptShardError("the object is empty, not a tar archive", url=url, hint="re-create the shard")
    if pending and any(pending):
        raise TruncatedShardError(
            f"the object ends inside a tar member ({len(pending)} unparsed bytes at the end)",
            url=url,
            hint="the upload was probably cut short; re-upload the shard",
        )


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
      a cache entry), views of a ``bytes`` copy otherwise.

    The tar members are grouped into samples by the native scan (:func:`iter_sample_runs`), so
    the only Python work per sample is its dict and one copy per field.
    """
    if limit is not None and limit <= 0:
        return
    index = 0
    yielded = 0
    for buffer, run in iter_sample_runs(url, chunks):
        n = len(run.keys)
        if index + n <= skip:
            index += n
            continue
        first = max(0, skip - index)
        index += n
        view = memoryview(buffer)
        as_view = views or (zero_copy and _immutable(view))
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


def iter_sample_runs(url: str, chunks: Iterable[tuple[Any, bool]]) -> Iterator[tuple[Any, SampleScan]]:
    """Yield ``(buffer, scan)`` runs of whole samples for a tar archive streamed as ``chunks``.

    The columnar counterpart of :func:`iter_samples`: each ``scan`` (a
    :class:`~fastfeed.columnar.SampleScan`) holds the keys of consecutive complete samples and,
    per extension, their ``(offset, size)`` spans in ``buffer``. ``buffer`` is the chunk itself
    (valid while the caller holds the chunk) or, for samples that straddle chunks, an immutable
    ``bytes`` copy of just those samples. No Python object is created per member.
    """
    from fastfeed.columnar import scan_samples  # columnar imports this module

    carry = b""  # bytes of the first incomplete sample onwards, not yet returned
    saw_any = False
    for chunk, is_last in chunks:
        view = memoryview(chunk)
        saw_any = saw_any or len(view) > 0
        pos = 0
        taken = 0  # bytes of this chunk already copied into `carry`
        step = max(_STRADDLE_STEP, len(carry))
        while carry:
            n = min(step, len(view) - taken)
            combined = carry + view[taken : taken + n].tobytes()
            taken += n
            final = is_last and taken == len(view)
            result = scan_samples(combined, 0, final=final, url=url)
            if result.keys:
                yield combined, result
            if result.end:
                return
            chunk_base = len(combined) - taken  # index in `combined` of this chunk's offset 0
            if result.next_pos >= chunk_base:
                pos, carry = result.next_pos - chunk_base, b""
                break
            carry = combined[result.next_pos :]
            if taken == len(view):
                break
            step *= 2
        if carry:
            continue  # the whole chunk went into `carry`: the straddling sample goes on
        result = scan_samples(view, pos, final=is_last, url=url)
        if result.keys:
            yield view, result
        if result.end:
            return
        if result.next_pos < len(view):
            carry = view[result.next_pos :].tobytes()
    if not saw_any:
        raise CorruptShardError("the object is empty, not a tar archive", url=url, hint="re-create the shard")
    if carry and any(carry):
        raise TruncatedShardError(
            f"the object ends inside a sample ({len(carry)} unparsed bytes at the end)",
            url=url,
            hint="the upload was probably cut short; re-upload the shard",
        )
