"""Where the data is and how every peer of ``fastfeed bench --compare`` reads it.

:class:`PeerContext` names the shards (``s3://bucket/prefix/*.tar``), the endpoint and
credentials, the work dir and the loader settings, and computes what an epoch must deliver.
:func:`boto3_client` is the peers' S3 client; :func:`aws_env` is the environment of a peer
process whose library reads credentials from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastfeed.bench.peers.common import DEFAULT_FIELDS, DEFAULT_REGION, FIELD_KINDS, Expected
from fastfeed.bench.peers.tar import shard_stats
from fastfeed.config import S3Config

__all__ = ["PeerContext", "aws_env", "boto3_client", "split_s3_url"]


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
        self.fields = dict(self.fields)  # the context is pickled to the peers' processes
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
        bad = {k: v for k, v in self.fields.items() if v not in FIELD_KINDS}
        if not self.fields or bad:
            raise ValueError(f"fields must map names to one of {FIELD_KINDS}, got {dict(self.fields)}")
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
        return self.s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION

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
        s3={"addressing_style": "path" if s3.path_style else "auto"},
        signature_version=UNSIGNED if s3.anonymous else None,
        connect_timeout=s3.connect_timeout,
        read_timeout=s3.read_timeout,
        max_pool_connections=s3.max_pool_connections,
        retries={"max_attempts": 5, "mode": "standard"},
    )
    return session.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        aws_session_token=s3.session_token,
        config=config,
    )


def aws_env(ctx: PeerContext) -> dict[str, str]:
    """The environment of a peer process whose library reads credentials from the environment
    (:meth:`~fastfeed.bench.peers.base.Peer.environment`): the standard AWS variables for
    ``ctx.s3`` (only those it sets), plus MosaicML Streaming's ``S3_ENDPOINT_URL``."""
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
