"""RaggedBytes.to_ints(): the native parse of ASCII integer fields against its Python twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfeed.batch.assemble import RaggedBytes


def ragged(items: list[bytes]) -> RaggedBytes:
    data = np.frombuffer(b"".join(items), dtype=np.uint8).copy()
    offsets = np.cumsum([0] + [len(i) for i in items]).astype(np.int64)
    return RaggedBytes(torch.from_numpy(data), torch.from_numpy(offsets))


def outcome(fn: object) -> tuple[str, object]:
    try:
        return "ok", fn().tolist()  # type: ignore[operator]
    except ValueError as exc:
        return "error", str(exc)


def test_webdataset_labels() -> None:
    r = ragged([b"3", b" 12\n", b"-7", b"+0", b"0009", b"999999999999999999"])
    assert r.to_ints().tolist() == [3, 12, -7, 0, 9, 999999999999999999]
    assert r.to_ints().dtype == torch.int64
    assert ragged([]).to_ints().shape == (0,)


@pytest.mark.parametrize("bad", [b"", b"x", b"1 2", b"-", b"3-", b"--3", b"1.5", b"1e3", b"1234567890123456789"])
def test_non_integers_are_named(bad: bytes) -> None:
    with pytest.raises(ValueError, match=r"item 1 of the batch is not an integer"):
        ragged([b"1", bad, b"x"]).to_ints()


items = st.one_of(
    st.integers(-(10**18) + 1, 10**18 - 1).map(lambda v: str(v).encode()),
    st.tuples(
        st.sampled_from([b"", b" ", b"\n", b"\t "]), st.integers(0, 10**6), st.sampled_from([b"", b"\n", b"  "])
    ).map(lambda t: t[0] + str(t[1]).encode() + t[2]),
    st.binary(max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(items, max_size=40))
def test_native_parse_matches_the_python_reference(values: list[bytes]) -> None:
    r = ragged(values)
    assert outcome(r.to_ints) == outcome(r._to_ints_py)
