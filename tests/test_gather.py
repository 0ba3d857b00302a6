"""Batch gather: fastfeed.batch.gather.gather (native) and gather_py (reference).

The two are checked against each other (results, bytes written, offsets, exception classes and
messages) on random sources of many buffer types, against the obvious concatenation, and on
every error case, where nothing may be written. A large copy checks the threaded path and that
other Python threads run while a native gather copies.
"""

from __future__ import annotations

import array
import mmap
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfeed import _native
from fastfeed.batch.gather import MAX_THREADS, gather, gather_py

GatherFn = Callable[..., int]
IMPLS = [pytest.param(gather, id="native"), pytest.param(gather_py, id="python")]
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SENTINEL = -7  # offsets elements a gather must not touch


# ---------------------------------------------------------------------------------------------
# Helpers


def raw(obj: Any) -> bytes:
    """The bytes of a C-contiguous buffer (as gather reads them)."""
    return b"".join([obj])


def outcome(fn: GatherFn, dst: Any, srcs: Any, **kw: Any) -> tuple[Any, ...]:
    try:
        return ("ok", fn(dst, srcs, **kw))
    except Exception as exc:
        return ("error", type(exc), str(exc))


@pytest.fixture
def anon_mmap() -> Iterator[Callable[[int], mmap.mmap]]:
    maps: list[mmap.mmap] = []

    def make(size: int) -> mmap.mmap:
        m = mmap.mmap(-1, max(size, 1))
        maps.append(m)
        return m

    yield make
    for m in maps:
        m.close()


# ---------------------------------------------------------------------------------------------
# Strategies: sources of many buffer types, rebuilt fresh for each implementation

DTYPES = ["u1", "i2", "f4", "f8", "c8", "?", "M8[s]"]


def make_source(kind: str, data: bytes, dtype: str, step: int) -> Any:
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "mv_slice":  # a contiguous slice in the middle of a bigger buffer
        return memoryview(bytearray(b"<" + data + b">"))[1 : 1 + len(data)]
    if kind == "array":
        return array.array("B", data)
    if kind == "numpy":
        dt = np.dtype(dtype)
        n = len(data) // dt.itemsize
        a = np.frombuffer(data[: n * dt.itemsize], dtype=dt).copy()
        return a.reshape(-1, step) if step > 1 and n % step == 0 else a
    if kind == "numpy_empty2d":
        return np.zeros((0, 3), dtype=np.float32)
    if kind == "numpy_0d":
        return np.array(np.frombuffer(data[:8].ljust(8, b"\0"), dtype="f8")[0])
    if kind == "torch":
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).numpy() if data else np.zeros(0, "u1")
    raise AssertionError(kind)


SOURCE_KINDS = ["bytes", "bytes", "bytearray", "memoryview", "mv_slice", "array", "numpy", "numpy", "torch"]
source_specs = st.tuples(
    st.sampled_from([*SOURCE_KINDS, "numpy_empty2d", "numpy_0d"]),
    st.one_of(st.binary(max_size=64), st.binary(max_size=2000)),
    st.sampled_from(DTYPES),
    st.sampled_from([1, 2, 4]),
)
DST_KINDS = ["bytearray", "numpy_u1", "numpy_f4_2d", "memoryview", "torch", "mmap"]


def make_dst(kind: str, init: bytes, maps: Callable[[int], mmap.mmap]) -> tuple[Any, Callable[[], bytes]]:
    """A destination holding `init` and a function that reads its bytes back."""
    if kind == "bytearray":
        d = bytearray(init)
        return d, lambda: bytes(d)
    if kind == "memoryview":
        mv = memoryview(bytearray(init))
        return mv, lambda: mv.tobytes()
    if kind == "numpy_u1":
        a = np.frombuffer(bytearray(init), dtype=np.uint8)
        return a, lambda: a.tobytes()
    if kind == "numpy_f4_2d":  # bytes, not elements: a float32 [n, 2] array of 8n bytes
        padded = init + bytes(-len(init) % 8)
        f4 = np.frombuffer(bytearray(padded), dtype=np.float32).reshape(-1, 2)
        return f4, lambda: f4.tobytes()
    if kind == "torch":
        t = torch.frombuffer(bytearray(init), dtype=torch.uint8) if init else torch.zeros(0, dtype=torch.uint8)
        arr = t.numpy()
        return arr, lambda: t.numpy().tobytes()
    if kind == "mmap":
        m = maps(len(init))
        m[: len(init)] = init  # an mmap cannot be empty: for no bytes it has 1 (zero) byte
        return m, lambda: m[:]
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------
# Native == reference == concatenation


