"""fastfeed: keep GPUs fed by streaming WebDataset shards from S3-compatible storage into PyTorch.

Public API::

    from fastfeed import StreamingDataset
    ds = StreamingDataset("s3://bucket/train/", shuffle=True, seed=0)

See the README for the data flow and :mod:`fastfeed.errors` for the error tree.
"""

from fastfeed.batch import RaggedBytes
from fastfeed.config import PrefetchConfig, RetryConfig, S3Config, parse_size
from fastfeed.dataset import StreamingDataset
from fastfeed.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConfigError,
    CorruptShardError,
    EmptyDatasetError,
    EndpointError,
    FastfeedError,
    InvalidURLError,
    NotFoundError,
    PipelineError,
    ShardError,
    StoreError,
    StoreTimeoutError,
    ThrottledError,
    TransientStoreError,
    TruncatedShardError,
)
from fastfeed.loader import DataLoader, LoaderStats

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "ConfigError",
    "CorruptShardError",
    "DataLoader",
    "EmptyDatasetError",
    "EndpointError",
    "FastfeedError",
    "InvalidURLError",
    "LoaderStats",
    "NotFoundError",
    "PipelineError",
    "PrefetchConfig",
    "RaggedBytes",
    "RetryConfig",
    "S3Config",
    "ShardError",
    "StoreError",
    "StoreTimeoutError",
    "StreamingDataset",
    "ThrottledError",
    "TransientStoreError",
    "TruncatedShardError",
    "__version__",
    "parse_size",
]
