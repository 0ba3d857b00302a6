"""Write WebDataset tar shards: from a Python iterable of samples or a directory of files.

:class:`ShardWriter` packs sample dicts into tar shards of a target size, locally (a directory,
a plain path or ``file://``) or straight into a bucket (``s3://bucket/prefix/``), and records a
:class:`DatasetManifest` (every shard's URL, size, ETag and sample count) that a training run
can store next to its checkpoints to pin exactly which data it read::

    from fastfeed.shards import write_from_directory, write_shards

    manifest = write_from_directory("photos/", "s3://bucket/train/", shard_size="256MiB")
    manifest = write_shards(({"__key__": f"{i:08d}", "txt": f"sample {i}", "cls": i % 10}
                             for i in range(1000)), "out/")

Conventions (WebDataset's, and exactly what :mod:`fastfeed.read.reader` reads back):

* a sample is a dict with a ``"__key__"`` (a string) and one value per extension; each value
  becomes the member ``<key>.<ext>``. Other ``__dunder__`` keys (``__url__`` ...) are skipped,
  so samples read from a :class:`~fastfeed.StreamingDataset` can be written again as they are.
* values: bytes-like objects as they are; ``str`` as UTF-8; ``int`` and ``float`` as ASCII
  (``"3"``, ``"0.5"``); ``dict`` / ``list`` as JSON (keys sorted); numpy arrays in ``.npy``
  format. Anything else (including ``bool`` and ``None``) is a :class:`ConfigError`.
* a key may contain ``/`` but no ``.`` in its last component (readers split a member's name at
  the first dot of its base name), and two consecutive samples may not share a key (readers
  would merge them).
* From a directory, files are grouped the same way: ``dir/abc.seg.jpg`` is extension
  ``seg.jpg`` of the sample ``dir/abc`` (its path relative to the source directory, up to the
  first dot of the file name). Samples are written in sorted key order, extensions in sorted
  order. Files without an extension, hidden files and hidden directories are skipped (readers
  would skip the first two; the last are ``.git/`` and the like).

The archives are byte-for-byte reproducible (member order as above, mtime 0, uid/gid 0, mode
0644, no user or group names, POSIX pax headers only for long or non-ASCII names), so the same
input gives the same shards and, uploaded with the same ``part_size``, the same ETags.

Each shard holds whole samples and at most ``shard_size`` bytes; a single sample larger than
that gets a shard of its own (with a warning). Local shards are written to a temporary name,
fsynced and renamed, so a shard either exists complete or not at all. To a bucket, each
finished shard is uploaded from a temporary file (one ``PutObject``, or a multipart upload with
``max_concurrency`` parts in flight once it exceeds ``part_size``) while the next shard is
written, so at most two shards are on local temporary disk and at most ``max_concurrency``
parts in memory. The manifest is written last, only when every shard is complete: a dataset
with a ``manifest.json`` is whole. Uploads go through the checkpoint store's one upload path
(:mod:`fastfeed.store.upload`): without ``overwrite`` every shard and the manifest are created with
a conditional write (``If-None-Match: *``), so a second writer racing on the same prefix fails
instead of mixing its shards into the first one's; a failed or aborted upload is aborted (again
at close if that failed), and incomplete uploads of ``*.tar`` keys left by a killed writer are
aborted by the next writer of the prefix once older than ``orphan_age``.

Index: fastfeed's reader needs no per-shard index file (it indexes tar members as the bytes
arrive), so none is written. What fastfeed can reuse is its sample-count cache
(``StreamingDataset(index_cache=...)``, keyed by URL, ETag and size): with ``index=True`` the
count of every shard uploaded to a bucket is recorded there, so a dataset built on this machine
(several ranks, ``len()``) does not scan the new shards' headers. Local shards need no entry:
their headers are counted through ``mmap``.

ETags: as fastfeed's stores report them, so manifests are comparable with
:func:`dataset_manifest` and ``StreamingDataset(...).shards``: the S3 ETag (quotes stripped)
for objects in a bucket, ``None`` for local files (:class:`~fastfeed.store.local.LocalStore` reports
none).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import mmap
import os
import tarfile
import tempfile
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

from fastfeed import _loop
from fastfeed.config import PrefetchConfig, S3Config, format_size, parse_size
from fastfeed.errors import (
    ConditionFailedError,
    ConfigError,
    EmptyDatasetError,
    FastfeedError,
    NotFoundError,
    StoreError,
)
from fastfeed.read.reader import split_key
from fastfeed.store.base import ObjectInfo
from fastfeed.store.pool import StoreSet
from fastfeed.store.upload import CkptStore, check_age, open_ckpt_store
from fastfeed.urls import Location, parse_url

__all__ = [
    "DatasetManifest",
    "ShardInfo",
    "ShardWriter",
    "WriteProgress",
    "dataset_manifest",
    "load_manifest",
    "save_manifest",
    "write_from_directory",
    "write_shards",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Identifies the JSON written by :meth:`DatasetManifest.to_json`.
MANIFEST_FORMAT = "fastfeed.dataset-manifest/1"
#: File name of the manifest written next to the shards.
MANIFEST_NAME = "manifest.json"
#: Where :class:`~fastfeed.StreamingDataset` looks for cached sample counts by default.
DEFAULT_INDEX_CACHE = "~/.cache/fastfeed/counts"

_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240
_ZEROS = bytes(_RECORD + 2 * _BLOCK)
_MIN_PART = 5 << 20  # S3's smallest multipart part (all but the last)
_MAX_PARTS = 10_000  # S3's largest part count
_COPY_CHUNK = 1 << 20
_FILE_BUFFER = 1 << 20


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a dataset: its URL, size in bytes, ETag and number of samples.

    ``etag`` is ``None`` for local files; ``samples`` is ``None`` when it was not counted.
    """

    url: str
    size: int
    etag: str | None = None
    samples: int | None = None


