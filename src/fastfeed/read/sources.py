"""Turn a dataset source into its shard list, and count the samples in shards.

A source is an ``s3://bucket/prefix/`` or local directory (every ``*.tar`` under it, sorted), a
brace pattern (``s3://b/p/shard-{000000..000099}.tar``), a single shard, a dataset manifest (a
:class:`~fastfeed.shards.DatasetManifest`, or the URL of its ``.json`` in any store), or a list of
any of these. Every shard is resolved to an :class:`~fastfeed.store.base.ObjectInfo` (size and
ETag) up front, concurrently, so a missing object, a missing bucket or bad credentials fail at
construction within seconds, naming the object, instead of midway through an epoch.

A manifest already knows its shards' sizes and ETags: no listing and no HEAD per shard (one GET
of the manifest, none for an object). Its ETags make every ranged GET conditional, so a shard
rewritten since the manifest was made fails its first read instead of mixing versions; entries
without an ETag (local files, web servers without validators) get a HEAD (a ``stat``) to check
their size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import tempfile
from collections.abc import Sequence

from fastfeed import _loop
from fastfeed.config import PrefetchConfig
from fastfeed.errors import ConfigError, EmptyDatasetError, InvalidURLError, NotFoundError, StoreError
from fastfeed.read.prefetch import Prefetcher
from fastfeed.read.reader import count_samples, iter_members
from fastfeed.read.tario import scan
from fastfeed.shards.manifest import DatasetManifest
from fastfeed.store.base import ObjectInfo, gather_limited
from fastfeed.store.pool import StoreSet
from fastfeed.urls import Location, expand_braces, has_braces, parse_url

__all__ = ["CountCache", "count_shard_samples", "resolve_source"]

log = logging.getLogger(__name__)

#: Concurrent HEAD requests while resolving an explicit shard list.
_HEAD_CONCURRENCY = 32
#: The largest manifest read as a source (a million shards' entries take about 200 MB).
MANIFEST_MAX_BYTES = 1 << 30

SourceItem = str | os.PathLike[str] | DatasetManifest
_MANIFEST_HINT = "make a new one for the dataset as it is now: fastfeed shards manifest <prefix> --json > manifest.json"


def resolve_source(source: SourceItem | Sequence[SourceItem], stores: StoreSet) -> list[ObjectInfo]:
    """Resolve ``source`` to its shards (blocking; runs on the IO loop)."""
    raw = [source] if isinstance(source, str | os.PathLike | DatasetManifest) else list(source)
    if not raw:
        raise EmptyDatasetError("the source list is empty", hint="pass at least one shard URL or a prefix")
    items: list[str | DatasetManifest] = []
    for item in raw:
        item = item if isinstance(item, DatasetManifest) else os.fspath(item)
        if not isinstance(item, str | DatasetManifest):
            raise InvalidURLError(f"shard URLs must be strings, got {type(item).__name__}")
        items.append(item)
    io = _loop.acquire()
    try:
        return io.run(_resolve(items, stores))
    finally:
        io.release()


async def _resolve(items: list[str | DatasetManifest], stores: StoreSet) -> list[ObjectInfo]:
    try:
        out: list[ObjectInfo] = []
        heads: list[tuple[int, Location]] = []
        for item in items:
            if isinstance(item, DatasetManifest):
                _add_manifest(item, "the manifest given", out, heads)
                continue
            urls = expand_braces(item) if has_braces(item) else [item]
            for url in urls:
                loc = parse_url(url)
                if _is_prefix(loc):
                    store = await stores.get(loc)
                    out.extend(await store.list(loc))
                elif loc.url.endswith(".json"):
                    _add_manifest(await _read_manifest(stores, loc), loc.url, out, heads)
                else:
                    heads.append((len(out), loc))
                    out.append(ObjectInfo(loc.url, -1))
        if heads:
            infos = await gather_limited([_head(stores, loc) for _, loc in heads], _HEAD_CONCURRENCY)
            for (index, _), info in zip(heads, infos, strict=True):
                known = out[index].size
                if known >= 0 and info.size != known:
                    raise StoreError(
                        f"{info.url} is {info.size} bytes, but its manifest says {known}: the dataset changed "
                        "since the manifest was made",
                        url=info.url,
                        hint=_MANIFEST_HINT,
                    )
                out[index] = info
        return out
    finally:
        await stores.aclose()


def _add_manifest(
    manifest: DatasetManifest, where: str, out: list[ObjectInfo], heads: list[tuple[int, Location]]
) -> None:
    """Append the manifest's shards to ``out``; those without an ETag also to ``heads`` (their
    size, known, is checked against the HEAD's)."""
    if not manifest.shards:
        raise EmptyDatasetError(f"{where} names no shards", url=manifest.url or None, hint=_MANIFEST_HINT)
    for shard in manifest.shards:
        loc = parse_url(shard.url)
        if loc.url.endswith(".json") or _is_prefix(loc):
            raise ConfigError(
                f"{where} names {shard.url}, which is not a shard", hint="a manifest lists the shard objects themselves"
            )
        if shard.etag is None:
            heads.append((len(out), loc))
        out.append(ObjectInfo(loc.url, shard.size, shard.etag))


