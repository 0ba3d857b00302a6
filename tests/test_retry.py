"""Retries against faults injected by a real proxy in front of the real S3 server.

No client code is patched: the FaultProxy sits on the socket path and answers with S3 errors,
cuts connections mid-body or stalls, and records every request it saw.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fastfeed import StreamingDataset, ThrottledError
from fastfeed.config import RetryConfig, S3Config
from fastfeed.testing.shards import upload_dir, write_synthetic_shards

PART = 64 * 1024


@pytest.fixture
def proxied(bucket: Any, fault_proxy: Any, tmp_path: Path) -> tuple[str, S3Config, list[bytes]]:
    """One ~320 KiB shard uploaded; an S3 config that goes through the proxy."""
    paths = write_synthetic_shards(tmp_path, num_shards=1, samples_per_shard=10, sample_bytes=30_000)
    upload_dir(bucket.client, bucket.name, tmp_path, prefix="r/")
    s3 = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
        retry=RetryConfig(max_attempts=5, base_delay=0.01, max_delay=0.05),
    )
    reference = [s["bin"] for s in StreamingDataset(str(paths[0]))]
    return f"s3://{bucket.name}/r/", s3, reference


def test_slowdown_is_retried_and_nothing_is_lost(proxied: Any, fault_proxy: Any) -> None:
    url, s3, reference = proxied
    ds = StreamingDataset(url, s3=s3, part_size=PART, max_requests=1)
    fault_proxy.reset_counters()
    fault_proxy.inject(status=503, code="SlowDown", count=3, method="GET")
    got = [s["bin"] for s in ds]
    assert got == reference
    parts = -(-ds.shards[0].size // PART)
    assert fault_proxy.count(method="GET") == parts + 3


def test_server_errors_are_retried(proxied: Any, fault_proxy: Any) -> None:
    url, s3, reference = proxied
    ds = StreamingDataset(url, s3=s3, part_size=PART)
    fault_proxy.inject(status=500, code="InternalError", count=2, method="GET")
    fault_proxy.inject(status=502, code="BadGateway", count=1, method="GET")
    assert [s["bin"] for s in ds] == reference


def test_broken_transfer_resumes_from_the_byte_received(proxied: Any, fault_proxy: Any) -> None:
    url, s3, reference = proxied
    ds = StreamingDataset(url, s3=s3, part_size=PART, max_requests=1)
    fault_proxy.reset_counters()
    fault_proxy.inject_reset(after_bytes=10_000, count=1, method="GET")
    assert [s["bin"] for s in ds] == reference
    ranges = fault_proxy.ranges()
    # The first part was cut after 10000 bytes; its retry asks for the rest only.
    assert ranges[0] == f"bytes=0-{PART - 1}"
    assert ranges[1] == f"bytes=10000-{PART - 1}", ranges


def test_read_timeout_mid_body_is_retried(proxied: Any, fault_proxy: Any) -> None:
    url, s3, reference = proxied
    s3 = S3Config(**{**s3.__dict__, "read_timeout": 0.5})
    ds = StreamingDataset(url, s3=s3, part_size=PART, max_requests=1)
    fault_proxy.reset_counters()
    fault_proxy.inject_stall(3.0, count=1, method="GET", after_bytes=5000)
    assert [s["bin"] for s in ds] == reference
    ranges = fault_proxy.ranges()
    assert re.fullmatch(r"bytes=(\d+)-\d+", ranges[1] or "")
    assert int(re.findall(r"\d+", ranges[1] or "0")[0]) >= 5000 - 1024  # resumed, not restarted


def test_persistent_throttling_gives_up_with_a_clear_error(proxied: Any, fault_proxy: Any) -> None:
    url, s3, _ = proxied
    ds = StreamingDataset(url, s3=s3, part_size=PART)
    fault_proxy.inject(status=503, code="SlowDown", count=None, method="GET")
    with pytest.raises(ThrottledError) as info:
        list(ds)
    assert "shard-000000.tar" in str(info.value)
