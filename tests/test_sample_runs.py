"""reader.iter_sample_runs (columnar) against reader.iter_samples, on streamed chunks."""

from __future__ import annotations

import io
import itertools
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfeed.errors import CorruptShardError, TruncatedShardError
from fastfeed.read.reader import iter_sample_runs, iter_samples


def make_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def chunked(data: bytes, cuts: list[int]) -> list[tuple[bytes, bool]]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)] or [b""]
    return [(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]


def runs_as_samples(url: str, chunks: list[tuple[bytes, bool]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for buf, scan, _ in iter_sample_runs(url, chunks):
        for i, key in enumerate(scan.keys):
            sample: dict[str, object] = {"__key__": key, "__url__": url}
            for ext, spans in scan.fields.items():
                off, size = int(spans[i][0]), int(spans[i][1])
                if off >= 0:
                    sample[ext] = bytes(memoryview(buf)[off : off + size])
            out.append(sample)
    return out


samples_st = st.lists(
    st.tuples(
        st.integers(0, 10**6).map(lambda i: f"dir/k{i:07d}"),
        st.dictionaries(st.sampled_from(["jpg", "cls", "seg.png", "json"]), st.binary(max_size=3000), min_size=1),
    ),
    min_size=1,
    max_size=25,
    unique_by=lambda s: s[0],
)


@settings(max_examples=150, deadline=None)
@given(samples=samples_st, cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_runs_equal_iter_samples_for_any_chunking(samples: list[tuple[str, dict[str, bytes]]], cuts: list[int]) -> None:
    data = make_tar(samples)
    chunks = chunked(data, cuts)
    expected = list(iter_samples("u", chunks))
    assert runs_as_samples("u", chunks) == expected
    assert len(expected) == len(samples)


def test_a_sample_larger_than_several_chunks() -> None:
    data = make_tar([("a", {"bin": b"x" * 300_000, "cls": b"1"}), ("b", {"bin": b"y" * 10, "cls": b"2"})])
    chunks = chunked(data, list(range(0, len(data), 4096)))
    got = runs_as_samples("u", chunks)
    assert [s["__key__"] for s in got] == ["a", "b"]
    assert got[0]["bin"] == b"x" * 300_000


def test_truncated_and_empty_objects() -> None:
    data = make_tar([("a", {"bin": b"x" * 5000}), ("b", {"bin": b"y" * 5000})])
    with pytest.raises(TruncatedShardError):
        runs_as_samples("u", chunked(data[:7000], [3000]))
    with pytest.raises(CorruptShardError, match="empty"):
        runs_as_samples("u", [(b"", True)])