@SETTINGS
@given(
    specs=st.lists(source_specs, max_size=12),
    dst_kind=st.sampled_from(DST_KINDS),
    dst_offset=st.integers(0, 40),
    slack=st.integers(-3, 24),
    use_offsets=st.booleans(),
    extra_offsets=st.integers(0, 3),
    as_tuple=st.booleans(),
    seed=st.integers(0, 255),
)
def test_native_matches_reference(
    specs: list[tuple[str, bytes, str, int]],
    dst_kind: str,
    dst_offset: int,
    slack: int,
    use_offsets: bool,
    extra_offsets: int,
    as_tuple: bool,
    seed: int,
) -> None:
    results = []
    for fn in (gather, gather_py):
        maps: list[mmap.mmap] = []

        def new_map(size: int, maps: list[mmap.mmap] = maps) -> mmap.mmap:
            m = mmap.mmap(-1, max(size, 1))
            maps.append(m)
            return m

        srcs_list = [make_source(*spec) for spec in specs]
        srcs: Any = tuple(srcs_list) if as_tuple else srcs_list
        expected = b"".join(raw(s) for s in srcs_list)
        size = max(0, dst_offset + len(expected) + slack)
        init = bytes((seed + i) % 256 for i in range(size))
        dst, read_back = make_dst(dst_kind, init, new_map)
        before = read_back()
        offsets = np.full(len(srcs_list) + 1 + extra_offsets, SENTINEL, dtype=np.int64)
        kw: dict[str, Any] = {"dst_offset": dst_offset}
        if use_offsets:
            kw["offsets"] = offsets
        res = outcome(fn, dst, srcs, **kw)
        after = read_back()
        del dst
        for m in maps:
            m.close()

        if dst_offset + len(expected) <= len(before):
            assert res == ("ok", len(expected))
            assert after[:dst_offset] == before[:dst_offset]
            assert after[dst_offset : dst_offset + len(expected)] == expected
            assert after[dst_offset + len(expected) :] == before[dst_offset + len(expected) :]
            if use_offsets:
                sizes = [len(raw(s)) for s in srcs_list]
                assert offsets[: len(sizes) + 1].tolist() == [0, *np.cumsum(sizes, dtype=np.int64).tolist()]
                assert (offsets[len(sizes) + 1 :] == SENTINEL).all()
        else:
            assert res[0] == "error" and res[1] is ValueError and "dst too small" in res[2]
            assert after == before
        if not use_offsets:
            assert (offsets == SENTINEL).all()
        results.append((res, after, offsets.tolist()))
    assert results[0] == results[1]


@SETTINGS
@given(n=st.integers(0, 40), item=st.integers(0, 64), data=st.data(), dtype=st.sampled_from(["u1", "f4", "i8"]))
def test_item_size_stacks_like_numpy(n: int, item: int, data: st.DataObject, dtype: str) -> None:
    """Fixed-size fields stacked into [B, ...]: the same bytes as np.stack."""
    itemsize = np.dtype(dtype).itemsize
    count = item // itemsize
    srcs = [
        np.frombuffer(data.draw(st.binary(min_size=count * itemsize, max_size=count * itemsize)), dtype=dtype)
        for _ in range(n)
    ]
    for fn in (gather, gather_py):
        out = np.zeros((n, count), dtype=dtype)
        assert fn(out.reshape(-1).view(np.uint8), srcs, item_size=count * itemsize) == n * count * itemsize
        expected = np.stack(srcs) if n else np.zeros((0, count), dtype=dtype)
        assert out.tobytes() == expected.tobytes()


