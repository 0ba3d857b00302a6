"""Columnar samples: fastfeed.read.columnar.scan_samples / gather_spans (native) and their references.

scan_samples is checked against reader.iter_samples (the grouping, the bytes of every field and
the error classes) on archives written by tarfile, fed whole, in chunks with carry-over, cut and
corrupted; native and reference must agree exactly everywhere (results, classes and messages).
gather_spans is checked against the concatenation of the slices and on every error case.
"""

from __future__ import annotations

import io
import mmap
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfeed import _native
from fastfeed.errors import CorruptShardError, ShardError, TruncatedShardError
from fastfeed.read import tario
from fastfeed.read.columnar import SampleScan, gather_spans, gather_spans_py, scan_samples, scan_samples_py
from fastfeed.read.reader import iter_samples

ScanFn = Callable[..., SampleScan]
IMPLS = [pytest.param(scan_samples, id="native"), pytest.param(scan_samples_py, id="python")]
GATHERS = [pytest.param(gather_spans, id="native"), pytest.param(gather_spans_py, id="python")]
FORMATS = [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
URL = "s3://bucket/shard-000.tar"

# A sample as a comparable value: (key, {ext: bytes}).
Flat = tuple[str, dict[str, bytes]]


# ---------------------------------------------------------------------------------------------
# Archives


def build(items: Sequence[tuple[str, str, Any]], fmt: int) -> bytes:
    """A tar archive of ("file", name, size) / ("dir", name, _) / ("symlink", name, target)."""
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=fmt) as tf:
        for i, (kind, name, arg) in enumerate(items):
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            fileobj = None
            if kind == "file":
                ti.size = arg
                fileobj = io.BytesIO((b"%d:" % i * (arg // 2 + 1))[:arg])  # distinct per member
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            else:
                ti.type = tarfile.SYMTYPE
                ti.linkname = arg
            try:
                tf.addfile(ti, fileobj)
            except ValueError:  # ustar: name too long; nothing was written
                continue
    return bio.getvalue()


class Archive(bytes):
    """Archive bytes that print as their recipe (hypothesis reports stay short)."""

    recipe: str

    def __repr__(self) -> str:
        return f"build({self.recipe})"


KEYS = [
    "a",
    "b",
    "s000001",
    "dir/a",
    "dir/sub.d/x",
    "dir/.hidden",
    "é日本/ключ",
    "k" * 120,
    "d" * 70 + "/" + "e" * 70,
    "x\udcff",
    "__meta__/a",
    "a__/b",
]
EXTS = ["bin", "cls", "json", "JPG", "jpg", "seg.png", "Tar.GZ", "txt", "", "ÉXT", "__key__"]
EXTRAS = [
    ("dir", "somedir", None),
    ("dir", "dir/sub.d", None),
    ("symlink", "a.lnk", "target"),
    ("symlink", "dir/a.jpg", "elsewhere"),
    ("file", "__meta__", 7),
    ("file", "__a.b__", 3),
    ("file", "noext", 5),
    ("file", "dir/noext", 0),
    ("file", "__x__/y.z", 2),
]
sizes = st.one_of(st.sampled_from([0, 1, 511, 512, 513, 4096]), st.integers(0, 1200))


@st.composite
def sample_items(draw: st.DrawFn) -> list[tuple[str, str, Any]]:
    """Samples of 1..4 members (keys that repeat, also non-consecutively), with extras between.

    One archive in six may repeat an extension in a sample (or have a sample follow one with
    the same key, which merges them), which is an error.
    """
    dup_ok = draw(st.integers(0, 5)) == 0
    items: list[tuple[str, str, Any]] = []
    last = None
    for _ in range(draw(st.integers(0, 7))):
        if draw(st.integers(0, 3)) == 0:
            items.append(draw(st.sampled_from(EXTRAS)))
        key = draw(st.sampled_from(KEYS if dup_ok else [k for k in KEYS if k != last]))
        last = key
        exts = draw(st.lists(st.sampled_from(EXTS), min_size=1, max_size=4))
        if not dup_ok:
            lowered = [e.lower() for e in exts]
            exts = [e for i, e in enumerate(exts) if e.lower() not in lowered[:i] and e != "__key__"] or ["bin"]
        for ext in exts:
            items.append(("file", f"{key}.{ext}", draw(sizes)))
            if draw(st.integers(0, 9)) == 0:
                items.append(draw(st.sampled_from(EXTRAS)))
    return items


@st.composite
def archives(draw: st.DrawFn) -> Archive:
    fmt = draw(st.sampled_from(FORMATS))
    items = draw(sample_items())
    archive = Archive(build(items, fmt))
    archive.recipe = f"{items!r}, {fmt}"
    return archive


# ---------------------------------------------------------------------------------------------
# Helpers


def flat(buf: Any, r: SampleScan) -> list[Flat]:
    """The samples of a scan as (key, {ext: bytes}); checks the shape of the result."""
    data = memoryview(buf).cast("B")
    assert isinstance(r.keys, list) and all(isinstance(k, str) for k in r.keys)
    out: list[Flat] = [(key, {}) for key in r.keys]
    for ext, rows in r.fields.items():
        assert isinstance(ext, str)
        assert rows.dtype == np.int64 and rows.shape == (len(r.keys), 2) and rows.flags.c_contiguous
        assert (rows[:, 0] != -1).any()  # only extensions some sample has
        for i, (off, size) in enumerate(rows.tolist()):
            if off == -1:
                assert size == 0
            else:
                assert off >= 0 and off + size <= len(data)
                out[i][1][ext] = bytes(data[off : off + size])
    return out


def expected(data: bytes) -> tuple[Any, ...]:
    """What reader.iter_samples makes of the whole buffer: ("ok", samples) or ("error", class)."""
    try:
        got = [
            (s["__key__"], {k: v for k, v in s.items() if k not in ("__key__", "__url__")})
            for s in iter_samples(URL, [(data, True)])
        ]
    except ShardError as exc:
        return ("error", type(exc))
    return ("ok", got)


def outcome(fn: ScanFn, buf: Any, pos: int = 0, **kw: Any) -> tuple[Any, ...]:
    """A comparable summary: the result, or the error class and message."""
    try:
        r = fn(buf, pos, url=URL, **kw)
    except ShardError as exc:
        assert exc.url == URL
        return ("error", type(exc), str(exc))
    fields = {ext: rows.tolist() for ext, rows in r.fields.items()}
    return ("ok", r.keys, list(fields.items()), r.next_pos, r.end, r.need)


def both(buf: Any, pos: int = 0, **kw: Any) -> tuple[Any, ...]:
    """Outcome of both implementations, which must be identical."""
    native = outcome(scan_samples, buf, pos, **kw)
    ref = outcome(scan_samples_py, buf, pos, **kw)
    assert native == ref
    if native[0] == "ok":
        assert pos <= native[3] <= len(memoryview(buf).cast("B"))
    return native


def feed(fn: ScanFn, data: bytes, chunk_sizes: Sequence[int], max_samples: int | None = None) -> Iterator[Flat]:
    """Feed ``data`` in chunks like a streaming reader: keep buf[next_pos:], append, rescan."""
    pending = b""
    start = 0
    i = 0
    while True:
        size = chunk_sizes[i % len(chunk_sizes)]
        i += 1
        chunk = data[start : start + size]
        start += size
        final = start >= len(data)
        buf = pending + chunk
        pos = 0
        while True:
            r = fn(buf, pos, final=final, max_samples=max_samples)
            yield from flat(buf, r)
            assert pos <= r.next_pos <= len(buf)
            pos = r.next_pos
            if r.end:
                return
            if max_samples is None or len(r.keys) < max_samples:
                break  # everything complete in buf has been returned
        if final:
            return
        pending = buf[pos:]


# ---------------------------------------------------------------------------------------------
# Whole buffers: the grouping of reader.iter_samples


@SETTINGS
@given(data=archives())
def test_whole_buffer_matches_iter_samples(data: bytes) -> None:
    exp = expected(data)
    got = both(data, final=True)
    if exp[0] == "error":
        assert got[0] == "error" and got[1] is exp[1]
        return
    assert got[0] == "ok"
    r = scan_samples(data, final=True)
    assert flat(data, r) == exp[1]
    tar = tario.scan(data, final=True)
    assert r.end and r.next_pos == tar.next_pos
    # Not final: the end-of-archive marker completes the last sample all the same.
    assert both(data) == got
    # Any buffer type, and pos past a junk prefix (offsets stay absolute).
    shifted = scan_samples(np.frombuffer(b"junk" * 300 + data, np.uint8), 1200, final=True)
    assert shifted.keys == r.keys
    for ext, rows in r.fields.items():
        moved = rows + np.where(rows[:, :1] == -1, 0, [[1200, 0]])
        assert np.array_equal(shifted.fields[ext], moved)


@SETTINGS
@given(data=archives(), chunk_sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=6))
def test_incremental_equals_one_shot(data: bytes, chunk_sizes: list[int]) -> None:
    exp = expected(data)
    for fn in (scan_samples, scan_samples_py):
        if exp[0] == "error":
            with pytest.raises(exp[1]):
                list(feed(fn, data, chunk_sizes))
        else:
            assert list(feed(fn, data, chunk_sizes)) == exp[1]


@SETTINGS
@given(
    data=archives(),
    chunk_sizes=st.lists(st.integers(500, 6000), min_size=1, max_size=4),
    max_samples=st.integers(1, 3),
)
def test_incremental_with_max_samples(data: bytes, chunk_sizes: list[int], max_samples: int) -> None:
    exp = expected(data)
    if exp[0] == "error":
        with pytest.raises(exp[1]):
            list(feed(scan_samples, data, chunk_sizes, max_samples))
    else:
        assert list(feed(scan_samples, data, chunk_sizes, max_samples)) == exp[1]


@SETTINGS
@given(data=archives(), max_samples=st.integers(0, 8), final=st.booleans(), cut=st.floats(0, 1))
def test_max_samples(data: bytes, max_samples: int, final: bool, cut: float) -> None:
    full = both(data, final=True)
    got = both(data, final=final, max_samples=max_samples)
    if full[0] == "error":
        # An error inside the first max_samples samples (or the member after them) still raises.
        if got[0] == "error":
            assert got[1] is full[1]
        return
    r = scan_samples(data, final=final, max_samples=max_samples)
    whole = flat(data, scan_samples(data, final=True))
    assert flat(data, r) == whole[:max_samples]
    assert r.end == (len(whole) <= max_samples)
    # Resuming at next_pos gives the rest.
    assert flat(data, scan_samples(data, r.next_pos, final=True)) == whole[len(r.keys) :]
    # Cut buffers too: native and reference agree.
    both(data[: int(cut * len(data))], final=final, max_samples=max_samples)


# ---------------------------------------------------------------------------------------------
# Truncated and corrupted buffers


@SETTINGS
@given(data=archives(), cut=st.floats(0, 1))
def test_truncated(data: bytes, cut: float) -> None:
    c = int(cut * len(data))
    head = data[:c]
    whole = expected(data)
    # final: what iter_samples makes of the cut object (an empty object aside).
    got = both(head, final=True)
    if c == 0:
        assert got == ("ok", [], [], 0, False, 0)
    else:
        exp = expected(head)
        if exp[0] == "error":
            assert got[0] == "error" and got[1] is exp[1]
        else:
            assert flat(head, scan_samples(head, final=True)) == exp[1]
    # Not final: a prefix of the samples, and resuming at next_pos on the whole buffer gives
    # the rest.
    got = both(head)
    if whole[0] == "error":
        return
    if got[0] == "error":  # a duplicate extension inside the cut
        assert got[1] is CorruptShardError and "duplicate file" in got[2]
        return
    r = scan_samples(head)
    part = flat(head, r)
    assert part == whole[1][: len(part)]
    assert flat(data, scan_samples(data, r.next_pos, final=True)) == whole[1][len(part) :]


@SETTINGS
@given(data=archives(), cut=st.floats(0, 1), cut2=st.floats(0, 1))
def test_known_size(data: bytes, cut: float, cut2: float) -> None:
    """With the object's size, a header that claims more bytes than the object has raises at
    once (what a final scan of the whole object raises); nothing else changes. The buffer
    length a resumed scan needs is past the buffer whenever the scan ran out of bytes."""
    c = int(cut * len(data))
    obj = data[:c]
    d = int(cut2 * c)
    early = both(obj[:d], size=c)
    if early[0] == "error" and early[1] is TruncatedShardError:
        assert early == both(obj, final=True)
    else:
        assert early == both(obj[:d])
    plain = both(data[:d], size=len(data))
    assert plain == both(data[:d])
    if plain[0] == "ok" and not plain[4]:
        assert plain[5] > d


@SETTINGS
@given(
    data=archives(),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4),
    final=st.booleans(),
    max_samples=st.one_of(st.none(), st.integers(0, 4)),
)
def test_corrupted_bytes_agree(
    data: bytes, flips: list[tuple[float, int]], final: bool, max_samples: int | None
) -> None:
    if not data:
        return
    buf = bytearray(data)
    for where, value in flips:
        buf[min(int(where * len(buf)), len(buf) - 1)] = value
    corrupt = bytes(buf)
    got = both(corrupt, final=True)
    exp = expected(corrupt)
    if exp[0] == "error":
        assert got[0] == "error" and got[1] is exp[1]
    else:
        assert flat(corrupt, scan_samples(corrupt, final=True)) == exp[1]
    both(corrupt, final=final, max_samples=max_samples)
    both(corrupt[: len(corrupt) // 2], final=final, max_samples=max_samples)


def raw_entry(name: bytes, data: bytes = b"", typeflag: bytes = b"0") -> bytes:
    """A ustar member with any name bytes (no tarfile involved)."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[124:136] = b"%011o\0" % len(data)
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + data + bytes(-len(data) % 512)


def test_errors() -> None:
    dup = raw_entry(b"a.txt", b"1") + raw_entry(b"a.TXT", b"2")
    cases: list[tuple[bytes, dict[str, Any], type[ShardError], str]] = [
        (dup + bytes(1024), {"final": True}, CorruptShardError, "duplicate file 'a.TXT' in sample 'a'"),
        (dup, {}, CorruptShardError, "duplicate file 'a.TXT'"),  # in the incomplete sample too
        (raw_entry(b"a.__key__", b"x") + bytes(1024), {}, CorruptShardError, "duplicate file 'a.__key__'"),
        (raw_entry(b"a.__URL__", b"x") + bytes(1024), {}, CorruptShardError, "duplicate file 'a.__URL__'"),
        (raw_entry(b"a.x", b"1" * 200)[:600], {"final": True}, TruncatedShardError, "ends inside the data"),
        (raw_entry(b"a.x")[:100], {"final": True}, TruncatedShardError, "ends inside a tar header"),
        (b"\x01" * 512, {}, CorruptShardError, "checksum"),
        # A tar error wins over a duplicate before it (iter_samples scans a chunk first).
        (dup + b"\x01" * 512, {}, CorruptShardError, "checksum"),
    ]
    for data, kw, cls, message in cases:
        for fn in (scan_samples, scan_samples_py):
            with pytest.raises(cls, match=message.replace("(", r"\(")) as info:
                fn(data, url=URL, **kw)
            assert info.value.url == URL
    # The duplicate message is reader.iter_samples's.
    with pytest.raises(CorruptShardError) as ref:
        list(iter_samples(URL, [(dup + bytes(1024), True)]))
    with pytest.raises(CorruptShardError) as got:
        scan_samples(dup + bytes(1024), url=URL)
    assert str(got.value) == str(ref.value)
    # max_samples stops before the bad bytes: nothing after the member that stops it is read.
    good = raw_entry(b"a.x", b"1") + raw_entry(b"b.x", b"2")
    for tail in (b"\x01" * 512, raw_entry(b"b.x", b"3"), raw_entry(b"c.x", b"123")[:520]):
        assert both(good + tail, final=True, max_samples=1) == ("ok", ["a"], [("x", [[512, 1]])], 1024, False, 1024)


def test_argument_errors() -> None:
    data = raw_entry(b"a.x", b"1") + bytes(1024)
    for fn in (scan_samples, scan_samples_py):
        with pytest.raises(ValueError, match=r"pos=2049 is outside the buffer \(0..2048\)"):
            fn(data, 2049)
        with pytest.raises(ValueError, match="pos=-1"):
            fn(data, -1)
        with pytest.raises(TypeError):
            fn(data, 1.0)
        with pytest.raises(ValueError, match="max_samples must be >= 0 or None, got -1"):
            fn(data, max_samples=-1)
        with pytest.raises(TypeError):
            fn(data, max_samples=1.5)
        with pytest.raises(TypeError):
            fn("not a buffer")
        assert fn(data, max_samples=2**70).keys == ["a"]
        assert fn(data, 1536).keys == []


# ---------------------------------------------------------------------------------------------
# Names: the split of keys.split_key, on bytes


_NAME_CHARS = "ab._/\nAZΣKİé日"
name_st = st.one_of(
    st.text(alphabet=_NAME_CHARS, min_size=1, max_size=12),
    st.sampled_from(["__", "___", "____", "__a__\n", "__a__/b.c", "a/__b__/c.d", "_.x", ".x", "a/.x", "a.b/.c"]),
    st.tuples(st.text(alphabet=_NAME_CHARS, min_size=1, max_size=8), st.sampled_from(["\udcff", ".\udc80X"])).map(
        "".join
    ),
)


@settings(SETTINGS, max_examples=100)
@given(names=st.lists(name_st, min_size=1, max_size=12), fmt=st.sampled_from(FORMATS))
def test_names_split_like_split_key(names: list[str], fmt: int) -> None:
    # A separator sample between names, so that each forms its own sample (or none).
    items: list[tuple[str, str, Any]] = []
    for i, name in enumerate(names):
        items += [("file", name.rstrip("/") or "x", 3), ("file", f"sep{i}.sep", 1)]
    data = build(items, fmt)
    exp = expected(data)
    got = both(data, final=True)
    if exp[0] == "error":
        assert got[0] == "error" and got[1] is exp[1]
    else:
        assert flat(data, scan_samples(data, final=True)) == exp[1]


def test_non_ascii_extensions_lower_like_python() -> None:
    # "K" (Kelvin sign) lowers to ASCII "k"; "Σ" lowers by context; "İ" to two characters.
    names = ["a.\u212a", "b.JPΣ", "b.XΣy", "c.İ", "d.\udcffX"]
    data = b"".join(raw_entry(n.encode("utf-8", "surrogateescape"), b"v") for n in names) + bytes(1024)
    r = both(data)
    assert r[0] == "ok"
    assert [ext for ext, _ in r[2]] == ["k", "jp\u03c2", "x\u03c3y", "i\u0307", "\udcffx"]
    # Two spellings of one extension in a sample are a duplicate, as in iter_samples.
    data = raw_entry(b"a.k", b"1") + raw_entry("a.\u212a".encode(), b"2") + bytes(1024)
    assert both(data)[1] is CorruptShardError
    assert expected(data)[1] is CorruptShardError


def test_prefix_names_and_extension_headers() -> None:
    """ustar prefix names, GNU long names and pax paths; next_pos lands on the first header."""
    long_key = "p" * 90 + "/" + "q" * 60
    for fmt in FORMATS:
        other = "y" * 60 + "/" + "z" * 90
        items = [("file", f"{long_key}.bin", 10), ("file", f"{long_key}.cls", 1), ("file", f"{other}.x", 2)]
        data = build(items, fmt)
        r = both(data, final=True)
        assert r[0] == "ok" and r[1] == [long_key, other]
        members = tario.scan(data).members
        # The first sample is complete once the headers of the first member of the next are
        # (its name is the next sample's key), before that member's data.
        assert both(data[: members[2][1] - 1])[1] == []
        head = both(data[: members[2][1]])  # the second sample is incomplete
        assert head[1] == [long_key]
        assert head == both(data[: members[2][1] + 511])
        # next_pos is where a scan that stops before the "z" member resumes.
        assert head[3] == tario.scan(data[: members[2][1] - 1]).next_pos


def test_buffer_types(tmp_path: Any) -> None:
    data = build([("file", "a.x", 3), ("file", "b.x", 600)], tarfile.GNU_FORMAT)
    ref = both(data, final=True)
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert both(m, final=True) == ref
    for buf in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert both(buf, final=True) == ref
    assert both(b"", final=True) == ("ok", [], [], 0, False, 0)
    assert both(bytes(1024)) == ("ok", [], [], 0, True, 0)


def test_native_binding() -> None:
    data = raw_entry(b"a.x", b"12") + bytes(1024)
    keys, fields, next_pos, end, err, dup, need = _native.scan_samples(data, 0, True, -1)
    assert (keys, next_pos, end, err, dup, need) == (["a"], 1024, True, None, None, 1024)
    assert list(fields) == ["x"] and np.frombuffer(fields["x"], np.int64).tolist() == [512, 2]


# ---------------------------------------------------------------------------------------------
# gather_spans


def concat(src: bytes, spans: np.ndarray) -> bytes:
    return b"".join(src[off : off + size] for off, size in spans.tolist() if off != -1)


@settings(SETTINGS, max_examples=150)
@given(
    src=st.binary(max_size=3000),
    rows=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.booleans()), max_size=12),
    dst_offset=st.integers(0, 20),
    slack=st.integers(0, 10),
    with_offsets=st.booleans(),
    dst_kind=st.sampled_from(["bytearray", "numpy", "numpy_f4", "memoryview"]),
)
def test_gather_spans_concatenates(
    src: bytes,
    rows: list[tuple[float, float, bool]],
    dst_offset: int,
    slack: int,
    with_offsets: bool,
    dst_kind: str,
) -> None:
    n = len(src)
    spans = np.array(
        [(-1, 0) if absent else (int(a * n), int(b * (n - int(a * n)))) for a, b, absent in rows], dtype=np.int64
    ).reshape(-1, 2)
    want = concat(src, spans)
    size = (dst_offset + len(want) + slack + 3) // 4 * 4
    results = []
    for fn in (gather_spans, gather_spans_py):
        backing = bytearray(b"\xee" * size)
        dst: Any = {
            "bytearray": backing,
            "numpy": np.frombuffer(backing, np.uint8),
            "numpy_f4": np.frombuffer(backing, np.float32).reshape(-1, 1),
            "memoryview": memoryview(backing),
        }[dst_kind]
        offsets = np.full(len(spans) + 3, -7, dtype=np.int64) if with_offsets else None
        assert fn(dst, src, spans, dst_offset=dst_offset, offsets=offsets) == len(want)
        assert backing[dst_offset : dst_offset + len(want)] == want
        assert backing[:dst_offset] == b"\xee" * dst_offset
        assert backing[dst_offset + len(want) :] == b"\xee" * (size - dst_offset - len(want))
        if offsets is not None:
            sizes = [s for _, s in spans.tolist()]
            assert offsets.tolist() == [0, *np.cumsum(sizes, dtype=np.int64).tolist(), -7, -7]
        results.append((bytes(backing), None if offsets is None else offsets.tolist()))
    assert results[0] == results[1]


@pytest.mark.parametrize("fn", GATHERS)
def test_gather_spans_of_a_scan(fn: Callable[..., int]) -> None:
    """The intended use: one field of every sample into one arena, with offsets."""
    items = [("file", f"s{i:03d}.{ext}", 100 + i) for i in range(20) for ext in ("bin", "cls")]
    items.insert(5, ("file", "s001.json", 3))
    data = build(items, tarfile.PAX_FORMAT)
    r = scan_samples(data, final=True)
    for ext, rows in r.fields.items():
        arena = np.zeros(int(rows[:, 1].sum()), np.uint8)
        offsets = np.empty(len(rows) + 1, np.int64)
        assert fn(arena, data, rows, offsets=offsets) == arena.nbytes
        samples = list(iter_samples(URL, [(data, True)]))
        assert [s["__key__"] for s in samples] == r.keys
        for i, sample in enumerate(samples):
            assert arena[offsets[i] : offsets[i + 1]].tobytes() == sample.get(ext, b"")
        # A row slice of the field array is still C-contiguous.
        assert fn(arena, data, rows[3:7]) == int(rows[3:7, 1].sum())


@pytest.mark.parametrize("fn", GATHERS)
def test_gather_spans_overlapping_and_large(fn: Callable[..., int]) -> None:
    d = bytearray(b"abcdefgh")
    assert fn(d, d, np.array([[0, 4], [0, 2]], np.int64), dst_offset=2) == 6
    assert d == b"ababcdab"  # span after span, each as src is at that moment
    big = np.arange(1 << 18, dtype=np.uint32).view(np.uint8)  # 1 MiB: the GIL-free path
    spans = np.array([[i * 4096, 4096] for i in range(255, -1, -1)], np.int64)
    out = np.zeros(big.nbytes, np.uint8)
    assert fn(out, big, spans) == big.nbytes
    assert np.array_equal(out.reshape(256, -1), big.reshape(256, -1)[::-1])


def _ro_np() -> np.ndarray:
    a = np.zeros(8, np.uint8)
    a.flags.writeable = False
    return a


def _spans(*rows: tuple[int, int]) -> np.ndarray:
    return np.array(rows, np.int64).reshape(-1, 2)


def B8() -> bytearray:  # short: the table below stays readable
    return bytearray(8)


GATHER_ERRORS: list[Any] = [
    # (id, dst, src, spans, kwargs, class, message part)
    ("dst_bytes", lambda: b"xxxx", b"ab", _spans(), {}, TypeError, "dst is read-only"),
    ("dst_ro_np", _ro_np, b"ab", _spans(), {}, TypeError, "dst is read-only"),
    ("dst_int", lambda: 3, b"ab", _spans(), {}, TypeError, "dst must be a writable C-contiguous buffer, not 'int'"),
    ("dst_strided", lambda: np.zeros(8, np.uint8)[::2], b"ab", _spans(), {}, BufferError, "dst is not C-contiguous"),
    ("src_int", B8, 5, _spans(), {}, TypeError, "src must be a C-contiguous buffer, not 'int'"),
    ("src_strided", B8, np.zeros(8, np.uint8)[::2], _spans(), {}, BufferError, "src is not C-contiguous"),
    ("spans_list", B8, b"ab", [[0, 1]], {}, TypeError, "spans must be a C-contiguous int64 buffer, not 'list'"),
    ("spans_i4", B8, b"ab", np.zeros((1, 2), np.int32), {}, TypeError, "got format 'i' with itemsize 4"),
    ("spans_u8", B8, b"ab", np.zeros((1, 2), np.uint64), {}, TypeError, "format 'L'"),
    ("spans_be", B8, b"ab", np.zeros((1, 2), ">i8"), {}, TypeError, "'>q'"),
    ("spans_1d", B8, b"ab", np.zeros(4, np.int64), {}, ValueError, "spans must have shape [n, 2], got (4,)"),
    ("spans_n3", B8, b"ab", np.zeros((2, 3), np.int64), {}, ValueError, "got (2, 3)"),
    ("spans_0d", B8, b"ab", np.zeros((), np.int64), {}, ValueError, "got ()"),
    ("spans_strided", B8, b"ab", np.zeros((4, 2), np.int64)[::2], {}, BufferError, "spans is not C-contiguous"),
    ("spans_fortran", B8, b"ab", np.zeros((2, 2), np.int64, order="F"), {}, BufferError, "spans is not"),
    ("past_end", B8, b"ab", _spans((0, 1), (1, 2)), {}, ValueError, "spans[1] = (1, 2) is outside src (2 bytes)"),
    ("negative_off", B8, b"ab", _spans((-2, 0)), {}, ValueError, "spans[0] = (-2, 0) is outside"),
    ("absent_with_size", B8, b"ab", _spans((-1, 1)), {}, ValueError, "spans[0] = (-1, 1) is outside"),
    ("negative_size", B8, b"ab", _spans((1, -1)), {}, ValueError, "spans[0] = (1, -1) is outside"),
    ("huge", B8, b"ab", _spans((2**62, 2**62)), {}, ValueError, "is outside src"),
    (
        "too_small",
        lambda: bytearray(2),
        b"abc",
        _spans((0, 3)),
        {},
        ValueError,
        "dst too small: needs 3 bytes (dst_offset 0 + 3 from 1 spans), has 2",
    ),
    (
        "too_small_offset",
        lambda: bytearray(4),
        b"abc",
        _spans((0, 3), (-1, 0)),
        {"dst_offset": 2},
        ValueError,
        "needs 5 bytes (dst_offset 2 + 3 from 2 spans), has 4",
    ),
    ("dst_offset_neg", B8, b"", _spans(), {"dst_offset": -1}, ValueError, "dst_offset must be in 0.."),
    ("dst_offset_float", B8, b"", _spans(), {"dst_offset": 1.0}, TypeError, "float"),
    (
        "offsets_short",
        B8,
        b"ab",
        _spans((0, 1)),
        {"offsets": np.zeros(1, np.int64)},
        ValueError,
        "offsets has 1 elements, needs at least 2 (len(spans) + 1)",
    ),
    ("offsets_i4", B8, b"ab", _spans(), {"offsets": np.zeros(4, np.int32)}, TypeError, "offsets must hold int64"),
    (
        "offsets_ro",
        B8,
        b"ab",
        _spans(),
        {"offsets": np.frombuffer(bytes(16), np.int64)},
        TypeError,
        "offsets is read-only",
    ),
    # The first failing check wins, in the documented order.
    ("order_dst_before_src", lambda: b"ro", 5, [], {}, TypeError, "dst is read-only"),
    ("order_src_before_spans", B8, 5, [], {}, TypeError, "src must be"),
    ("order_spans_before_offsets", B8, b"", [], {"offsets": 5}, TypeError, "spans must be"),
    ("order_offsets_before_rows", B8, b"", _spans((9, 9)), {"offsets": 5}, TypeError, "offsets must be"),
    ("order_rows_before_size", lambda: bytearray(0), b"ab", _spans((0, 2), (5, 0)), {}, ValueError, "spans[1]"),
]


@pytest.mark.parametrize(
    ("dst_f", "src", "spans", "kw", "exc", "msg"), [pytest.param(*e[1:], id=e[0]) for e in GATHER_ERRORS]
)
def test_gather_spans_errors_match_and_write_nothing(
    dst_f: Callable[[], Any], src: Any, spans: Any, kw: dict[str, Any], exc: type[Exception], msg: str
) -> None:
    got = []
    for fn in (gather_spans, gather_spans_py):
        dst = dst_f()
        before = dst.tobytes() if isinstance(dst, np.ndarray) else bytes(dst) if isinstance(dst, bytearray) else None
        offsets = kw.get("offsets")
        offsets_before = offsets.tobytes() if isinstance(offsets, np.ndarray) else None
        with pytest.raises(exc) as info:
            fn(dst, src, spans, **kw)
        assert msg in str(info.value)
        if before is not None:
            assert bytes(dst) == before
        if offsets_before is not None:
            assert kw["offsets"].tobytes() == offsets_before
        got.append((type(info.value), str(info.value)))
    assert got[0] == got[1]