@dataclass(frozen=True)
class DatasetManifest:
    """What a dataset consists of: the shards under ``url``, in order, with sizes and ETags.

    Record it with a training run (``manifest.to_json()``) to know exactly which bytes it read;
    ``StreamingDataset(manifest.urls)`` reads exactly these shards.
    """

    #: The dataset's prefix (``s3://bucket/train/`` or ``file:///data/train/``).
    url: str
    shards: tuple[ShardInfo, ...]
    #: When the manifest was made (ISO 8601, UTC).
    created: str = ""

    @property
    def urls(self) -> list[str]:
        """The shard URLs, in order."""
        return [s.url for s in self.shards]

    @property
    def total_bytes(self) -> int:
        """Bytes of all shards."""
        return sum(s.size for s in self.shards)

    @property
    def total_samples(self) -> int | None:
        """Samples in all shards, or ``None`` if any shard's count is unknown."""
        counts = [s.samples for s in self.shards]
        if any(c is None for c in counts):
            return None
        return sum(c for c in counts if c is not None)

    def to_json(self, *, indent: int | None = 2) -> str:
        """The manifest as JSON (totals included, for people reading it)."""
        doc = {
            "format": MANIFEST_FORMAT,
            "url": self.url,
            "created": self.created,
            "num_shards": len(self.shards),
            "total_bytes": self.total_bytes,
            "total_samples": self.total_samples,
            "shards": [dataclasses.asdict(s) for s in self.shards],
        }
        return json.dumps(doc, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetManifest:
        """Parse :meth:`to_json`'s output.

        Raises:
            ConfigError: the text is not a fastfeed dataset manifest.
        """
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"'format' is not {MANIFEST_FORMAT!r}")
            shards = tuple(
                ShardInfo(
                    url=str(s["url"]),
                    size=int(s["size"]),
                    etag=None if s.get("etag") is None else str(s["etag"]),
                    samples=None if s.get("samples") is None else int(s["samples"]),
                )
                for s in doc["shards"]
            )
            return cls(url=str(doc["url"]), shards=shards, created=str(doc.get("created", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"not a fastfeed dataset manifest: {exc}",
                hint="pass the manifest.json that fastfeed shards write (or DatasetManifest.to_json) wrote",
            ) from exc


@dataclass(frozen=True)
class WriteProgress:
    """Passed to a ``progress`` callback after every sample and every finished shard."""

    #: Samples written so far.
    samples: int
    #: Bytes of sample values written so far (without tar headers and padding).
    payload_bytes: int
    #: Tar bytes written so far (all shards, the current one included).
    tar_bytes: int
    #: Shards finished (written locally, or handed to the uploader).
    shards: int
    #: Total payload bytes to write, when known in advance (:func:`write_from_directory`).
    total_payload_bytes: int | None = None


# --------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class _FileData:
    """A member whose bytes are streamed from a file (directory mode)."""

    path: str
    size: int


_Data = memoryview | _FileData


class ShardWriter:
    """Write samples into WebDataset tar shards under ``url_prefix``; use as a context manager.

    Args:
        url_prefix: where the shards go: a local directory (created if missing), a
            ``file://`` URL or ``s3://bucket/prefix/`` (the bucket must exist).
        shard_size: the largest shard, in bytes or as ``"256MiB"``; a new shard starts when the
            next sample would not fit.
        name: shard file names, formatted with the shard number; must end in ``.tar`` (it may
            contain ``/`` for subdirectories).
        s3: S3 options (credentials, region, retries); ``endpoint_url`` overrides its endpoint.
            Default: the environment (``AWS_ENDPOINT_URL``, ...), as for ``StreamingDataset``.
        endpoint_url: S3 endpoint, e.g. ``http://127.0.0.1:9000``.
        index: record each uploaded shard's sample count in fastfeed's sample-count cache
            (``True``: the default ``index_cache`` of ``StreamingDataset``, or a directory);
            ``False`` to skip. No index file is written next to the shards (see the module doc).
        manifest: write the manifest when the writer closes: ``True`` writes
            ``<url_prefix>/manifest.json``, a path or URL writes it there, ``False`` does not.
        overwrite: replace shards of an earlier run. Without it, a destination that already
            holds the first shard name is an error (a new dataset mixed with an old one's extra
            shards would be read as one dataset).
        part_size: multipart part size for uploads (at least 5 MiB); shards up to this size
            are uploaded with one ``PutObject``. ETags depend on it.
        max_concurrency: parts uploaded in parallel.
        tmp_dir: where shards bound for a bucket are staged (default: the system temp dir);
            at most two shards at a time.
        progress: called with a :class:`WriteProgress` after every sample and shard.
        orphan_age: seconds after which an incomplete multipart upload of a ``*.tar`` under
            ``url_prefix`` counts as abandoned (its writer was killed) and is aborted when a
            writer opens the prefix. Default one day.

    Raises (at construction, within seconds): :class:`BucketNotFoundError`,
    :class:`AccessDeniedError`, :class:`EndpointError`, :class:`ConfigError` for bad arguments
    or an existing dataset without ``overwrite``; :class:`StoreError` for an unwritable
    directory. :meth:`write` raises :class:`ConfigError` for a sample that cannot be written
    (missing ``__key__``, duplicate key or extension, unsupported value), naming it; the
    shards already finished stay, and no manifest is written.
    """

    def __init__(
        self,
        url_prefix: str | os.PathLike[str],
        *,
        shard_size: int | str = "256MiB",
        name: str = "shard-{:06d}.tar",
        s3: S3Config | None = None,
        endpoint_url: str | None = None,
        index: bool | str | os.PathLike[str] = True,
        manifest: bool | str | os.PathLike[str] = True,
        overwrite: bool = False,
        part_size: int | str = "16MiB",
        max_concurrency: int = 8,
        tmp_dir: str | os.PathLike[str] | None = None,
        progress: Callable[[WriteProgress], None] | None = None,
        orphan_age: float = 24 * 3600.0,
    ) -> None:
        self.shard_size = parse_size(shard_size, name="shard_size")
        if self.shard_size <= 0:
            raise ConfigError(f"shard_size must be > 0, got {shard_size!r}", hint="use something like '256MiB'")
        self.part_size = parse_size(part_size, name="part_size")
        if self.part_size < _MIN_PART:
            raise ConfigError(
                f"part_size={part_size!r} is below S3's minimum multipart part of 5 MiB", hint="use e.g. '16MiB'"
            )
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.name = name
        first = _shard_name(name, 0)
        self._progress = progress
        self._total_payload: int | None = None
        self._index_dir = _index_dir(index)
        loc = parse_url(os.fspath(url_prefix))
        self._s3 = _s3_config(s3, endpoint_url)
        self._manifest_target = _manifest_target(manifest, loc)
        self._sink: _Sink
        if loc.scheme == "file":
            self._sink = _LocalSink(loc.path, overwrite=overwrite, first=first)
        else:
            self._sink = _S3Sink(
                loc,
                self._s3,
                overwrite=overwrite,
                first=first,
                part_size=self.part_size,
                max_concurrency=max_concurrency,
                tmp_dir=None if tmp_dir is None else os.fspath(tmp_dir),
                orphan_age=check_age(orphan_age),
            )
        #: The dataset prefix as a canonical URL (ends with ``/``).
        self.url = self._sink.url
        #: Set by :meth:`close`: the manifest of everything written.
        self.manifest: DatasetManifest | None = None
        self._current: _OpenShard | None = None
        self._number = 0
        self._shard_bytes = 0
        self._shard_samples = 0
        self._samples = 0
        self._payload = 0
        self._tar_done = 0
        self._last_key: str | None = None
        self._closed = False
        self._failed = False

    # ------------------------------------------------------------------ public API

    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample (a dict with ``"__key__"``); see the module doc for the value types."""
        members = self._encode(sample)
        self._write_members(sample["__key__"], members)

    def close(self) -> DatasetManifest:
        """Finish the last shard, wait for the uploads, write the manifest; return it.

        Idempotent. After an error (in :meth:`write` or an upload) use :meth:`abort` instead,
        as ``__exit__`` does.
        """
        if self._closed:
            if self.manifest is None:
                raise ConfigError("the shard writer was aborted; nothing was committed")
            return self.manifest
        if self._failed:
            self.abort()
            raise ConfigError("the shard writer failed earlier; its output is incomplete and no manifest was written")
        try:
            if self._current is not None:
                self._finish_shard()
            shards = self._sink.finish()
            manifest = DatasetManifest(
                url=self.url,
                shards=tuple(shards),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            self._record_counts(shards)
            if self._manifest_target is not None:
                _save_manifest(manifest, self._manifest_target, self._s3, self._sink)
        except BaseException:
            self.abort()
            raise
        self.manifest = manifest
        self._closed = True
        self._sink.close()
        return manifest

    def abort(self) -> None:
        """Stop without committing: drop the shard being written, cancel the upload in flight
        (a multipart upload is aborted) and write no manifest. Shards already finished stay."""
        if self._closed:
            return
        self._closed = True
        current, self._current = self._current, None
        try:
            self._sink.abort(current)
        finally:
            self._sink.close()
        done = self._number - (1 if current is not None else 0)
        if done > 0:
            log.warning(
                "shard writing to %s stopped after %d shard(s); no manifest was written, the data there is incomplete",
                self.url,
                done,
            )

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------ internals

    def _encode(self, sample: Mapping[str, Any]) -> list[tuple[str, _Data]]:
        if not isinstance(sample, Mapping):
            raise ConfigError(
                f"sample #{self._samples} is a {type(sample).__name__}, not a dict",
                hint='write dicts like {"__key__": "000001", "jpg": b"..."}',
            )
        if "__key__" not in sample:
            shown = ", ".join(repr(k) for k in list(sample)[:5])
            raise ConfigError(
                f"sample #{self._samples} has no '__key__' (its keys: {shown or 'none'})",
                hint="give every sample a unique string '__key__', e.g. its file name without extension",
            )
        key = sample["__key__"]
        members: list[tuple[str, _Data]] = []
        for ext, value in sample.items():
            if not isinstance(ext, str):
                raise ConfigError(f"sample {key!r}: field names must be strings, got {ext!r}")
            if ext.startswith("__") and ext.endswith("__"):
                continue  # __key__, __url__, __local_path__, ...
            members.append((ext, _encode_value(key, ext, value)))
        return members

    def _write_members(self, key: Any, members: list[tuple[str, _Data]]) -> None:
        if self._closed:
            raise ConfigError("the shard writer is closed")
        if self._failed:
            raise ConfigError("an earlier write failed; the shard being written is incomplete", hint="start again")
        _check_key(key)
        if key == self._last_key:
            raise ConfigError(
                f"duplicate key {key!r}: two consecutive samples have it (sample #{self._samples})",
                hint="readers would merge them into one sample; give every sample its own '__key__'",
            )
        if not members:
            raise ConfigError(
                f"sample {key!r} has no fields besides '__key__'",
                hint="readers skip samples without members; add at least one extension",
            )
        members.sort(key=lambda m: m[0])
        seen: dict[str, str] = {}
        headers: list[bytes] = []
        size = 0
        payload = 0
        for ext, data in members:
            _check_ext(key, ext)
            folded = ext.lower()
            if folded in seen:
                raise ConfigError(
                    f"duplicate extension in sample {key!r}: {seen[folded]!r} and {ext!r}",
                    url=data.path if isinstance(data, _FileData) else None,
                    hint="readers lower-case extensions; every extension of a sample must be distinct",
                )
            seen[folded] = ext
            length = data.size if isinstance(data, _FileData) else data.nbytes
            header = _header(f"{key}.{ext}", length)
            headers.append(header)
            size += len(header) + length + (-length % _BLOCK)
            payload += length
        if self._current is not None and _final_size(self._shard_bytes + size) > self.shard_size:
            self._finish_shard()
        if _final_size(size) > self.shard_size:
            log.warning(
                "sample %r (%s) is larger than shard_size (%s): it gets a shard of its own",
                key,
                format_size(_final_size(size)),
                format_size(self.shard_size),
            )
        if self._current is None:
            self._start_shard()
        assert self._current is not None
        fh = self._current.fh
        try:
            for header, (_, data) in zip(headers, members, strict=True):
                fh.write(header)
                if isinstance(data, _FileData):
                    _copy_file(data, fh)
                    length = data.size
                else:
                    fh.write(data)
                    length = data.nbytes
                fh.write(_ZEROS[: -length % _BLOCK])
        except BaseException as exc:
            self._failed = True
            if isinstance(exc, OSError):
                raise StoreError(
                    f"cannot write shard {self._current.name}: {exc}",
                    url=self.url,
                    hint="check free space and permissions (tmp_dir= for uploads)",
                ) from exc
            raise
        self._shard_bytes += size
        self._shard_samples += 1
        self._samples += 1
        self._payload += payload
        self._last_key = key
        self._report()

    def _start_shard(self) -> None:
        name = _shard_name(self.name, self._number)
        self._current = self._sink.open(name)
        self._number += 1
        self._shard_bytes = 0
        self._shard_samples = 0

    def _finish_shard(self) -> None:
        current = self._current
        assert current is not None
        self._current = None
        end = _final_size(self._shard_bytes)
        try:
            current.fh.write(_ZEROS[: end - self._shard_bytes])
            self._sink.commit(current, end, self._shard_samples)
        except BaseException:
            self._failed = True
            self._sink.discard(current)
            raise
        self._tar_done += end
        self._report()

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(
                WriteProgress(
                    samples=self._samples,
                    payload_bytes=self._payload,
                    tar_bytes=self._tar_done + (self._shard_bytes if self._current is not None else 0),
                    shards=self._number - (1 if self._current is not None else 0),
                    total_payload_bytes=self._total_payload,
                )
            )

    def _record_counts(self, shards: list[ShardInfo]) -> None:
        if self._index_dir is None:
            return
        from fastfeed.read.sources import CountCache

        cache = CountCache(self._index_dir)
        for shard in shards:
            if shard.etag and shard.samples is not None:
                cache.put(ObjectInfo(shard.url, shard.size, shard.etag), shard.samples)


def write_shards(
    samples: Iterable[Mapping[str, Any]], url_prefix: str | os.PathLike[str], **kw: Any
) -> DatasetManifest:
    """Write ``samples`` (dicts with ``"__key__"``) as tar shards under ``url_prefix``.

    Keyword arguments are :class:`ShardWriter`'s. Returns the manifest (also written to
    ``<url_prefix>/manifest.json`` unless ``manifest=False``).
    """
    with ShardWriter(url_prefix, **kw) as writer:
        for sample in samples:
            writer.write(sample)
    assert writer.manifest is not None
    return writer.manifest


def write_from_directory(
    src_dir: str | os.PathLike[str], url_prefix: str | os.PathLike[str], **kw: Any
) -> DatasetManifest:
    """Write every file under ``src_dir`` (recursively) as WebDataset shards under ``url_prefix``.

    Files are grouped into samples by key (the path relative to ``src_dir`` up to the first dot
    of the file name; ``a/b.seg.png`` is extension ``seg.png`` of sample ``a/b``), in sorted
    key order. File contents are streamed into the shards, never loaded whole. Keyword
    arguments are :class:`ShardWriter`'s.

    Raises:
        NotFoundError: ``src_dir`` does not exist or is not a directory.
        EmptyDatasetError: it holds no file with an extension.
        ConfigError: two files map to the same sample extension (``a.jpg`` and ``a.JPG``), or a
            local destination inside ``src_dir``.
    """
    root = os.path.abspath(os.fspath(src_dir))
    samples, total = _scan_directory(root)
    dest = parse_url(os.fspath(url_prefix))
    if dest.scheme == "file":
        real_root, real_dest = os.path.realpath(root), os.path.realpath(dest.path)
        if os.path.commonpath([real_root, real_dest]) == real_root:
            raise ConfigError(
                f"the destination {dest.path} is inside the source directory {root}",
                url=dest.url,
                hint="write the shards outside the directory being packed",
            )
    with ShardWriter(url_prefix, **kw) as writer:
        writer._total_payload = total
        for key, files in samples:
            writer._write_members(key, [(ext, _FileData(path, size)) for ext, path, size in files])
    assert writer.manifest is not None
    return writer.manifest


def _scan_directory(root: str) -> tuple[list[tuple[str, list[tuple[str, str, int]]]], int]:
    """``[(key, [(ext, path, size), ...]), ...]`` sorted by key, and the total bytes."""
    if not os.path.exists(root):
        raise NotFoundError(
            f"source directory {root} does not exist",
            url=Path(root).as_uri(),
            hint="pass the directory whose files should be packed into shards",
        )
    if not os.path.isdir(root):
        raise NotFoundError(
            f"source {root} is not a directory", url=Path(root).as_uri(), hint="pass a directory of files"
        )
    groups: dict[str, dict[str, tuple[str, str, int]]] = {}
    skipped: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        hidden = [d for d in dirnames if d.startswith(".")]
        skipped.extend(os.path.relpath(os.path.join(dirpath, d), root).replace(os.sep, "/") + "/" for d in hidden)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git/ and the like
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if not os.path.isfile(path):
                continue
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            parts = split_key(rel)
            if parts is None:
                skipped.append(rel)
                continue
            key, folded = parts
            ext = rel[len(key) + 1 :]
            sample = groups.setdefault(key, {})
            if folded in sample:
                other = sample[folded][1]
                raise ConfigError(
                    f"duplicate key and extension: {other} and {path} are both {key!r} . {folded!r}",
                    url=Path(path).as_uri(),
                    hint="readers lower-case extensions; rename or remove one of the two files",
                )
            size = os.path.getsize(path)
            sample[folded] = (ext, path, size)
            total += size
    if skipped:
        log.warning(
            "skipped %d file(s) without an extension, or hidden (readers would skip them), e.g. %s",
            len(skipped),
            ", ".join(sorted(skipped)[:3]),
        )
    if not groups:
        raise EmptyDatasetError(
            f"no files with an extension under {root}",
            url=Path(root).as_uri(),
            hint="samples are files named <key>.<ext>; point SRC at the directory that holds them",
        )
    ordered = [(key, sorted(groups[key].values())) for key in sorted(groups)]
    return ordered, total


def _encode_value(key: Any, ext: str, value: Any) -> memoryview:
    import numpy as np

    if isinstance(value, bytes | bytearray | memoryview):
        view = memoryview(value)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    if isinstance(value, str):
        return memoryview(value.encode("utf-8"))
    if isinstance(value, bool | np.bool_):
        raise ConfigError(
            f"sample {key!r}, field {ext!r}: bool values are ambiguous",
            hint="convert it yourself, e.g. int(value) or 'true'/'false'",
        )
    if isinstance(value, int | np.integer):
        return memoryview(str(int(value)).encode("ascii"))
    if isinstance(value, float | np.floating):
        return memoryview(repr(float(value)).encode("ascii"))
    if isinstance(value, dict | list):
        try:
            text = json.dumps(value, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"sample {key!r}, field {ext!r}: cannot encode as JSON: {exc}") from exc
        return memoryview(text.encode("utf-8"))
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        try:
            np.save(buf, value, allow_pickle=False)
        except ValueError as exc:
            raise ConfigError(f"sample {key!r}, field {ext!r}: cannot save the array as .npy: {exc}") from exc
        return buf.getbuffer()
    raise ConfigError(
        f"sample {key!r}, field {ext!r}: cannot write a {type(value).__name__}",
        hint="use bytes, str, int, float, dict/list (JSON) or a numpy array; encode other values yourself",
    )


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"'__key__' must be a non-empty string, got {key!r}")
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise ConfigError(
            f"'__key__' {key!r} is not a safe relative path",
            hint="use keys like '000001' or 'train/000001' (no leading '/', no empty, '.' or '..' parts)",
        )
    if "." in parts[-1]:
        raise ConfigError(
            f"'__key__' {key!r} contains a '.' in its last part",
            hint="readers split member names at the first dot of the file name; replace the dot (e.g. with '_')",
        )


def _check_ext(key: str, ext: str) -> None:
    if not ext or "/" in ext or "\0" in ext or split_key(f"{key}.{ext}") != (key, ext.lower()):
        raise ConfigError(
            f"sample {key!r}: {ext!r} is not a valid extension",
            hint="extensions are non-empty names without '/', like 'jpg', 'cls' or 'seg.png'",
        )


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _final_size(members_bytes: int) -> int:
    """Size of a tar holding ``members_bytes`` of members: two zero blocks, then zeros to a
    whole record, as tarfile and GNU tar write it."""
    end = members_bytes + 2 * _BLOCK
    return end + (-end % _RECORD)


def _copy_file(data: _FileData, fh: IO[bytes]) -> None:
    with open(data.path, "rb") as src:
        left = data.size
        while left:
            chunk = src.read(min(_COPY_CHUNK, left))
            if not chunk:
                break
            fh.write(chunk)
            left -= len(chunk)
        if left or src.read(1):
            raise StoreError(
                f"{data.path} changed size while it was being packed (expected {data.size} bytes)",
                url=Path(data.path).as_uri(),
                hint="do not modify the source directory while writing shards",
            )


def _shard_name(template: str, number: int) -> str:
    try:
        name = template.format(number)
        other = template.format(number + 1)
    except (IndexError, KeyError, ValueError) as exc:
        raise ConfigError(
            f"name={template!r} cannot be formatted with a shard number: {exc}", hint="use e.g. 'shard-{:06d}.tar'"
        ) from exc
    if name == other or not name.endswith(".tar") or name.startswith("/") or ".." in name.split("/"):
        raise ConfigError(
            f"name={template!r} must give distinct relative names ending in .tar",
            hint="use e.g. 'shard-{:06d}.tar' (fastfeed reads every *.tar under a prefix)",
        )
    return name


def _index_dir(index: bool | str | os.PathLike[str]) -> str | None:
    if index is False:
        return None
    path = DEFAULT_INDEX_CACHE if index is True else os.fspath(index)
    return os.path.abspath(os.path.expanduser(path))


def _manifest_target(manifest: bool | str | os.PathLike[str], loc: Location) -> str | None:
    if manifest is False:
        return None
    if manifest is True:
        return _prefix_url(loc) + MANIFEST_NAME
    return os.fspath(manifest)


def _prefix_url(loc: Location) -> str:
    if loc.scheme == "file":
        return Path(os.path.abspath(loc.path)).as_uri().rstrip("/") + "/"
    key = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
    return f"s3://{loc.bucket}/{key}"


def _s3_config(s3: S3Config | None, endpoint_url: str | None) -> S3Config:
    if s3 is None:
        return S3Config.resolve(endpoint_url=endpoint_url)
    if endpoint_url is not None:
        return dataclasses.replace(s3, endpoint_url=endpoint_url)
    return s3


# --------------------------------------------------------------------------------------------
# Sinks: where finished shards go


@dataclass
class _OpenShard:
    name: str
    fh: IO[bytes]
    tmp: str | None = None  # local sink: the temporary path


class _Sink(abc.ABC):
    """Where finished shards go: a local directory or a bucket."""

    url: str

    @abc.abstractmethod
    def open(self, name: str) -> _OpenShard:
        """A new shard being written."""

    @abc.abstractmethod
    def commit(self, shard: _OpenShard, size: int, samples: int) -> None:
        """Make the shard durable (or start its upload); takes over ``shard.fh``."""

    def discard(self, shard: _OpenShard | None) -> None:
        """Drop a shard that will not be committed."""
        if shard is None:
            return
        with contextlib.suppress(OSError):
            shard.fh.close()
        if shard.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(shard.tmp)

    @abc.abstractmethod
    def finish(self) -> list[ShardInfo]:
        """Wait for everything committed; the shards in order."""

    def abort(self, current: _OpenShard | None) -> None:
        self.discard(current)

    def close(self) -> None:
        return None


class _LocalSink(_Sink):
    def __init__(self, root: str, *, overwrite: bool, first: str) -> None:
        self.root = os.path.abspath(root)
        self.url = Path(self.root).as_uri().rstrip("/") + "/"
        self._done: list[ShardInfo] = []
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"{self.root} exists and is not a directory", url=self.url, hint="pick a directory")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create {self.root}: {exc}", url=self.url, hint="check the path and permissions"
            ) from exc
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"{self.root} is not writable", url=self.url, hint="pick a writable directory")
        existing = os.path.join(self.root, *first.split("/"))
        if not overwrite and os.path.exists(existing):
            raise ConfigError(
                f"{existing} exists: the destination already holds a dataset",
                url=self.url,
                hint="write to an empty directory, or pass overwrite=True (--overwrite) to replace it",
            )

    def open(self, name: str) -> _OpenShard:
        path = os.path.join(self.root, *name.split("/"))
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        except OSError as exc:
            raise StoreError(f"cannot create a shard in {parent}: {exc}", url=self.url) from exc
        return _OpenShard(name, os.fdopen(fd, "wb", buffering=_FILE_BUFFER), tmp)

    def commit(self, shard: _OpenShard, size: int, samples: int) -> None:
        assert shard.tmp is not None
        path = os.path.join(self.root, *shard.name.split("/"))
        try:
            shard.fh.flush()
            os.fsync(shard.fh.fileno())
            shard.fh.close()
            os.chmod(shard.tmp, 0o644)  # mkstemp makes it 0600
            os.replace(shard.tmp, path)
        except OSError as exc:
            raise StoreError(
                f"cannot write {path}: {exc}", url=Path(path).as_uri(), hint="check free space and permissions"
            ) from exc
        self._done.append(ShardInfo(Path(path).as_uri(), size, None, samples))

    def finish(self) -> list[ShardInfo]:
        return list(self._done)


class _S3Sink(_Sink):
    """Uploads through the checkpoint store's one upload path (:class:`~fastfeed.store.upload.S3CkptStore`
    on fastfeed's IO loop): multipart with parts in parallel, conditional writes (``If-None-Match``)
    unless ``overwrite``, failed uploads aborted (again at close if that failed) and incomplete
    uploads of ``*.tar`` keys older than ``orphan_age`` (a writer killed mid-upload) aborted here at
    construction."""

    def __init__(
        self,
        loc: Location,
        config: S3Config,
        *,
        overwrite: bool,
        first: str,
        part_size: int,
        max_concurrency: int,
        tmp_dir: str | None,
        orphan_age: float,
    ) -> None:
        self.bucket = loc.bucket
        self.prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
        self.url = f"s3://{self.bucket}/{self.prefix}"
        self.overwrite = overwrite
        self._part_size = part_size
        self._concurrency = max_concurrency
        self._tmp_dir = tmp_dir
        self._done: list[ShardInfo] = []
        self._pending: concurrent.futures.Future[ShardInfo] | None = None
        self._uploader: concurrent.futures.ThreadPoolExecutor | None = None
        self._uploads: set[asyncio.Task[Any]] = set()  # on the IO loop: cancelled by abort()
        self._aborting = False  # on the IO loop: set by abort(), no upload starts after it
        self._io = _loop.acquire()
        self._released = False
        self._store: CkptStore | None = None
        try:
            self._store = self._io.run(open_ckpt_store(self.url, config))
            self._io.run(self._store.check_writable())
            first_url = f"{self.url}{first}"
            if not overwrite and self._exists(first):
                raise ConfigError(
                    f"{first_url} exists: the destination already holds a dataset",
                    url=self.url,
                    hint="write to an empty prefix, or pass overwrite=True (--overwrite) to replace it",
                )
            try:
                self._io.run(
                    self._store.abort_orphaned_uploads("", older_than=orphan_age, match=lambda k: k.endswith(".tar"))
                )
            except FastfeedError as err:
                log.warning("could not look for abandoned uploads under %s: %s", self.url, err)
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the IO loop as a task that :meth:`abort` can cancel."""

        async def tracked() -> T:
            if self._aborting:  # read and set on the IO loop only: no race with abort()
                coro.close()
                raise asyncio.CancelledError
            task = asyncio.ensure_future(coro)
            self._uploads.add(task)
            try:
                return await task
            finally:
                self._uploads.discard(task)

        return self._io.run(tracked())

    def _exists(self, key: str) -> bool:
        assert self._store is not None
        try:
            self._io.run(self._store.head(key))
        except NotFoundError:
            return False
        return True

    def open(self, name: str) -> _OpenShard:
        try:
            fh = tempfile.TemporaryFile(  # noqa: SIM115 - owned by the _OpenShard until uploaded
                dir=self._tmp_dir, prefix="fastfeed-shard-", buffering=_FILE_BUFFER
            )
        except OSError as exc:
            raise StoreError(
                f"cannot create a temporary file for {name}: {exc}", url=self.url, hint="pass tmp_dir= a writable dir"
            ) from exc
        return _OpenShard(name, fh)

    def commit(self, shard: _OpenShard, size: int, samples: int) -> None:
        try:
            shard.fh.flush()
            self._drain()  # at most one upload in flight: two shards on disk at most
        except BaseException:
            self.discard(shard)
            raise
        if self._uploader is None:
            self._uploader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastfeed-shards-upload")
        self._pending = self._uploader.submit(self._upload, shard, size, samples)

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._done.append(pending.result())

    def finish(self) -> list[ShardInfo]:
        self._drain()
        return list(self._done)

    def abort(self, current: _OpenShard | None) -> None:
        self.discard(current)

        def cancel() -> None:
            self._aborting = True
            for task in self._uploads:
                task.cancel()  # the upload aborts its multipart upload before it ends

        self._io.call_soon(cancel)
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(BaseException):
                pending.result()

    def close(self) -> None:
        if self._uploader is not None:
            self._uploader.shutdown(wait=True)
            self._uploader = None
        store, self._store = self._store, None
        if self._released:
            return
        self._released = True
        try:
            if store is not None:
                self._io.run(store.aclose())  # retries the abort of any upload that failed to abort
        finally:
            self._io.release()

    def put(self, key: str, body: bytes, *, if_absent: bool = False) -> None:
        """Write ``body`` to ``key`` (relative to the prefix)."""
        assert self._store is not None
        self._run(self._store.put(key, memoryview(body), if_absent=if_absent))

    def _upload(self, shard: _OpenShard, size: int, samples: int) -> ShardInfo:
        assert self._store is not None
        store, key = self._store, shard.name
        url = f"{self.url}{key}"
        fd = shard.fh.fileno()
        try:
            if size <= self._part_size:
                self.put(key, os.pread(fd, size, 0), if_absent=not self.overwrite)
            else:
                mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)  # parts are read from the page cache
                try:
                    self._run(
                        store.put_large(
                            key,
                            memoryview(mapped),
                            part_size=self._part_size,
                            concurrency=self._concurrency,
                            if_absent=not self.overwrite,
                        )
                    )
                finally:
                    with contextlib.suppress(BufferError):  # a traceback still holds a view: GC closes it
                        mapped.close()
            head = self._io.run(store.head(key))
        except ConditionFailedError as err:
            raise StoreError(
                f"{url} appeared while this dataset was being written: another writer uses the prefix",
                url=url,
                hint="write to an empty prefix, or pass overwrite=True (--overwrite) to replace it",
            ) from err
        finally:
            shard.fh.close()
        if head.size != size:
            raise StoreError(
                f"{url} has {head.size} bytes after the upload, expected {size}",
                url=url,
                hint="another writer may be using this prefix",
            )
        log.info("uploaded %s (%s, %d samples)", url, format_size(size), samples)
        return ShardInfo(url, size, head.etag, samples)


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


