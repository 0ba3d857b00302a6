"""StreamingDataset end to end against the real local S3 server (SeaweedFS) and real files.

Reference: WebDataset's own reader over the same shard files must give exactly the same samples
(same keys, same bytes, nothing lost, nothing duplicated).
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from fastfeed import StreamingDataset
from fastfeed.config import S3Config
from fastfeed.testing.shards import upload_dir, write_synthetic_shards


def s3cfg(server: Any) -> S3Config:
    return S3Config(
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        region="us-east-1",
    )


def wds_samples(paths: list[Path], url_of: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """WebDataset's own reader (tar_file_expander + group_by_keys, what wds.WebDataset runs)
    over local files, shard by shard; __url__ mapped to the URL fastfeed reports."""
    out = []
    for path in paths:
        with open(path, "rb") as stream:
            for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
                sample = dict(sample)
                if url_of is not None:
                    sample["__url__"] = url_of[sample["__url__"]]
                out.append(sample)
    return out


def canon(samples: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    """A multiset of samples, comparable whatever the order."""
    return Counter(
        tuple(sorted((k, bytes(v) if isinstance(v, bytes | bytearray) else v) for k, v in s.items())) for s in samples
    )


@pytest.fixture(scope="module")
def gnu_shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Shards written by GNU tar: long names, nested directories, pax and GNU headers."""
    root = tmp_path_factory.mktemp("gnu")
    out = []
    for fmt in ("gnu", "pax", "ustar"):
        src = root / f"src-{fmt}"
        long_dir = "d" * 60 + "/" + "e" * 70 if fmt != "ustar" else "nested/dir"
        for i in range(5):
            sub = src / long_dir / f"sub{i % 2}"
            sub.mkdir(parents=True, exist_ok=True)
            stem = ("sample-with-a-rather-long-name-" * 5 if fmt != "ustar" else "s") + f"{i:03d}"
            (sub / f"{stem}.txt").write_bytes(f"text {i} {fmt}".encode() * (i * 50 + 1))
            (sub / f"{stem}.seg.PNG").write_bytes(os.urandom(513 * i))
            (sub / f"{stem}.json").write_text(f'{{"i": {i}}}')
        tar_path = root / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-cf", str(tar_path), "-C", str(src), "."], check=True)
        out.append(tar_path)
    return out


# ------------------------------------------------------------------------- equality with wds


def test_local_directory_matches_webdataset(shard_dir: Path) -> None:
    paths = sorted(shard_dir.glob("*.tar"))
    expected = wds_samples(paths, {str(p): p.as_uri() for p in paths})
    got = list(StreamingDataset(str(shard_dir)))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in expected]  # same order, unshuffled
    assert got == expected


def test_gnu_tar_shards_match_webdataset(gnu_shards: list[Path]) -> None:
    expected = wds_samples(gnu_shards, {str(p): p.as_uri() for p in gnu_shards})
    assert len(expected) == 15
    assert any(len(s["__key__"]) > 255 for s in expected), "long names must be exercised"
    got = list(StreamingDataset([p.as_uri() for p in gnu_shards]))
    assert got == expected


@pytest.mark.parametrize("form", ["prefix", "brace", "list"])
def test_s3_sources_match_webdataset(s3_shards: Any, seaweed: Any, form: str) -> None:
    bucket, prefix, paths = s3_shards
    url_of = {str(p): f"s3://{bucket}/{prefix}{p.name}" for p in paths}
    expected = wds_samples(paths, url_of)
    source: Any
    if form == "prefix":
        source = f"s3://{bucket}/{prefix}"
    elif form == "brace":
        source = f"s3://{bucket}/{prefix}shard-{{000000..{len(paths) - 1:06d}}}.tar"
    else:
        source = [url_of[str(p)] for p in paths]
    ds = StreamingDataset(source, s3=s3cfg(seaweed), part_size="64KiB", byte_budget="256KiB")
    assert [s.url for s in ds.shards] == sorted(url_of.values())
    got = list(ds)
    assert got == expected


def test_gnu_tar_shards_from_s3_match_webdataset(gnu_shards: list[Path], bucket: Any) -> None:
    for p in gnu_shards:
        bucket.client.upload_file(str(p), bucket.name, f"gnu/{p.name}")
    url_of = {str(p): f"s3://{bucket.name}/gnu/{p.name}" for p in gnu_shards}
    expected = wds_samples(sorted(gnu_shards), url_of)
    got = list(StreamingDataset(f"s3://{bucket.name}/gnu/", s3=s3cfg(bucket.server), part_size="64KiB"))
    assert canon(got) == canon(expected)
    assert len(got) == len(expected)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_dataloader_workers_and_shuffle_give_exactly_the_dataset(
    s3_shards: Any, seaweed: Any, workers: int, shuffle: bool
) -> None:
    bucket, prefix, paths = s3_shards
    url_of = {str(p): f"s3://{bucket}/{prefix}{p.name}" for p in paths}
    expected = wds_samples(paths, url_of)
    ds = StreamingDataset(f"s3://{bucket}/{prefix}", s3=s3cfg(seaweed), shuffle=shuffle, seed=3, shuffle_buffer=20)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    got = list(loader)
    assert canon(got) == canon(expected)
    if shuffle:
        assert [s["__key__"] for s in got] != [s["__key__"] for s in expected]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_start_methods(shard_dir: Path, context: str) -> None:
    ds = StreamingDataset(str(shard_dir), shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context)
    keys = [s["__key__"] for s in loader]
    again = [
        s["__key__"]
        for s in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context)
    ]
    assert keys == again, "same seed, same epoch, same layout: same order"
    assert sorted(keys) == sorted(s["__key__"] for s in StreamingDataset(str(shard_dir)))


