"""The node cache on a machine shared with other users (fastfeed.cache.files's trust model), and
entries that are damaged on disk: against the real S3 server, with real files, and with a
second local user (``nobody``, through ``setpriv``) in real processes where one is needed.

Tests that need a second user run only as root (they skip otherwise, saying so); the
directories that user needs are made accessible to it explicitly, under a private temporary
directory in /tmp, and made private again before fastfeed reads them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfeed import ConfigError, StreamingDataset
from fastfeed.cache.admin import cache_info, clear_cache, entry_files
from fastfeed.cache.entries import Checksums, trailer_size
from fastfeed.cache.node import _LOCK_S
from fastfeed.config import S3Config
from fastfeed.testing.shards import upload_dir, write_synthetic_shards

SHARDS = 3
PER_SHARD = 10
SAMPLE = 20_000  # ~200 KiB shards: one checksum chunk each


def _other_user() -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "acting as a second local user needs root (these tests switch to 'nobody' with setpriv)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    if _other_user() is None:
        return "there is no 'nobody' user"
    return None


needs_other_user = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def as_other_user(*cmd: str) -> list[str]:
    """``cmd`` run as ``nobody`` (no supplementary groups)."""
    ids = _other_user()
    assert ids is not None
    return ["setpriv", f"--reuid={ids[0]}", f"--regid={ids[1]}", "--clear-groups", *cmd]


def run_as_other_user(script: str) -> None:
    out = subprocess.run(as_other_user("sh", "-c", script), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"as nobody: {script}\n{out.stderr}"


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory under /tmp that other users may enter (mode 0755, owned by the test's user)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ff-shared-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def data(bucket: Any, fault_proxy: Any, tmp_path: Path) -> dict[str, Any]:
    local = tmp_path / "shards"
    paths = write_synthetic_shards(local, num_shards=SHARDS, samples_per_shard=PER_SHARD, sample_bytes=SAMPLE)
    upload_dir(bucket.client, bucket.name, local, prefix="t/")
    s3 = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
    )
    reference = {f"{p.name}#{s['__key__']}": s["bin"] for p in paths for s in StreamingDataset(str(p))}
    return {"url": f"s3://{bucket.name}/t/", "s3": s3, "paths": paths, "reference": reference, "proxy": fault_proxy}


def read(data: dict[str, Any], cache: Path | str, **kw: Any) -> tuple[dict[str, bytes], dict[str, float]]:
    """Every sample through the cache at ``cache``: ``({shard#key: bin}, io_stats)``."""
    ds = StreamingDataset(data["url"], s3=data["s3"], cache_dir=str(cache), cache_limit="1GB", **kw)
    got = {f"{Path(s['__url__']).name}#{s['__key__']}": s["bin"] for s in ds}
    return got, ds.io_stats()


def as_entry(payload: bytes) -> bytes:
    """``payload`` as a valid-looking cache entry (the shard, then its checksums)."""
    sums = Checksums()
    sums.update(memoryview(payload))
    return payload + sums.trailer()


def payload_of(entry: Path) -> bytes:
    size = int(entry.stem.rsplit("-", 1)[1])
    raw = entry.read_bytes()
    assert len(raw) == size + trailer_size(size), entry
    return raw[:size]


def originals(data: dict[str, Any]) -> set[bytes]:
    return {p.read_bytes() for p in data["paths"]}


def open_up(cache: Path, sub: str) -> None:
    """Let another user into ``cache/v2`` and write ``cache/v2/<sub>`` (a directory that was
    shared once: what fastfeed refuses now)."""
    cache.chmod(0o755)
    (cache / "v2").chmod(0o755)
    (cache / "v2" / sub).chmod(0o777)


def close_down(cache: Path) -> None:
    for path in (cache, cache / "v2", cache / "v2" / "entries", cache / "v2" / "tmp"):
        path.chmod(0o700)


def warnings_of(caplog: Any) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ------------------------------------------------------------------------ permissions


def test_files_are_0600_and_directories_0700_whatever_the_umask(data: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data["proxy"].set_bandwidth(100_000)  # slow fills: a part file is there to look at
    old = os.umask(0)  # the loosest umask: the modes must not come from it
    try:
        ds = StreamingDataset(
            data["url"], s3=data["s3"], cache_dir=str(cache), cache_limit="1GB", part_size="64KiB",
            shards_in_flight=1,
        )  # fmt: skip
        it = iter(ds)
        next(it)
        parts = list((cache / "v2" / "tmp").glob("*.part"))
        assert parts, "a fill is in progress"
        part_modes = {stat.S_IMODE(p.stat().st_mode) for p in parts}
        data["proxy"].set_bandwidth(None)
        list(it)
    finally:
        os.umask(old)
    assert part_modes == {0o600}
    me = os.geteuid()
    for d in (cache, cache / "v2", cache / "v2" / "entries", cache / "v2" / "tmp"):
        st = os.stat(d)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, me), d
    files = [cache / "v2" / ".lock", *entry_files(cache)]
    assert len(files) == SHARDS + 1
    for f in files:
        st = os.stat(f)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_nlink) == (0o600, me, 1), f


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o702])
def test_a_cache_dir_others_may_write_is_refused(data: dict[str, Any], tmp_path: Path, mode: int) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(ConfigError, match="writable by") as refused:
        StreamingDataset(data["url"], s3=data["s3"], cache_dir=str(d), cache_limit="1GB")
    text = str(refused.value)
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert str(d) in text and f"chmod 700 {d}" in text and f"cache_dir={d}/{user}" in text
    assert not (d / "v2").exists(), "nothing was written into it"
    # The fix the error names works: a private subdirectory, made 0700.
    got, _ = read(data, d / user)
    assert got == data["reference"]
    assert stat.S_IMODE(os.stat(d / user).st_mode) == 0o700