@pytest.mark.parametrize("fn", IMPLS)
def test_variable_fields_flat_plus_offsets(fn: GatherFn) -> None:
    texts = [b"alpha", b"", b"be", b"\x00" * 300, "\u65e5\u672c".encode()]
    total = sum(map(len, texts))
    flat = np.zeros(total, dtype=np.uint8)
    offsets = np.empty(len(texts) + 1, dtype=np.int64)
    assert fn(flat, texts, offsets=offsets) == total
    for i, t in enumerate(texts):
        assert flat[offsets[i] : offsets[i + 1]].tobytes() == t


@pytest.mark.parametrize("fn", IMPLS)
def test_exact_fit_zero_sources_and_empty(fn: GatherFn) -> None:
    d = bytearray(7)
    assert fn(d, [b"abc", b"defg"]) == 7 and d == b"abcdefg"
    d = bytearray(b"xxxxxxx")
    assert fn(d, [b"ab", b"cd"], dst_offset=3) == 4 and d == b"xxxabcd"
    offsets = np.full(3, SENTINEL, dtype=np.int64)
    assert fn(bytearray(), [], offsets=offsets) == 0
    assert offsets.tolist() == [0, SENTINEL, SENTINEL]
    assert fn(bytearray(b"zz"), [], dst_offset=2) == 0  # at the very end: fine
    assert fn(bytearray(), [b"", bytearray(), np.zeros(0)], item_size=0) == 0
    assert fn(np.zeros(0, np.uint8), iter([b""])) == 0  # any iterable
    assert fn(bytearray(4), (b"ab" for _ in range(2))) == 4


@pytest.mark.parametrize("fn", IMPLS)
def test_overlapping_source_is_copied_in_order(fn: GatherFn) -> None:
    d = bytearray(b"abcdefgh")
    with memoryview(d) as mv:
        assert fn(d, [mv[0:4], mv[0:2]], dst_offset=2) == 6
    # first "abcd" lands at 2 (d = "ababcdgh"), then d[0:2] = "ab" lands at 6
    assert d == b"ababcdab"


@pytest.mark.parametrize("fn", IMPLS)
def test_unaligned_and_array_offsets(fn: GatherFn) -> None:
    backing = bytearray(8 * 4 + 1)
    with memoryview(backing) as mv, mv[1:] as tail, tail.cast("q") as unaligned:
        assert fn(bytearray(5), [b"ab", b"cde"], offsets=unaligned) == 5
        assert unaligned.tolist() == [0, 2, 5, 0]
    a = array.array("q", [SENTINEL] * 3)
    assert fn(bytearray(5), [b"ab", b"cde"], offsets=a) == 5
    assert a.tolist() == [0, 2, 5]


# ---------------------------------------------------------------------------------------------
# Errors: same class and message from both, raised before anything is written


def _fortran() -> np.ndarray:
    return np.zeros((4, 4), dtype=np.uint8, order="F")


class NoBuffer:
    pass


