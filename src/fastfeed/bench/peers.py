"""Other data loaders reading the same data, for ``fastfeed bench --compare``.

One adapter per peer reads the same samples, in the same run, each in the configuration its
documentation recommends and in its own format where it needs one::

    from fastfeed.bench.peers import PEERS, PeerContext, make_peer

    ctx = PeerContext.from_url("s3://bucket/train/", s3=S3Config(endpoint_url=...), work_dir=tmp)
    for name in PEERS:
        peer = make_peer(name)
        if (why := peer.available()) is not None:
            print(f"skip {name}: {why}")
            continue
        try:
            peer.prepare(ctx)                       # convert + upload; not timed
            cold = peer.run(ctx, epoch=0, warm=False)
            warm = peer.run(ctx, epoch=1, warm=True)  # == cold for peers without a local cache
        finally:
            peer.cleanup()

=====================  ==================================================================
``torch``              ``torch.utils.data.DataLoader`` over an ``IterableDataset`` that GETs
                       each shard whole with boto3 and parses it with :mod:`tarfile`; shards
                       split across workers (``shards[worker::num_workers]``). The baseline
                       users write by hand.
``webdataset``         ``webdataset.WebDataset(urls, shardshuffle=False)`` with ``pipe:``
                       URLs, ``.to_tuple(...).map_tuple(...).batched(batch_size)``, in a
                       DataLoader with ``batch_size=None`` (what ``wds.WebLoader`` wraps), as
                       WebDataset's documentation recommends. ``pipe:`` runs a small Python
                       boto3 script per shard (:data:`WebDatasetPeer.opener` ``"python"``), or
                       ``"curl"``: presigned ``http(s)`` URLs opened by WebDataset's own curl
                       handler.
``litdata``            ``litdata.optimize`` converts once; ``litdata.StreamingDataset`` +
                       ``litdata.StreamingDataLoader``. Has a local chunk cache (warm runs).
``streaming``          MosaicML Streaming: ``MDSWriter`` converts once;
                       ``streaming.StreamingDataset`` + ``torch.utils.data.DataLoader``. Has a
                       local shard cache (warm runs).
``s3torchconnector``   ``S3IterableDataset.from_prefix(..., enable_sharding=True)`` over the tar
                       shards themselves (AWS CRT client), each object parsed as a tar stream
                       (the pattern of s3torchconnector's WebDataset example), in a DataLoader.
=====================  ==================================================================

Every run reads one full epoch, in each library's natural (unshuffled) order, with the
context's ``batch_size`` and ``num_workers``, and checks that every sample was delivered: the
sample count and the payload bytes must equal :meth:`PeerContext.expected_counts`, or
:class:`PeerError` is raised. Payload bytes are the lengths of the ``"bytes"`` fields of
:attr:`PeerContext.fields` (``"int"`` fields, ASCII integers in the tar shards, are decoded and
not counted). CPU time includes child processes that exited during the run (loader workers,
``pipe:`` processes). Cold/warm: a peer with a local cache (:attr:`Peer.has_cache`) empties it
for ``warm=False`` and reads from it, filled, for ``warm=True`` (filling it first, untimed, if
needed), and a warm run fails if any file in the cache changed (something was re-downloaded).

Process-wide side effects, limited to the calls that need them: MosaicML Streaming and the CRT
client of s3torchconnector read credentials (and Streaming its endpoint, ``S3_ENDPOINT_URL``)
from the environment, so :func:`env_vars` sets them around those peers' calls; Streaming's file
locks and ``litdata.optimize``'s working folders go to :func:`tempfile.gettempdir`, which
:func:`tempdir_redirect` points into the work dir; LitData's obstore client is told to allow
``http://`` endpoints (:func:`litdata_allow_http`); and a CUDA-less torchvision makes
``import streaming`` fail, which :func:`import_streaming` works around. Streaming's
shared-memory blocks (named by a machine-wide prefix number) are unlinked after each of its
epochs, only those of the peer's own datasets (:func:`unlink_streaming_shm`). Warnings from the
peers' own modules are ignored during their calls (also in their forked workers). See
``benchmarks/cache/README_peers.md`` for installing the peers.
"""

from __future__ import annotations

import abc
import contextlib
import gc
import importlib
import json
import os
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
import types
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import torch.utils.data

from fastfeed.bench.measure import Measurement, measure_batches
from fastfeed.config import S3Config

__all__ = [
    "DEFAULT_FIELDS",
    "PEERS",
    "Expected",
    "LitdataCollate",
    "LitdataPeer",
    "Peer",
    "PeerContext",
    "PeerError",
    "PeerUnavailable",
    "S3TorchConnectorPeer",
    "StreamingPeer",
    "TarSamples",
    "TorchPeer",
    "WebDatasetPeer",
    "boto3_client",
    "cache_snapshot",
    "convert_litdata",
    "convert_mds",
    "drop_streaming_clients",
    "env_vars",
    "import_streaming",
    "iter_tar_samples",
    "litdata_allow_http",
    "litdata_storage_options",
    "make_peer",
    "open_litdata_dataset",
    "open_streaming_dataset",
    "sample_fields",
    "shard_stats",
    "shutdown_loader_iter",
    "snapshot_diff",
    "streaming_shm_names",
    "streaming_shm_owner",
    "tempdir_redirect",
    "unlink_streaming_shm",
]

#: The peers, in the order ``fastfeed bench --compare`` lists them.
PEERS = ("torch", "webdataset", "litdata", "streaming", "s3torchconnector")

#: The fields of :func:`fastfeed.testing.shards.write_synthetic_shards` samples that are read:
#: ``bin`` (the payload) and ``cls`` (an ASCII integer label).
DEFAULT_FIELDS: Mapping[str, str] = types.MappingProxyType({"bin": "bytes", "cls": "int"})

_FIELD_KINDS = ("bytes", "int")
_DEFAULT_REGION = "us-east-1"
# WebDataset's rule for a member's sample key and field: everything before the first "." of
# the file name (directories included in the key).
_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class PeerError(RuntimeError):
    """A peer failed, or did not deliver exactly the expected samples."""