def test_a_cache_dir_opened_up_after_the_dataset_was_made_is_refused_when_read(
    data: dict[str, Any], tmp_path: Path
) -> None:
    d = tmp_path / "later"
    ds = StreamingDataset(data["url"], s3=data["s3"], cache_dir=str(d), cache_limit="1GB")
    d.mkdir(mode=0o700)
    d.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by"):
        list(ds)


def test_a_private_cache_dir_readable_by_others_is_accepted(data: dict[str, Any], tmp_path: Path) -> None:
    d = tmp_path / "readable"
    d.mkdir()
    d.chmod(0o755)  # what mkdir makes with the usual umask: others cannot write it
    got, _ = read(data, d)
    assert got == data["reference"]
    assert stat.S_IMODE(os.stat(d / "v2").st_mode) == 0o700, "what fastfeed makes inside is private"


@needs_other_user
def test_a_cache_dir_of_another_user_is_refused(data: dict[str, Any], shared: Path) -> None:
    uid, gid = _other_user()  # type: ignore[misc]
    theirs = shared / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, uid, gid)
    with pytest.raises(ConfigError, match=r"belongs to nobody \(uid \d+\), not to you") as refused:
        StreamingDataset(data["url"], s3=data["s3"], cache_dir=str(theirs), cache_limit="1GB")
    assert str(theirs) in str(refused.value) and f"cache_dir={theirs}-" in str(refused.value)
    # A directory of ours holding a v2/ tree another user made is refused as well.
    ours = shared / "ours"
    ours.mkdir(mode=0o700)
    (ours / "v2").mkdir(mode=0o700)
    os.chown(ours / "v2", uid, gid)
    with pytest.raises(ConfigError, match="belongs to nobody"):
        StreamingDataset(data["url"], s3=data["s3"], cache_dir=str(ours), cache_limit="1GB")
    # A symbolic link another user made, even to a directory of ours, is refused: they chose
    # where it points (and can point it elsewhere later).
    (ours / "v2").rmdir()
    sticky = shared / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    run_as_other_user(f"ln -s {ours} {sticky}/cache")
    with pytest.raises(ConfigError, match="is a symbolic link made by nobody"):
        StreamingDataset(data["url"], s3=data["s3"], cache_dir=str(sticky / "cache"), cache_limit="1GB")


# ------------------------------------------------------------------------ planted files