ERRORS: list[Any] = [
    # (id, dst factory, srcs factory, kwargs, class, message part)
    ("dst_bytes", lambda: b"xxxx", lambda: [b"a"], {}, TypeError, "dst is read-only"),
    ("dst_ro_mv", lambda: memoryview(bytearray(4)).toreadonly(), lambda: [b"a"], {}, TypeError, "read-only"),
    ("dst_ro_np", lambda: np.frombuffer(b"xxxx", np.uint8), lambda: [b"a"], {}, TypeError, "read-only"),
    ("dst_strided", lambda: np.zeros(8, np.uint8)[::2], lambda: [b"a"], {}, BufferError, "dst is not C-cont"),
    ("dst_fortran", _fortran, lambda: [b"a"], {}, BufferError, "dst is not C-contiguous"),
    ("dst_int", lambda: 3, lambda: [b"a"], {}, TypeError, "dst must be a writable C-contiguous buffer, not 'int'"),
    ("dst_str", lambda: "abc", lambda: [], {}, TypeError, "not 'str'"),
    ("dst_none", lambda: None, lambda: [], {}, TypeError, "not 'NoneType'"),
    ("src_int", lambda: bytearray(8), lambda: [b"a", 5], {}, TypeError, "srcs[1] must be a C-contiguous buffer"),
    (
        "src_str",
        lambda: bytearray(8),
        lambda: ["abc"],
        {},
        TypeError,
        "srcs[0] must be a C-contiguous buffer, not 'str'",
    ),
    ("src_obj", lambda: bytearray(8), lambda: [b"", b"", NoBuffer()], {}, TypeError, "srcs[2]"),
    (
        "src_strided",
        lambda: bytearray(8),
        lambda: [b"a", np.zeros(8, np.uint8)[::2]],
        {},
        BufferError,
        "srcs[1] is not C-",
    ),
    ("src_mv_strided", lambda: bytearray(8), lambda: [memoryview(b"abcd")[::2]], {}, BufferError, "srcs[0] is not"),
    ("src_fortran", lambda: bytearray(99), lambda: [_fortran()], {}, BufferError, "srcs[0] is not C-contiguous"),
    ("src_transposed", lambda: bytearray(99), lambda: [np.zeros((2, 3)).T], {}, BufferError, "srcs[0]"),
    ("srcs_not_iterable", lambda: bytearray(8), lambda: 5, {}, TypeError, "not iterable"),
    (
        "srcs_bytes",
        lambda: bytearray(8),
        lambda: b"ab",
        {},
        TypeError,
        "srcs[0] must be a C-contiguous buffer, not 'int'",
    ),
    ("src_fits_dst_does_not", lambda: bytearray(1), lambda: [b"ab"], {}, ValueError, "dst too small"),
    (
        "item_size",
        lambda: bytearray(9),
        lambda: [b"abc", b"de", b"f"],
        {"item_size": 3},
        ValueError,
        "srcs[1] has 2 bytes, expected item_size=3",
    ),
    (
        "item_size_np",
        lambda: bytearray(99),
        lambda: [np.zeros(3, np.float32)],
        {"item_size": 3},
        ValueError,
        "srcs[0] has 12 bytes, expected item_size=3",
    ),
    ("item_size_neg", lambda: bytearray(9), lambda: [], {"item_size": -1}, ValueError, "item_size must be in 0.."),
    ("item_size_float", lambda: bytearray(9), lambda: [], {"item_size": 1.0}, TypeError, "integer"),
    (
        "dst_offset_neg",
        lambda: bytearray(9),
        lambda: [],
        {"dst_offset": -1},
        ValueError,
        f"dst_offset must be in 0..{sys.maxsize}, got -1",
    ),
    (
        "dst_offset_huge",
        lambda: bytearray(9),
        lambda: [],
        {"dst_offset": 2**70},
        ValueError,
        "got 1180591620717411303424",
    ),
    ("dst_offset_float", lambda: bytearray(9), lambda: [], {"dst_offset": 1.5}, TypeError, "float"),
    (
        "dst_offset_past_end",
        lambda: bytearray(9),
        lambda: [],
        {"dst_offset": 10},
        ValueError,
        "dst too small: needs 10 bytes (dst_offset 10 + 0 from 0 sources), has 9",
    ),
    (
        "too_small_by_one",
        lambda: bytearray(4),
        lambda: [b"ab", b"cde"],
        {},
        ValueError,
        "dst too small: needs 5 bytes (dst_offset 0 + 5 from 2 sources), has 4",
    ),
    (
        "too_small_offset",
        lambda: np.zeros(6, np.uint8),
        lambda: [b"ab", b"cde"],
        {"dst_offset": 2},
        ValueError,
        "needs 7 bytes (dst_offset 2 + 5 from 2 sources), has 6",
    ),
    ("too_small_f4", lambda: np.zeros(1, np.float32), lambda: [b"abcde"], {}, ValueError, "has 4"),
    ("threads_0", lambda: bytearray(9), lambda: [], {"threads": 0}, ValueError, f"threads must be in 1..{MAX_THREADS}"),
    ("threads_big", lambda: bytearray(9), lambda: [], {"threads": MAX_THREADS + 1}, ValueError, "threads must"),
    ("threads_str", lambda: bytearray(9), lambda: [], {"threads": "2"}, TypeError, "str"),
    (
        "offsets_short",
        lambda: bytearray(9),
        lambda: [b"a", b"b"],
        {"offsets": np.zeros(2, np.int64)},
        ValueError,
        "offsets has 2 elements, needs at least 3 (len(srcs) + 1)",
    ),
    (
        "offsets_empty",
        lambda: bytearray(9),
        lambda: [],
        {"offsets": np.zeros(0, np.int64)},
        ValueError,
        "offsets has 0 elements, needs at least 1",
    ),
    (
        "offsets_i4",
        lambda: bytearray(9),
        lambda: [b"a"],
        {"offsets": np.zeros(4, np.int32)},
        TypeError,
        "offsets must hold int64 values, got format 'i' with itemsize 4",
    ),
    ("offsets_f8", lambda: bytearray(9), lambda: [b"a"], {"offsets": np.zeros(4, np.float64)}, TypeError, "format 'd'"),
    ("offsets_u8", lambda: bytearray(9), lambda: [b"a"], {"offsets": np.zeros(4, np.uint64)}, TypeError, "format 'L'"),
    ("offsets_be", lambda: bytearray(9), lambda: [b"a"], {"offsets": np.zeros(4, ">i8")}, TypeError, "'>q'"),
    ("offsets_bytearray", lambda: bytearray(9), lambda: [b"a"], {"offsets": bytearray(64)}, TypeError, "format 'B'"),
    (
        "offsets_ro",
        lambda: bytearray(9),
        lambda: [b"a"],
        {"offsets": np.frombuffer(bytes(32), np.int64)},
        TypeError,
        "offsets is read-only",
    ),
    (
        "offsets_strided",
        lambda: bytearray(9),
        lambda: [b"a"],
        {"offsets": np.zeros(8, np.int64)[::2]},
        BufferError,
        "offsets is not C-contiguous",
    ),
    (
        "offsets_list",
        lambda: bytearray(9),
        lambda: [b"a"],
        {"offsets": [0, 0]},
        TypeError,
        "offsets must be a writable C-contiguous int64 buffer, not 'list'",
    ),
    # The first failing check wins, in the documented order.
    ("order_srcs_before_dst", lambda: b"ro", lambda: 5, {}, TypeError, "not iterable"),
    ("order_dst_before_sources", lambda: np.zeros(8)[::2], lambda: [5], {}, BufferError, "dst is not"),
    (
        "order_sources_before_offsets",
        lambda: bytearray(9),
        lambda: [5],
        {"offsets": np.zeros(1, np.int32)},
        TypeError,
        "srcs[0]",
    ),
    (
        "order_offsets_before_size",
        lambda: bytearray(0),
        lambda: [b"a"],
        {"offsets": np.zeros(1, np.int64)},
        ValueError,
        "offsets has 1 elements",
    ),
    (
        "order_item_size_before_size",
        lambda: bytearray(0),
        lambda: [b"a", b"bc"],
        {"item_size": 1},
        ValueError,
        "srcs[1] has 2 bytes",
    ),
]


