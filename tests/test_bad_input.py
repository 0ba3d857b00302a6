"""Bad input gets a clear fastfeed error within seconds, naming the object and what to do."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fastfeed import (
    AccessDeniedError,
    BucketNotFoundError,
    CorruptShardError,
    EmptyDatasetError,
    EndpointError,
    InvalidURLError,
    NotFoundError,
    StreamingDataset,
    TruncatedShardError,
)
from fastfeed.config import RetryConfig, S3Config
from fastfeed.testing.shards import write_synthetic_shards

#: Every error below must surface within this many seconds (a hang would hit pytest's timeout).
FAST = 10.0


@contextmanager
def within(seconds: float = FAST) -> Iterator[None]:
    start = time.monotonic()
    yield
    assert time.monotonic() - start < seconds


def cfg(server: Any, **kw: Any) -> S3Config:
    values = dict(
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        region="us-east-1",
    )
    values.update(kw)
    return S3Config(**values)


def test_missing_bucket(seaweed: Any) -> None:
    with within(), pytest.raises(BucketNotFoundError) as info:
        StreamingDataset("s3://no-such-bucket-ff/train/", s3=cfg(seaweed))
    assert "no-such-bucket-ff" in str(info.value)
    assert "create the bucket" in str(info.value)


def test_missing_bucket_with_explicit_keys(seaweed: Any) -> None:
    with within(), pytest.raises(BucketNotFoundError) as info:
        StreamingDataset("s3://no-such-bucket-ff/shard-{0..3}.tar", s3=cfg(seaweed))
    assert "no-such-bucket-ff" in str(info.value)


def test_missing_key_in_brace_range(s3_shards: Any, seaweed: Any) -> None:
    bucket, prefix, paths = s3_shards
    n = len(paths)
    source = f"s3://{bucket}/{prefix}shard-{{000000..{n:06d}}}.tar"  # one past the end
    with within(), pytest.raises(NotFoundError) as info:
        StreamingDataset(source, s3=cfg(seaweed))
    assert f"shard-{n:06d}.tar" in str(info.value)
    assert info.value.url == f"s3://{bucket}/{prefix}shard-{n:06d}.tar"


def test_wrong_credentials(s3_shards: Any, seaweed: Any) -> None:
    bucket, prefix, _ = s3_shards
    with within(), pytest.raises(AccessDeniedError) as info:
        StreamingDataset(f"s3://{bucket}/{prefix}", s3=cfg(seaweed, secret_access_key="wrong-secret"))
    assert "AWS_ACCESS_KEY_ID" in str(info.value)
    assert bucket in str(info.value)


def test_no_credentials_at_all(s3_shards: Any, seaweed: Any) -> None:
    bucket, prefix, _ = s3_shards
    # The autouse fixture removed every AWS_* variable and hid the config files.
    with within(), pytest.raises(AccessDeniedError):
        StreamingDataset(f"s3://{bucket}/{prefix}", endpoint_url=seaweed.endpoint_url)


def test_unreachable_endpoint() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    s3 = S3Config(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="a", secret_access_key="b")
    with within(), pytest.raises(EndpointError) as info:
        StreamingDataset("s3://bucket/train/", s3=s3)
    assert "AWS_ENDPOINT_URL" in str(info.value)


def test_empty_prefix(s3_shards: Any, seaweed: Any) -> None:
    bucket, _, _ = s3_shards
    with within(), pytest.raises(EmptyDatasetError) as info:
        StreamingDataset(f"s3://{bucket}/nothing-here/", s3=cfg(seaweed))
    assert f"s3://{bucket}/nothing-here/" in str(info.value)


def test_empty_local_directory(tmp_path: Path) -> None:
    with pytest.raises(EmptyDatasetError) as info:
        StreamingDataset(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as info:
        StreamingDataset(str(tmp_path / "nope.tar"))
    assert "nope.tar" in str(info.value)


@pytest.mark.parametrize(
    "source",
    ["s3://", "gs://bucket/x.tar", "s3://b/shard-{0..", "s3://bb/shard-{0..9}}.tar", "http:///x.tar"],
)
def test_malformed_urls(source: str) -> None:
    with within(1.0), pytest.raises(InvalidURLError):
        StreamingDataset(source)


def test_empty_source_list() -> None:
    with pytest.raises(EmptyDatasetError):
        StreamingDataset([])


def _upload(bucket: Any, key: str, data: bytes) -> str:
    bucket.client.put_object(Bucket=bucket.name, Key=key, Body=data)
    return f"s3://{bucket.name}/{key}"


def test_truncated_shard_from_s3(bucket: Any, tmp_path: Path) -> None:
    (path,) = write_synthetic_shards(tmp_path, num_shards=1, samples_per_shard=20, sample_bytes=3000)
    data = path.read_bytes()
    url = _upload(bucket, "bad/truncated.tar", data[: len(data) // 2 + 100])
    ds = StreamingDataset(url, s3=cfg(bucket.server), part_size="64KiB")
    got = []
    with within(), pytest.raises(TruncatedShardError) as info:
        for sample in ds:
            got.append(sample)
    assert info.value.url == url
    assert "truncated.tar" in str(info.value)
    assert len(got) < 20  # never the whole shard: a clear error instead of a silent partial result


def test_truncated_local_shard(tmp_path: Path) -> None:
    (path,) = write_synthetic_shards(tmp_path, num_shards=1, samples_per_shard=10, sample_bytes=3000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member, not in the zero padding
    with pytest.raises(TruncatedShardError, match=path.name):
        list(StreamingDataset(str(path)))


@pytest.mark.parametrize(
    "payload",
    [b"this is a text file, not a tar archive\n" * 40, bytes(range(256)) * 8, b"x"],
    ids=["text", "binary", "tiny"],
)
def test_object_that_is_not_a_tar(bucket: Any, payload: bytes) -> None:
    url = _upload(bucket, "bad/not-a-tar.tar", payload)
    with within(), pytest.raises((CorruptShardError, TruncatedShardError)) as info:
        list(StreamingDataset(url, s3=cfg(bucket.server)))
    assert info.value.url == url


def test_empty_object(bucket: Any) -> None:
    url = _upload(bucket, "bad/empty.tar", b"")
    with within(), pytest.raises(CorruptShardError, match="empty"):
        list(StreamingDataset(url, s3=cfg(bucket.server)))


def test_corrupt_header_checksum(bucket: Any, tmp_path: Path) -> None:
    (path,) = write_synthetic_shards(tmp_path, num_shards=1, samples_per_shard=4, sample_bytes=1000)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # first member's name: the stored checksum no longer matches
    url = _upload(bucket, "bad/corrupt.tar", bytes(data))
    with within(), pytest.raises(CorruptShardError, match="checksum") as info:
        list(StreamingDataset(url, s3=cfg(bucket.server)))
    assert info.value.url == url


def test_dead_store_mid_epoch_is_an_error_not_a_hang(bucket: Any, fault_proxy: Any, tmp_path: Path) -> None:
    """Every GET answered 500: bounded retries, then TransientStoreError naming the shard."""
    from fastfeed import TransientStoreError

    write_synthetic_shards(tmp_path, num_shards=1, samples_per_shard=4, sample_bytes=1000)
    for p in tmp_path.glob("*.tar"):
        bucket.client.upload_file(str(p), bucket.name, f"dead/{p.name}")
    s3 = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
        retry=RetryConfig(max_attempts=4, base_delay=0.05, max_delay=0.2),
    )
    ds = StreamingDataset(f"s3://{bucket.name}/dead/", s3=s3)
    fault_proxy.reset_counters()
    fault_proxy.inject(status=500, code="InternalError", count=1000, method="GET")
    with within(), pytest.raises(TransientStoreError) as info:
        list(ds)
    assert "shard-000000.tar" in str(info.value)
    assert fault_proxy.count(method="GET") == 4