# --------------------------------------------------------------------------------------------
# Manifests of existing datasets


def dataset_manifest(
    url: str | os.PathLike[str],
    *,
    s3: S3Config | None = None,
    endpoint_url: str | None = None,
    count_samples: bool = False,
) -> DatasetManifest:
    """The manifest of an existing dataset: every ``*.tar`` under ``url`` (or the shards a brace
    pattern names), sorted, with sizes and ETags as fastfeed's stores report them.

    ``samples`` is ``None`` unless ``count_samples`` (which reads every shard's tar headers:
    local files through ``mmap``, objects streamed once).

    Raises:
        NotFoundError / BucketNotFoundError / EmptyDatasetError / AccessDeniedError: as
        :class:`~fastfeed.StreamingDataset` does for the same source.
    """
    from fastfeed.read.sources import count_shard_samples, resolve_source

    config = dataclasses.replace(_s3_config(s3, endpoint_url), engine="aiobotocore")
    source = os.fspath(url)
    infos = resolve_source(source, StoreSet(config))
    counts: list[int | None] = [None] * len(infos)
    if count_samples:
        counts = list(count_shard_samples(infos, StoreSet(config), PrefetchConfig()))
    loc = parse_url(source)
    prefix = _prefix_url(loc) if not loc.url.endswith(".tar") else loc.url
    return DatasetManifest(
        url=prefix,
        shards=tuple(ShardInfo(i.url, i.size, i.etag, c) for i, c in zip(infos, counts, strict=True)),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def save_manifest(
    manifest: DatasetManifest,
    url: str | os.PathLike[str],
    *,
    s3: S3Config | None = None,
    endpoint_url: str | None = None,
) -> str:
    """Write ``manifest`` as JSON to a local path (atomically) or an ``s3://`` URL; returns the
    canonical URL written."""
    return _save_manifest(manifest, os.fspath(url), _s3_config(s3, endpoint_url), None)


def _save_manifest(manifest: DatasetManifest, url: str, config: S3Config, sink: _Sink | None) -> str:
    loc = parse_url(url)
    body = (manifest.to_json() + "\n").encode("utf-8")
    if loc.scheme == "file":
        parent = os.path.dirname(loc.path) or "."
        try:
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".manifest.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, loc.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise StoreError(f"cannot write the manifest {loc.path}: {exc}", url=loc.url) from exc
        return loc.url
    if isinstance(sink, _S3Sink) and sink.bucket == loc.bucket and loc.key.startswith(sink.prefix):
        sink.put(loc.key[len(sink.prefix) :], body, if_absent=not sink.overwrite)
        return loc.url
    parent, _, name = loc.url.rpartition("/")
    _with_store(parent + "/", config, lambda store: store.put(name, memoryview(body)))
    return loc.url


def load_manifest(
    url: str | os.PathLike[str], *, s3: S3Config | None = None, endpoint_url: str | None = None
) -> DatasetManifest:
    """Read a manifest written by :func:`save_manifest` (or a :class:`ShardWriter`).

    Raises:
        NotFoundError: it does not exist. ConfigError: it is not a fastfeed dataset manifest.
    """
    loc = parse_url(os.fspath(url))
    if loc.scheme == "file":
        try:
            with open(loc.path, "rb") as f:
                return DatasetManifest.from_json(f.read())
        except FileNotFoundError as exc:
            raise NotFoundError(f"no manifest at {loc.path}", url=loc.url, hint="check the path") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {loc.path}: {exc}", url=loc.url) from exc
    parent, _, name = loc.url.rpartition("/")
    return DatasetManifest.from_json(
        _with_store(parent + "/", _s3_config(s3, endpoint_url), lambda store: store.get(name))
    )


def _with_store(url: str, config: S3Config, op: Callable[[CkptStore], Coroutine[Any, Any, T]]) -> T:
    """``op(store)`` with a store of the prefix ``url``, opened and closed on fastfeed's IO loop."""

    async def run() -> T:
        store = await open_ckpt_store(url, config)
        try:
            return await op(store)
        finally:
            await store.aclose()

    io_loop = _loop.acquire()
    try:
        return io_loop.run(run())
    finally:
        io_loop.release()
