"""The ``s3torchconnector`` peer: AWS's ``S3IterableDataset.from_prefix`` over the tar shards
themselves (its CRT client), each object parsed as a tar stream while it downloads, in a
DataLoader; the pattern of s3torchconnector's WebDataset example."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from typing import Any

import torch.utils.data

from fastfeed.bench.peers.base import Peer, import_error, iterate_loader, loader_kwargs, quiet
from fastfeed.bench.peers.context import PeerContext, aws_env
from fastfeed.bench.peers.tar import iter_tar_samples

__all__ = ["S3TarSamples", "S3TorchConnectorPeer"]


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
    credentials from the AWS chain: the context's keys are in its process's environment.
    Works with a plain-HTTP ``127.0.0.1`` endpoint."""

    name = "s3torchconnector"

    def available(self) -> str | None:
        return import_error("s3torchconnector", "s3torchconnector")

    def environment(self, ctx: PeerContext) -> dict[str, str]:
        return aws_env(ctx)

    def _config(self, ctx: PeerContext) -> str:
        return "S3IterableDataset.from_prefix(enable_sharding=True, force_path_style), tarfile stream, DataLoader"

    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        from s3torchconnector import S3ClientConfig, S3IterableDataset

        s3 = ctx.s3
        config = S3ClientConfig(force_path_style=bool(s3.path_style), unsigned=s3.anonymous, profile=s3.profile)
        with quiet("s3torchconnector", "s3torchconnectorclient"):
            objects = S3IterableDataset.from_prefix(
                ctx.prefix_url,
                region=ctx.region,
                endpoint=s3.endpoint_url,
                s3client_config=config,
                enable_sharding=True,
            )
            loader = torch.utils.data.DataLoader(
                S3TarSamples(objects, ctx.fields), batch_size=ctx.batch_size, **loader_kwargs(ctx, ctx.num_workers)
            )
            yield from iterate_loader(loader, ctx)
