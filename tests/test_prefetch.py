"""The prefetcher's bounds and shutdown: byte budget, shards in flight, close(), early exit."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fastfeed import StreamingDataset
from fastfeed.config import PrefetchConfig, S3Config
from fastfeed.read.prefetch import Prefetcher
from fastfeed.store.base import ObjectInfo
from fastfeed.store.pool import StoreSet
from fastfeed.testing.shards import upload_dir, write_synthetic_shards


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_synthetic_shards(
        tmp_path_factory.mktemp("big"), num_shards=6, samples_per_shard=40, sample_bytes=20_000
    )


def _infos(paths: list[Path]) -> list[ObjectInfo]:
    return [ObjectInfo(p.as_uri(), p.stat().st_size) for p in paths]


def _io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastfeed-io"]


def test_budget_is_never_exceeded_and_every_byte_arrives(big_shards: list[Path]) -> None:
    config = PrefetchConfig(part_size=64 * 1024, max_requests=4, shards_in_flight=3, byte_budget=256 * 1024)
    received = bytearray()
    with Prefetcher(_infos(big_shards), StoreSet(S3Config()), config) as prefetcher:
        for fetch in prefetcher:
            for data, _ in fetch.chunks():
                received += data
                time.sleep(0.001)  # a slow consumer: the prefetcher runs ahead until the budget stops it
            fetch.close()
        peak = prefetcher.budget_peak
        fetched = prefetcher.stats.bytes_fetched
    assert bytes(received) == b"".join(p.read_bytes() for p in big_shards)
    assert fetched == len(received)
    assert 0 < peak <= config.byte_budget
    assert peak >= 2 * config.part_size, "the prefetcher should run ahead of a slow consumer"


def test_abandoning_a_shard_returns_its_budget(big_shards: list[Path]) -> None:
    """Reading only the first part of each shard must not exhaust the budget (no deadlock)."""
    config = PrefetchConfig(part_size=64 * 1024, max_requests=2, shards_in_flight=2, byte_budget=128 * 1024)
    firsts = []
    with Prefetcher(_infos(big_shards), StoreSet(S3Config()), config) as prefetcher:
        for fetch in prefetcher:
            data, _ = next(iter(fetch.chunks()))
            firsts.append(bytes(data[:512]))
            fetch.close()
    assert len(firsts) == len(big_shards)
    assert all(f == p.read_bytes()[:512] for f, p in zip(firsts, big_shards, strict=True))


@pytest.mark.timeout(60)
def test_a_part_the_consumer_waits_for_is_never_refused(big_shards: list[Path]) -> None:
    """A consumer that holds every part (hold=True, never releasing) still gets the next one:
    everything held is its own, so refusing could only deadlock. The excess is reported; a
    consumer that gives parts back never causes one."""
    config = PrefetchConfig(part_size=64 * 1024, max_requests=4, shards_in_flight=1, byte_budget=128 * 1024)
    shard = big_shards[0]
    size = shard.stat().st_size
    assert size > 4 * config.byte_budget
    for hold in (True, False):
        with Prefetcher(_infos([shard]), StoreSet(S3Config()), config) as prefetcher:
            fetch = next(iter(prefetcher))
            data = b"".join(bytes(chunk) for chunk, _ in fetch.chunks(hold=hold))
            held = fetch.parts_held
            fetch.close()
            stats = prefetcher.stats
        assert data == shard.read_bytes()
        if hold:
            assert held == -(-size // config.part_size)
            assert stats.over_budget == stats.held_peak - config.byte_budget == size - config.byte_budget
        else:
            assert stats.over_budget == 0
            assert stats.held_peak <= config.byte_budget


def test_close_mid_stream_stops_the_io_thread(big_shards: list[Path]) -> None:
    config = PrefetchConfig(part_size=64 * 1024, max_requests=4, byte_budget=256 * 1024)
    prefetcher = Prefetcher(_infos(big_shards), StoreSet(S3Config()), config)
    fetch = next(iter(prefetcher))
    next(iter(fetch.chunks()))
    assert _io_threads()
    start = time.monotonic()
    prefetcher.close()
    assert time.monotonic() - start < 5
    assert not _io_threads()


def test_breaking_out_of_a_dataset_loop_stops_everything(s3_shards: Any, seaweed: Any) -> None:
    bucket, prefix, _ = s3_shards
    s3 = S3Config(
        endpoint_url=seaweed.endpoint_url,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
    )
    ds = StreamingDataset(f"s3://{bucket}/{prefix}", s3=s3, shuffle=True, shuffle_buffer=10)
    for i, _ in enumerate(ds):
        if i == 5:
            break
    # The generator is closed when the loop's iterator is dropped; the IO thread goes with it.
    deadline = time.monotonic() + 5
    while _io_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _io_threads()


def test_peak_memory_is_bounded_by_the_budget_not_the_dataset(bucket: Any, tmp_path: Path) -> None:
    """Twice the data through the same budget: the prefetcher's peak stays the same."""
    peaks = []
    for n, sub in ((3, "small"), (12, "large")):
        write_synthetic_shards(tmp_path / sub, num_shards=n, samples_per_shard=8, sample_bytes=50_000)
        upload_dir(bucket.client, bucket.name, tmp_path / sub, prefix=f"{sub}/")
        s3 = S3Config(
            endpoint_url=bucket.server.endpoint_url,
            access_key_id=bucket.server.access_key,
            secret_access_key=bucket.server.secret_key,
        )
        ds = StreamingDataset(f"s3://{bucket.name}/{sub}/", s3=s3)
        config = PrefetchConfig(part_size=64 * 1024, max_requests=4, byte_budget=192 * 1024)
        with Prefetcher(ds.shards, StoreSet(s3), config) as prefetcher:
            total = 0
            for fetch in prefetcher:
                for data, _ in fetch.chunks():
                    total += len(data)
                fetch.close()
            assert total == sum(s.size for s in ds.shards)
            peaks.append(prefetcher.budget_peak)
    assert all(p <= 192 * 1024 for p in peaks)
