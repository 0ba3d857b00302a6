"""Samples larger than the prefetcher's byte budget, headers that lie about sizes, and the bytes
the reader copies (issue 13: "Hang on a valid shard").

Every shard here is a real tar file written by :mod:`tarfile`, read from local disk or from the
local S3 server, and every sample is checked against what :mod:`tarfile` reads from the same
file. Memory is checked through the prefetcher's own accounting (``io_stats``): the bytes held
stay within the byte budget plus the copy of the one sample that straddles parts, and that copy
is never more than the sample (plus the header after it, which shows the sample is complete).
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfeed import DataLoader, StreamingDataset, TruncatedShardError
from fastfeed.config import S3Config
from fastfeed.read.reader import iter_members, iter_sample_runs, iter_samples

KiB = 1024
MiB = 1024 * KiB
#: Bytes of the header that follows a sample, which the reader needs to know it is complete.
NEXT_HEADER = 512

Samples = list[tuple[str, dict[str, bytes]]]


# ---------------------------------------------------------------------------------------------
# Shards and the reference reading


def write_shard(path: Path, sizes: list[int], seed: int = 0) -> Path:
    """A shard of ``len(sizes)`` samples ``s00000``...: a ``.bin`` of random bytes of each size
    and a small ``.cls``, written by tarfile."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for i, size in enumerate(sizes):
            for ext, data in (("bin", rng.bytes(size)), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def tar_samples(path: Path) -> Samples:
    """The shard's samples as tarfile reads them (members grouped by the name before the dot)."""
    out: Samples = []
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            key, ext = member.name.split(".", 1)
            f = tf.extractfile(member)
            assert f is not None
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = f.read()
    return out


def largest_extent(path: Path) -> int:
    """Bytes of the largest sample in the tar stream: its headers, data and padding."""
    spans: dict[str, list[int]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key = m.name.split(".", 1)[0]
            span = spans.setdefault(key, [m.offset, 0])
            span[1] = m.offset_data + -(-m.size // 512) * 512
    return max(end - start for start, end in spans.values())


def as_samples(items: Iterator[dict[str, Any]]) -> Samples:
    return [(s["__key__"], {k: bytes(v) for k, v in s.items() if not k.startswith("__")}) for s in items]


def loader_samples(ds: StreamingDataset, workers: int, batch_size: int = 2) -> dict[str, dict[str, bytes]]:
    """key -> fields of every sample fastfeed.DataLoader delivers (checking each is delivered once)."""
    got: dict[str, dict[str, bytes]] = {}
    for batch in DataLoader(ds, batch_size=batch_size, num_workers=workers):
        for i, key in enumerate(batch["__key__"]):
            assert key not in got
            got[key] = {"bin": batch["bin"][i], "cls": str(int(batch["cls"][i])).encode()}
    return got


def s3(bucket: Any) -> S3Config:
    server = bucket.server
    return S3Config(
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        region="us-east-1",
    )


def upload(bucket: Any, path: Path) -> str:
    bucket.client.put_object(Bucket=bucket.name, Key=path.name, Body=path.read_bytes())
    return bucket.url(path.name)


def check_accounting(ds: StreamingDataset, budget: int, path: Path) -> dict[str, float]:
    """The prefetcher's own accounting: what it held never exceeded the budget plus the one
    straddling sample's copy, nor did that copy exceed the largest sample."""
    io_ = ds.io_stats()
    assert io_["over_budget"] == 0
    assert io_["held_peak"] <= budget + io_["copy_peak"]
    assert io_["copy_peak"] <= largest_extent(path) + NEXT_HEADER
    return io_


# ---------------------------------------------------------------------------------------------
# A valid shard with samples larger than the budget

#: name -> (sample sizes, dataset options). Each has a sample larger than the byte budget.
LAYOUTS: dict[str, tuple[list[int], dict[str, Any]]] = {
    # The issue's case: a 40 MiB sample in the middle, 8 MiB parts, a 16 MiB budget.
    "40MiB-in-the-middle": ([10 * KiB] * 4 + [40 * MiB] + [10 * KiB] * 4, {"byte_budget": "16MiB"}),
    "several-large": ([3 * MiB, 1 * KiB, 5 * MiB, 4 * MiB, 2 * KiB], {"part_size": "256KiB", "byte_budget": "1MiB"}),
    "tiny-budget": (
        [600 * KiB, 10 * KiB, 900 * KiB, 1, 0, 130 * KiB, 5 * KiB],
        {"part_size": "64KiB", "byte_budget": "128KiB"},
    ),
    "first-and-last": ([5 * MiB, 1 * KiB, 3, 1 * KiB, 5 * MiB], {"part_size": "64KiB", "byte_budget": "192KiB"}),
    "one-sample-shard": ([6 * MiB], {"part_size": "64KiB", "byte_budget": "128KiB"}),
}


@pytest.fixture(scope="module")
def layout_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("large")
    return {
        name: write_shard(root / f"{name}.tar", sizes, seed=i) for i, (name, (sizes, _)) in enumerate(LAYOUTS.items())
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_sample_larger_than_the_budget_per_sample(layout: str, layout_shards: dict[str, Path], bucket: Any) -> None:
    path = layout_shards[layout]
    ds = StreamingDataset(upload(bucket, path), s3=s3(bucket), **LAYOUTS[layout][1])
    budget = ds.prefetch_config.byte_budget
    assert largest_extent(path) > budget
    assert as_samples(iter(ds)) == tar_samples(path)
    io_ = check_accounting(ds, budget, path)
    assert io_["copy_peak"] > budget  # the large sample really was held whole, beyond the budget
    assert io_["bytes_fetched"] == path.stat().st_size


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_sample_larger_than_the_budget_through_the_dataloader(
    layout: str, workers: int, layout_shards: dict[str, Path], bucket: Any
) -> None:
    path = layout_shards[layout]
    ds = StreamingDataset(upload(bucket, path), s3=s3(bucket), **LAYOUTS[layout][1])
    assert loader_samples(ds, workers) == dict(tar_samples(path))
    if workers == 0:  # the streams ran in this process: their prefetchers' accounting is here
        check_accounting(ds, ds.stream_prefetch_config(share=8).byte_budget, path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_the_issue_case_with_default_settings(workers: int, layout_shards: dict[str, Path], bucket: Any) -> None:
    """A 40 MiB sample with every setting at its default (a stream's budget is 32 MiB)."""
    path = layout_shards["40MiB-in-the-middle"]
    ds = StreamingDataset(upload(bucket, path), s3=s3(bucket))
    assert ds.stream_prefetch_config(share=8).byte_budget < 40 * MiB
    assert loader_samples(ds, workers, batch_size=4) == dict(tar_samples(path))


# ---------------------------------------------------------------------------------------------
# Each byte is copied a bounded number of times, whatever the budget


@pytest.mark.timeout(120)
@pytest.mark.parametrize("via", ["samples", "loader"])
def test_a_shard_that_is_one_sample_is_copied_once(via: str, tmp_path: Path) -> None:
    """A 48 MiB shard of one sample through 64 KiB parts: the reader copies the sample once
    (the carry-over buffer it replaced copied ~18 GiB here, re-copying it at every part)."""
    path = write_shard(tmp_path / "one.tar", [48 * MiB])
    ds = StreamingDataset(str(path), part_size="64KiB", byte_budget="128KiB")
    if via == "samples":
        assert as_samples(iter(ds)) == tar_samples(path)
    else:
        assert loader_samples(ds, 0) == dict(tar_samples(path))
    size = path.stat().st_size
    io_ = ds.io_stats()
    assert 48 * MiB <= io_["bytes_copied"] <= size
    assert io_["copy_peak"] <= size


@pytest.mark.timeout(120)
def test_many_small_samples_are_copied_only_where_they_straddle_parts(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "small.tar", [3000] * 2000)  # ~8 MiB in 64 KiB parts
    ds = StreamingDataset(str(path), part_size="64KiB", byte_budget="256KiB")
    assert as_samples(iter(ds)) == tar_samples(path)
    parts = -(-path.stat().st_size // (64 * KiB))
    # At most one sample (plus the header after it) per part boundary.
    assert ds.io_stats()["bytes_copied"] <= parts * (largest_extent(path) + NEXT_HEADER)


@pytest.mark.timeout(120)
def test_a_shuffle_block_is_copied_out_once_however_small_the_budget(tmp_path: Path) -> None:
    """The DataLoader's streams copy a block's samples out of the parts to let the parts go
    (here after every part: the budget is two parts); a sample copied out stays copied, so the
    bytes copied stay within the shard's size, not the block's size times its parts."""
    path = write_shard(tmp_path / "small.tar", [3000] * 2000)  # ~8 MiB: one block of 1000 x 2
    ds = StreamingDataset(str(path), part_size="64KiB", byte_budget="128KiB", shuffle=True, shuffle_buffer=8000)
    assert loader_samples(ds, 0, batch_size=10) == dict(tar_samples(path))
    assert ds.io_stats()["bytes_copied"] <= path.stat().st_size


# ---------------------------------------------------------------------------------------------
# A header that claims more bytes than the object has


def lying_shard(path: Path, at: str) -> tuple[Path, int]:
    """A valid 48 MiB shard (48 samples of 1 MiB) whose member header at the start or in the
    middle claims 1 TB; returns the path and that header's offset."""
    write_shard(path, [MiB - 2 * KiB] * 48)
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    victim = members[0] if at == "start" else members[len(members) // 2]
    lie = tarfile.TarInfo(victim.name)
    lie.size = 2**40
    header = lie.tobuf(tarfile.GNU_FORMAT)
    assert len(header) == 512
    with open(path, "r+b") as f:
        f.seek(victim.offset)
        f.write(header)
    return path, victim.offset


@pytest.mark.timeout(60)
@pytest.mark.parametrize("via", ["samples", "loader-0", "loader-2"])
@pytest.mark.parametrize("at", ["start", "middle"])
def test_a_header_claiming_a_terabyte_is_an_error_at_once(at: str, via: str, tmp_path: Path, bucket: Any) -> None:
    path, offset = lying_shard(tmp_path / f"liar-{at}.tar", at)
    url = upload(bucket, path)
    expected = tar_samples_before(path, offset)
    ds = StreamingDataset(url, s3=s3(bucket), part_size="64KiB", byte_budget="256KiB")
    got: list[str] = []
    with pytest.raises(TruncatedShardError) as info:
        if via == "samples":
            got.extend(s["__key__"] for s in ds)
        else:
            for batch in DataLoader(ds, batch_size=1, num_workers=int(via[-1])):
                got.extend(batch["__key__"])
    if via != "loader-2":  # (raised again in this process from a worker's message: text only)
        assert info.value.url == url
    message = str(info.value)
    assert path.name in message
    assert f"at offset {offset} " in message and f"of {2**40} bytes present" in message
    if via == "samples":
        # Every sample before the lie, in order, then the error, long before the object's end.
        assert got == expected
        assert ds.io_stats()["bytes_fetched"] <= offset + 512 + 2 * 256 * KiB
    else:
        assert set(got) <= set(expected)


def tar_samples_before(path: Path, offset: int) -> list[str]:
    """Keys of the samples whose every member lies before ``offset``."""
    with tarfile.open(path) as tf:
        keys: list[str] = []
        try:
            for m in tf:
                if m.offset >= offset:
                    break
                keys.append(m.name.split(".", 1)[0])
        except tarfile.TarError:
            pass
    complete = list(dict.fromkeys(keys))
    victim_key = _name_at(path, offset).split(".", 1)[0]
    return [k for k in complete if k != victim_key]


def _name_at(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(100).split(b"\0", 1)[0].decode()


# ---------------------------------------------------------------------------------------------
# Properties: any sample sizes against any part size and budget

_SIZES = st.lists(
    st.one_of(st.integers(0, 3000), st.integers(0, 300 * KiB), st.sampled_from([0, 511, 512, 513, 64 * KiB])),
    min_size=1,
    max_size=12,
)
_PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPS
@given(sizes=_SIZES, part_kib=st.sampled_from([64, 96, 128]), parts=st.integers(1, 4), seed=st.integers(0, 9))
def test_any_sizes_budget_and_parts_per_sample(sizes: list[int], part_kib: int, parts: int, seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_shard(Path(tmp) / "p.tar", sizes, seed)
        budget = parts * part_kib * KiB
        ds = StreamingDataset(str(path), part_size=part_kib * KiB, byte_budget=budget)
        assert as_samples(iter(ds)) == tar_samples(path)
        io_ = check_accounting(ds, budget, path)
        assert io_["bytes_copied"] <= 5 * os.path.getsize(path)


@settings(_PROPS, max_examples=15)
@given(sizes=_SIZES, part_kib=st.sampled_from([64, 128]), parts=st.integers(2, 4), seed=st.integers(0, 9))
def test_any_sizes_budget_and_parts_through_the_dataloader(
    sizes: list[int], part_kib: int, parts: int, seed: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_shard(Path(tmp) / "p.tar", sizes, seed)
        ds = StreamingDataset(str(path), part_size=part_kib * KiB, byte_budget=parts * part_kib * KiB)
        assert loader_samples(ds, 0, batch_size=3) == dict(tar_samples(path))
        check_accounting(ds, ds.stream_prefetch_config(share=8).byte_budget, path)


class Scribbling:
    """A reader.ChunkSource over fixed-size chunks of ``data`` that knows the object's size,
    overwrites each chunk the reader drops (as a pool that reuses the buffer at once would),
    and counts what the reader says it copies and holds."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.size = len(data)
        self.chunks = [bytearray(data[i : i + chunk]) for i in range(0, len(data), chunk)] or [bytearray()]
        self.given = 0
        self.copied = 0
        self.held_peak = 0

    def __iter__(self) -> Iterator[tuple[bytearray, bool]]:
        for i, chunk in enumerate(self.chunks):
            self.given = i + 1
            yield chunk, i == len(self.chunks) - 1

    def hold_copy(self, held: int, copied: int) -> None:
        self.copied += copied
        self.held_peak = max(self.held_peak, held)

    def drop_last(self) -> None:
        chunk = self.chunks[self.given - 1]
        chunk[:] = b"\xee" * len(chunk)


@settings(max_examples=150, deadline=None)
@given(sizes=_SIZES, chunk=st.integers(1, 40 * KiB), seed=st.integers(0, 9))
def test_reader_runs_stay_valid_and_copies_are_bounded(sizes: list[int], chunk: int, seed: int) -> None:
    """Runs that a caller holds (as the DataLoader's streams do) never point into a chunk the
    reader dropped; each byte is copied a bounded number of times; the copy held is never
    more than one sample and the header after it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_shard(Path(tmp) / "p.tar", sizes, seed)
        data = path.read_bytes()
        expected = tar_samples(path)
        extent = largest_extent(path)
    source = Scribbling(data, chunk)
    runs = list(iter_sample_runs("u", source))  # every run held until the end
    got: Samples = []
    for buffer, scan, _ in runs:
        view = memoryview(buffer)
        for i, key in enumerate(scan.keys):
            spans = {ext: rows[i].tolist() for ext, rows in scan.fields.items()}
            got.append((key, {ext: bytes(view[o : o + n]) for ext, (o, n) in spans.items() if o >= 0}))
    assert got == expected
    assert source.copied <= 5 * len(data)
    assert source.held_peak <= extent + NEXT_HEADER


def test_reader_raises_on_a_lying_header_before_reading_on() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, offset = lying_shard(Path(tmp) / "liar.tar", "middle")
        data = path.read_bytes()
    for read in (lambda src: list(iter_sample_runs("u", src)), lambda src: list(iter_members("u", src))):
        source = Scribbling(data, 64 * KiB)
        with pytest.raises(TruncatedShardError, match=f"at offset {offset} "):
            read(source)
        assert source.given == offset // (64 * KiB) + 1  # the chunk that holds the lying header


def test_without_the_size_a_lying_header_raises_at_the_end_of_the_object() -> None:
    """A plain iterable of chunks says nothing of the object's size: the lie is found at its end,
    having copied (and allocated) no more than the object itself."""
    with tempfile.TemporaryDirectory() as tmp:
        path, offset = lying_shard(Path(tmp) / "liar.tar", "middle")
        data = path.read_bytes()
    chunks = [(data[i : i + 64 * KiB], i + 64 * KiB >= len(data)) for i in range(0, len(data), 64 * KiB)]
    with pytest.raises(TruncatedShardError, match=f"at offset {offset} "):
        list(iter_sample_runs("u", chunks))


@pytest.mark.parametrize("chunk", [1000, 64 * KiB, None])
def test_the_samples_before_the_point_an_object_falls_short_come_first(tmp_path: Path, chunk: int | None) -> None:
    """A cut object (or a lying header) raises, but only after every sample complete before
    that point, also those in the same chunk as it."""
    path = write_shard(tmp_path / "cut.tar", [3000] * 6)
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        cut = next(m for m in tf.getmembers() if m.name == "s00004.bin").offset_data + 100
    head = data[:cut]
    step = chunk or len(head)
    chunks = [(head[i : i + step], i + step >= len(head)) for i in range(0, len(head), step)]
    got: list[str] = []
    with pytest.raises(TruncatedShardError):
        got.extend(s["__key__"] for s in iter_samples("u", chunks))
    assert got == ["s00000", "s00001", "s00002", "s00003"]
