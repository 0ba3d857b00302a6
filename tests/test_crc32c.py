"""The native CRC32C of checkpoint parts (csrc/crc32c.cpp): known vectors, the hardware path
against the portable one, and continuation across splits."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from fastfeed import _native
from fastfeed.store.upload import checksum


def reference(data: bytes) -> int:
    """Bit-by-bit CRC32C (reflected polynomial 0x82F63B78), the definition."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_known_vectors() -> None:
    # RFC 3720 (iSCSI) B.4 test patterns and the usual check value.
    assert checksum(b"123456789") == 0xE3069283
    assert checksum(bytes(32)) == 0x8A9136AA
    assert checksum(b"\xff" * 32) == 0x62A8AB43
    assert checksum(bytes(range(32))) == 0x46DD794E
    assert checksum(b"") == 0
    assert checksum(b"123456789") != zlib.crc32(b"123456789"), "Castagnoli, not zlib's polynomial"


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_both_paths_match_the_definition_and_continue_across_splits(data: bytes, cut: int) -> None:
    cut = min(cut, len(data))
    expected = reference(data)
    assert _native.crc32c(data) == expected
    assert _native.crc32c(data, portable=True) == expected
    assert _native.crc32c(data[cut:], _native.crc32c(data[:cut])) == expected
    assert _native.crc32c(memoryview(data)[cut:], _native.crc32c(data[:cut], portable=True), portable=True) == expected


@given(
    st.integers(min_value=0, max_value=3 * 8192 * 2 + 3 * 256 * 3 + 17),
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_long_inputs_three_chains_at_once_match_the_portable_path(length: int, seed: int, start: int) -> None:
    # Inputs of 3 x 8 KiB and 3 x 256 B or more are cut into three stretches computed at once
    # and combined (csrc/crc32c.cpp); any length, content, start value and alignment.
    import random

    data = random.Random(seed).randbytes(length + 7)
    for offset in (0, 3, 7):
        view = memoryview(data)[offset : offset + length]
        assert _native.crc32c(view, start) == _native.crc32c(view, start, portable=True)


@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=1500))
def test_chunks_are_the_crc32c_of_each_piece(data: bytes, chunk: int) -> None:
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    assert _native.crc32c_chunks(data, chunk) == [_native.crc32c(p) for p in pieces]
    assert _native.crc32c_chunks(memoryview(data), chunk) == [reference(p) for p in pieces]


def test_chunks_need_a_positive_size() -> None:
    import pytest

    with pytest.raises(ValueError, match="chunk=0"):
        _native.crc32c_chunks(b"abc", 0)
