"""fastfeed: keep GPUs fed by streaming WebDataset shards from S3-compatible storage into PyTorch.

Public API::

    from fastfeed import StreamingDataset
    ds = StreamingDataset("s3://bucket/train/", shuffle=True, seed=0)

See the README for the data flow and :mod:`fastfeed.errors` for the error tree.
"""

from typing import TYPE_CHECKING, Any

from fastfeed import stats, vision
from fastfeed.batch.assemble import RaggedBytes
from fastfeed.cache.config import CacheConfig
from fastfeed.callbacks import CheckpointCallback
from fastfeed.checkpoint.checkpointer import Checkpointer, CheckpointInfo, CheckpointStats, SaveHandle
from fastfeed.config import PrefetchConfig, RetryConfig, S3Config, parse_size
from fastfeed.dataset import StreamingDataset
from fastfeed.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CacheError,
    CheckpointError,
    ConditionFailedError,
    ConfigError,
    CorruptCheckpointError,
    CorruptShardError,
    DecodeError,
    EmptyDatasetError,
    EndpointError,
    FastfeedError,
    InvalidURLError,
    NotFoundError,
    NotSupportedError,
    PipelineError,
    ShardError,
    StoreError,
    StoreTimeoutError,
    ThrottledError,
    TransientStoreError,
    TruncatedShardError,
)
from fastfeed.loader.dataloader import DataLoader
from fastfeed.loader.stats import LoaderStats

if TYPE_CHECKING:
    from fastfeed.checkpoint.dcp import FastfeedStorageReader, FastfeedStorageWriter

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "CacheConfig",
    "CacheError",
    "CheckpointCallback",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointStats",
    "Checkpointer",
    "ConditionFailedError",
    "ConfigError",
    "CorruptCheckpointError",
    "CorruptShardError",
    "DataLoader",
    "DecodeError",
    "EmptyDatasetError",
    "EndpointError",
    "FastfeedError",
    "FastfeedStorageReader",
    "FastfeedStorageWriter",
    "InvalidURLError",
    "LoaderStats",
    "NotFoundError",
    "NotSupportedError",
    "PipelineError",
    "PrefetchConfig",
    "RaggedBytes",
    "RetryConfig",
    "S3Config",
    "SaveHandle",
    "ShardError",
    "StoreError",
    "StoreTimeoutError",
    "StreamingDataset",
    "ThrottledError",
    "TransientStoreError",
    "TruncatedShardError",
    "__version__",
    "parse_size",
    "stats",
    "vision",
]


def __getattr__(name: str) -> Any:
    # The DCP storage classes import torch.distributed.checkpoint (about a second): only on use.
    if name in ("FastfeedStorageReader", "FastfeedStorageWriter"):
        from fastfeed.checkpoint import dcp

        return getattr(dcp, name)
    raise AttributeError(f"module 'fastfeed' has no attribute {name!r}")