class PeerUnavailable(PeerError):
    """A peer cannot run here (not installed, or cannot reach the store); ``reason`` says why."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason


@dataclass(frozen=True)
class Expected:
    """What one epoch must deliver: every sample and the total length of its ``bytes`` fields."""

    samples: int
    payload_bytes: int
    #: Largest payload of one sample (sizes MDS shard files); 0 if unknown.
    max_sample_bytes: int = 0


# -- context ---------------------------------------------------------------------------------


@dataclass
class PeerContext:
    """Where the data is and how every peer reads it.

    The WebDataset shards are the objects ``shard_urls`` under ``s3://bucket/prefix``. Peers
    that need their own format upload it under ``s3://bucket/<converted_prefix><format>/``,
    outside ``prefix`` (a peer that lists ``prefix`` must see only the shards).
    """

    #: Endpoint and credentials (``None`` fields fall back to the AWS chain, as in fastfeed).
    s3: S3Config
    bucket: str
    #: Key prefix of the shards, ending with ``/`` (``"train/"`` for ``s3://bucket/train/``).
    prefix: str
    #: ``s3://bucket/prefix...`` URL of every shard, in order.
    shard_urls: list[str]
    #: Caches, conversions and scratch files of the peers go here (created if missing).
    work_dir: Path
    batch_size: int = 64
    #: DataLoader worker processes (0: iterate in this process).
    num_workers: int = 2
    #: Sample fields to read: name -> ``"bytes"`` (payload, counted) or ``"int"`` (ASCII integer).
    fields: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_FIELDS))
    #: Samples per file of converted formats; ``None``: as many as the first shard holds.
    samples_per_file: int | None = None
    #: Local copies of the shards (same order as ``shard_urls``): the conversions read these,
    #: and :meth:`expected_counts` their tar headers. ``None``: downloaded once when needed.
    local_shards: list[Path] | None = None
    #: Key prefix for converted copies; ``None``: ``"<prefix without />-peers/"``.
    converted_prefix: str | None = None
    #: What an epoch must deliver; ``None``: computed by :meth:`expected_counts`.
    expected: Expected | None = None
    #: A loader batch not ready within this many seconds fails the run instead of hanging.
    loader_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)
        if not self.prefix or not self.prefix.endswith("/") or self.prefix.startswith("/"):
            raise ValueError(f"prefix must be a non-empty key prefix ending with '/', got {self.prefix!r}")
        if not self.shard_urls:
            raise ValueError("shard_urls is empty")
        base = f"s3://{self.bucket}/{self.prefix}"
        outside = [u for u in self.shard_urls if not u.startswith(base)]
        if outside:
            raise ValueError(f"shard URLs must be under {base}: {outside[:3]}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        bad = {k: v for k, v in self.fields.items() if v not in _FIELD_KINDS}
        if not self.fields or bad:
            raise ValueError(f"fields must map names to one of {_FIELD_KINDS}, got {dict(self.fields)}")
        if "bytes" not in self.fields.values():
            raise ValueError("fields need at least one 'bytes' field (the payload that is counted)")
        if self.local_shards is not None and len(self.local_shards) != len(self.shard_urls):
            raise ValueError("local_shards must list one file per shard URL")
        conv = self.converted
        if conv.startswith(self.prefix) or self.prefix.startswith(conv):
            raise ValueError(f"converted_prefix {conv!r} must not overlap prefix {self.prefix!r}")
        self._sources: list[Path] | None = None

    @classmethod
    def from_url(cls, url: str, *, s3: S3Config, work_dir: str | os.PathLike[str], **kwargs: Any) -> PeerContext:
        """A context for every ``*.tar`` under ``url`` (``s3://bucket/prefix/``), listed with boto3."""
        bucket, prefix = split_s3_url(url)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        client = boto3_client(s3)
        urls: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            urls += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
        if not urls:
            raise ValueError(f"no *.tar objects under {url}")
        return cls(s3=s3, bucket=bucket, prefix=prefix, shard_urls=sorted(urls), work_dir=Path(work_dir), **kwargs)

    @property
    def prefix_url(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def converted(self) -> str:
        """Key prefix of the converted copies (ends with ``/``)."""
        if self.converted_prefix is not None:
            return self.converted_prefix.rstrip("/") + "/"
        return self.prefix.rstrip("/") + "-peers/"

    def converted_url(self, fmt: str) -> str:
        """``s3://bucket/<converted prefix><fmt>/``."""
        return f"s3://{self.bucket}/{self.converted}{fmt}/"

    @property
    def region(self) -> str:
        """The signing region: ``s3.region``, else ``AWS_REGION``/``AWS_DEFAULT_REGION``, else us-east-1."""
        return self.s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or _DEFAULT_REGION

    @property
    def byte_fields(self) -> list[str]:
        return [k for k, v in self.fields.items() if v == "bytes"]

    def source_shards(self) -> list[Path]:
        """Local copies of the shards: ``local_shards``, or downloaded once into the work dir."""
        if self.local_shards is not None:
            return list(self.local_shards)
        if self._sources is None:
            out = self.work_dir / "source"
            out.mkdir(parents=True, exist_ok=True)
            client = boto3_client(self.s3)
            paths = []
            for i, url in enumerate(self.shard_urls):
                bucket, key = split_s3_url(url)
                path = out / f"{i:06d}-{Path(key).name}"
                client.download_file(bucket, key, str(path))
                paths.append(path)
            self._sources = paths
        return list(self._sources)

    def expected_counts(self) -> Expected:
        """``expected``, or computed (once) from the tar headers of :meth:`source_shards`."""
        if self.expected is None:
            stats = shard_stats(self.source_shards(), self.fields)
            self.expected = Expected(
                samples=sum(s[0] for s in stats),
                payload_bytes=sum(s[1] for s in stats),
                max_sample_bytes=max((s[2] for s in stats), default=0),
            )
        return self.expected

    def files_per_shard(self) -> int:
        """Samples per converted file: ``samples_per_file`` or the first shard's sample count."""
        if self.samples_per_file is not None:
            return self.samples_per_file
        return max(1, shard_stats(self.source_shards()[:1], self.fields)[0][0])


def _region(s3: S3Config) -> str:
    return s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or _DEFAULT_REGION


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``("bucket", "key")``."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    return bucket, key


def boto3_client(s3: S3Config) -> Any:
    """A boto3 S3 client for ``s3`` (path-style by default, as fastfeed)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = boto3.session.Session(profile_name=s3.profile) if s3.profile else boto3.session.Session()
    config = Config(
        s3={"addressing_style": s3.addressing_style},
        signature_version=UNSIGNED if s3.anonymous else None,
        connect_timeout=s3.connect_timeout,
        read_timeout=s3.read_timeout,
        max_pool_connections=s3.max_pool_connections,
        retries={"max_attempts": 5, "mode": "standard"},
    )
    return session.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or _DEFAULT_REGION,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        aws_session_token=s3.session_token,
        config=config,
    )


def _aws_env(ctx: PeerContext) -> dict[str, str]:
    """The standard AWS variables for ``ctx.s3`` (only those it sets), plus MosaicML
    Streaming's ``S3_ENDPOINT_URL``."""
    s3 = ctx.s3
    values = {
        "AWS_ACCESS_KEY_ID": s3.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
        "AWS_SESSION_TOKEN": s3.session_token,
        "AWS_PROFILE": s3.profile,
        "S3_ENDPOINT_URL": s3.endpoint_url,
        "AWS_REGION": ctx.region,
        "AWS_DEFAULT_REGION": ctx.region,
    }
    return {k: v for k, v in values.items() if v is not None}


@contextlib.contextmanager
def env_vars(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (children forked in it inherit them), then
    restore the previous values."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def tempdir_redirect(path: Path) -> Iterator[None]:
    """Point :func:`tempfile.gettempdir` (and ``TMPDIR`` for child processes) at ``path`` for
    the block: MosaicML Streaming puts its file locks and ``litdata.optimize`` its working
    folders there, so they stay in (and are removed with) the work dir."""
    import multiprocessing.util

    # multiprocessing makes its own temporary directory (for the sockets that pass tensors
    # between loader workers) once per process, on first use: make it now, in the real temp
    # dir, not in ``path`` (deleted later, and maybe too long for an AF_UNIX socket path).
    multiprocessing.util.get_temp_dir()
    path.mkdir(parents=True, exist_ok=True)
    old = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        with env_vars({"TMPDIR": str(path)}):
            yield
    finally:
        tempfile.tempdir = old


@contextlib.contextmanager
def _quiet(*modules: str) -> Iterator[None]:
    """Ignore warnings raised from ``modules`` (and their submodules) in the block; worker
    processes forked in it inherit the filter."""
    with warnings.catch_warnings():
        for m in modules:
            warnings.filterwarnings("ignore", module=rf"{re.escape(m)}(\..*)?$")
        yield


# -- tar shards ------------------------------------------------------------------------------


def _decode(kind: str, data: bytes) -> bytes | int:
    return int(data) if kind == "int" else data


def iter_tar_samples(
    source: str | os.PathLike[str] | IO[bytes], fields: Mapping[str, str] = DEFAULT_FIELDS
) -> Iterator[dict[str, Any]]:
    """The samples of one WebDataset shard (a path, or a readable binary stream read
    sequentially) as ``{field: bytes | int}`` with exactly ``fields``.

    Members are grouped into samples as WebDataset does (key = name up to the first ``.`` of
    the file name). Raises :class:`PeerError` if a sample lacks one of ``fields``."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as stream:
            yield from iter_tar_samples(stream, fields)
        return
    sample: dict[str, Any] = {}
    key: str | None = None

    def done() -> dict[str, Any]:
        missing = [f for f in fields if f not in sample]
        if missing:
            raise PeerError(f"sample {key!r} has no field(s) {missing}")
        return sample

    with tarfile.open(fileobj=source, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            m = _MEMBER_RE.match(member.name)
            if not m:
                continue
            stem, ext = m.group(1), m.group(2)
            if stem != key:
                if key is not None:
                    yield done()
                sample, key = {}, stem
            kind = fields.get(ext)
            if kind is not None:
                fh = tar.extractfile(member)
                assert fh is not None
                sample[ext] = _decode(kind, fh.read())
    if key is not None:
        yield done()


def sample_fields(path: str | os.PathLike[str]) -> dict[str, str]:
    """The fields peers read from a dataset whose first local shard is ``path``: the synthetic
    datasets' :data:`DEFAULT_FIELDS` when its first sample has them, else every field of its
    first sample as payload (``"bytes"``), as fastfeed's loader delivers them all. From the tar
    headers alone."""
    first: str | None = None
    exts: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            m = _MEMBER_RE.match(member.name) if member.isfile() else None
            if m is None:
                continue
            if first is None:
                first = m.group(1)
            elif m.group(1) != first:
                break
            exts.append(m.group(2))
    if not exts:
        raise PeerError(f"{path}: no samples in the first shard")
    if all(f in exts for f in DEFAULT_FIELDS):
        return dict(DEFAULT_FIELDS)
    return {ext: "bytes" for ext in exts}


def shard_stats(paths: Sequence[str | os.PathLike[str]], fields: Mapping[str, str]) -> list[tuple[int, int, int]]:
    """``(samples, payload bytes, largest sample payload)`` of each local shard, from its tar
    headers alone (member data is skipped, not read). Payload: the ``bytes`` fields."""
    out = []
    for path in paths:
        sizes: dict[str, dict[str, int]] = {}
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                m = _MEMBER_RE.match(member.name) if member.isfile() else None
                if m:
                    sizes.setdefault(m.group(1), {})[m.group(2)] = member.size
        payload = largest = 0
        for key, members in sizes.items():
            missing = [f for f in fields if f not in members]
            if missing:
                raise PeerError(f"{path}: sample {key!r} has no field(s) {missing}")
            n = sum(members[f] for f, kind in fields.items() if kind == "bytes")
            payload += n
            largest = max(largest, n)
        out.append((len(sizes), payload, largest))
    return out


class TarSamples:
    """``litdata.optimize``'s per-input function: a local shard path -> its samples (a
    picklable callable, so its worker processes can run it)."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self.fields = dict(fields)

    def __call__(self, path: str) -> Iterator[dict[str, Any]]:
        yield from iter_tar_samples(path, self.fields)


# -- loaders and measurement helpers ---------------------------------------------------------


def shutdown_loader_iter(it: Any) -> None:
    """Stop a torch DataLoader iterator's worker processes now (also on an error mid-epoch)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _loader_kwargs(ctx: PeerContext, workers: int) -> dict[str, Any]:
    return {"num_workers": workers, "timeout": ctx.loader_timeout_s if workers else 0}


def _count_batch(batch: Any, names: Sequence[str], byte_fields: Sequence[str]) -> tuple[int, int]:
    """(samples, payload bytes) of a collated batch: a dict by field name, or a tuple in
    ``names`` order. ``bytes`` fields must be lists of ``bytes``-like values."""
    if isinstance(batch, dict):
        cols = batch
    elif isinstance(batch, list | tuple):
        cols = dict(zip(names, batch, strict=True))
    else:
        raise PeerError(f"unexpected batch type {type(batch).__name__}")
    try:
        n = len(cols[names[0]])
        payload = sum(len(v) for f in byte_fields for v in cols[f])
    except KeyError as exc:
        raise PeerError(f"batch has no field {exc}") from None
    return n, payload


def _iterate_loader(
    loader: Iterable[Any], ctx: PeerContext, names: Sequence[str] | None = None
) -> Iterator[tuple[int, int]]:
    names = list(ctx.fields) if names is None else names
    byte_fields = ctx.byte_fields
    it = iter(loader)
    try:
        for batch in it:
            yield _count_batch(batch, names, byte_fields)
    finally:
        shutdown_loader_iter(it)


def cache_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every regular file under ``root``: relative path -> (size, inode). A re-downloaded file
    is written anew (new inode or size), a removed or added one changes the key set. ``.lock``
    files are ignored."""
    out = {}
    if root.exists():
        for p in root.rglob("*"):
            if p.is_file() and not p.name.endswith(".lock"):
                st = p.stat()
                out[str(p.relative_to(root))] = (st.st_size, st.st_ino)
    return out


def snapshot_diff(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Files added, removed and rewritten between two :func:`cache_snapshot` results."""
    return {
        "files_added": len(after.keys() - before.keys()),
        "files_removed": len(before.keys() - after.keys()),
        "files_rewritten": sum(1 for k in before.keys() & after.keys() if before[k] != after[k]),
    }


def _dir_stats(root: Path) -> dict[str, int]:
    files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def _upload_dir(ctx: PeerContext, src: Path, fmt: str) -> list[str]:
    """Upload every file under ``src`` to ``ctx.converted_url(fmt)``; returns the keys."""
    client = boto3_client(ctx.s3)
    base = f"{ctx.converted}{fmt}/"
    keys = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        key = base + path.relative_to(src).as_posix()
        client.upload_file(str(path), ctx.bucket, key)
        keys.append(key)
    return keys


def _delete_keys(ctx: PeerContext, keys: Sequence[str]) -> None:
    client = boto3_client(ctx.s3)
    for i in range(0, len(keys), 1000):
        client.delete_objects(
            Bucket=ctx.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
        )


# -- the adapters ----------------------------------------------------------------------------


class Peer(abc.ABC):
    """One peer library: :meth:`available`, :meth:`prepare` (untimed), :meth:`run` (one
    timed, checked epoch), :meth:`cleanup`."""

    #: One of :data:`PEERS`.
    name: ClassVar[str] = ""
    #: Whether the peer keeps a local copy that a ``warm=True`` run reads from.
    has_cache: ClassVar[bool] = False
    #: The on-store format it reads.
    data_format: ClassVar[str] = "webdataset tar"

    def __init__(self) -> None:
        self._ctx: PeerContext | None = None
        self._prepared = False
        self.notes: list[str] = []  # workarounds applied, for reports

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @abc.abstractmethod
    def available(self) -> str | None:
        """``None`` if the peer can run in this interpreter, else why not (e.g. ``"pip install litdata"``)."""

    def prepare(self, ctx: PeerContext) -> None:
        """Untimed set-up: compute what an epoch must deliver, convert and upload the data if
        the peer needs its own format. Raises :class:`PeerUnavailable` if it cannot run."""
        reason = self.available()
        if reason is not None:
            raise PeerUnavailable(self.name, reason)
        self._ctx = ctx
        ctx.expected_counts()
        self._prepare(ctx)
        self._prepared = True

    def _prepare(self, ctx: PeerContext) -> None:
        return None

    @abc.abstractmethod
    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        """Read one epoch: yield ``(samples, payload bytes)`` per batch; stop every worker
        process before returning (also when closed early)."""

    def _config(self, ctx: PeerContext) -> str:
        return ""

    def _workers(self, ctx: PeerContext) -> int:
        return ctx.num_workers

    def cache_dir(self, ctx: PeerContext) -> Path:
        """The peer's local cache (peers with :attr:`has_cache`)."""
        return ctx.work_dir / self.name / "cache"

    def run(self, ctx: PeerContext, *, epoch: int = 0, warm: bool = False) -> Measurement:
        """Time one full epoch and check it delivered every sample (count and payload bytes).

        ``warm=False`` on a peer with a cache empties the cache first (the epoch reads from the
        store and fills it); ``warm=True`` reads from the filled cache (filled first, untimed, if
        empty) and fails if the cache changed. For peers without a cache ``warm`` changes
        nothing but ``extra["warm"]``. ``epoch`` is recorded in ``extra``: no peer shuffles.

        Raises:
            PeerUnavailable: not installed / cannot run.
            PeerError: a wrong sample count or payload size, or a warm epoch that re-downloaded.
        """
        if not self._prepared or self._ctx is not ctx:
            self.prepare(ctx)
        expected = ctx.expected_counts()
        cache = self.cache_dir(ctx)
        before: dict[str, tuple[int, int]] = {}
        filled_first = False
        if self.has_cache:
            if not warm:
                shutil.rmtree(cache, ignore_errors=True)
            elif not cache_snapshot(cache):
                self._check(self._time(ctx, epoch), expected, "filling the cache")
                filled_first = True
            before = cache_snapshot(cache) if warm else {}
        m = self._time(ctx, epoch)
        self._check(m, expected, "warm" if warm and self.has_cache else "cold")
        from_cache = warm and self.has_cache
        m.extra.update(
            epoch=epoch,
            warm=warm,
            from_cache=from_cache,
            format=self.data_format,
            batch_size=ctx.batch_size,
            num_workers=self._workers(ctx),
            config=self._config(ctx),
            cpu_includes_children=True,
        )
        if self.notes:
            m.extra["notes"] = list(self.notes)
        if self.has_cache:
            m.extra["cache"] = _dir_stats(cache)
            m.extra["filled_cache_first"] = filled_first
        if from_cache:
            diff = snapshot_diff(before, cache_snapshot(cache))
            m.extra.update(diff)
            if any(diff.values()):
                raise PeerError(f"{self.name}: the local cache changed during a warm epoch (re-downloaded?): {diff}")
        return m

    def _time(self, ctx: PeerContext, epoch: int) -> Measurement:
        """One epoch through :func:`fastfeed.bench.measure.measure_batches`, as fastfeed's own runs are
        timed: the same latency percentiles, wait fraction, timeline, CPU (workers included)."""
        gen = self._epoch(ctx, epoch)
        try:
            m = measure_batches(self.name, lambda: gen, size_of=lambda item: item[1], count_of=lambda item: item[0])
        finally:
            gen.close()
        gc.collect()  # datasets and loaders of the epoch go now (a peer may refuse a second live one)
        self._after_epoch(ctx)
        return m

    def _after_epoch(self, ctx: PeerContext) -> None:
        """Untimed clean-up after each epoch."""
        return None

    def _check(self, m: Measurement, expected: Expected, what: str) -> None:
        if m.samples != expected.samples or m.bytes != expected.payload_bytes:
            raise PeerError(
                f"{self.name} ({what}): delivered {m.samples} samples / {m.bytes} payload bytes, "
                f"expected {expected.samples} / {expected.payload_bytes}"
            )

    def cleanup(self) -> None:
        """Remove what :meth:`prepare` and :meth:`run` left: the local cache and scratch files,
        and converted copies uploaded to the store. Never raises."""
        ctx = self._ctx
        if ctx is None:
            return
        with contextlib.suppress(Exception):
            self._cleanup(ctx)
        shutil.rmtree(ctx.work_dir / self.name, ignore_errors=True)
        self._prepared = False
        self._ctx = None

    def _cleanup(self, ctx: PeerContext) -> None:
        return None


def _import_error(module: str, pip_name: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"pip install {pip_name} ({type(exc).__name__}: {exc})"
    return None


# torch --------------------------------------------------------------------------------------


class ShardGetDataset(torch.utils.data.IterableDataset[dict[str, Any]]):
    """Each DataLoader worker GETs its shards (``urls[worker::num_workers]``) whole with boto3
    and yields their samples, parsed with :mod:`tarfile`."""

    def __init__(self, s3: S3Config, urls: Sequence[str], fields: Mapping[str, str]) -> None:
        self.s3 = s3
        self.urls = list(urls)
        self.fields = dict(fields)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import io

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        client = boto3_client(self.s3)
        for url in self.urls[worker::workers]:
            bucket, key = split_s3_url(url)
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            yield from iter_tar_samples(io.BytesIO(data), self.fields)


class TorchPeer(Peer):
    """The plain-DataLoader baseline: :class:`ShardGetDataset` in
    ``torch.utils.data.DataLoader(batch_size=..., num_workers=...)`` with the default collate
    (``bytes`` fields -> lists, ``int`` fields -> tensors). Workers: at most one per shard."""

    name = "torch"

    def available(self) -> str | None:
        return _import_error("boto3", "boto3")

    def _workers(self, ctx: PeerContext) -> int:
        return min(ctx.num_workers, len(ctx.shard_urls))

    def _config(self, ctx: PeerContext) -> str:
        return "DataLoader(IterableDataset: boto3 get_object per shard, tarfile), default collate"

    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        ds = ShardGetDataset(ctx.s3, ctx.shard_urls, ctx.fields)
        loader = torch.utils.data.DataLoader(ds, batch_size=ctx.batch_size, **_loader_kwargs(ctx, self._workers(ctx)))
        yield from _iterate_loader(loader, ctx)


# webdataset ---------------------------------------------------------------------------------

_S3CAT = '''\
"""Write one S3 object to stdout: fastfeed.bench.peers' WebDataset ``pipe:`` opener.

Usage: python s3cat.py CONFIG.json BUCKET KEY (CONFIG: endpoint, credentials, region, style).
"""
import json
import sys

import boto3
from botocore.config import Config

with open(sys.argv[1]) as f:
    cfg = json.load(f)
client = boto3.client(
    "s3",
    endpoint_url=cfg["endpoint_url"],
    region_name=cfg["region"],
    aws_access_key_id=cfg["access_key_id"],
    aws_secret_access_key=cfg["secret_access_key"],
    aws_session_token=cfg["session_token"],
    config=Config(s3={"addressing_style": cfg["addressing_style"]}, retries={"max_attempts": 5, "mode": "standard"}),
)
body = client.get_object(Bucket=sys.argv[2], Key=sys.argv[3])["Body"]
out = sys.stdout.buffer
try:
    for chunk in body.iter_chunks(1 << 20):
        out.write(chunk)
    out.flush()
except BrokenPipeError:  # the reader stopped early: the status WebDataset's Pipe ignores
    sys.exit(141)
'''


class WebDatasetPeer(Peer):
    """``webdataset.WebDataset`` over ``pipe:`` (or presigned ``http``) URLs of the shards.

    WebDataset has no S3 client of its own; its documentation reads S3 through ``pipe:``
    commands (``pipe:aws s3 cp s3://... -``). ``opener="python"`` (default) uses
    ``pipe:<this python> s3cat.py cfg.json BUCKET KEY``, a boto3 ``get_object`` streamed to
    stdout (no AWS CLI needed; the endpoint and credentials are in a 0600 JSON file in the work
    dir, not on the command line). It starts one Python process per shard: 0.35-0.45 s of CPU
    per shard on the 2-core dev machine (start-up, ``import boto3``, client), about what
    ``aws s3 cp`` costs too, which caps it near 40 MB/s per core with 16 MB shards.
    ``opener="curl"`` hands WebDataset presigned ``http(s)`` URLs instead, which it opens with
    its built-in curl handler (a few ms per shard; 4-5x faster there with 16 MB shards).
    Pipeline as documented: ``WebDataset(urls, shardshuffle=False).to_tuple(*fields)
    .map_tuple(...).batched(batch_size)`` (batched in the workers), in a DataLoader with
    ``batch_size=None`` (``wds.WebLoader`` is this DataLoader with a fluid interface). Shards are
    split across workers by WebDataset's ``split_by_worker``; at most one worker per shard.
    """

    name = "webdataset"

    def __init__(self, opener: str = "python") -> None:
        super().__init__()
        if opener not in ("python", "curl"):
            raise ValueError(f"opener must be 'python' or 'curl', got {opener!r}")
        self.opener = opener

    def available(self) -> str | None:
        reason = _import_error("webdataset", "webdataset")
        if reason is not None:
            return reason
        import webdataset.utils

        if self.opener == "python":
            if webdataset.utils.enforce_security:
                return "WDS_SECURE=1 forbids WebDataset pipe: URLs"
            return _import_error("boto3", "boto3")
        if shutil.which("curl") is None:
            return "the curl opener needs the curl command"
        return _import_error("boto3", "boto3")

    def _workers(self, ctx: PeerContext) -> int:
        return min(ctx.num_workers, len(ctx.shard_urls))

    def _config(self, ctx: PeerContext) -> str:
        how = "pipe: python boto3 get_object" if self.opener == "python" else "presigned http URLs via curl"
        return f"WebDataset({how}).to_tuple.map_tuple.batched(batch_size) in DataLoader(batch_size=None)"

    def _prepare(self, ctx: PeerContext) -> None:
        if self.opener != "python":
            return
        d = ctx.work_dir / self.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "s3cat.py").write_text(_S3CAT)
        s3 = ctx.s3
        cfg = {
            "endpoint_url": s3.endpoint_url,
            "region": ctx.region,
            "access_key_id": s3.access_key_id,
            "secret_access_key": s3.secret_access_key,
            "session_token": s3.session_token,
            "addressing_style": s3.addressing_style,
        }
        path = d / "s3.json"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f)

    def urls(self, ctx: PeerContext) -> list[str]:
        """The URLs handed to ``webdataset.WebDataset``."""
        if self.opener == "curl":
            client = boto3_client(ctx.s3)
            out = []
            for url in ctx.shard_urls:
                bucket, key = split_s3_url(url)
                out.append(
                    client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=86400)
                )
            return out
        d = ctx.work_dir / self.name
        cmd = [sys.executable, str(d / "s3cat.py"), str(d / "s3.json")]
        prefix = " ".join(shlex.quote(c) for c in cmd)
        return [f"pipe:{prefix} {' '.join(shlex.quote(p) for p in split_s3_url(u))}" for u in ctx.shard_urls]

    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        import webdataset as wds

        names = list(ctx.fields)
        decoders = [int if ctx.fields[f] == "int" else None for f in names]
        ds = (
            wds.WebDataset(self.urls(ctx), shardshuffle=False, empty_check=False)
            .to_tuple(*names)
            .map_tuple(*decoders)
            .batched(ctx.batch_size, partial=True)
        )
        loader = torch.utils.data.DataLoader(ds, batch_size=None, **_loader_kwargs(ctx, self._workers(ctx)))
        yield from _iterate_loader(loader, ctx, names)


# s3torchconnector ---------------------------------------------------------------------------


class S3TarSamples(torch.utils.data.IterableDataset[dict[str, Any]]):
    """The samples of the ``.tar`` objects an ``S3IterableDataset`` yields (as ``S3Reader``
    streams), each parsed sequentially with :mod:`tarfile` while it downloads. Objects not
    ending in ``.tar`` are skipped (never read)."""

    def __init__(self, objects: Any, fields: Mapping[str, str]) -> None:
        self.objects = objects
        self.fields = dict(fields)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for reader in self.objects:
            if reader.key.endswith(".tar"):
                yield from iter_tar_samples(reader, self.fields)


class S3TorchConnectorPeer(Peer):
    """``s3torchconnector.S3IterableDataset.from_prefix(s3://bucket/prefix/, region=...,
    endpoint=..., s3client_config=S3ClientConfig(force_path_style=...), enable_sharding=True)``
    (objects split across DataLoader workers), each object a streamed tar (:class:`S3TarSamples`;
    s3torchconnector's WebDataset example does the same with WebDataset's tar expander), in
    ``torch.utils.data.DataLoader(batch_size=..., num_workers=...)``. Its CRT client takes
    credentials from the AWS chain: the context's keys are set in the environment for the run.
    Works with a plain-HTTP ``127.0.0.1`` endpoint."""

    name = "s3torchconnector"

    def available(self) -> str | None:
        return _import_error("s3torchconnector", "s3torchconnector")

    def _config(self, ctx: PeerContext) -> str:
        return "S3IterableDataset.from_prefix(enable_sharding=True, force_path_style), tarfile stream, DataLoader"

    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        from s3torchconnector import S3ClientConfig, S3IterableDataset

        s3 = ctx.s3
        config = S3ClientConfig(
            force_path_style=s3.addressing_style == "path", unsigned=s3.anonymous, profile=s3.profile
        )
        with env_vars(_aws_env(ctx)), _quiet("s3torchconnector", "s3torchconnectorclient"):
            objects = S3IterableDataset.from_prefix(
                ctx.prefix_url,
                region=ctx.region,
                endpoint=s3.endpoint_url,
                s3client_config=config,
                enable_sharding=True,
            )
            loader = torch.utils.data.DataLoader(
                S3TarSamples(objects, ctx.fields), batch_size=ctx.batch_size, **_loader_kwargs(ctx, ctx.num_workers)
            )
            yield from _iterate_loader(loader, ctx)


# MosaicML Streaming -------------------------------------------------------------------------


def import_streaming() -> str | None:
    """Import MosaicML Streaming; return a note if a workaround was needed.

    PyPI's torchvision wheels are CUDA builds: next to torch's CPU build their C ops fail to load
    and ``import torchvision`` raises. Streaming imports torchvision only in ``streaming.vision``
    (its CIFAR/ImageNet dataset classes), which ``streaming/__init__`` imports eagerly and MDS
    reading never uses; in that case that one subpackage is replaced by an empty module.
    """
    note = None
    if "streaming" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except ModuleNotFoundError:
            pass
        except Exception as exc:
            sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
            note = f"torchvision unusable ({type(exc).__name__}: {exc}); streaming.vision stubbed out (not used by MDS)"
    with _quiet("streaming"):
        importlib.import_module("streaming")
    return note


def convert_mds(
    paths: Sequence[str | os.PathLike[str]], out: Path, fields: Mapping[str, str], samples_per_file: int
) -> Expected:
    """Write the samples of the tar shards ``paths`` to MDS under ``out`` (``bytes`` columns
    for ``bytes`` fields, ``int`` for ``int`` ones; no compression or hashes), about
    ``samples_per_file`` samples per shard file: ``size_limit`` is that many of the largest
    sample plus 64 bytes each. Returns what was written."""
    from streaming import MDSWriter

    largest = max((s[2] for s in shard_stats(paths, fields)), default=0)
    n = nbytes = 0
    byte_fields = [f for f, k in fields.items() if k == "bytes"]
    columns = {f: "bytes" if k == "bytes" else "int" for f, k in fields.items()}
    with MDSWriter(out=str(out), columns=columns, size_limit=samples_per_file * (largest + 64)) as w:
        for path in paths:
            for s in iter_tar_samples(path, fields):
                w.write(s)
                n += 1
                nbytes += sum(len(s[f]) for f in byte_fields)
    return Expected(n, nbytes, largest)


def open_streaming_dataset(remote: str, local: Path, batch_size: int) -> Any:
    """``streaming.StreamingDataset(remote=..., local=..., batch_size=..., shuffle=False)``,
    everything else at its defaults (``cache_limit=None``: nothing evicted). It reads the S3
    endpoint and credentials from the environment (``S3_ENDPOINT_URL``, ``AWS_*``).

    The returned dataset holds no S3 client made in this process
    (:func:`drop_streaming_clients`), so it can be handed to forked DataLoader workers."""
    import streaming

    ds = streaming.StreamingDataset(remote=remote, local=str(local), batch_size=batch_size, shuffle=False)
    drop_streaming_clients(ds)
    return ds


def drop_streaming_clients(ds: Any) -> int:
    """Make every stream of the MosaicML ``StreamingDataset`` ``ds`` forget the cloud client
    it made in this process; returns how many S3 clients were dropped.

    With an empty ``local``, the constructor downloads ``index.json`` in this process, and the
    stream's downloader keeps that boto3 client, with its idle keep-alive connection, for
    later downloads. DataLoader workers forked from here inherit the client *and the socket*:
    both workers then send their shard GETs on one TCP connection and read each other's
    responses. A worker either writes another shard's bytes (same length) into its shard file,
    and decoding fails (``IndexError: index 0 is out of bounds`` in an MDS ``int`` column,
    ``Relative sample index 0 is not present``), or waits for a response that the other worker
    already consumed until the 60 s read timeout. Only pickling for ``spawn`` drops the client
    (``S3Downloader.__getstate__``), and spawn workers cannot import ``streaming`` where
    :func:`import_streaming` had to stub out torchvision. ``downloader.clean_up()`` is
    Streaming's own way to drop it: each worker then makes its own client on first use."""
    dropped = 0
    for stream in getattr(ds, "streams", ()):
        downloader = getattr(stream, "_downloader", None)
        if downloader is None:
            continue
        dropped += getattr(downloader, "_s3_client", None) is not None
        downloader.clean_up()
    return dropped


class StreamingPeer(Peer):
    """MosaicML Streaming: MDS written once by :func:`convert_mds` and uploaded;
    :func:`open_streaming_dataset` (a new object per epoch, never iterated in this process:
    one iterated here and then forked into workers hangs them; holding no S3 client made here,
    see :func:`drop_streaming_clients`) in
    ``torch.utils.data.DataLoader(ds, batch_size=..., num_workers=...)``, as its docs show.
    After each epoch the dataset's shared-memory blocks are unlinked
    (:func:`unlink_streaming_shm`; other processes' blocks are left alone)."""

    name = "streaming"
    has_cache = True
    data_format = "MDS"

    def __init__(self) -> None:
        super().__init__()
        self._keys: list[str] = []
        #: Shared-memory prefix of each dataset this peer opened, in order (see
        #: :func:`streaming_shm_names`); their blocks are unlinked after each epoch.
        self.shm_prefixes: list[int] = []
        self._live_shm: list[tuple[int, str]] = []

    def available(self) -> str | None:
        try:
            note = import_streaming()
        except Exception as exc:
            return f"pip install mosaicml-streaming ({type(exc).__name__}: {exc})"
        if note and note not in self.notes:
            self.notes.append(note)
        return _import_error("boto3", "boto3")

    def _config(self, ctx: PeerContext) -> str:
        return "StreamingDataset(remote, local, batch_size, shuffle=False) in DataLoader"

    def _prepare(self, ctx: PeerContext) -> None:
        out = ctx.work_dir / self.name / "mds-out"
        shutil.rmtree(out, ignore_errors=True)
        with tempdir_redirect(ctx.work_dir / self.name / "tmp"), _quiet("streaming"):
            got = convert_mds(ctx.source_shards(), out, ctx.fields, ctx.files_per_shard())
        self._check_conversion(got, ctx.expected_counts())
        self._keys = _upload_dir(ctx, out, "mds")
        shutil.rmtree(out, ignore_errors=True)

    def _check_conversion(self, got: Expected, expected: Expected) -> None:
        if (got.samples, got.payload_bytes) != (expected.samples, expected.payload_bytes):
            raise PeerError(f"{self.name}: conversion wrote {got}, expected {expected}")

    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        with (
            env_vars(_aws_env(ctx)),
            tempdir_redirect(ctx.work_dir / self.name / "tmp"),
            _quiet("streaming"),
        ):
            local = self.cache_dir(ctx)
            ds = open_streaming_dataset(ctx.converted_url("mds"), local, ctx.batch_size)
            prefix = getattr(ds, "_shm_prefix_int", None)
            if isinstance(prefix, int):
                self.shm_prefixes.append(prefix)
                self._live_shm.append((prefix, str(local)))
            loader = torch.utils.data.DataLoader(ds, batch_size=ctx.batch_size, **_loader_kwargs(ctx, ctx.num_workers))
            yield from _iterate_loader(loader, ctx)

    def _after_epoch(self, ctx: PeerContext) -> None:
        self._release_shm()

    def _cleanup(self, ctx: PeerContext) -> None:
        gc.collect()
        self._release_shm()  # also after an epoch that raised (no _after_epoch then)
        if self._keys:
            _delete_keys(ctx, self._keys)
            self._keys = []

    def _release_shm(self) -> None:
        while self._live_shm:
            prefix, local = self._live_shm.pop()
            with contextlib.suppress(Exception):
                unlink_streaming_shm(prefix, local)


def streaming_shm_names(prefix: int) -> list[str]:
    """The names of the shared-memory blocks MosaicML Streaming may create for a dataset that
    registered shared-memory prefix ``prefix`` (``/dev/shm/<name>`` on Linux)."""
    from streaming.base.constant import SHM_TO_CLEAN

    return [_streaming_shm_name(prefix, name) for name in SHM_TO_CLEAN]


def streaming_shm_owner(prefix: int) -> list[str] | None:
    """The local dirs that the dataset holding shared-memory prefix ``prefix`` registered (its
    ``<prefix>_locals`` block), or ``None`` if no dataset holds it now."""
    from streaming.base.shared import SharedMemory

    try:
        shm = SharedMemory(_streaming_shm_name(prefix, "locals"), create=False, auto_cleanup=False)
    except FileNotFoundError:
        return None
    try:
        data = bytes(shm.buf)
    finally:
        shm.cleanup()  # closes it; an attached block is neither unlinked nor tracked
    # Streaming's layout (streaming.base.shared.prefix): int32 size, then the dirs and the
    # prefix, each followed by a NUL but the last.
    size = int.from_bytes(data[:4], sys.byteorder, signed=True)
    return data[4:size].decode("utf-8", "replace").split("\0")[:-1]


def unlink_streaming_shm(prefix: int, local: str | os.PathLike[str]) -> list[str]:
    """Unlink the shared-memory blocks of MosaicML Streaming's prefix ``prefix``, if the dataset
    that registered it read ``local`` (else someone else holds that prefix now: nothing is
    touched); returns the names unlinked.

    A ``StreamingDataset`` unlinks its blocks only at interpreter exit, and
    ``streaming.base.util.clean_stale_shared_memory()`` unlinks every prefix from 0 on until
    the first free one, whoever holds it: on a machine where other processes read with
    Streaming it pulls the blocks from under their live datasets (a loader next to such a
    sweeping loop hung here), and it leaves ours that sit behind a free prefix. Streaming's own
    error message advises calling it once, before the first dataset, for blocks that crashed
    runs left; its prefix search steps over those anyway. This removes ours, and only ours,
    once the epoch's workers are gone.
    """
    from multiprocessing.shared_memory import SharedMemory

    owner = streaming_shm_owner(prefix)
    if owner is None or os.path.abspath(local) not in owner:
        return []
    removed = []
    for name in streaming_shm_names(prefix):
        try:
            shm = SharedMemory(name, create=False)  # tracked by this process's resource tracker ...
        except FileNotFoundError:
            continue
        shm.close()
        shm.unlink()  # ... and untracked here
        removed.append(name)
    return removed


def _streaming_shm_name(prefix: int, name: str) -> str:
    return f"{prefix:06}_{name}"


# LitData ------------------------------------------------------------------------------------


def litdata_allow_http() -> str:
    """Let LitData's obstore chunk downloads use a plain-HTTP endpoint.

    LitData fetches chunks with obstore, whose client refuses ``http://`` URLs unless its
    ``allow_http`` client option is set, and LitData passes fixed client options (no env or
    ``storage_options`` route to it). Adds ``allow_http`` to them (process-wide)."""
    import litdata.streaming.downloader as downloader

    options: dict[str, str] = downloader._OBSTORE_CLIENT_OPTIONS  # a plain dict at run time
    options["allow_http"] = "true"
    return "obstore client option allow_http=true added (the endpoint is http://)"


def litdata_storage_options(s3: S3Config, region: str = _DEFAULT_REGION) -> dict[str, Any]:
    """``storage_options`` for LitData's boto3 client, as its README documents for custom endpoints."""
    from botocore.config import Config

    opts: dict[str, Any] = {
        "region_name": s3.region or region,
        "config": Config(s3={"addressing_style": s3.addressing_style}, retries={"max_attempts": 3, "mode": "standard"}),
    }
    for key, value in (
        ("endpoint_url", s3.endpoint_url),
        ("aws_access_key_id", s3.access_key_id),
        ("aws_secret_access_key", s3.secret_access_key),
        ("aws_session_token", s3.session_token),
    ):
        if value is not None:
            opts[key] = value
    return opts


def convert_litdata(
    paths: Sequence[str | os.PathLike[str]], out: Path, fields: Mapping[str, str], samples_per_file: int
) -> None:
    """``litdata.optimize`` the samples of the tar shards ``paths`` into ``out``:
    ``chunk_size=samples_per_file``, one worker, no compression, input order kept."""
    import litdata

    litdata.optimize(
        fn=TarSamples(fields),
        inputs=[str(p) for p in paths],
        output_dir=str(out),
        chunk_size=samples_per_file,
        num_workers=1,
        reorder_files=False,
        verbose=False,
        start_method="fork",
    )


def _in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a forked child process (spawned where fork is unavailable); its result
    or exception comes back here, and whatever it leaves behind ends with the child."""
    import concurrent.futures
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method)) as pool:
        return pool.submit(fn, *args).result()


def open_litdata_dataset(url: str, cache_dir: Path, s3: S3Config, region: str = _DEFAULT_REGION, **kwargs: Any) -> Any:
    """``litdata.StreamingDataset(url, cache_dir=..., storage_options=...)`` (``kwargs`` passed on)."""
    import litdata

    return litdata.StreamingDataset(
        url, cache_dir=str(cache_dir), storage_options=litdata_storage_options(s3, region), **kwargs
    )


class LitdataCollate:
    """LitData loader collation: ``bytes`` fields as lists of ``bytes``, ``int`` fields as a tensor.

    LitData yields ``bytes`` columns as memoryviews into its mmap'ed chunk, which cannot be
    pickled to the main process, and torch's ``default_collate`` takes a memoryview for a
    sequence and transposes a batch of them into one tiny tensor per byte. Copying each to
    ``bytes`` in the worker gives the batch the MosaicML loader gives."""

    def __init__(self, fields: Mapping[str, str] = DEFAULT_FIELDS) -> None:
        self.fields = dict(fields)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            f: [bytes(s[f]) for s in samples] if kind == "bytes" else torch.tensor([int(s[f]) for s in samples])
            for f, kind in self.fields.items()
        }


class LitdataPeer(Peer):
    """LitData: chunks written once by :func:`convert_litdata` and uploaded;
    :func:`open_litdata_dataset` (a new object per epoch) in
    ``litdata.StreamingDataLoader(ds, batch_size=..., num_workers=..., collate_fn=LitdataCollate)``."""

    name = "litdata"
    has_cache = True
    data_format = "litdata chunks"

    def __init__(self) -> None:
        super().__init__()
        self._keys: list[str] = []

    def available(self) -> str | None:
        reason = _import_error("litdata", "litdata")
        return reason if reason is not None else _import_error("boto3", "boto3")

    def _config(self, ctx: PeerContext) -> str:
        return "StreamingDataset(s3 url, cache_dir, storage_options) in StreamingDataLoader(collate_fn=bytes copy)"

    def _prepare(self, ctx: PeerContext) -> None:
        if (ctx.s3.endpoint_url or "").startswith("http://"):
            note = litdata_allow_http()
            if note not in self.notes:
                self.notes.append(note)
        out = ctx.work_dir / self.name / "litdata-out"
        shutil.rmtree(out, ignore_errors=True)
        with tempdir_redirect(ctx.work_dir / self.name / "tmp"), _quiet("litdata"):
            # In a child process: optimize leaves queues (and their feeder threads) referenced
            # from module globals in the process that called it.
            _in_child(convert_litdata, ctx.source_shards(), out, dict(ctx.fields), ctx.files_per_shard())
        self._keys = _upload_dir(ctx, out, "litdata")
        shutil.rmtree(out, ignore_errors=True)

    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        import litdata

        with tempdir_redirect(ctx.work_dir / self.name / "tmp"), _quiet("litdata"):
            ds = open_litdata_dataset(ctx.converted_url("litdata"), self.cache_dir(ctx), ctx.s3, ctx.region)
            loader = litdata.StreamingDataLoader(
                ds,
                batch_size=ctx.batch_size,
                collate_fn=LitdataCollate(ctx.fields),
                **_loader_kwargs(ctx, ctx.num_workers),
            )
            yield from _iterate_loader(loader, ctx)

    def _cleanup(self, ctx: PeerContext) -> None:
        if self._keys:
            _delete_keys(ctx, self._keys)
            self._keys = []


_PEER_CLASSES: dict[str, Callable[..., Peer]] = {
    "torch": TorchPeer,
    "webdataset": WebDatasetPeer,
    "litdata": LitdataPeer,
    "streaming": StreamingPeer,
    "s3torchconnector": S3TorchConnectorPeer,
}


def make_peer(name: str, **options: Any) -> Peer:
    """A new adapter for ``name`` (one of :data:`PEERS`), in its default configuration unless
    ``options`` say otherwise (only ``webdataset`` has one: ``opener="python" | "curl"``)."""
    try:
        cls = _PEER_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}") from None
    return cls(**options)
