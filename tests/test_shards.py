"""Writing WebDataset shards (fastfeed.shards, ``fastfeed shards``) against real files and the
real local S3 server: round trips through StreamingDataset, the size bound, reproducible bytes
and ETags, manifests against the store's own listing, the CLI, and every error case."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastfeed import (
    AccessDeniedError,
    BucketNotFoundError,
    ConfigError,
    EmptyDatasetError,
    NotFoundError,
    StoreError,
    StreamingDataset,
)
from fastfeed.cli import main
from fastfeed.config import S3Config, format_size
from fastfeed.shards import (
    DatasetManifest,
    ShardWriter,
    WriteProgress,
    dataset_manifest,
    load_manifest,
    write_from_directory,
    write_shards,
)

#: Errors about buckets and credentials must surface within this many seconds.
FAST = 10.0


def s3_config(bucket: Any, **kw: Any) -> S3Config:
    values: dict[str, Any] = dict(
        endpoint_url=bucket.server.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
    )
    values.update(kw)
    return S3Config(**values)


def read_back(url: str, s3: S3Config | None = None) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of the dataset at ``url``, in order, as ``(key, {ext: bytes})``."""
    out = []
    for sample in StreamingDataset(url, s3=s3, index_cache=None):
        fields = {k: bytes(v) for k, v in sample.items() if not k.startswith("__")}
        out.append((sample["__key__"], fields))
    return out


