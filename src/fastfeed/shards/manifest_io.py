"""Manifests of datasets in a store: the manifest of an existing dataset (:func:`dataset_manifest`),
and manifests written to and read from a local path or an ``s3://`` URL (:func:`save_manifest`,
:func:`load_manifest`; a :class:`~fastfeed.shards.ShardWriter` writes its own through its sink).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from fastfeed import _loop
from fastfeed.config import PrefetchConfig, S3Config
from fastfeed.errors import (
    NotFoundError,
    StoreError,
)
from fastfeed.shards.manifest import (
    DatasetManifest,
    ShardInfo,
)
from fastfeed.shards.sinks import (
    S3Sink,
    Sink,
)
from fastfeed.store.pool import StoreSet
from fastfeed.store.upload import CkptStore, open_ckpt_store
from fastfeed.urls import Location, parse_url

__all__ = ["dataset_manifest", "load_manifest", "prefix_url", "s3_config", "save_manifest", "write_manifest"]

T = TypeVar("T")


def prefix_url(loc: Location) -> str:
    """The canonical URL of the prefix (directory) ``loc``, ending with ``/``."""
    if loc.scheme == "file":
        return Path(os.path.abspath(loc.path)).as_uri().rstrip("/") + "/"
    key = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
    return f"s3://{loc.bucket}/{key}"


def s3_config(s3: S3Config | None, endpoint_url: str | None) -> S3Config:
    """``s3``, or the AWS_* configuration, with ``endpoint_url`` (if given) overriding."""
    if s3 is None:
        return S3Config.resolve(endpoint_url=endpoint_url)
    if endpoint_url is not None:
        return dataclasses.replace(s3, endpoint_url=endpoint_url)
    return s3


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

    config = dataclasses.replace(s3_config(s3, endpoint_url), engine="aiobotocore")
    source = os.fspath(url)
    infos = resolve_source(source, StoreSet(config))
    counts: list[int | None] = [None] * len(infos)
    if count_samples:
        counts = list(count_shard_samples(infos, StoreSet(config), PrefetchConfig()))
    loc = parse_url(source)
    prefix = prefix_url(loc) if not loc.url.endswith(".tar") else loc.url
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
    return write_manifest(manifest, os.fspath(url), s3_config(s3, endpoint_url), None)


def write_manifest(manifest: DatasetManifest, url: str, config: S3Config, sink: Sink | None) -> str:
    """Write ``manifest`` to ``url`` (through ``sink`` when it is an S3 sink of the same prefix); the URL written."""
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
    if isinstance(sink, S3Sink) and sink.bucket == loc.bucket and loc.key.startswith(sink.prefix):
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
        _with_store(parent + "/", s3_config(s3, endpoint_url), lambda store: store.get(name))
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