@needs_other_user
@pytest.mark.parametrize("where", ["part", "entry"])
def test_a_symlink_planted_by_another_user_is_not_followed(
    data: dict[str, Any], shared: Path, where: str, caplog: Any
) -> None:
    cache = shared / "cache"
    read(data, cache)  # warm
    entry = entry_files(cache)[0]
    key = entry.stem
    # What the other user wants fastfeed to overwrite (a part file's target), or to serve (an
    # entry's target: a valid-looking entry of other samples).
    victim = shared / "victim"
    other = write_synthetic_shards(shared / "other", num_shards=1, samples_per_shard=PER_SHARD, sample_bytes=SAMPLE)
    planted = as_entry(other[0].read_bytes()) if where == "entry" else b"precious, not a shard\n"
    victim.write_bytes(planted)
    victim.chmod(0o644)
    if where == "part":
        entry.unlink()  # the next read fills it: through tmp/<key>.part
        open_up(cache, "tmp")
        run_as_other_user(f"ln -s {victim} {cache}/v2/tmp/{key}.part")
        link = cache / "v2" / "tmp" / f"{key}.part"
    else:
        open_up(cache, "entries")
        run_as_other_user(f"rm -f {entry} && ln -s {victim} {entry}")
        link = entry
    close_down(cache)
    assert link.is_symlink() and link.lstat().st_uid != os.geteuid()
    caplog.set_level(logging.WARNING, logger="fastfeed")
    got, _ = read(data, cache)
    assert got == data["reference"], "the samples are the store's"
    assert victim.read_bytes() == planted and stat.S_IMODE(victim.stat().st_mode) == 0o644, "target untouched"
    assert f"{link} is a symbolic link" in warnings_of(caplog)
    assert not link.is_symlink()
    assert {payload_of(e) for e in entry_files(cache)} == originals(data), "cached again, from the store"


@needs_other_user
def test_an_entry_planted_by_another_user_is_not_served(data: dict[str, Any], shared: Path, caplog: Any) -> None:
    cache = shared / "cache"
    read(data, cache)  # warm
    entry = entry_files(cache)[0]
    other = write_synthetic_shards(shared / "other", num_shards=1, samples_per_shard=PER_SHARD, sample_bytes=SAMPLE)
    fake = other[0].read_bytes()
    assert len(fake) == len(payload_of(entry)), "same size: only its owner tells it apart"
    source = shared / "planted"
    source.write_bytes(as_entry(fake))  # a valid trailer too: its checksums match
    source.chmod(0o644)
    open_up(cache, "entries")
    run_as_other_user(f"cp {source} {entry}.new && chmod 600 {entry}.new && mv -f {entry}.new {entry}")
    close_down(cache)
    assert entry.stat().st_uid != os.geteuid() and entry.read_bytes() == as_entry(fake)
    caplog.set_level(logging.WARNING, logger="fastfeed")
    got, io = read(data, cache)
    assert got == data["reference"], "the samples are the store's, not the planted ones"
    assert io["cache_misses"] == 1 and io["cache_hits"] == SHARDS - 1
    assert f"{entry} is owned by nobody" in warnings_of(caplog)
    st = entry.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600), "fastfeed's own entry took its place"
    assert {payload_of(e) for e in entry_files(cache)} == originals(data)


@pytest.mark.parametrize("kind", ["fifo", "hard link", "directory"])
def test_a_fifo_a_hard_link_or_a_directory_at_an_entry_is_not_used(
    data: dict[str, Any], tmp_path: Path, kind: str, caplog: Any
) -> None:
    cache = tmp_path / "cache"
    read(data, cache)
    entry = entry_files(cache)[0]
    payload = payload_of(entry)
    entry.unlink()
    outside = tmp_path / "outside"
    if kind == "fifo":
        os.mkfifo(entry, 0o600)  # an open that blocked on it would hang the reader
    elif kind == "directory":
        entry.mkdir(mode=0o700)
    else:
        outside.write_bytes(as_entry(payload))  # valid, but a link to a file elsewhere
        outside.chmod(0o600)
        os.link(outside, entry)
    caplog.set_level(logging.WARNING, logger="fastfeed")
    start = time.monotonic()
    got, _ = read(data, cache)
    assert time.monotonic() - start < 30
    assert got == data["reference"]
    why = {"fifo": "not a regular file", "hard link": "a file with 2 hard links", "directory": "a directory"}[kind]
    assert f"{entry} is {why}" in warnings_of(caplog)
    assert stat.S_ISREG(entry.lstat().st_mode) and entry.stat().st_nlink == 1
    assert payload_of(entry) == payload
    if kind == "hard link":
        assert outside.read_bytes() == as_entry(payload), "the other name's file is untouched"