@pytest.mark.parametrize(("dst_f", "srcs_f", "kw", "exc", "msg"), [pytest.param(*e[1:], id=e[0]) for e in ERRORS])
def test_errors_match_and_write_nothing(
    dst_f: Callable[[], Any], srcs_f: Callable[[], Any], kw: dict[str, Any], exc: type[Exception], msg: str
) -> None:
    got = []
    for fn in (gather, gather_py):
        dst = dst_f()
        offsets: Any = kw.get("offsets")
        before = bytes(memoryview(dst).tobytes()) if _has_buffer(dst) else None
        offsets_before = memoryview(offsets).tobytes() if _has_buffer(offsets) else None
        with pytest.raises(exc) as info:
            fn(dst, srcs_f(), **kw)
        assert msg in str(info.value)
        if before is not None:
            assert memoryview(dst).tobytes() == before
        if offsets_before is not None:
            assert memoryview(offsets).tobytes() == offsets_before
        got.append((type(info.value), str(info.value)))
    assert got[0] == got[1]


def _has_buffer(obj: Any) -> bool:
    try:
        memoryview(obj).release()
    except TypeError:
        return False
    return True


@pytest.mark.parametrize("fn", IMPLS)
def test_readonly_mmap_dst_and_mmap_sources(fn: GatherFn, anon_mmap: Callable[[int], mmap.mmap]) -> None:
    m = anon_mmap(64)
    m[:6] = b"abcdef"
    ro = mmap.mmap(-1, 16, prot=mmap.PROT_READ)
    try:
        with pytest.raises(TypeError, match="dst is read-only"):
            fn(ro, [b"a"])
    finally:
        ro.close()
    out = bytearray(8)
    with memoryview(m) as mv:
        assert fn(out, [mv[4:6], m[0:2], mv[0:4]]) == 8
    assert out == b"efababcd"
    assert fn(m, [b"XY"], dst_offset=62) == 2  # an mmap as dst, up to its last byte
    assert m[60:64] == b"\0\0XY"


