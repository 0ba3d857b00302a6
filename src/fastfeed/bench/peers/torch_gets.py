"""The ``torch`` peer: the plain-DataLoader baseline users write by hand. Each DataLoader worker
GETs its shards whole with boto3 and parses them with :mod:`tarfile`
(:class:`ShardGetDataset`), in ``torch.utils.data.DataLoader`` with the default collate."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import Any

import torch.utils.data

from fastfeed.bench.peers.base import Peer, import_error, iterate_loader, loader_kwargs
from fastfeed.bench.peers.context import PeerContext, boto3_client, split_s3_url
from fastfeed.bench.peers.tar import iter_tar_samples
from fastfeed.config import S3Config

__all__ = ["ShardGetDataset", "TorchPeer"]


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
        return import_error("boto3", "boto3")

    def _workers(self, ctx: PeerContext) -> int:
        return min(ctx.num_workers, len(ctx.shard_urls))

    def _config(self, ctx: PeerContext) -> str:
        return "DataLoader(IterableDataset: boto3 get_object per shard, tarfile), default collate"

    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        ds = ShardGetDataset(ctx.s3, ctx.shard_urls, ctx.fields)
        loader = torch.utils.data.DataLoader(ds, batch_size=ctx.batch_size, **loader_kwargs(ctx, self._workers(ctx)))
        yield from iterate_loader(loader, ctx)