# ------------------------------------------------------------------------ locks held by others


def _hold_lock(path: Path, other_user: bool) -> subprocess.Popen[bytes]:
    """A process holding ``flock(LOCK_EX)`` on ``path`` until killed. Another user cannot
    open the cache's files (0600 in 0700 directories): it holds one through a descriptor it was
    handed (inherited, or opened while the directory was shared), which is what is done here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        script = f"flock -x {fd} && exec sleep 300"
        cmd = as_other_user("sh", "-c", script) if other_user else ["sh", "-c", script]
        holder = subprocess.Popen(cmd, pass_fds=(fd,))
    finally:
        os.close(fd)
    probe = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until the lock is really held
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(probe, fcntl.LOCK_UN)
            except BlockingIOError:
                return holder
            assert holder.poll() is None and time.monotonic() < deadline, "the holder did not lock"
            time.sleep(0.02)
    finally:
        os.close(probe)


def _stop(holder: subprocess.Popen[bytes]) -> None:
    holder.kill()
    holder.wait(timeout=30)


@pytest.mark.parametrize(
    ("target", "other_user"),
    [
        pytest.param("entry", True, marks=needs_other_user),
        pytest.param(".lock", True, marks=needs_other_user),
        pytest.param(".lock", False, id=".lock-own-process"),  # a stuck job of the same user
    ],
)
def test_a_lock_held_by_another_process_does_not_hang_a_reader(
    data: dict[str, Any], shared: Path, target: str, other_user: bool, caplog: Any
) -> None:
    cache = shared / "cache"
    read(data, cache)  # warm
    if target == "entry":
        path = entry_files(cache)[0]
    else:
        path = cache / "v2" / ".lock"  # held while space is reserved: every fill needs it
        clear_cache(cache)
    holder = _hold_lock(path, other_user)
    caplog.set_level(logging.WARNING, logger="fastfeed")
    try:
        start = time.monotonic()
        got, io = read(data, cache)
        elapsed = time.monotonic() - start
        assert got == data["reference"], "read from the store"
        assert elapsed < _LOCK_S + 30, f"bounded by the lock deadline, took {elapsed:.1f}s"
        text = warnings_of(caplog)
        assert f"another process has held {path}" in text and text.count("another process has held") == 1, text
        if target == "entry":
            assert io["cache_hits"] == SHARDS - 1, "the other shards are hits"
        else:
            assert cache_info(cache).entries == 0, "nothing could be cached while .lock was held"
            assert elapsed < _LOCK_S + 5, "one wait for the lock, not one per shard"
    finally:
        _stop(holder)
    got, io = read(data, cache)  # free again: the cache works as before
    assert got == data["reference"] and cache_info(cache).entries == SHARDS


# ------------------------------------------------------------------------ damaged entries


def test_a_truncated_entry_is_dropped_and_fetched_again(data: dict[str, Any], tmp_path: Path, caplog: Any) -> None:
    cache = tmp_path / "cache"
    read(data, cache)
    entry = entry_files(cache)[0]
    good = entry.read_bytes()
    size = int(entry.stem.rsplit("-", 1)[1])
    caplog.set_level(logging.WARNING, logger="fastfeed")
    for cut in (0, 1, 511, size // 2, size - 1, size, size + 3, len(good) - 28, len(good) - 1):
        os.truncate(entry, cut)
        caplog.clear()
        got, io = read(data, cache)
        assert got == data["reference"], cut
        assert io["cache_misses"] == 1 and io["cache_hits"] == SHARDS - 1, cut
        text = warnings_of(caplog)
        assert f"entry {entry} of " in text and "truncated" in text and "fetching the shard again" in text, cut
        assert entry.read_bytes() == good, f"cut at {cut}: fetched and cached again at once"


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(choice=st.data())
def test_a_bit_flip_anywhere_in_an_entry_is_caught_before_it_is_served(
    data: dict[str, Any], tmp_path: Path, caplog: Any, choice: st.DataObject
) -> None:
    cache = tmp_path / "cache"
    if not cache.exists():
        read(data, cache)
    entry = entry_files(cache)[0]
    good = entry.read_bytes()
    size = int(entry.stem.rsplit("-", 1)[1])
    in_data = st.integers(0, 8 * size - 1)
    in_trailer = st.integers(8 * size, 8 * len(good) - 1)
    bit = choice.draw(st.one_of(in_data, in_trailer), label="bit")
    flipped = bytearray(good)
    flipped[bit // 8] ^= 1 << (bit % 8)
    entry.write_bytes(flipped)
    caplog.set_level(logging.WARNING, logger="fastfeed")
    caplog.clear()
    got, io = read(data, cache)
    assert got == data["reference"]
    text = warnings_of(caplog)
    assert f"entry {entry} of " in text, text
    if bit < 8 * size:
        start = bit // 8 // (1 << 20) * (1 << 20)
        assert f"fails its CRC32C check in bytes {start}-" in text
        assert not entry.exists(), "dropped; the shard was read from the store"
        assert io["bytes_fetched"] == size
        read(data, cache)  # its next read caches it again
    else:
        assert "trailer" in text or "truncated" in text, text
    assert entry.read_bytes() == good


def test_a_damaged_chunk_of_a_large_entry_is_caught_when_it_is_read(
    bucket: Any, fault_proxy: Any, tmp_path: Path, caplog: Any
) -> None:
    # ~2.5 MiB: three checksum chunks, read in 64 KiB parts. The damaged chunk and what
    # follows come from the store.
    (path,) = write_synthetic_shards(tmp_path / "big", num_shards=1, samples_per_shard=25, sample_bytes=100_000)
    upload_dir(bucket.client, bucket.name, tmp_path / "big", prefix="big/")
    data = {
        "url": f"s3://{bucket.name}/big/",
        "s3": S3Config(
            endpoint_url=fault_proxy.endpoint_url,
            access_key_id=bucket.server.access_key,
            secret_access_key=bucket.server.secret_key,
        ),
    }
    reference = {f"{path.name}#{s['__key__']}": s["bin"] for s in StreamingDataset(str(path))}
    cache = tmp_path / "cache"
    read(data, cache, part_size="64KiB")
    (entry,) = entry_files(cache)
    good = entry.read_bytes()
    size = path.stat().st_size
    damaged = bytearray(good)
    damaged[(2 << 20) + 12345] ^= 0x10  # in the third chunk
    entry.write_bytes(damaged)
    caplog.set_level(logging.WARNING, logger="fastfeed")
    got, io = read(data, cache, part_size="64KiB")
    assert got == reference
    assert f"entry {entry} of s3://{bucket.name}/big/{path.name} fails its CRC32C check in bytes 2097152-" in (
        warnings_of(caplog)
    )
    # Parts are checked concurrently: a good chunk's parts not yet served when the damage is
    # found come from the store too. Nothing of the damaged chunk or after it is served from
    # the entry.
    assert io["bytes_from_cache"] <= 2 << 20, io
    assert io["bytes_from_cache"] + io["bytes_fetched"] == size, io
    assert not entry.exists()
    got, io = read(data, cache, part_size="64KiB")
    assert got == reference and entry.read_bytes() == good, "cached again by its next read"


def test_a_reader_in_another_process_also_refuses_a_damaged_entry(data: dict[str, Any], tmp_path: Path) -> None:
    # The check is on every hit, in every process: a DataLoader worker finds the damage too.
    cache = tmp_path / "cache"
    read(data, cache)
    entry = entry_files(cache)[0]
    damaged = bytearray(entry.read_bytes())
    damaged[100] ^= 1
    entry.write_bytes(damaged)
    s3 = data["s3"]
    script = (
        "import hashlib, json\n"
        "from pathlib import Path\n"
        "from fastfeed import DataLoader, StreamingDataset\n"
        "from fastfeed.config import S3Config\n"
        f"ds = StreamingDataset({data['url']!r}, s3=S3Config(endpoint_url={s3.endpoint_url!r}, "
        f"access_key_id={s3.access_key_id!r}, secret_access_key={s3.secret_access_key!r}), "
        f"cache_dir={str(cache)!r}, cache_limit='1GB')\n"
        "def digest(samples):\n"
        "    return [[Path(s['__url__']).name + '#' + s['__key__'], hashlib.sha256(s['bin']).hexdigest()]"
        " for s in samples]\n"
        "loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=digest)\n"
        "print(json.dumps(sorted(d for batch in loader for d in batch)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = sorted([k, hashlib.sha256(v).hexdigest()] for k, v in data["reference"].items())
    assert json.loads(out.stdout) == expected
    assert out.stderr.count("fails its CRC32C check") == 1, out.stderr


_FILLER = """
import json, sys
from fastfeed import StreamingDataset
from fastfeed.config import S3Config
cfg = json.loads(sys.argv[1])
ds = StreamingDataset(cfg["url"], s3=S3Config(**cfg["s3"]), cache_dir=cfg["cache"], cache_limit="1GB",
                      part_size="64KiB", shards_in_flight=1)