async def _read_manifest(stores: StoreSet, loc: Location) -> DatasetManifest:
    """The manifest at ``loc`` (one HEAD and one GET), its size checked before reading it."""
    info = await _head(stores, loc)
    if info.size > MANIFEST_MAX_BYTES:
        raise ConfigError(
            f"{loc.url} is {info.size} bytes, more than a dataset manifest can be ({MANIFEST_MAX_BYTES})",
            url=loc.url,
            hint="pass the manifest.json that fastfeed shards write, or the shards themselves",
        )
    store = await stores.get(loc)
    body = await store.read_range(loc, 0, info.size, info.etag) if info.size else memoryview(b"")
    try:
        return DatasetManifest.from_json(bytes(body))
    except ConfigError as exc:
        raise ConfigError(f"{loc.url}: {exc.message}", url=loc.url, hint=exc.hint) from exc


def _is_prefix(loc: Location) -> bool:
    if loc.scheme == "file":
        return os.path.isdir(loc.path)
    return loc.key == "" or loc.key.endswith("/") or not os.path.splitext(loc.key.rsplit("/", 1)[-1])[1]


async def _head(stores: StoreSet, loc: Location) -> ObjectInfo:
    store = await stores.get(loc)
    try:
        return await store.head(loc)
    except NotFoundError as err:
        if type(err) is NotFoundError:
            raise NotFoundError(
                f"shard not found: {loc.url}",
                url=loc.url,
                hint="check the URL / brace range and the endpoint",
            ) from err
        raise


def count_shard_samples(
    shards: Sequence[ObjectInfo], stores: StoreSet, config: PrefetchConfig, cache_dir: str | None = None
) -> list[int]:
    """Number of samples in each shard (blocking).

    Local files are scanned through ``mmap``: only the 512-byte headers are touched. Objects in a
    store are streamed through the prefetcher once and their headers parsed; the data is not
    copied or kept. With ``cache_dir``, counts of objects with an ETag are remembered there
    (keyed by URL, ETag and size, so a changed object is counted again): a dataset on S3 is
    scanned once per machine, not once per run.
    """
    counts = [-1] * len(shards)
    remote: list[int] = []
    cache = CountCache(cache_dir) if cache_dir else None
    for i, info in enumerate(shards):
        loc = parse_url(info.url)
        if loc.scheme == "file":
            counts[i] = _count_local(loc)
        elif cache is not None and (cached := cache.get(info)) is not None:
            counts[i] = cached
        else:
            remote.append(i)
    if remote:
        with Prefetcher([shards[i] for i in remote], stores, config) as prefetcher:
            for i, fetch in zip(remote, prefetcher, strict=False):
                try:
                    names = (name for name, _ in iter_members(fetch.url, fetch.chunks(), data="none"))
                    counts[i] = count_samples(names)
                    if cache is not None:
                        cache.put(shards[i], counts[i])
                finally:
                    fetch.close()
    return counts


class CountCache:
    """Sample counts of store objects, one small JSON file per (URL, ETag, size) (also written by
    :class:`fastfeed.shards.ShardWriter` for the shards it wrote).

    Written atomically (temp file + rename); unreadable entries are ignored and recounted, and
    a cache directory that cannot be written only costs a warning.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._warned = False

    def _path(self, info: ObjectInfo) -> str | None:
        if not info.etag:
            return None
        digest = hashlib.sha256(f"{info.url}\0{info.etag}\0{info.size}".encode()).hexdigest()
        return os.path.join(self.root, digest[:2], digest + ".json")

    def get(self, info: ObjectInfo) -> int | None:
        path = self._path(info)
        if path is None:
            return None
        # A missing or unreadable entry is a miss: the shard is counted again.
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(path) as f:
            entry = json.load(f)
            if entry.get("url") == info.url and entry.get("etag") == info.etag and entry.get("size") == info.size:
                return int(entry["samples"])
        return None

    def put(self, info: ObjectInfo, samples: int) -> None:
        path = self._path(info)
        if path is None:
            return
        entry = {"url": info.url, "etag": info.etag, "size": info.size, "samples": samples}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot write the sample-count cache under %s (%s); counting again next run", self.root, exc
                )


def _count_local(loc: Location) -> int:
    try:
        with open(loc.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return count_samples(name for name, _ in iter_members(loc.url, [(b"", True)], data="none"))
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                result = scan(mm, 0, final=True, url=loc.url)
                return count_samples(name for name, _, _ in result.members)
    except FileNotFoundError as exc:
        raise NotFoundError(f"shard not found: {loc.path}", url=loc.url) from exc