def test_native_argument_passing() -> None:
    """The binding itself: positional, None for offsets and item_size; and its constant."""
    d = bytearray(3)
    assert _native.gather(d, [b"abc"], 0, None, None, 1) == 3 and d == b"abc"
    assert MAX_THREADS == _native.GATHER_MAX_THREADS >= 2


# ---------------------------------------------------------------------------------------------
# Large copies: threads, and other Python threads keep running


@pytest.fixture(scope="module")
def big_sources() -> list[np.ndarray]:
    """Five sources of 40 MiB each (200 MiB), with distinct contents, cut at odd sizes."""
    base = np.arange(10 << 20, dtype=np.uint32).view(np.uint8)
    return [np.roll(base, i)[: (40 << 20) - 3 * i] for i in range(5)]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_big_copy(threads: int) -> None:
    """64 MiB (+ a few bytes) from sources of uneven sizes; the threads cut inside sources."""
    rng = np.random.default_rng(threads)
    sizes = [(8 << 20) + 1, 3, (20 << 20) - 7, 0, (36 << 20) + 5]
    srcs = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    total = sum(sizes)
    dst = np.zeros(total + 10, dtype=np.uint8)
    offsets = np.empty(len(srcs) + 1, dtype=np.int64)
    assert gather(dst, srcs, dst_offset=5, offsets=offsets, threads=threads) == total
    assert offsets.tolist() == [0, *np.cumsum(sizes).tolist()]
    assert np.array_equal(dst[5 : 5 + total], np.concatenate(srcs))
    assert not dst[:5].any() and not dst[5 + total :].any()


def _ticks_inside(run: Callable[[], object]) -> int:
    """How often a Python counter thread ran in the middle half of `run()`."""
    ticks: list[float] = []
    stop = threading.Event()

    def counter() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())

    t = threading.Thread(target=counter)
    t.start()
    try:
        while not ticks:  # the counter is running
            time.sleep(0.001)
        t0 = time.perf_counter()
        run()
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join()
    lo, hi = t0 + (t1 - t0) / 4, t1 - (t1 - t0) / 4
    return sum(1 for x in ticks if lo < x < hi)


def test_gil_released_during_large_gather(big_sources: list[np.ndarray]) -> None:
    """A counter thread runs in the middle of a ~200 MiB native gather, and (the control) not
    in the middle of a copy of the same size that holds the GIL.

    Holding the GIL for the whole call, the counter could only run at its edges (a switch
    right before it starts or right after it returns, at most one switch interval, set to
    1 ms here, of the window). The native attempt is retried a few times in case the
    scheduler keeps the counter off the CPU for a whole copy on a busy machine.
    """
    total = sum(a.nbytes for a in big_sources)
    dst = np.empty(total, dtype=np.uint8)
    dst.fill(1)  # fault the pages in now, not inside the timed copies
    joined = np.concatenate(big_sources)
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        with dst.data as dmv, joined.data as jmv:

            def hold_gil() -> None:
                dmv[:] = jmv  # memoryview assignment: a memcpy with the GIL held

            assert _ticks_inside(hold_gil) == 0
        best = 0
        for _ in range(4):
            best = max(best, _ticks_inside(lambda: gather(dst, big_sources)))
            if best > 0:
                break
    finally:
        sys.setswitchinterval(old)
    assert best > 0
    assert np.array_equal(dst, joined)
