"""Shards over http(s): a local web server with Range support (fastfeed.testing.http_server),
read with ranged GETs through the same prefetcher, cache, retries and errors as S3, against the
shards' members as Python's tarfile reads them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fastfeed import DataLoader, InvalidURLError, NotFoundError, StoreError, StreamingDataset
from fastfeed.testing.http_server import RangeServer
from fastfeed.testing.proxy import FaultProxy
from tar_members import sample_members, tar_members, write_site

SHARDS = 4


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site", SHARDS, samples_per_shard=9, sample_bytes=30_000)


PATTERN = "train-{000000..000003}.tar"


@pytest.mark.parametrize("etags", [True, False])
def test_http_shards_read_as_tarfile_reads_them(site: Path, etags: bool) -> None:
    with RangeServer(site, etags=etags) as server:
        ds = StreamingDataset(server.url + PATTERN, part_size="64KiB")
        assert [s.size for s in ds.shards] == [os.path.getsize(site / f"train-{i:06d}.tar") for i in range(SHARDS)]
        assert all(s.etag and (s.etag.startswith('"') if etags else s.etag.startswith("lm:")) for s in ds.shards)
        assert sample_members(ds) == tar_members(sorted(site.glob("*.tar")))
        # Ranged GETs only, each naming the version it expects.
        gets = [r for r in server.requests if r[0] == "GET"]
        assert gets and all(r[2] and r[2].startswith("bytes=") for r in gets)


def test_the_loader_and_the_cache_over_http(site: Path, tmp_path: Path) -> None:
    with RangeServer(site) as server:
        ds = StreamingDataset(server.url + PATTERN, cache_dir=str(tmp_path / "cache"), cache_limit="1GB")
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=list)
        first = sample_members(s for b in loader for s in b)
        assert first == tar_members(sorted(site.glob("*.tar")))
        gets = sum(1 for r in server.requests if r[0] == "GET")
        ds.set_epoch(1)
        second = sample_members(s for b in loader for s in b)
        assert second == first
        assert sum(1 for r in server.requests if r[0] == "GET") == gets  # the second epoch read the cache
        assert loader.stats().cache_hits >= SHARDS


def test_a_shard_replaced_mid_epoch_is_an_error_not_a_mix(site: Path) -> None:
    with RangeServer(site) as server:
        ds = StreamingDataset(server.url + PATTERN, part_size="64KiB", byte_budget="128KiB")
        it = iter(ds)
        next(it)
        target = site / "train-000003.tar"
        data = target.read_bytes()
        time.sleep(0.01)
        target.write_bytes(data[:-1024] + b"\0" * 1024)  # same size, new version
        os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
        with pytest.raises(StoreError) as info:
            for _ in it:
                pass
        assert "train-000003.tar" in str(info.value) and "changed" in str(info.value)


def test_bad_http_sources_fail_clearly(site: Path) -> None:
    with RangeServer(site) as server:
        with pytest.raises(NotFoundError) as missing:
            StreamingDataset(server.url + "train-{000000..000009}.tar")
        assert "train-000004.tar" in str(missing.value)
        with pytest.raises(InvalidURLError, match="no listing") as listing:
            StreamingDataset(server.url)
        assert "brace pattern" in (listing.value.hint or "")
    with RangeServer(site, ranges=False) as plain:
        with pytest.raises(StoreError, match="ignored the Range header") as ranges:
            list(StreamingDataset(plain.url + PATTERN))
        assert "range requests" in (ranges.value.hint or "")


def test_faults_between_client_and_server_are_retried(site: Path) -> None:
    # Through the fault proxy: 503s and a connection cut mid-body, retried (the cut part resumed
    # from the byte it stopped at), and every byte still right.
    with RangeServer(site) as server, FaultProxy(server.url.rstrip("/")) as proxy:
        proxy.inject(503, "SlowDown", count=2, method="HEAD")  # the dataset's HEADs retry too
        proxy.inject(503, "SlowDown", count=3, method="GET")
        proxy.inject_reset(after_bytes=10_000, count=1, method="GET", path_regex="train-000002")
        ds = StreamingDataset(proxy.endpoint_url + "/" + PATTERN, part_size="64KiB")
        assert sample_members(ds) == tar_members(sorted(site.glob("*.tar")))
        assert proxy.count("HEAD") == SHARDS + 2
        ranges = proxy.ranges(path_regex="train-000002")
        assert any(r and not r.startswith("bytes=0-") for r in ranges)  # a resumed range
