"""A dataset manifest as the source of a ``StreamingDataset``: a :class:`DatasetManifest` or the
URL of its JSON, over http(s), S3 and local files. The manifest knows every shard's size and
ETag, so construction sends no listing and no HEAD per shard (counted at the servers); reads are
the shards' members as Python's ``tarfile`` reads them; a shard rewritten after the manifest was
made fails (its first read, or at construction where there is no ETag) instead of being read as
a mix; malformed and hostile manifests are refused naming the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fastfeed import ConfigError, EmptyDatasetError, FastfeedError, S3Config, StoreError, StreamingDataset
from fastfeed.shards import DatasetManifest, ShardInfo, dataset_manifest, save_manifest
from fastfeed.testing.http_server import RangeServer
from fastfeed.testing.proxy import FaultProxy
from tar_members import sample_members, tar_members, write_site

SHARDS = 4
PATTERN = "train-{000000..000003}.tar"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site", SHARDS, samples_per_shard=7, sample_bytes=20_000)


def s3(server: Any, endpoint: str | None = None) -> S3Config:
    url = endpoint or server.endpoint_url
    return S3Config(endpoint_url=url, access_key_id=server.access_key, secret_access_key=server.secret_key)


def test_a_manifest_over_http_needs_no_head_per_shard(site: Path) -> None:
    with RangeServer(site) as server:
        manifest = dataset_manifest(server.url + PATTERN)  # HEADs each shard, once
        save_manifest(manifest, site / "manifest.json")
        server.requests.clear()
        ds = StreamingDataset(server.url + "manifest.json", part_size="64KiB")
        assert [(m, p) for m, p, _ in server.requests] == [("HEAD", "/manifest.json"), ("GET", "/manifest.json")]
        assert [(s.url, s.size, s.etag) for s in ds.shards] == [(s.url, s.size, s.etag) for s in manifest.shards]
        assert sample_members(ds) == tar_members(sorted(site.glob("*.tar")))
        shard_requests = [r for r in server.requests if r[1] != "/manifest.json"]
        assert shard_requests and all(m == "GET" and rng for m, _, rng in shard_requests)  # ranged GETs only


def test_a_manifest_in_s3_or_in_hand_sends_no_listing(seaweed: Any, s3_shards: Any, bucket: Any) -> None:
    # The manifest goes into a bucket of this test's own (the shards' bucket is shared).
    name, prefix, paths = s3_shards
    manifest = dataset_manifest(f"s3://{name}/{prefix}", s3=s3(seaweed))
    save_manifest(manifest, f"s3://{bucket.name}/manifest.json", s3=s3(seaweed))
    with FaultProxy(seaweed.endpoint_url) as proxy:
        in_hand = StreamingDataset(manifest, s3=s3(seaweed, proxy.endpoint_url))
        assert proxy.requests() == []  # nothing at all: the manifest knows the shards
        by_url = StreamingDataset(f"s3://{bucket.name}/manifest.json", s3=s3(seaweed, proxy.endpoint_url))
        assert [(r.method, r.path.split("?")[0]) for r in proxy.requests()] == [
            ("HEAD", f"/{bucket.name}/manifest.json"),
            ("GET", f"/{bucket.name}/manifest.json"),
        ]
        listed = StreamingDataset(f"s3://{name}/{prefix}", s3=s3(seaweed))
        assert in_hand.shards == by_url.shards == listed.shards
        assert sample_members(in_hand) == sample_members(by_url) == tar_members(paths)


def test_a_shard_rewritten_after_the_manifest_is_an_error_not_a_mix(bucket: Any, site: Path, tmp_path: Path) -> None:
    # S3: the manifest's ETag makes the first GET of the rewritten shard fail (same size, new bytes).
    paths = sorted(site.glob("*.tar"))
    for p in paths:
        bucket.client.upload_file(str(p), bucket.name, f"d/{p.name}")
    manifest = dataset_manifest(f"s3://{bucket.name}/d/", s3=s3(bucket.server))
    body = paths[2].read_bytes()
    bucket.client.put_object(Bucket=bucket.name, Key=f"d/{paths[2].name}", Body=body[:-512] + b"\1" * 512)
    ds = StreamingDataset(manifest, s3=s3(bucket.server))
    with pytest.raises(StoreError) as info:
        list(ds)
    assert paths[2].name in str(info.value) and "changed" in str(info.value)

    # Local files have no ETag: their size is checked at construction.
    local = dataset_manifest(site)
    assert all(s.etag is None for s in local.shards)
    assert sample_members(StreamingDataset(local)) == tar_members(paths)
    paths[1].write_bytes(paths[1].read_bytes() + b"\0" * 1024)
    with pytest.raises(StoreError) as grown:
        StreamingDataset(local)
    assert paths[1].name in str(grown.value) and "manifest" in str(grown.value) and grown.value.hint


def _manifest_text(url: str, shards: list[dict[str, Any]]) -> str:
    return json.dumps({"format": "fastfeed.dataset-manifest/1", "url": url, "shards": shards})


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        ("not json at all", ConfigError, "not a fastfeed dataset manifest"),
        ("[1, 2]", ConfigError, "not a fastfeed dataset manifest"),
        ('{"format": "something-else/1"}', ConfigError, "format"),
        ("SHARDS:[]", EmptyDatasetError, "no shards"),
        ('SHARDS:[{"url": "SITE/train-000000.tar"}]', ConfigError, "size"),
        ('SHARDS:[{"url": "SITE/train-000000.tar", "size": -5}]', ConfigError, "negative"),
        ('SHARDS:[{"url": "SITE/train-000000.tar", "size": "many"}]', ConfigError, "many"),
        ('SHARDS:[{"url": "", "size": 10}]', ConfigError, "empty"),
        ('SHARDS:[{"url": "SITE/", "size": 10}]', ConfigError, "not a shard"),
        ('SHARDS:[{"url": "SITE/other.json", "size": 10}]', ConfigError, "not a shard"),
        ('SHARDS:[{"url": "ftp://host/x.tar", "size": 10}]', FastfeedError, "ftp"),
    ],
)
def test_malformed_manifests_are_refused_naming_the_manifest(
    site: Path, tmp_path: Path, body: str, error: type[Exception], words: str
) -> None:
    if body.startswith("SHARDS:"):
        body = _manifest_text(str(site), json.loads(body.removeprefix("SHARDS:").replace("SITE", str(site))))
    path = tmp_path / "manifest.json"
    path.write_text(body)
    with pytest.raises(error) as info:
        StreamingDataset(str(path))
    text = str(info.value)
    assert words in text, text
    if error is not FastfeedError:
        assert str(path) in text or "manifest" in text, text


def test_a_manifest_object_is_checked_when_made() -> None:
    with pytest.raises(ConfigError, match="negative"):
        ShardInfo("s3://b/x.tar", size=-1)
    with pytest.raises(EmptyDatasetError, match="no shards"):
        StreamingDataset(DatasetManifest(url="s3://b/p/", shards=()))


def test_an_oversized_manifest_is_refused_before_it_is_read(site: Path, tmp_path: Path) -> None:
    # A .json past the limit (sparse: nothing is written or read) is refused from its size alone.
    from fastfeed.read.sources import MANIFEST_MAX_BYTES

    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(MANIFEST_MAX_BYTES + 1)
    with pytest.raises(ConfigError) as info:
        StreamingDataset(str(path))
    assert "huge.json" in str(info.value) and "bytes" in str(info.value)
    assert os.path.getsize(path) == MANIFEST_MAX_BYTES + 1
