"""Other data loaders reading the same data, for ``fastfeed bench --compare``.

One adapter per peer (one module each: :mod:`~fastfeed.bench.peers.torch_gets`,
:mod:`~fastfeed.bench.peers.webdataset`, :mod:`~fastfeed.bench.peers.litdata`,
:mod:`~fastfeed.bench.peers.streaming`, :mod:`~fastfeed.bench.peers.s3torchconnector`; the shared
lifecycle in :mod:`~fastfeed.bench.peers.base`) reads the same samples, in the same run, each in the configuration its
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

Each peer runs in a Python process of its own (:mod:`~fastfeed.bench.peers.process`), started
by :meth:`Peer.prepare` and stopped by :meth:`Peer.cleanup`, so what its library needs
process-wide stays there: MosaicML Streaming and the CRT client of s3torchconnector read
credentials (and Streaming its endpoint, ``S3_ENDPOINT_URL``) from the environment, which their
process is started with (:meth:`Peer.environment`); Streaming's file locks and
``litdata.optimize``'s working folders go to the process's own ``TMPDIR``; LitData's obstore
client is told to allow ``http://`` endpoints (:func:`litdata_allow_http`) and a CUDA-less
torchvision is stubbed out for ``import streaming`` (:func:`import_streaming`) in that process.
The benchmarking process's ``os.environ`` and :data:`tempfile.tempdir` are never changed. The
timed epoch runs in the peer's process: its figures (CPU included) are that process's and its
children's. Streaming's shared-memory blocks (named by a machine-wide prefix number) are unlinked
after each of its epochs, only those of the peer's own datasets (:func:`unlink_streaming_shm`).
Warnings from the peers' own modules are ignored during their calls (also in their forked
workers). See ``benchmarks/cache/README_peers.md`` for installing the peers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastfeed.bench.peers.base import (
    Peer,
    cache_snapshot,
    shutdown_loader_iter,
    snapshot_diff,
)
from fastfeed.bench.peers.common import DEFAULT_FIELDS, Expected, PeerError, PeerUnavailable
from fastfeed.bench.peers.context import PeerContext, boto3_client
from fastfeed.bench.peers.litdata import (
    LitdataCollate,
    LitdataPeer,
    convert_litdata,
    litdata_allow_http,
    litdata_storage_options,
    open_litdata_dataset,
)
from fastfeed.bench.peers.s3torchconnector import S3TorchConnectorPeer
from fastfeed.bench.peers.streaming import (
    StreamingPeer,
    convert_mds,
    drop_streaming_clients,
    import_streaming,
    open_streaming_dataset,
    streaming_shm_names,
    streaming_shm_owner,
    unlink_streaming_shm,
)
from fastfeed.bench.peers.tar import TarSamples, iter_tar_samples, sample_fields, shard_stats
from fastfeed.bench.peers.torch_gets import TorchPeer
from fastfeed.bench.peers.webdataset import WebDatasetPeer

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
    "unlink_streaming_shm",
]

#: The peers, in the order ``fastfeed bench --compare`` lists them.
PEERS = ("torch", "webdataset", "litdata", "streaming", "s3torchconnector")

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
