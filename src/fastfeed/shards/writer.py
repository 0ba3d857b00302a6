"""Writing WebDataset shards: :class:`ShardWriter` packs sample dicts into tar shards of a target
size and hands each finished one to its sink; :func:`write_shards` and
:func:`write_from_directory` drive it from an iterable or a directory of files (see
:mod:`fastfeed.shards` for the conventions and guarantees).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from fastfeed.config import S3Config, format_size, parse_size
from fastfeed.errors import (
    ConfigError,
    EmptyDatasetError,
    NotFoundError,
    StoreError,
)
from fastfeed.read.keys import split_key
from fastfeed.shards.manifest import (
    MANIFEST_NAME,
    DatasetManifest,
    ShardInfo,
)
from fastfeed.shards.manifest_io import (
    prefix_url,
    s3_config,
    write_manifest,
)
from fastfeed.shards.sinks import (
    LocalSink,
    OpenShard,
    S3Sink,
    Sink,
)
from fastfeed.shards.tar import (
    BLOCK,
    ZEROS,
    FileData,
    MemberData,
    check_ext,
    check_key,
    copy_file,
    encode_value,
    final_size,
    shard_name,
    tar_header,
)
from fastfeed.store.base import ObjectInfo
from fastfeed.store.upload import MIN_PART, check_age
from fastfeed.urls import Location, parse_url

__all__ = ["DEFAULT_INDEX_CACHE", "ShardWriter", "WriteProgress", "write_from_directory", "write_shards"]

log = logging.getLogger(__name__)

#: Where :class:`~fastfeed.StreamingDataset` looks for cached sample counts by default.
DEFAULT_INDEX_CACHE = "~/.cache/fastfeed/counts"


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
        if self.part_size < MIN_PART:
            raise ConfigError(
                f"part_size={part_size!r} is below S3's minimum multipart part of 5 MiB", hint="use e.g. '16MiB'"
            )
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.name = name
        first = shard_name(name, 0)
        self._progress = progress
        self._total_payload: int | None = None
        self._index_dir = _index_dir(index)
        loc = parse_url(os.fspath(url_prefix))
        self._s3 = s3_config(s3, endpoint_url)
        self._manifest_target = _manifest_target(manifest, loc)
        self._sink: Sink
        if loc.scheme == "file":
            self._sink = LocalSink(loc.path, overwrite=overwrite, first=first)
        else:
            self._sink = S3Sink(
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
        self._current: OpenShard | None = None
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
                write_manifest(manifest, self._manifest_target, self._s3, self._sink)
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

    def _encode(self, sample: Mapping[str, Any]) -> list[tuple[str, MemberData]]:
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
        members: list[tuple[str, MemberData]] = []
        for ext, value in sample.items():
            if not isinstance(ext, str):
                raise ConfigError(f"sample {key!r}: field names must be strings, got {ext!r}")
            if ext.startswith("__") and ext.endswith("__"):
                continue  # __key__, __url__, __local_path__, ...
            members.append((ext, encode_value(key, ext, value)))
        return members

    def _write_members(self, key: Any, members: list[tuple[str, MemberData]]) -> None:
        if self._closed:
            raise ConfigError("the shard writer is closed")
        if self._failed:
            raise ConfigError("an earlier write failed; the shard being written is incomplete", hint="start again")
        check_key(key)
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
            check_ext(key, ext)
            folded = ext.lower()
            if folded in seen:
                raise ConfigError(
                    f"duplicate extension in sample {key!r}: {seen[folded]!r} and {ext!r}",
                    url=data.path if isinstance(data, FileData) else None,
                    hint="readers lower-case extensions; every extension of a sample must be distinct",
                )
            seen[folded] = ext
            length = data.size if isinstance(data, FileData) else data.nbytes
            header = tar_header(f"{key}.{ext}", length)
            headers.append(header)
            size += len(header) + length + (-length % BLOCK)
            payload += length
        if self._current is not None and final_size(self._shard_bytes + size) > self.shard_size:
            self._finish_shard()
        if final_size(size) > self.shard_size:
            log.warning(
                "sample %r (%s) is larger than shard_size (%s): it gets a shard of its own",
                key,
                format_size(final_size(size)),
                format_size(self.shard_size),
            )
        if self._current is None:
            self._start_shard()
        assert self._current is not None
        fh = self._current.fh
        try:
            for header, (_, data) in zip(headers, members, strict=True):
                fh.write(header)
                if isinstance(data, FileData):
                    copy_file(data, fh)
                    length = data.size
                else:
                    fh.write(data)
                    length = data.nbytes
                fh.write(ZEROS[: -length % BLOCK])
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
        name = shard_name(self.name, self._number)
        self._current = self._sink.open(name)
        self._number += 1
        self._shard_bytes = 0
        self._shard_samples = 0

    def _finish_shard(self) -> None:
        current = self._current
        assert current is not None
        self._current = None
        end = final_size(self._shard_bytes)
        try:
            current.fh.write(ZEROS[: end - self._shard_bytes])
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
            writer._write_members(key, [(ext, FileData(path, size)) for ext, path, size in files])
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


def _index_dir(index: bool | str | os.PathLike[str]) -> str | None:
    if index is False:
        return None
    path = DEFAULT_INDEX_CACHE if index is True else os.fspath(index)
    return os.path.abspath(os.path.expanduser(path))


def _manifest_target(manifest: bool | str | os.PathLike[str], loc: Location) -> str | None:
    if manifest is False:
        return None
    if manifest is True:
        return prefix_url(loc) + MANIFEST_NAME
    return os.fspath(manifest)