# ------------------------------------------------------------------------- order


def test_shuffle_is_a_pure_function_of_seed_and_epoch(shard_dir: Path) -> None:
    def keys(seed: int, epoch: int) -> list[str]:
        ds = StreamingDataset(str(shard_dir), shuffle=True, seed=seed, shuffle_buffer=30)
        ds.set_epoch(epoch)
        return [s["__key__"] for s in ds]

    base = keys(5, 0)
    assert base == keys(5, 0)
    assert base != keys(5, 1)
    assert base != keys(6, 0)
    assert sorted(base) == sorted(keys(5, 1))
    unshuffled = [s["__key__"] for s in StreamingDataset(str(shard_dir))]
    assert base != unshuffled and sorted(base) == sorted(unshuffled)


# ------------------------------------------------------------------------- streaming, budget


def test_samples_flow_before_the_shard_is_downloaded(bucket: Any, fault_proxy: Any, tmp_path: Path) -> None:
    """With a budget of two parts, the first sample must arrive after at most ~2 parts of GETs."""
    paths = write_synthetic_shards(tmp_path, num_shards=1, samples_per_shard=64, sample_bytes=64 * 1024)
    upload_dir(bucket.client, bucket.name, tmp_path, prefix="big/")
    cfg = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
    )
    ds = StreamingDataset(f"s3://{bucket.name}/big/", s3=cfg, part_size="64KiB", byte_budget="128KiB", max_requests=2)
    fault_proxy.reset_counters()
    it = iter(ds)
    first = next(it)
    gets_at_first = fault_proxy.count(method="GET")
    rest = list(it)
    total_gets = fault_proxy.count(method="GET")
    size = paths[0].stat().st_size
    assert first["__key__"].endswith("00000000")
    assert len(rest) == 63
    assert total_gets >= size // (64 * 1024)
    # The first sample needs parts 0-2 (its 64 KiB member straddles parts, and the sample ends
    # where the next key begins); the budget admits at most one part more. Not the whole shard.
    assert gets_at_first <= 4 < total_gets / 10, f"{gets_at_first} GETs before the first sample"


# ------------------------------------------------------------------------- helpers for other tests


def make_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_sample_counts_are_cached_per_etag(bucket: Any, fault_proxy: Any, tmp_path: Path) -> None:
    """Counting a store dataset reads it once per machine; a changed object is counted again."""
    write_synthetic_shards(tmp_path / "d", num_shards=3, samples_per_shard=10, sample_bytes=2000)
    upload_dir(bucket.client, bucket.name, tmp_path / "d", prefix="c/")
    cfg = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
    )
    cache = tmp_path / "counts"

    def count() -> tuple[int, int]:
        fault_proxy.reset_counters()
        ds = StreamingDataset(f"s3://{bucket.name}/c/", s3=cfg, index_cache=cache)
        n = len(ds)
        return n, fault_proxy.count(method="GET", path_regex=r"\.tar$")

    assert count() == (30, 3)  # one GET per shard to count it
    assert count() == (30, 0)  # remembered
    write_synthetic_shards(tmp_path / "e", num_shards=1, samples_per_shard=7, sample_bytes=2000)
    bucket.client.upload_file(str(tmp_path / "e" / "shard-000000.tar"), bucket.name, "c/shard-000000.tar")
    assert count() == (27, 1)  # the changed shard only


def test_set_epoch_applies_to_the_next_iteration_only(shard_dir: Path) -> None:
    """An iteration reads the epoch that was current when it started, whenever set_epoch is called."""
    ds = StreamingDataset(str(shard_dir), shuffle=True, seed=5, shuffle_buffer=30)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append([s["__key__"] for s in ds])
    assert epochs[0] != epochs[1]
    for after in (0, 1, 70):
        ds.set_epoch(0)
        it = iter(ds)
        head = [next(it)["__key__"] for _ in range(after)]
        ds.set_epoch(1)
        assert head + [s["__key__"] for s in it] == epochs[0], f"set_epoch after {after} samples"
        assert [s["__key__"] for s in ds] == epochs[1]


