"""Test and benchmark helpers, shipped so ``fastfeed bench --demo`` can use them too.

* :mod:`fastfeed.testing.servers`: local S3 servers (:class:`SeaweedServer`, :class:`MotoServer`)
  run as child processes on 127.0.0.1 with free ports, plus :func:`make_s3_client`;
  :mod:`fastfeed.testing.processes` holds their process plumbing (ports, stopping a group).
* :mod:`fastfeed.testing.proxy`: :class:`FaultProxy`, an HTTP/1.1 proxy that adds latency,
  throttling, S3 error responses, connection resets, stalls and damaged request bodies, and
  records requests; its HTTP/1.1 framing is in :mod:`fastfeed.testing.http1`, its rules and
  request record (:class:`FaultRule`, :class:`ProxyRequest`) in :mod:`fastfeed.testing.faults`,
  and :mod:`fastfeed.testing.proxy_process` runs one in a process of its own.
* :mod:`fastfeed.testing.shards`: :func:`write_synthetic_shards` (deterministic WebDataset tar
  shards written with :mod:`tarfile`) and :func:`upload_dir`.

Nothing here runs at import time; boto3 is imported only when a client is made.
"""

from fastfeed.testing.proxy import FaultProxy, FaultRule, ProxyRequest
from fastfeed.testing.servers import (
    LocalS3Server,
    MotoServer,
    SeaweedServer,
    find_weed_binary,
    make_s3_client,
)
from fastfeed.testing.shards import sample_key, upload_dir, write_synthetic_shards

__all__ = [
    "FaultProxy",
    "FaultRule",
    "LocalS3Server",
    "MotoServer",
    "ProxyRequest",
    "SeaweedServer",
    "find_weed_binary",
    "make_s3_client",
    "sample_key",
    "upload_dir",
    "write_synthetic_shards",
]
