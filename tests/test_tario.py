"""Tar member indexing: fastfeed.read.tario.scan (native) and scan_py (reference).

Both implementations are checked against Python's tarfile and GNU tar on valid archives, and
against each other (results, error classes and messages) on truncated, corrupted and fuzzed
input.
"""

from __future__ import annotations

import io
import mmap
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfeed import _native
from fastfeed.errors import CorruptShardError, ShardError, TruncatedShardError
from fastfeed.read import tario
from fastfeed.read.tario import ScanResult, scan, scan_py

ScanFn = Callable[..., ScanResult]
IMPLS = [pytest.param(scan, id="native"), pytest.param(scan_py, id="python")]
FORMATS = [
    pytest.param(tarfile.GNU_FORMAT, id="gnu"),
    pytest.param(tarfile.PAX_FORMAT, id="pax"),
    pytest.param(tarfile.USTAR_FORMAT, id="ustar"),
]
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
URL = "s3://bucket/shard-000.tar"


# ---------------------------------------------------------------------------------------------
# Helpers


def padded(n: int) -> int:
    return (n + 511) // 512 * 512


def content(size: int) -> bytes:
    return (b"0123456789abcdef\xff" * (size // 17 + 1))[:size]


def outcome(fn: ScanFn, buf: Any, pos: int = 0, final: bool = False, **kw: Any) -> tuple[Any, ...]:
    """A comparable summary: the result, or the error class and message."""
    try:
        r = fn(buf, pos, final=final, url=URL, **kw)
    except ShardError as exc:
        assert exc.url == URL
        return ("error", type(exc), str(exc))
    return ("ok", r.members, r.next_pos, r.end, r.need)


def both(buf: Any, pos: int = 0, final: bool = False, **kw: Any) -> tuple[Any, ...]:
    """Outcome of both implementations, which must be identical and well-formed."""
    native = outcome(scan, buf, pos, final, **kw)
    ref = outcome(scan_py, buf, pos, final, **kw)
    assert native == ref
    if native[0] == "ok":
        n = len(memoryview(buf).cast("B"))
        _, members, next_pos, end, need = native
        assert pos <= next_pos <= n
        assert not end or next_pos + 512 <= n
        # need: past the end of the buffer exactly when the scan ran out of bytes
        assert need == next_pos if (end or final) else need > n
        for name, off, size in members:
            assert isinstance(name, str)
            assert pos + 512 <= off and off + size <= n
    return native


def tar_listing(data: bytes) -> tuple[list[tarfile.TarInfo], int]:
    """All members tarfile sees and the offset of its end-of-archive marker."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        infos = tf.getmembers()
        return infos, tf.offset


def tar_regular(data: bytes) -> list[tuple[str, int, int]]:
    infos, _ = tar_listing(data)
    return [(m.name, m.offset_data, m.size) for m in infos if m.isreg()]


def data_len(m: tarfile.TarInfo) -> int:
    return m.size if m.isreg() or m.type not in tarfile.SUPPORTED_TYPES else 0


def fix_checksum(h: bytearray, *, signed: bool = False) -> bytes:
    h[148:156] = b" " * 8
    total = sum(b - 256 if signed and b >= 128 else b for b in h)
    assert total >= 0
    h[148:156] = b"%06o\0 " % total
    return bytes(h)


def raw_header(
    name: bytes = b"f.txt",
    typeflag: bytes = b"0",
    size: int = 0,
    *,
    size_field: bytes | None = None,
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
    linkname: bytes = b"",
    signed: bool = False,
) -> bytes:
    """A 512-byte header with a valid checksum (no tarfile involved)."""
    h = bytearray(512)
    h[0 : len(name[:100])] = name[:100]
    h[100:108] = b"0000644\0"
    h[108:116] = b"0001750\0"
    h[116:124] = b"0001750\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"14500000000\0"
    h[156:157] = typeflag
    h[157 : 157 + len(linkname[:100])] = linkname[:100]
    h[257 : 257 + len(magic[:8])] = magic[:8]
    h[345 : 345 + len(prefix[:155])] = prefix[:155]
    return fix_checksum(h, signed=signed)


def entry(name: bytes, data: bytes = b"", typeflag: bytes = b"0", **kw: Any) -> bytes:
    return raw_header(name, typeflag, len(data), **kw) + data + bytes(padded(len(data)) - len(data))


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def ext(payload: bytes, typeflag: bytes = b"x") -> bytes:
    return entry(b"././@PaxHeader", payload, typeflag)


END = bytes(1024)


# ---------------------------------------------------------------------------------------------
# Strategies: archives written by tarfile

_CHARS = "abcxyz019_-. =+éßΩ日本😀\u0301"
_short = st.text(alphabet=_CHARS, min_size=1, max_size=16)
_long = st.text(alphabet=_CHARS, min_size=40, max_size=130)
_component = st.one_of(_short, _short, _long) | st.tuples(_short, st.sampled_from(["\udcff", "\udc80x"])).map("".join)
names = st.tuples(st.lists(_component, min_size=1, max_size=6).map("/".join), st.sampled_from(["", "", "", "/"])).map(
    "".join
)
sizes = st.one_of(st.sampled_from([0, 1, 100, 511, 512, 513, 1023, 1024, 1025, 4096]), st.integers(0, 3000))
entries = st.lists(
    st.one_of(
        st.tuples(st.just("file"), names, sizes),
        st.tuples(st.just("file"), names, sizes),
        st.tuples(st.just("file"), names, sizes),
        st.tuples(st.sampled_from(["dir", "fifo", "chr"]), names, st.just(0)),
        st.tuples(st.sampled_from(["symlink", "hardlink"]), names, names),
    ),
    min_size=1,
    max_size=10,
)


def build_archive(items: Sequence[tuple[str, str, Any]], fmt: int, global_pax: bool = False) -> bytes:
    bio = io.BytesIO()
    extra: dict[str, Any] = {"pax_headers": {"comment": "global é"}} if global_pax else {}
    with tarfile.open(fileobj=bio, mode="w", format=fmt, **extra) as tf:
        for kind, name, arg in items:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            fileobj = None
            if kind == "file":
                ti.size = arg
                fileobj = io.BytesIO(content(arg))
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            elif kind == "chr":
                ti.type = tarfile.CHRTYPE
                ti.devmajor, ti.devminor = 1, 3
            else:
                ti.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                ti.linkname = arg
            try:
                tf.addfile(ti, fileobj)
            except ValueError:  # ustar: name or link name too long; nothing was written
                continue
    return bio.getvalue()


class Archive(bytes):
    """Archive bytes that print as the recipe (hypothesis reports stay short)."""

    recipe: str

    def __repr__(self) -> str:
        return f"build_archive({self.recipe})"


@st.composite
def archives(draw: st.DrawFn) -> Archive:
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]))
    global_pax = fmt == tarfile.PAX_FORMAT and draw(st.booleans())
    items = draw(entries)
    archive = Archive(build_archive(items, fmt, global_pax))
    archive.recipe = f"{items!r}, {fmt}, {global_pax}"
    return archive


# ---------------------------------------------------------------------------------------------
# Valid archives: same members as tarfile


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(items=entries, global_pax=st.booleans())
def test_matches_tarfile(fn: ScanFn, fmt: int, items: list[tuple[str, str, Any]], global_pax: bool) -> None:
    data = build_archive(items, fmt, global_pax and fmt == tarfile.PAX_FORMAT)
    expected = tar_regular(data)
    _, end_offset = tar_listing(data)
    for final in (False, True):
        r = fn(data, final=final)
        assert r.members == expected
        assert r.end and r.next_pos == end_offset
    # Any buffer type, and a leading junk prefix with pos pointing past it.
    shifted = fn(bytearray(b"junk" * 300 + data), 1200, final=True)
    assert shifted.members == [(n, off + 1200, s) for n, off, s in expected]


@pytest.mark.parametrize("fn", IMPLS)
@SETTINGS
@given(data=archives(), chunk_sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=8), junk=st.booleans())
def test_incremental_equals_one_shot(fn: ScanFn, data: bytes, chunk_sizes: list[int], junk: bool) -> None:
    whole = fn(data, final=True)
    members, end_at = scan_in_chunks(fn, data, chunk_sizes, junk=junk)
    assert members == whole.members
    assert end_at == whole.next_pos


def scan_in_chunks(
    fn: ScanFn, data: bytes, chunk_sizes: Sequence[int], *, junk: bool = False
) -> tuple[list[tuple[str, int, int]], int]:
    """Feed ``data`` in chunks the way a streaming reader does: keep buf[next_pos:], append."""
    members: list[tuple[str, int, int]] = []
    base = 0  # shard offset of pending[0]
    pending = b""
    start = 0
    i = 0
    while True:
        size = chunk_sizes[i % len(chunk_sizes)]
        i += 1
        chunk = data[start : start + size]
        start += size
        final = start >= len(data)
        lead = b"\xaa" * 7 if junk else b""  # pos > 0 with bytes before it
        buf = lead + pending + chunk
        r = fn(buf, len(lead), final=final)
        members += [(name, base + off - len(lead), n) for name, off, n in r.members]
        consumed = r.next_pos - len(lead)
        if r.end or final:
            return members, base + consumed
        base += consumed
        pending = buf[r.next_pos :]


@pytest.mark.parametrize("fn", IMPLS)
@SETTINGS
@given(data=archives(), cut=st.floats(0, 1), final=st.booleans())
def test_truncated(fn: ScanFn, data: bytes, cut: float, final: bool) -> None:
    c = int(cut * len(data))
    infos, end_offset = tar_listing(data)
    ends = [(m.offset_data + data_len(m), m.offset_data + padded(data_len(m))) for m in infos]
    boundaries = {0, end_offset} | {pend for _, pend in ends} | ({infos[0].offset} if infos else set())
    regular = [m for m in infos if m.isreg()]
    if final:
        clean = c >= end_offset or c in boundaries or any(d <= c <= p for d, p in ends)
        if not clean:
            with pytest.raises(TruncatedShardError, match="the object ends"):
                fn(data[:c], final=True, url=URL)
            return
        r = fn(data[:c], final=True)
        assert r.members == [(m.name, m.offset_data, m.size) for m in regular if m.offset_data + m.size <= c]
        assert r.next_pos == min(c, end_offset)
    else:
        r = fn(data[:c])
        assert r.members == [(m.name, m.offset_data, m.size) for m in regular if m.offset_data + padded(m.size) <= c]
        assert r.next_pos == max(b for b in boundaries if b <= c)
    assert r.end == (c >= end_offset + 512)


@SETTINGS
@given(data=archives(), cut=st.floats(0, 1))
def test_need_is_the_length_that_gets_a_scan_further(data: bytes, cut: float) -> None:
    """A scan that runs out of bytes names the buffer length that gets it further, and no less:
    a streaming reader copies exactly the bytes it needs and never rescans in vain."""
    c = int(cut * len(data))
    _, _, next_pos, end, need = both(data[:c])
    if end:
        return
    assert need > c
    if need - 1 <= len(data):  # one byte short: the same stop
        assert both(data[: need - 1], next_pos) == ("ok", [], next_pos, False, need)
    if need <= len(data):  # enough: members, the end, or a stop further on
        _, members, next2, end2, need2 = both(data[:need], next_pos)
        assert members or end2 or (next2, need2) > (next_pos, need)


@SETTINGS
@given(data=archives(), cut=st.floats(0, 1), cut2=st.floats(0, 1))
def test_a_known_size_makes_a_lying_header_an_error_at_once(data: bytes, cut: float, cut2: float) -> None:
    """With the object's size, a scan of any prefix raises as soon as a header claims more bytes
    than the object has, with the error a final scan of the whole object raises; otherwise it
    is the scan without the size."""
    c = int(cut * len(data))
    obj = data[:c]  # an object cut short somewhere
    d = int(cut2 * c)
    early = both(obj[:d], size=c)
    if early[0] == "error":
        assert early[1] is TruncatedShardError
        assert early == both(obj, final=True)
    else:
        assert early == both(obj[:d])
    assert both(data[:d], size=len(data)) == both(data[:d])  # a valid archive: no claim is a lie


@pytest.mark.parametrize("fn", IMPLS)
def test_a_header_claiming_a_terabyte(fn: ScanFn) -> None:
    ti = tarfile.TarInfo("big.bin")
    ti.size = 2**40
    lie = ti.tobuf(tarfile.GNU_FORMAT)
    data = entry(b"a.bin", content(1000)) + lie + content(5000)
    at = len(data) - 5000 - 512  # the lying header
    message = rf"inside the data of member 'big.bin' at offset {at} \(5000 of {2**40} bytes present\)"
    with pytest.raises(TruncatedShardError, match=message):
        fn(data[: at + 600], url=URL, size=len(data))
    # A buffer that starts later in the object: offsets are the object's.
    with pytest.raises(TruncatedShardError, match=message):
        fn(data[1536 : at + 1024], url=URL, base=1536, size=len(data))
    assert fn(data[: at + 600]).members == [("a.bin", 512, 1000)]  # without the size: wait for more
    for base, size in ((0, at + 599), (1, at + 600), (at + 601, at + 600)):
        with pytest.raises(ValueError, match="before"):
            fn(data[: at + 600], base=base, size=size)


# ---------------------------------------------------------------------------------------------
# Native and reference agree on anything


@SETTINGS
@given(
    data=archives(),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4),
    final=st.booleans(),
)
def test_corrupted_bytes_agree(data: bytes, flips: list[tuple[float, int]], final: bool) -> None:
    buf = bytearray(data)
    for where, value in flips:
        buf[min(int(where * len(buf)), len(buf) - 1)] = value
    both(bytes(buf), 0, final)
    both(bytes(buf[: len(buf) // 2]), 0, final)


@SETTINGS
@given(buf=st.binary(max_size=2048), final=st.booleans(), pos=st.integers(0, 2048))
def test_garbage_agrees(buf: bytes, final: bool, pos: int) -> None:
    both(buf, min(pos, len(buf)), final)
    both(bytes(512) + buf, 0, final)


def octal_fields(n: int) -> st.SearchStrategy[bytes]:
    """Valid ways to write ``n`` in a 12-byte size field."""
    return st.sampled_from(
        [
            b"%011o\0" % n,
            b"%011o " % n,
            b"%012o" % n,
            (b"  %o" % n).ljust(12, b"\0"),
            (b"%o" % n + b"\0x" * 6)[:12],
            b"\x80" + n.to_bytes(11, "big"),
        ]
    )


size_fields = st.one_of(
    st.binary(min_size=12, max_size=12),
    st.integers(0, 2**88 - 1).map(lambda n: b"\x80" + n.to_bytes(11, "big")),
    st.binary(min_size=11, max_size=11).map(lambda b: b"\xff" + b),
)
typeflags = st.sampled_from([b"0", b"\0", b"7", b"1", b"2", b"3", b"5", b"6", b"S", b"V", b"D", b"L", b"K", b"x"])
magics = st.sampled_from([b"ustar\x0000", b"ustar  \0", bytes(8), b"ustar\0xy"])
pax_keys = st.sampled_from([b"path", b"size", b"mtime", b"linkpath", b"GNU.sparse.major", b"hdrcharset", b"a"])
pax_values = st.one_of(st.binary(max_size=40), st.integers(0, 3000).map(lambda n: str(n).encode()), st.just(b""))


@st.composite
def pax_payloads(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        rec = pax_record(draw(pax_keys), draw(pax_values))
        mutation = draw(st.sampled_from(["none", "none", "none", "len+1", "len-1", "noeq", "nonl", "bytes"]))
        if mutation == "len+1":
            rec = str(int(rec.split(b" ")[0]) + 1).encode() + rec[rec.index(b" ") :]
        elif mutation == "len-1":
            rec = str(int(rec.split(b" ")[0]) - 1).encode() + rec[rec.index(b" ") :]
        elif mutation == "noeq":
            rec = rec.replace(b"=", b":", 1)
        elif mutation == "nonl":
            rec = rec[:-1] + b"x"
        elif mutation == "bytes":
            rec = draw(st.binary(max_size=30))
        parts.append(rec)
    if draw(st.booleans()):
        parts.append(bytes(draw(st.integers(1, 20))))
    return b"".join(parts)


@st.composite
def fuzz_buffers(draw: st.DrawFn) -> bytes:
    """Block sequences with valid checksums, so that parsing goes past the checksum."""
    parts: list[bytes] = []
    kinds = ["hdr"] * 8 + ["pax", "pax", "long", "zero", "partial", "junk"]
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(kinds))
        if kind == "hdr":
            n = draw(st.integers(0, 1500))
            choice = draw(st.integers(0, 19))
            if choice == 0:
                field = draw(size_fields)
            elif choice == 1:
                field = (b"%o" % n).ljust(12, b"9")[:12]  # digits, but no terminator
            else:
                field = draw(octal_fields(n))
            h = raw_header(
                draw(st.binary(max_size=100)),
                draw(typeflags),
                size_field=field,
                magic=draw(magics),
                prefix=draw(st.binary(max_size=155)),
            )
            if draw(st.integers(0, 19)) == 0:
                h = h[:148] + draw(st.binary(min_size=8, max_size=8)) + h[156:]
            data = bytes([draw(st.integers(1, 255))]) * n
            if draw(st.integers(0, 14)):
                data += bytes(padded(n) - n)
            parts.append(h + data)
        elif kind == "pax":
            payload = draw(pax_payloads())
            flag = draw(st.sampled_from([b"x", b"X", b"g"]))
            parts.append(entry(b"pax", payload, flag))
        elif kind == "long":
            parts.append(entry(b"././@LongLink", draw(st.binary(max_size=300)), draw(st.sampled_from([b"L", b"K"]))))
        elif kind == "zero":
            parts.append(bytes(512))
        elif kind == "partial":
            parts.append(bytes(draw(st.integers(1, 511))))
        else:
            parts.append(draw(st.binary(min_size=1, max_size=600)))
    return b"".join(parts)


@settings(SETTINGS, max_examples=200)
@given(buf=fuzz_buffers(), final=st.booleans(), cut=st.floats(0, 1))
def test_fuzz_agrees_and_is_prefix_consistent(buf: bytes, final: bool, cut: float) -> None:
    full = both(buf, 0, final)
    # Scanning a prefix and resuming at next_pos on the whole buffer gives the one-shot outcome.
    c = int(cut * len(buf))
    head = both(buf[:c], 0, False)
    if head[0] == "error":
        assert head == full
        return
    tail = both(buf, head[2], final)
    if tail[0] == "error":
        assert tail == full
    else:
        assert full == ("ok", head[1] + tail[1], tail[2], tail[3], tail[4])


# ---------------------------------------------------------------------------------------------
# GNU tar


def gnu_tar() -> str:
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("no tar binary")
    version = subprocess.run([tar, "--version"], capture_output=True, text=True, check=False).stdout
    if "GNU tar" not in version:
        pytest.skip("tar is not GNU tar")
    return tar


def make_tree(root: Path, *, long_names: bool = True) -> None:
    root.mkdir()
    (root / "small.txt").write_bytes(content(10))
    (root / "empty").write_bytes(b"")
    (root / "é日本.bin").write_bytes(content(513))
    sub = root / "a" / "b"
    sub.mkdir(parents=True)
    for size in (0, 511, 512, 513, 10_000):
        (sub / f"s{size}.dat").write_bytes(content(size))
    (root / "link").symlink_to("small.txt")
    (root / "hard").hardlink_to(root / "small.txt")
    if long_names:
        deep = root / ("d" * 60) / ("é" * 45) / ("f" * 99)
        deep.mkdir(parents=True)
        (deep / ("x" * 100 + ".jpg")).write_bytes(content(1500))
        (deep / "short.cls").write_bytes(b"7")
        (root / ("y" * 150 + ".txt")).write_bytes(content(3))
        (root / "longlink").symlink_to("z" * 200)


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar", "v7"])
def test_gnu_tar_archives(fn: ScanFn, fmt: str, tmp_path: Path) -> None:
    tar = gnu_tar()
    root = tmp_path / "root"
    make_tree(root, long_names=fmt in ("gnu", "pax"))
    if fmt == "v7":
        (root / "link").unlink()
        (root / "hard").unlink()
    out = tmp_path / "out.tar"
    subprocess.run([tar, f"--format={fmt}", "-cf", str(out), "-C", str(root), "."], check=True)
    data = out.read_bytes()
    expected = tar_regular(data)
    assert len(expected) >= 8
    assert any(len(name) > 255 for name, _, _ in expected) == (fmt in ("gnu", "pax"))
    r = fn(data, final=True)
    assert r.members == expected
    assert r.end
    for name, off, size in r.members:
        assert data[off : off + size] == (root / name).read_bytes()
    for size in (7, 511, 512, 513, 4099):
        assert scan_in_chunks(fn, data, [size]) == (expected, r.next_pos)


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_gnu_tar_sparse_is_rejected(fn: ScanFn, fmt: str, tmp_path: Path) -> None:
    tar = gnu_tar()
    root = tmp_path / "root"
    root.mkdir()
    with open(root / "sparse.bin", "wb") as f:
        f.truncate(1 << 20)
        f.seek(300_000)
        f.write(b"data")
    out = tmp_path / "out.tar"
    subprocess.run([tar, f"--format={fmt}", "-S", "-cf", str(out), "-C", str(root), "."], check=True)
    data = out.read_bytes()
    infos, _ = tar_listing(data)
    if not any(m.issparse() for m in infos):
        pytest.skip("GNU tar did not detect the holes on this file system")
    with pytest.raises(CorruptShardError, match="unsupported sparse member"):
        fn(data, final=True, url=URL)


def test_webdataset_writer() -> None:
    wds = pytest.importorskip("webdataset")
    bio = io.BytesIO()
    with wds.TarWriter(bio) as sink:
        for i in range(20):
            sink.write({"__key__": f"dir/sample{i:04d}", "jpg": content(i * 97), "cls": str(i)})
    data = bio.getvalue()
    expected = tar_regular(data)
    assert len(expected) == 40
    assert scan(data, final=True).members == expected == scan_py(data, final=True).members


# ---------------------------------------------------------------------------------------------
# Hand-made headers


@pytest.mark.parametrize("fn", IMPLS)
def test_edge_buffers(fn: ScanFn) -> None:
    # A scan that runs out of bytes says how far the buffer must reach to get any further.
    assert fn(b"") == ScanResult([], 0, False, 512)
    assert fn(b"", final=True) == ScanResult([], 0, False, 0)
    assert fn(bytes(100), final=True) == ScanResult([], 0, False, 0)  # a partial zero block
    assert fn(END) == ScanResult([], 0, True, 0)
    data = entry(b"a.txt", b"hello") + END
    assert fn(data, len(data)) == ScanResult([], len(data), False, len(data) + 512)
    assert fn(data, len(data), final=True) == ScanResult([], len(data), False, len(data))
    assert fn(data, 512 + 512) == ScanResult([], 1024, True, 1024)
    # No end marker: a clean end at a header boundary, as tarfile accepts.
    assert fn(data[:1024], final=True) == ScanResult([("a.txt", 512, 5)], 1024, False, 1024)
    # Padding cut off: accepted only when final.
    assert fn(data[:600], final=True) == ScanResult([("a.txt", 512, 5)], 600, False, 600)
    assert fn(data[:600]) == ScanResult([], 0, False, 1024)
    assert fn(data[:516]) == ScanResult([], 0, False, 1024)
    assert fn(data[:300]) == ScanResult([], 0, False, 512)
    with pytest.raises(TruncatedShardError, match=r"inside the data of member 'a.txt' at offset 0 \(4 of 5"):
        fn(data[:516], final=True)
    with pytest.raises(TruncatedShardError, match=r"inside a tar header at offset 0 \(100 of 512"):
        fn(b"x" * 100, final=True)
    for pos in (-1, len(data) + 1, 2**70):
        with pytest.raises(ValueError, match="outside the buffer"):
            fn(data, pos)


@pytest.mark.parametrize("fn", IMPLS)
def test_buffer_types(fn: ScanFn, tmp_path: Path) -> None:
    data = entry(b"a.txt", b"hello") + entry(b"b.txt", content(700)) + END
    expected = ScanResult([("a.txt", 512, 5), ("b.txt", 1536, 700)], 2560, True, 2560)
    assert fn(data) == expected
    assert fn(bytearray(data)) == expected
    assert fn(memoryview(data)) == expected
    assert fn(np.frombuffer(data, dtype=np.uint8)) == expected
    assert fn(memoryview(b"zz" + data)[2:]) == expected
    path = tmp_path / "x.tar"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert fn(mm, final=True) == expected
    # The export is released: the bytearray can be resized afterwards.
    buf = bytearray(data)
    fn(buf)
    buf += b"more"
    with pytest.raises((TypeError, BufferError)):
        fn(memoryview(data)[::2])
    with pytest.raises(TypeError):
        fn(12345)


@pytest.mark.parametrize("fn", IMPLS)
def test_names(fn: ScanFn) -> None:
    data = b"".join(
        [
            entry(b"name", b"1", prefix=b"pre/fix"),  # ustar prefix
            entry(b"gnu", b"2", magic=b"ustar  \0", prefix=b"12345670123"),  # GNU: atime there
            entry(b"v7", b"3", typeflag=b"\0", magic=bytes(8), prefix=b"ignored"),
            entry(b"v7dir/", typeflag=b"\0", magic=bytes(8)),  # old-style directory: skipped
            entry(b"././@LongLink", b"L" * 300 + b"\0junk", b"L"),
            entry(b"cut", b"4"),
            ext(pax_record(b"path", b"p\xc3\xa9/x//") + pax_record(b"mtime", b"1.5")),
            entry(b"paxcut", b"5"),
            entry(b"bad\xff\xfe", b"6"),
            entry(b"reg/", b"7"),  # typeflag '0' with a trailing slash stays a file
            END,
        ]
    )
    names = [n for n, _, _ in fn(data).members]
    assert names == ["pre/fix/name", "gnu", "v7", "L" * 300, "pé/x", "bad\udcff\udcfe", "reg/"]
    # tarfile also joins the "prefix" bytes of GNU and v7 headers; we read them only for ustar.
    assert tar_regular(data)[3:] == fn(data).members[3:]


@pytest.mark.parametrize("fn", IMPLS)
def test_numeric_fields(fn: ScanFn) -> None:
    # GNU base-256 size, octal with leading spaces / space terminator, signed checksum.
    data = b"".join(
        [
            entry(b"b256", b"abcde", size_field=b"\x80" + (5).to_bytes(11, "big")),
            entry(b"spaces", b"xyz", size_field=b"      3 \0\0\0\0"),
            entry(b"high\xe9\xe9\xe9", b"q", signed=True),
            END,
        ]
    )
    assert fn(data).members == [("b256", 512, 5), ("spaces", 1536, 3), ("high\udce9\udce9\udce9", 2560, 1)]
    assert tar_regular(data) == [("b256", 512, 5), ("spaces", 1536, 3), ("high\udce9\udce9\udce9", 2560, 1)]
    # A huge GNU size: the data is simply not there yet.
    ti = tarfile.TarInfo("huge")
    ti.size = 2**34 + 3
    huge = ti.tobuf(tarfile.GNU_FORMAT)
    assert fn(huge + bytes(4096)) == ScanResult([], 0, False, 512 + 2**34 + 512)
    with pytest.raises(TruncatedShardError, match=r"'huge' at offset 0 \(4096 of 17179869187"):
        fn(huge + bytes(4096), final=True)
    for field in (
        b"\xff" + bytes(11),
        b"\xff" * 12,
        b"\x80" + b"\xff" * 11,
        b"0000000009x\0",
        b"00000x00000\0",
    ):
        with pytest.raises(CorruptShardError, match="invalid size field in the tar header at offset 512"):
            fn(entry(b"ok", b"") + raw_header(b"bad", size_field=field) + END)


@pytest.mark.parametrize("fn", IMPLS)
def test_types(fn: ScanFn) -> None:
    data = b"".join(
        [
            raw_header(b"sym", b"2", 512, linkname=b"t"),  # no data follows, whatever the size says
            raw_header(b"dir/", b"5", 1024),
            raw_header(b"fifo", b"6", 100),
            entry(b"vol", b"v" * 600, b"V"),  # unknown type: data skipped
            entry(b"contig", b"c" * 10, b"7"),
            ext(pax_record(b"size", b"3")),
            raw_header(b"paxsize", b"0", 0) + b"abc" + bytes(509),
            entry(b"g", pax_record(b"path", b"ignored"), b"g"),
            entry(b"after-global", b"z"),
            END,
        ]
    )
    expected = [("contig", 3584, 10), ("paxsize", 5632, 3), ("after-global", 7680, 1)]
    assert fn(data).members == expected
    assert fn(data).next_pos == 8192
    assert tar_regular(data)[:2] == expected[:2]  # tarfile applies global 'path' records; we do not


@pytest.mark.parametrize("fn", IMPLS)
def test_extension_chains_resume_at_first_header(fn: ScanFn) -> None:
    chain = ext(pax_record(b"path", b"long/" * 40 + b"x")) + entry(b"././@LongLink", b"other", b"L")
    data = entry(b"first", b"1") + chain + entry(b"short", content(100)) + END
    member_at = 1024 + len(chain)
    for cut in range(1024, member_at + 512 + 100, 256):
        r = fn(data[:cut])
        assert r[:3] == ([("first", 512, 1)], 1024, False)
    with pytest.raises(TruncatedShardError):
        fn(data[: member_at + 512], final=True)
    assert fn(data).members[1] == ("long/" * 40 + "x", member_at + 512, 100)
    # A global header on its own is consumed like a member.
    g = entry(b"g", pax_record(b"comment", b"hi"), b"g")
    assert fn(g + entry(b"n", b"1")[:100]) == ScanResult([], len(g), False, len(g) + 512)
    assert fn(g) == ScanResult([], len(g), False, len(g) + 512)


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        pytest.param(
            entry(b"a", b"1")[:148] + b"0000000\0" + entry(b"a", b"1")[156:],
            CorruptShardError,
            "bad tar header checksum at offset 0",
            id="checksum",
        ),
        pytest.param(
            entry(b"a", b"1")[:148] + b"zz\0\0\0\0\0\0" + entry(b"a", b"1")[156:],
            CorruptShardError,
            "invalid checksum field",
            id="checksum-field",
        ),
        pytest.param(b"not a tar" * 100, CorruptShardError, "invalid checksum field in the tar header at", id="text"),
        pytest.param(b"12345670" * 100, CorruptShardError, "bad tar header checksum at offset 0", id="digits"),
        pytest.param(ext(b"abc\n"), CorruptShardError, "malformed pax record at offset 512", id="pax"),
        pytest.param(ext(b"6 a=b\n" + b"4 =x\n"), CorruptShardError, "malformed pax record at offset 518", id="pax2"),
        pytest.param(ext(b"99 a=b\n"), CorruptShardError, "malformed pax record", id="pax-length"),
        pytest.param(ext(pax_record(b"size", b"-1")), CorruptShardError, "invalid pax size", id="pax-size"),
        pytest.param(ext(pax_record(b"size", b"9" * 19)), CorruptShardError, "invalid pax size", id="pax-big"),
        pytest.param(raw_header(b"s", b"S", 0), CorruptShardError, "unsupported sparse member", id="sparse"),
        pytest.param(
            ext(pax_record(b"GNU.sparse.major", b"1")),
            CorruptShardError,
            "unsupported sparse",
            id="pax-sparse",
        ),
        pytest.param(
            entry(b"a", b"1") + entry(b"L", b"name", b"L") + END,
            CorruptShardError,
            "extension header at offset 1024 is followed by the end-of-archive marker at offset 2048",
            id="dangling",
        ),
        pytest.param(
            entry(b"L", b"name", b"L"),
            TruncatedShardError,
            "ends inside the header of member 'name' at offset 1024 \\(0 of 512",
            id="ext-then-eof",
        ),
        pytest.param(
            entry(b"L", b"n" * 600, b"L")[:1000],
            TruncatedShardError,
            "inside the extension header at offset 0 \\(488 of 600",
            id="ext-payload",
        ),
        pytest.param(
            entry(b"L", b"n" * 600, b"L")[:1200],
            TruncatedShardError,
            "after the extension header at offset 0",
            id="ext-padding",
        ),
    ],
)
def test_errors(fn: ScanFn, data: bytes, error: type[ShardError], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        fn(data, final=True, url=URL)
    assert info.value.url == URL
    assert URL in str(info.value)
    assert info.value.hint
    assert outcome(scan, data, 0, True) == outcome(scan_py, data, 0, True)


def test_threads_share_a_buffer() -> None:
    # The native scan runs without the GIL on an exported buffer; concurrent scans must agree.
    data = build_archive([("file", f"d/{i:05d}.bin", 700) for i in range(3000)], tarfile.GNU_FORMAT)
    expected = scan_py(data, final=True)
    assert len(expected.members) == 3000
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: scan(data, final=True), range(16)))
    assert all(r == expected for r in results)


def test_error_kinds_agree() -> None:
    assert _native.ERROR_KINDS == tario.ERROR_KINDS