def make_tree(root: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Files for write_from_directory, and the samples a reader must get back (sorted by key)."""
    rng = random.Random(7)
    expected: dict[str, dict[str, bytes]] = {}

    def put(rel: str, data: bytes, key: str, ext: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected.setdefault(key, {})[ext] = data

    for i in range(30):
        key = f"{'train' if i % 2 else 'val'}/img_{i:04d}"
        put(f"{key}.jpg", rng.randbytes(rng.randrange(0, 9000)), key, "jpg")
        put(f"{key}.cls", str(i % 5).encode(), key, "cls")
        if i % 3 == 0:
            put(f"{key}.seg.png", rng.randbytes(700), key, "seg.png")  # split at the first dot
    put("top.TXT", b"upper-case extension", "top", "txt")  # readers lower-case extensions
    put("empty.bin", b"", "empty", "bin")
    long_key = "deep/" + "d" * 150  # > 100 bytes: needs a pax header
    put(f"{long_key}.json", b'{"long": true}', long_key, "json")
    put("ünïcödé/ñame.txt", b"non-ASCII names", "ünïcödé/ñame", "txt")
    (root / "README").write_bytes(b"no extension: skipped")
    (root / ".hidden.txt").write_bytes(b"hidden: skipped")
    (root / ".git").mkdir()
    (root / ".git" / "config.txt").write_bytes(b"hidden directory: skipped")
    return sorted(expected.items())


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


# -- round trips ---------------------------------------------------------------------------


def test_directory_round_trip_local(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = make_tree(src)
    dest = tmp_path / "out"
    seen: list[WriteProgress] = []
    manifest = write_from_directory(src, dest.as_uri(), shard_size="32KiB", progress=seen.append)

    assert read_back(str(dest)) == expected  # every key, extension and byte, in sorted key order
    shards = sorted(dest.glob("*.tar"))
    assert len(shards) > 3
    assert manifest.urls == [p.as_uri() for p in shards]
    assert [s.size for s in manifest.shards] == [p.stat().st_size for p in shards]
    assert manifest.total_samples == len(expected) and manifest.url == dest.as_uri() + "/"
    assert all(s.etag is None for s in manifest.shards)  # what LocalStore reports
    assert DatasetManifest.from_json((dest / "manifest.json").read_text()) == manifest
    assert sorted(os.listdir(dest)) == sorted([p.name for p in shards] + ["manifest.json"])  # no temp files
    # Progress: cumulative, ends at everything, with the total known up front.
    total = sum(len(v) for _, fields in expected for v in fields.values())
    assert seen[-1].samples == len(expected) and seen[-1].payload_bytes == total
    assert seen[-1].total_payload_bytes == total and seen[-1].shards == len(shards)
    assert [p.samples for p in seen] == sorted(p.samples for p in seen)
    # Deterministic headers, and each sample's members in sorted extension order.
    for path in shards:
        members = tar_members(path)
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) for m in members} == {(0, 0, 0, 0o644, "", "")}
        names = [m.name for m in members]
        by_key: dict[str, list[str]] = {}
        for name in names:
            base = name.rsplit("/", 1)[-1]
            key = name[: len(name) - len(base)] + base.split(".", 1)[0]
            by_key.setdefault(key, []).append(name[len(key) + 1 :])
        assert all(exts == sorted(exts) for exts in by_key.values())
        assert list(by_key) == sorted(by_key)


def test_webdataset_reads_the_same_samples(tmp_path: Path) -> None:
    tariterators = pytest.importorskip("webdataset.tariterators")
    expected = make_tree(tmp_path / "src")
    write_from_directory(tmp_path / "src", tmp_path / "out", shard_size="32KiB")
    got = []
    for path in sorted((tmp_path / "out").glob("*.tar")):  # what wds.WebDataset runs, shard by shard
        with open(path, "rb") as stream:
            members = tariterators.tar_file_expander([{"url": str(path), "stream": stream}])
            for sample in tariterators.group_by_keys(members):
                got.append((sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}))
    assert got == expected


def expected_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int | float):
        return repr(value).encode("ascii")
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    raise AssertionError(type(value))


def test_iterable_round_trip_s3(bucket: Any) -> None:
    s3 = s3_config(bucket)
    rng = np.random.default_rng(3)
    samples = [
        {
            "__key__": f"part{i // 50}/{i:06d}",
            "bin": rng.bytes(int(rng.integers(0, 4000))),
            "txt": f"caption {i} — ünïcode",
            "cls": i % 7,
            "score": i / 8,
            "json": {"i": i, "b": [1, 2], "a": None},
            "npy": np.arange(i % 5 + 1, dtype=np.float32) * i,
            "mem": memoryview(bytearray([i % 256] * 3)),
        }
        for i in range(120)
    ]
    manifest = write_shards(iter(samples), f"s3://{bucket.name}/ds/", shard_size="64KiB", s3=s3, index=False)
    got = read_back(f"s3://{bucket.name}/ds/", s3)
    assert [k for k, _ in got] == [s["__key__"] for s in samples]
    for (_, fields), sample in zip(got, samples, strict=True):
        assert set(fields) == {"bin", "txt", "cls", "score", "json", "npy", "mem"}
        for ext in ("bin", "txt", "cls", "score", "json"):
            assert fields[ext] == expected_bytes(sample[ext]), ext
        assert np.array_equal(np.load(io.BytesIO(fields["npy"])), sample["npy"])
        assert fields["mem"] == bytes(sample["mem"])
    assert len(manifest.shards) > 2 and manifest.total_samples == len(samples)
    assert all(s.url.startswith(f"s3://{bucket.name}/ds/shard-") for s in manifest.shards)


# -- the size bound --------------------------------------------------------------------------


def test_shards_respect_the_size_bound_and_are_full(tmp_path: Path, caplog: Any) -> None:
    rng = random.Random(11)
    sizes = [rng.randrange(0, 20_000) for _ in range(300)]
    bound = 64 * 1024
    manifest = write_shards(
        ({"__key__": f"{i:05d}", "bin": bytes(n)} for i, n in enumerate(sizes)), tmp_path / "out", shard_size=bound
    )

    def tar_size(n: int) -> int:  # one header block + data padded to 512
        return 512 + n + (-n % 512)

    def final(members: int) -> int:  # two zero blocks, then zeros to a whole 10240-byte record
        end = members + 1024
        return end + (-end % 10240)

    assert sum(s.samples or 0 for s in manifest.shards) == len(sizes)
    start = 0
    for i, shard in enumerate(manifest.shards):
        assert shard.size <= bound
        assert shard.samples
        members = sum(tar_size(n) for n in sizes[start : start + shard.samples])
        assert shard.size == final(members) == Path(shard.url[len("file://") :]).stat().st_size
        start += shard.samples
        if i + 1 < len(manifest.shards):  # full: the next sample would not have fitted
            assert final(members + tar_size(sizes[start])) > bound

    with caplog.at_level(logging.WARNING, logger="fastfeed.shards"):
        big = write_shards(
            [{"__key__": "a", "bin": b"x"}, {"__key__": "b", "bin": bytes(100_000)}, {"__key__": "c", "bin": b"y"}],
            tmp_path / "big",
            shard_size=bound,
        )
    assert [s.samples for s in big.shards] == [1, 1, 1]  # the oversized sample alone
    assert big.shards[1].size > bound and "larger than shard_size" in caplog.text


# -- reproducibility ---------------------------------------------------------------------------


def reproducible_samples() -> Iterator[dict[str, Any]]:
    rng = np.random.default_rng(5)
    for i in range(24):
        yield {"__key__": f"{i:04d}", "bin": rng.bytes(500_000), "cls": i % 3, "txt": f"sample {i}"}


def test_same_input_gives_the_same_bytes_and_etags(bucket: Any, tmp_path: Path) -> None:
    s3 = s3_config(bucket)
    kw: dict[str, Any] = dict(shard_size="7MiB", part_size="5MiB", s3=s3, index=False)
    first = write_shards(reproducible_samples(), f"s3://{bucket.name}/a/", **kw)
    second = write_shards(reproducible_samples(), f"s3://{bucket.name}/b/", **kw)
    local = write_shards(reproducible_samples(), tmp_path / "local", shard_size="7MiB")

    assert len(first.shards) == 2 and first.shards[0].size > 5 * 2**20  # the first is a multipart upload
    assert [s.etag for s in first.shards] == [s.etag for s in second.shards]
    assert all(s.etag for s in first.shards)
    assert [s.size for s in first.shards] == [s.size for s in second.shards] == [s.size for s in local.shards]
    for remote, path in zip(first.shards, local.shards, strict=True):
        key = remote.url.split("/", 3)[3]
        body = bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
        assert body == Path(path.url[len("file://") :]).read_bytes()
    # The single-part upload's ETag is the MD5 of the bytes, as S3 defines it; the multipart one's is not.
    last = Path(local.shards[-1].url[len("file://") :]).read_bytes()
    assert len(last) <= 5 * 2**20 and first.shards[-1].etag == hashlib.md5(last).hexdigest()
    multipart = Path(local.shards[0].url[len("file://") :]).read_bytes()
    assert first.shards[0].etag != hashlib.md5(multipart).hexdigest()

    # Samples read back from the dataset and written again give the very same shards.
    copy = write_shards(
        StreamingDataset(f"s3://{bucket.name}/a/", s3=s3, index_cache=None), f"s3://{bucket.name}/c/", **kw
    )
    assert [(s.size, s.etag, s.samples) for s in copy.shards] == [(s.size, s.etag, s.samples) for s in first.shards]


# -- manifests ---------------------------------------------------------------------------------


def test_manifest_matches_the_store_listing(bucket: Any, tmp_path: Path) -> None:
    s3 = s3_config(bucket)
    src = tmp_path / "src"
    make_tree(src)
    url = f"s3://{bucket.name}/m/"
    manifest = write_from_directory(src, url, shard_size="32KiB", s3=s3, index=False)

    listing = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="m/")["Contents"]
    tars = sorted((o for o in listing if o["Key"].endswith(".tar")), key=lambda o: o["Key"])
    assert [(f"s3://{bucket.name}/{o['Key']}", o["Size"], o["ETag"].strip('"')) for o in tars] == [
        (s.url, s.size, s.etag) for s in manifest.shards
    ]
    assert {o["Key"] for o in listing} - {o["Key"] for o in tars} == {"m/manifest.json"}
    assert load_manifest(url + "manifest.json", s3=s3) == manifest

    listed = dataset_manifest(url, s3=s3)
    assert listed.url == manifest.url == url
    assert [(s.url, s.size, s.etag) for s in listed.shards] == [(s.url, s.size, s.etag) for s in manifest.shards]
    assert all(s.samples is None for s in listed.shards) and listed.total_samples is None
    assert dataset_manifest(url, s3=s3, count_samples=True).shards == manifest.shards
    ds = StreamingDataset(url, s3=s3, index_cache=None)
    assert [(s.url, s.size, s.etag) for s in ds.shards] == [(s.url, s.size, s.etag) for s in manifest.shards]

    # A second run into the same prefix is refused unless asked for, then replaces the shards.
    with pytest.raises(ConfigError, match="already holds a dataset") as info:
        write_from_directory(src, url, s3=s3, index=False)
    assert "overwrite=True" in str(info.value)
    again = write_from_directory(src, url, shard_size="32KiB", s3=s3, index=False, overwrite=True)
    assert [(s.url, s.etag) for s in again.shards] == [(s.url, s.etag) for s in manifest.shards]


def test_local_manifest_matches_the_local_store_and_a_custom_path(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    where = tmp_path / "records" / "data.json"
    manifest = write_from_directory(src, tmp_path / "out", shard_size="32KiB", manifest=where)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert load_manifest(where) == manifest
    assert dataset_manifest(tmp_path / "out", count_samples=True).shards == manifest.shards
    ds = StreamingDataset(str(tmp_path / "out"), index_cache=None)
    assert [(s.url, s.size, s.etag) for s in ds.shards] == [(s.url, s.size, s.etag) for s in manifest.shards]
    assert StreamingDataset(manifest.urls, index_cache=None).total_samples == manifest.total_samples
    with pytest.raises(ConfigError, match="not a fastfeed dataset manifest"):
        DatasetManifest.from_json('{"shards": []}')
    with pytest.raises(NotFoundError, match="no manifest"):
        load_manifest(tmp_path / "nope.json")


def test_uploaded_counts_seed_fastfeeds_sample_count_cache(
    bucket: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = s3_config(bucket)
    url = f"s3://{bucket.name}/idx/"
    manifest = write_shards(reproducible_samples(), url, shard_size="4MiB", s3=s3, index=tmp_path / "counts")

    class NoScanning:
        def __init__(self, *args: Any, **kw: Any) -> None:
            raise AssertionError("the shards were scanned")

    monkeypatch.setattr("fastfeed.read.sources.Prefetcher", NoScanning)
    ds = StreamingDataset(url, s3=s3, index_cache=tmp_path / "counts")
    assert ds.shard_sample_counts == [s.samples for s in manifest.shards]
    with pytest.raises(AssertionError, match="scanned"):  # without the entries, counting scans
        _ = StreamingDataset(url, s3=s3, index_cache=tmp_path / "empty").shard_sample_counts


# -- the command line ------------------------------------------------------------------------


def test_cli_write_and_manifest(bucket: Any, s3_env: Any, tmp_path: Path, capsys: Any) -> None:
    src = tmp_path / "src"
    expected = make_tree(src)
    url = f"s3://{bucket.name}/cli/"
    assert main(["shards", "write", str(src), url, "--shard-size", "32KiB", "--no-index"]) == 0
    out, err = capsys.readouterr()
    manifest = load_manifest(url + "manifest.json")
    assert f"wrote {len(manifest.shards)} shard(s), {len(expected)} samples" in out
    assert f"manifest: {url}manifest.json" in out
    assert "writing shards" in err  # the progress bar, on stderr
    assert read_back(url) == expected

    assert main(["shards", "manifest", url, "--json", "--samples"]) == 0
    listed = DatasetManifest.from_json(capsys.readouterr().out)
    assert listed.shards == manifest.shards

    assert main(["shards", "manifest", url + "manifest.json"]) == 0
    text = capsys.readouterr().out
    for shard in manifest.shards:
        assert f"{shard.url}  {shard.size}  {shard.etag}  {shard.samples}" in text
    assert f"{len(manifest.shards)} shard(s)" in text

    assert main(["shards", "write", str(src), "s3://no-such-bucket-ff/x/"]) == 2
    assert "no-such-bucket-ff" in capsys.readouterr().err


def test_cli_progress_without_tqdm(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    expected = make_tree(src)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    assert main(["shards", "write", str(src), str(tmp_path / "out"), "--shard-size", "32KiB"]) == 0
    err = capsys.readouterr().err
    total = sum(len(v) for _, fields in expected for v in fields.values())
    shards = len(list((tmp_path / "out").glob("*.tar")))
    done = f"writing shards: {format_size(total)} of {format_size(total)}, {len(expected)} samples, {shards} shard(s)"
    assert done in err  # the final line; periodic ones come every few seconds


def test_cli_as_a_subprocess(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = make_tree(src)
    dest = tmp_path / "out"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "fastfeed.cli", "shards", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    proc = run("write", str(src), str(dest), "--shard-size", "16KiB")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "writing shards" in proc.stderr
    assert read_back(str(dest)) == expected
    proc = run("manifest", str(dest))
    assert proc.returncode == 0 and f"{len(list(dest.glob('*.tar')))} shard(s)" in proc.stdout

    proc = run("write", str(tmp_path / "missing"), str(tmp_path / "out2"))
    assert proc.returncode == 2
    assert "fastfeed: error:" in proc.stderr and "missing does not exist" in proc.stderr
    assert not (tmp_path / "out2").exists()


# -- errors ----------------------------------------------------------------------------------


def test_missing_empty_or_bad_source_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist") as info:
        write_from_directory(tmp_path / "nope", tmp_path / "out")
    assert str(tmp_path / "nope") in str(info.value) and "pass the directory" in str(info.value)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotFoundError, match="is not a directory"):
        write_from_directory(tmp_path / "file.txt", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("no extension")
    with pytest.raises(EmptyDatasetError, match="no files with an extension"):
        write_from_directory(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConfigError, match="inside the source directory"):
        write_from_directory(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sample_without_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sample #0 has no '__key__' \(its keys: 'jpg'\)") as info:
        write_shards([{"jpg": b"x"}], tmp_path / "a")
    assert "give every sample" in str(info.value)
    with pytest.raises(ConfigError, match="sample #1 has no '__key__'"):
        write_shards([{"__key__": "k0", "jpg": b"x"}, {"jpg": b"y"}], tmp_path / "b")
    # Nothing is committed: no manifest, no shard, no temporary file.
    assert os.listdir(tmp_path / "b") == []
    # A rejected sample writes nothing: the writer goes on if the caller does.
    with ShardWriter(tmp_path / "c") as writer:
        writer.write({"__key__": "k0", "txt": "a"})
        with pytest.raises(ConfigError, match="sample #1 has no '__key__'"):
            writer.write({"txt": "b"})
        writer.write({"__key__": "k1", "txt": "c"})
    assert read_back(str(tmp_path / "c")) == [("k0", {"txt": b"a"}), ("k1", {"txt": b"c"})]


def test_duplicate_keys_and_extensions(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"1")
    (src / "a.JPG").write_bytes(b"2")
    with pytest.raises(ConfigError, match="duplicate key and extension") as info:
        write_from_directory(src, tmp_path / "out")
    assert "a.jpg" in str(info.value) and "a.JPG" in str(info.value)
    with pytest.raises(ConfigError, match="duplicate key 'k'"):
        write_shards([{"__key__": "k", "jpg": b"1"}, {"__key__": "k", "cls": b"2"}], tmp_path / "o1")
    with pytest.raises(ConfigError, match="duplicate extension in sample 'k'"):
        write_shards([{"__key__": "k", "jpg": b"1", "JPG": b"2"}], tmp_path / "o2")


def test_invalid_keys_values_and_arguments(tmp_path: Path) -> None:
    cases = [
        ({"__key__": "a.b", "jpg": b""}, "contains a '.' in its last part"),
        ({"__key__": "/abs", "jpg": b""}, "not a safe relative path"),
        ({"__key__": "x/../y", "jpg": b""}, "not a safe relative path"),
        ({"__key__": 3, "jpg": b""}, "must be a non-empty string"),
        ({"__key__": "k", "jpg": None}, "field 'jpg': cannot write a NoneType"),
        ({"__key__": "k", "flag": True}, "field 'flag': bool values are ambiguous"),
        ({"__key__": "k"}, "no fields besides '__key__'"),
        ({"__key__": "k", "a/b": b""}, "'a/b' is not a valid extension"),
    ]
    for i, (sample, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=re.escape(message)):
            write_shards([sample], tmp_path / f"o{i}")
    with pytest.raises(ConfigError, match=r"must give distinct relative names ending in \.tar"):
        ShardWriter(tmp_path / "n", name="shard.tar")
    with pytest.raises(ConfigError, match="is not a size"):
        ShardWriter(tmp_path / "n", shard_size="big")
    with pytest.raises(ConfigError, match="minimum multipart part"):
        ShardWriter(tmp_path / "n", part_size="1MiB")


def test_existing_local_dataset_needs_overwrite(tmp_path: Path) -> None:
    samples = [{"__key__": f"{i}", "txt": "x" * 5000} for i in range(10)]
    first = write_shards(samples, tmp_path / "out", shard_size="16KiB")
    with pytest.raises(ConfigError, match="already holds a dataset"):
        write_shards(samples, tmp_path / "out")
    again = write_shards(samples, tmp_path / "out", shard_size="16KiB", overwrite=True)
    assert again.shards == first.shards


def test_missing_bucket_fails_fast(bucket: Any) -> None:
    start = time.monotonic()
    with pytest.raises(BucketNotFoundError) as info:
        ShardWriter("s3://no-such-bucket-ff/train/", s3=s3_config(bucket))
    assert "no-such-bucket-ff" in str(info.value) and "create the bucket" in str(info.value)
    assert time.monotonic() - start < FAST


def test_bad_or_missing_credentials_fail_fast(bucket: Any) -> None:
    start = time.monotonic()
    with pytest.raises(AccessDeniedError) as info:
        write_shards(
            [{"__key__": "k", "txt": "x"}], f"s3://{bucket.name}/x/", s3=s3_config(bucket, secret_access_key="wrong")
        )
    assert bucket.name in str(info.value) and "AWS_ACCESS_KEY_ID" in str(info.value)
    # No credentials anywhere (the autouse fixture hid the environment and the AWS files).
    with pytest.raises(AccessDeniedError):
        ShardWriter(f"s3://{bucket.name}/x/", endpoint_url=bucket.server.endpoint_url)
    assert time.monotonic() - start < FAST
    assert "Contents" not in bucket.client.list_objects_v2(Bucket=bucket.name)


def test_a_failing_source_commits_no_manifest(bucket: Any) -> None:
    s3 = s3_config(bucket)

    def samples() -> Iterator[dict[str, Any]]:
        for part in ("a", "b"):
            for sample in reproducible_samples():
                yield {**sample, "__key__": f"{part}/{sample['__key__']}"}
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        write_shards(samples(), f"s3://{bucket.name}/f/", shard_size="6MiB", part_size="5MiB", s3=s3, index=False)
    keys = [o["Key"] for o in bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="f/").get("Contents", [])]
    # Shards finished before the error stay (the one uploading then may be cancelled); no manifest.
    assert {"f/shard-000000.tar", "f/shard-000001.tar"} <= set(keys)
    assert all(k.endswith(".tar") for k in keys) and "f/manifest.json" not in keys
    assert bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []) == []


def test_a_second_writer_on_the_prefix_fails_instead_of_mixing_shards_in(bucket: Any) -> None:
    """Without overwrite, shards and the manifest are conditional writes: a shard that another
    writer put there after this writer opened the prefix is never replaced."""
    url = f"s3://{bucket.name}/mixed/"
    writer = ShardWriter(url, s3=s3_config(bucket), shard_size="64KiB", index=False)
    bucket.client.put_object(Bucket=bucket.name, Key="mixed/shard-000001.tar", Body=b"the other writer's")
    with (
        pytest.raises(StoreError, match=r"shard-000001\.tar appeared while this dataset was being written"),
        writer,
    ):
        for i in range(40):
            writer.write({"__key__": f"{i:04d}", "bin": bytes(4096)})
    other = bucket.client.get_object(Bucket=bucket.name, Key="mixed/shard-000001.tar")["Body"].read()
    assert other == b"the other writer's"
    keys = [o["Key"] for o in bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="mixed/")["Contents"]]
    assert "mixed/manifest.json" not in keys