for sample in ds:
    pass
"""


def test_a_fill_taken_over_from_a_killed_filler_gets_the_right_checksums(
    data: dict[str, Any], tmp_path: Path, caplog: Any
) -> None:
    # A reader waiting on another process's fill continues it when that process dies; the
    # checksums of the bytes the dead filler wrote are computed from the part file.
    cache = tmp_path / "cache"
    s3 = {k: data["s3"].__dict__[k] for k in ("endpoint_url", "access_key_id", "secret_access_key")}
    cfg = {"url": data["url"], "s3": s3, "cache": str(cache)}
    # Made first: listing the shards and counting their samples is not what is throttled.
    ds = StreamingDataset(
        data["url"], s3=data["s3"], cache_dir=str(cache), cache_limit="1GB", part_size="64KiB", shards_in_flight=1
    )
    data["proxy"].set_bandwidth(30_000)  # ~8 s per shard: the kill lands in the first one
    filler = subprocess.Popen([sys.executable, "-c", _FILLER, json.dumps(cfg)])
    try:
        tmp = cache / "v2" / "tmp"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = [p for p in tmp.glob("*.part") if p.stat().st_size >= 64 << 10] if tmp.exists() else []
            if parts:
                break
            time.sleep(0.02)
        assert parts, "the filler never wrote its first part"
        # Frozen in the middle of its fill (holding its lock) however slowly this reader starts,
        # then killed once the reader has taken a sample from the part file.
        os.kill(filler.pid, signal.SIGSTOP)
        it = iter(ds)
        first = next(it)  # from the filler's part file
        os.kill(filler.pid, signal.SIGKILL)
        filler.wait(timeout=30)
        left = [p.stat().st_size for p in tmp.glob("*.part")]
        data["proxy"].set_bandwidth(None)
        got = {f"{Path(s['__url__']).name}#{s['__key__']}": s["bin"] for s in [first, *it]}
    finally:
        filler.kill()
        filler.wait()
    assert got == data["reference"]
    size = len(next(iter(originals(data))))
    assert len(left) == 1 and 0 < left[0] < size, "killed in the middle of a fill"
    info = cache_info(cache)
    # Every shard cached (a shard read from the store instead would not be) and fewer bytes
    # fetched than the shards hold: the fill went on from the bytes the dead filler left.
    assert info.entries == SHARDS and info.partial == 0
    assert ds.io_stats()["bytes_fetched"] <= SHARDS * size - left[0]
    assert {payload_of(e) for e in entry_files(cache)} == originals(data)
    caplog.set_level(logging.WARNING, logger="fastfeed")
    got, io = read(data, cache)
    assert got == data["reference"] and io["cache_hits"] == SHARDS
    assert warnings_of(caplog) == "", "every entry passes its checks"