def test_each_stream_of_a_process_keeps_a_next_shard_in_flight(shard_dir: Path) -> None:
    ds = StreamingDataset(str(shard_dir), byte_budget="64MiB", max_requests=16)
    one = ds.stream_prefetch_config(4)  # 4 streams in this process share the bounds
    assert one.byte_budget * 4 <= ds.prefetch_config.byte_budget and one.max_requests * 4 <= 16
    # Not 4 // 4 = 1: with one shard in flight a stream fetches nothing while it parses.
    assert one.shards_in_flight == 2
    assert ds.stream_prefetch_config(1).shards_in_flight == ds.prefetch_config.shards_in_flight
    strict = StreamingDataset(str(shard_dir), shards_in_flight=1)
    assert strict.stream_prefetch_config(4).shards_in_flight == 1, "a configured bound of one is kept"


def test_a_dataset_with_a_cache_pickles_after_an_iteration(tmp_path: Path, s3_shards: Any, seaweed: Any) -> None:
    import pickle

    bucket, prefix, _ = s3_shards
    cache = str(tmp_path / "cache")
    ds = StreamingDataset(f"s3://{bucket}/{prefix}", s3=s3cfg(seaweed), cache_dir=cache, cache_limit="1GB")
    first = [s["__key__"] for s in ds]  # builds the cache's planner (a closure) in this process
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned or persistent worker receives
    assert [s["__key__"] for s in copy] == first
    assert copy.io_stats()["cache_hits"] == len(ds.shards), "the copy reads the same cache"


def test_config_objects_are_accepted_whole(tmp_path: Path, s3_shards: Any, seaweed: Any) -> None:
    """``prefetch=PrefetchConfig(...)`` and ``cache=CacheConfig(...)`` configure the dataset as
    their fields given as keywords do: the same settings, the same samples, and the second read
    comes from the cache either way."""
    from fastfeed import CacheConfig, PrefetchConfig

    bucket, prefix, paths = s3_shards
    url = f"s3://{bucket}/{prefix}"
    flat = StreamingDataset(
        url, s3=s3cfg(seaweed), part_size="64KiB", max_requests=3, shards_in_flight=2, byte_budget="256KiB",
        cache_dir=tmp_path / "flat", cache_limit="1GB", cache_policy="lru", cache_io="buffered",
    )  # fmt: skip
    whole = StreamingDataset(
        url, s3=s3cfg(seaweed),
        prefetch=PrefetchConfig.from_args(part_size="64KiB", max_requests=3, shards_in_flight=2, byte_budget="256KiB"),
        cache=CacheConfig.of(tmp_path / "whole", "1GB", policy="lru", io="buffered"),
    )  # fmt: skip
    assert whole.prefetch_config == flat.prefetch_config
    assert flat.cache_config is not None and whole.cache_config is not None
    assert whole.cache_config == CacheConfig.of(tmp_path / "whole", "1GB", policy="lru", io="buffered")
    assert (whole.cache_config.limit, whole.cache_config.policy) == (flat.cache_config.limit, "lru")
    expected = wds_samples(paths, {str(p): f"{url}{p.name}" for p in paths})
    for ds in (flat, whole):
        assert list(ds) == expected
        assert list(ds) == expected
        assert ds.io_stats()["cache_hits"] == len(paths), "the second pass read the cache"


@pytest.mark.parametrize(
    ("whole", "field"),
    [("prefetch", {"byte_budget": "1MiB"}), ("cache", {"cache_limit": "1GB"}), ("cache", {"cache_policy": "lru"})],
)
def test_a_config_object_and_its_fields_together_are_refused(
    tmp_path: Path, s3_shards: Any, seaweed: Any, whole: str, field: dict[str, Any]
) -> None:
    from fastfeed import CacheConfig, ConfigError, PrefetchConfig

    bucket, prefix, _ = s3_shards
    obj = PrefetchConfig() if whole == "prefetch" else CacheConfig.of(tmp_path / "c", "1GB")
    with pytest.raises(ConfigError, match=f"{whole}= and also {next(iter(field))}") as info:
        StreamingDataset(f"s3://{bucket}/{prefix}", s3=s3cfg(seaweed), **{whole: obj}, **field)
    assert info.value.hint and whole in info.value.hint


def test_the_loader_tells_the_dataset_its_read_streams(tmp_path: Path) -> None:
    """fastfeed.DataLoader sets the streams the cache plans by through the dataset's
    documented ``set_read_streams``; a nonsensical count is refused with a ConfigError."""
    from fastfeed import ConfigError, DataLoader

    write_synthetic_shards(tmp_path / "shards", num_shards=4, samples_per_shard=3, sample_bytes=64)
    ds = StreamingDataset(str(tmp_path / "shards"), cache_dir=tmp_path / "cache", cache_limit="1GB")
    assert ds.read_streams == 1
    DataLoader(ds, batch_size=2, num_workers=0, num_streams=3)
    assert ds.read_streams == 3
    with pytest.raises(ConfigError, match="at least 1"):
        ds.set_read_streams(0)
    assert ds.read_streams == 3, "a refused count changes nothing"
