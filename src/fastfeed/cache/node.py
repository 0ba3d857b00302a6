"""Node-local shard cache: each shard is fetched from the store once per node, then read from
local disk (NVMe) by every DataLoader worker, rank and job of the user on the node.

Layout of ``cache_dir``::

    v2/.lock                      flock'ed briefly while space is reserved (kernel-released)
    v2/entries/<key>.tar          complete shards, checksummed; never modified, only unlinked
    v2/tmp/<key>.part             shards being filled; the filler holds flock(LOCK_EX) on it

``key`` is ``<sha256(url)[:24]>-<sha256(etag)[:12]>-<size>``: a changed object (another ETag)
has another key, so a stale entry is never served, and every fill reads the object with
``If-Match`` on its ETag. (``v1/``, the layout of older versions, had no checksums; it is not
read, and a notice says it can be removed.)

An entry is the object's ``size`` bytes followed by a trailer: the CRC32C of each ``chunk``
bytes of the object (the last chunk may be shorter), each a little-endian u32, then a 28-byte
footer ``<8sQIII``: ``b"ffcache2"``, ``size``, ``chunk`` (1 MiB), the number of CRCs, and the
CRC32C of the CRCs followed by the footer's first 24 bytes.

**Coordination is by ``flock`` only** (released by the kernel when a process dies, also on
``kill -9``), on files that exist anyway: no lock files, no shared memory, nothing to clean up
by hand.

* *Fill* (a miss): the process that wins ``flock(LOCK_EX)`` on ``tmp/<key>.part`` downloads
  the whole object in order (a few ranged GETs in flight, written in order, so the file's size
  is the number of bytes that landed), computing the chunks' CRC32Cs from the bytes it writes
  (in the same worker thread, while they are in memory), appends the trailer, fsyncs, checks
  the size, and renames it to ``entries/<key>.tar`` (atomic) before unlocking. The fill is the
  process's, not the reader's: it completes even if the reader that started it stops early.
  With ``CacheConfig.io == "direct"`` the fill writes its aligned parts with ``O_DIRECT`` (no
  page cache: for datasets larger than memory); a shard's last part is written buffered.
* *Stream-and-tee*: a reader in the filling process gets each part straight from the fill's
  GET buffer once it is written (:meth:`ShardCache.claim`); a reader of a shard another
  process fills reads each byte range from the part file as soon as it has landed. Either
  way the first sample does not wait for the whole shard. If the filler dies (its lock
  becomes free while the file is incomplete), a waiting reader takes the lock and continues
  the fill from the bytes already there (their CRC32Cs are computed from the file).
* *Hit*: the entry is opened and ``flock(LOCK_SH)``'ed for as long as it is read; eviction
  only removes entries it can ``flock(LOCK_EX)``, so a shard being read is never evicted.
  The entry is memory-mapped and readers get views of it (no copy), verified (below).
* *Space*: before a fill, under ``v2/.lock``, the bytes of all entries and part files (sizes
  from their names) plus the new shard must fit ``limit``; entries are evicted by the
  dataset's known future (Belady: the one used again farthest in the future; a shard whose own
  next use is farther than every candidate's is not cached at all) or, without a plan, least
  recently used first (entry mtime, touched on each hit). If nothing can be evicted, the shard
  is read from the store without caching.
* *Crash safety*: an entry exists only once complete and checksummed. At start-up, part files
  whose lock is free (their filler died) are deleted.
* *Errors*: a full disk (ENOSPC, EDQUOT, EFBIG) or an unwritable directory logs one warning
  and the shard (and, for an unwritable directory, the cache) is read from the store instead,
  or raises :class:`~fastfeed.errors.CacheError` with ``on_error="raise"``. Readers never lose data: a failed
  fill only means the bytes come from the store.

**Trust model.** The node is shared with other local users; the cache must not let one of
them change what another's training reads, read it, or stop it. Root, and the user's own
processes (another job of the same user), are trusted: they can change any file the user owns.

* *The cache belongs to one user.* ``cache_dir`` must be a directory owned by the effective
  user and not writable by group or others; it is created with mode 0700 when missing. A
  directory owned by someone else, or group- or world-writable (``/tmp`` itself, a shared
  group directory), is refused with a :class:`~fastfeed.errors.ConfigError` naming it and the
  fix: ``chmod 700 DIR``, or a per-user subdirectory such as ``DIR/$USER`` (which fastfeed
  creates 0700). A cache shared by a group is refused, not offered as an opt-in: a group
  member could plant any entry (a CRC32C detects accidents, it is no signature), so sharing
  would mean trusting every member with every other member's training data. Each user has one
  cache per node, shared by all of that user's jobs, ranks and workers. A final symbolic link
  in ``cache_dir`` made by another user (not root) is refused too.
* ``v2/``, ``v2/entries/`` and ``v2/tmp/`` are made 0700; one of the user's with another mode
  is reset to 0700 (with a warning if others could write it); one owned by someone else, or a
  symbolic link or a file at its name, is refused with a ConfigError.
* *Checked once, then used by descriptor.* The directories are checked on descriptors opened
  once (``fstat`` of the opened directory, not of a path), and every later operation is
  relative to those descriptors (``openat``, ``renameat``, ``unlinkat``, ...): replacing
  ``cache_dir`` or a directory above it afterwards cannot redirect the cache. (The ancestors
  of ``cache_dir`` are not checked: whoever can replace one can only make the next process
  find a directory it refuses.)
* *Files.* Every open of a cache file uses ``O_NOFOLLOW`` (a symbolic link is never
  followed), ``O_NONBLOCK`` (a FIFO cannot block the open) and ``O_CLOEXEC``. Files are made
  with ``O_CREAT | O_EXCL`` (so the inode is new, made by this process, whatever stood at the
  name before) and mode 0600 (``fchmod``: the umask cannot loosen or break it). A part file
  has a fixed name so that every process of the user finds the same fill (stream-and-tee): its
  fresh inode is made at that name. Every file opened is checked on its descriptor: a regular
  file, owned by the user, no permission bits for group or others, one link. Anything else
  found at a cache file's name (a symbolic link, a FIFO, a directory, another user's file, a
  hard link; left there, say, while the directory was shared) was not made by fastfeed for
  this user: it is never read or written, it is removed from the directory with a warning
  naming it, and the shard is fetched again.
* *Every wait on a lock has a deadline.* An entry's ``LOCK_SH`` (only an eviction holds its
  ``LOCK_EX``, for an unlink) and ``.lock``'s ``LOCK_EX`` (held while space is reserved) are
  tried for ``_LOCK_S`` (10 s); if another process still holds the lock, the shard is read
  from the store, not cached, with a warning naming the file, and until the lock is seen free
  again it is tried once, not waited for. A reader of a part file whose filler holds its lock
  but lands no byte for ``_STALL_S`` (120 s) reads the shard from the store. Every other lock
  is only tried (``LOCK_NB``). Nothing blocks in ``flock``.
* *Verified entries.* Opening an entry for a hit checks its size and trailer (two ``pread``
  calls, before any byte is served): a truncated entry or a damaged trailer is removed and the
  shard fetched (and cached) again at once, with a warning naming it. Each chunk's CRC32C is
  checked the first time a read of the mapping touches it, in a worker thread, at memory speed
  (CRC32C with SSE4.2), before its bytes are handed out; every new mapping (every hit) checks
  again. A chunk that fails: the entry is removed, the rest of the shard is read from the
  store, its next read caches it again, and a warning names the entry and the bytes.

Not covered: root, and the user's own processes (a file the user owns can be changed by
them; an entry truncated under a live mapping makes its readers fail with SIGBUS, as does a
disk error while a mapped entry is read); bytes
read from a part file while another process of the user fills it are served without a check
(that process wrote them moments before, from the store); a CRC32C detects accidents (bit rot,
truncation, a partial copy), not a deliberate forgery by someone who can write the directory,
which is why nobody else may; other users can see the names in ``cache_dir`` if the user made
it readable to them (0755), but not inside ``v2/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import pwd
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from fastfeed import _native
from fastfeed.config import parse_size
from fastfeed.errors import CacheError, ConfigError
from fastfeed.store.base import ObjectInfo, RangeReader
from fastfeed.store.buffers import pool_for
from fastfeed.urls import Location

__all__ = [
    "CacheConfig",
    "CacheError",
    "CacheInfo",
    "ShardCache",
    "cache_info",
    "check_cache_dir",
    "clear_cache",
    "entry_files",
]

log = logging.getLogger(__name__)

_VERSION_DIR = "v2"
#: Layouts of older versions, not read (a notice says they can be removed).
_OLD_VERSION_DIRS = ("v1",)
_ENTRY, _PART = ".tar", ".part"
#: Bytes of one ranged GET of a fill, and how many are in flight at once per fill.
_FILL_PART = 8 << 20
_FILL_WINDOW = 4
#: A reader waiting for bytes of a shard another process fills gives up on the cache for that
#: shard (and reads from the store) if no byte lands for this long.
_STALL_S = 120.0
#: How often a waiting reader checks that the filler is still alive.
_LIVENESS_S = 0.1
#: How long a hit waits for an entry's LOCK_SH, and a fill for ``.lock``, before it reads the
#: shard from the store instead (both are held by others for milliseconds at most).
_LOCK_S = 10.0
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: Flags of every open of a cache file: never through a symbolic link, never blocked by a
#: FIFO, never inherited by a program the process runs.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Bytes per CRC32C in an entry's trailer (each chunk is checked when first read).
_CHUNK = 1 << 20
_CHUNK_RANGE = (4096, 1 << 30)
_MAGIC = b"ffcache2"
_FOOTER = struct.Struct("<8sQIII")  # magic, object size, chunk, CRC count, CRC32C of the rest
#: Check each chunk of a hit against its CRC32C (off only to measure what the check costs:
#: benchmarks/cache/bench_hit_path.py).
_VERIFY = True


@dataclass(frozen=True)
class CacheConfig:
    """Where shards are cached and how much space they may take.

    Args:
        dir: the cache directory (created 0700 if missing); shared by every process of the user
            on the node. It must be the user's own and not writable by group or others (see the
            trust model in :mod:`fastfeed.cache.node`).
        limit: bytes the cache may use (int or ``"500GB"``); entries and fills in progress.
        on_error: ``"warn"`` (default): a full disk or unwritable directory logs a warning and
            reading continues from the store; ``"raise"``: raise :class:`CacheError`. (A
            directory the cache may not trust is always a ConfigError.)
        policy: ``"belady"`` (default): evict by the dataset's known future, falling back to
            least recently used for shards it does not plan to read; ``"lru"``: least recently
            used only.
        io: how fills write: ``"buffered"`` (through the page cache, so the next epoch of a
            dataset that fits in memory reads it from there) or ``"direct"`` (``O_DIRECT``: no
            page cache and no copy into it, for datasets larger than memory, which would only
            push other data out of it; falls back to buffered where the file system refuses).
    """

    dir: str
    limit: int
    on_error: str = "warn"
    policy: str = "belady"
    io: str = "buffered"

    @classmethod
    def of(
        cls,
        cache_dir: str | os.PathLike[str],
        cache_limit: int | str,
        on_error: str = "warn",
        policy: str = "belady",
        io: str = "buffered",
    ) -> CacheConfig:
        if io not in ("buffered", "direct"):
            raise ConfigError(f"cache io={io!r} is invalid", hint="use 'buffered' or 'direct'")
        if on_error not in ("warn", "raise"):
            raise ConfigError(f"cache on_error={on_error!r} is invalid", hint="use 'warn' or 'raise'")
        if policy not in ("belady", "lru"):
            raise ConfigError(f"cache policy={policy!r} is invalid", hint="use 'belady' or 'lru'")
        limit = parse_size(cache_limit, name="cache_limit")
        if limit <= 0:
            raise ConfigError(f"cache_limit must be > 0, got {cache_limit!r}")
        return cls(os.path.abspath(os.path.expanduser(os.fspath(cache_dir))), limit, on_error, policy, io)


def entry_key(info: ObjectInfo) -> str:
    """The cache key of one version of an object."""
    url_hash = hashlib.sha256(info.url.encode()).hexdigest()[:24]
    etag_hash = hashlib.sha256((info.etag or "").encode()).hexdigest()[:12]
    return f"{url_hash}-{etag_hash}-{info.size}"


def url_hash_of(key: str) -> str:
    return key.split("-", 1)[0]


def _size_of(name: str) -> int:
    """The object size a cache file name records (0 if the name is not ours)."""
    stem = name.split(".", 1)[0]
    try:
        return int(stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _try_flock(fd: int, flags: int) -> bool:
    try:
        fcntl.flock(fd, flags | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


async def _flock_within(fd: int, flags: int, timeout: float) -> bool:
    """``flock(fd, flags)``, tried until ``timeout`` seconds have passed (on the event loop:
    never blocks it); False if another process still holds a conflicting lock."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not _try_flock(fd, flags):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def _same_at(dir_fd: int, name: str, fd: int) -> bool:
    """``name`` in ``dir_fd`` is (still) the file open at ``fd``."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


def _unlink_if_same(dir_fd: int, name: str, fd: int) -> bool:
    if _same_at(dir_fd, name, fd):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
            return True
    return False


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _not_ours(st: os.stat_result) -> str | None:
    """Why a cache file with status ``st`` is not one fastfeed made for this user (None if it is)."""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by {_user(st.st_uid)}, not by you ({_user(os.geteuid())})"
    if st.st_mode & 0o077:
        return f"open to other users (mode {stat.S_IMODE(st.st_mode):04o}; fastfeed makes 0600)"
    if st.st_nlink > 1:
        return f"a file with {st.st_nlink} hard links"
    return None


def _remove_foreign(dir_fd: int, name: str, st: os.stat_result, why: str, where: Path) -> None:
    """Remove ``name`` from a cache directory of the user's if it is still the file ``st``
    describes, which fastfeed did not make (``why``), with a warning."""
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
            return
        if stat.S_ISDIR(now.st_mode):
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning(
            "fastfeed cache: %s is %s: fastfeed did not make it, so it is not used; it cannot be removed (%s): "
            "remove it (the shard is read from the store meanwhile)",
            where,
            why,
            exc,
        )
        return
    log.warning("fastfeed cache: %s is %s: fastfeed did not make it, so it is not used; removed", where, why)


def _open_checked(dir_fd: int, name: str, flags: int, where: Path) -> int | None:
    """``name`` in the cache directory ``dir_fd`` opened with ``flags`` (and ``_FILE_FLAGS``)
    if it is a file fastfeed made for this user; None if nothing usable stands there (nothing,
    or something else, which is then removed with a warning)."""
    try:
        fd = os.open(name, flags | _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        # A symbolic link (ELOOP), another user's file this user may not open (EACCES), a FIFO
        # without a reader (ENXIO), a directory opened for writing (EISDIR): look at the name.
        if exc.errno not in (errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENXIO, errno.EISDIR):
            raise
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        why = _not_ours(st)
        if why is None:
            raise  # a file of ours that cannot be opened: a real error
        _remove_foreign(dir_fd, name, st, why, where)
        return None
    st = os.fstat(fd)
    why = _not_ours(st)
    if why is None:
        return fd
    try:
        _remove_foreign(dir_fd, name, st, why, where)
    finally:
        os.close(fd)
    return None


def _create(dir_fd: int, name: str, flags: int) -> int:
    """A new file ``name`` in ``dir_fd`` (FileExistsError if anything stands there), mode 0600."""
    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o600)  # exactly: a umask may have taken the owner's bits
    except BaseException:
        os.close(fd)
        raise
    return fd


# ------------------------------------------------------------------------ the directories


def _refuse_top(path: str, st: os.stat_result) -> None:
    """Raise ConfigError if the opened directory ``path`` (status ``st``) may not hold this
    user's cache."""
    me = os.geteuid()
    name = _user(me).split(" ", 1)[0]
    if st.st_uid != me:
        raise ConfigError(
            f"cache directory {path} belongs to {_user(st.st_uid)}, not to you ({_user(me)}); fastfeed only uses a "
            "cache directory of your own, which no other user can change",
            url=path,
            hint=f"pass a directory of your own, e.g. cache_dir={path.rstrip('/')}-{name} (created with mode 0700)",
        )
    if st.st_mode & 0o022:
        who = "group and others" if st.st_mode & 0o022 == 0o022 else ("others" if st.st_mode & 0o002 else "its group")
        raise ConfigError(
            f"cache directory {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): another user could "
            "plant or replace what it serves; fastfeed does not share a cache between users",
            url=path,
            hint=f"make it private (chmod 700 {path}), or use a private subdirectory of it: "
            f"cache_dir={os.path.join(path, name)} (fastfeed creates it with mode 0700)",
        )


def _open_top(path: str, create: bool) -> int:
    """A descriptor of the checked directory ``path`` (made 0700 first if ``create``)."""
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        link = os.lstat(path)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"cache directory {path} is a symbolic link made by {_user(link.st_uid)}",
                url=path,
                hint="pass a directory of your own",
            )
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        _refuse_top(path, st)
        if create and stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)  # a umask took the owner's bits
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_subdir(parent: int, name: str, path: Path, create: bool) -> int:
    """A descriptor of the checked subdirectory ``name`` of ``parent`` (made 0700 if ``create``)."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise ConfigError(
            f"{path} is not a directory (a symbolic link or a file stands at its name)",
            url=str(path),
            hint=f"remove it (rm {path}); fastfeed makes the directory again",
        ) from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"{path} belongs to {_user(st.st_uid)}, not to you ({_user(os.geteuid())})",
                url=str(path),
                hint="have it removed (by its owner or root), or pass another cache_dir",
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode != 0o700:
            if mode & 0o022:
                log.warning(
                    "fastfeed cache: %s was writable by other users (mode %04o); made private (0700). Files in it "
                    "that fastfeed did not make for you are removed when found, never used",
                    path,
                    mode,
                )
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class _Tree:
    """Descriptors of a cache's checked directories (every file operation is relative to them)
    and of its ``.lock`` (-1 where not needed)."""

    root: int
    entries: int
    tmp: int
    lock: int = -1

    def close(self) -> None:
        for fd in (self.root, self.entries, self.tmp, self.lock):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _open_tree(cache_dir: str, create: bool) -> _Tree:
    """Check (and with ``create``, make) ``cache_dir`` and its ``v2/`` tree, and with
    ``create`` open (or make) ``.lock``; ConfigError for a directory the cache may not use,
    OSError for one it cannot."""
    top = _open_top(cache_dir, create)
    opened: list[int] = []
    try:
        root_path = Path(cache_dir, _VERSION_DIR)
        opened.append(_open_subdir(top, _VERSION_DIR, root_path, create))
        opened.append(_open_subdir(opened[0], "entries", root_path / "entries", create))
        opened.append(_open_subdir(opened[0], "tmp", root_path / "tmp", create))
        if create:
            opened.append(_open_lock(opened[0], root_path / ".lock"))
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    finally:
        os.close(top)
    return _Tree(*opened)


def _open_lock(root: int, where: Path) -> int:
    for _ in range(3):
        with contextlib.suppress(FileExistsError):
            return _create(root, ".lock", os.O_RDWR)
        fd = _open_checked(root, ".lock", os.O_RDWR, where)
        if fd is not None:
            return fd
    raise OSError(errno.EEXIST, f"{where} keeps being replaced")


def check_cache_dir(cache_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`~fastfeed.errors.ConfigError` if ``cache_dir`` (or its ``v2/`` tree, as
    far as it exists) is not a directory the cache may use (see the trust model above); nothing
    if it does not exist yet (it is made, 0700, when the cache opens). Logs a notice if it holds
    an older version's layout, which this one does not read."""
    path = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    try:
        fd = _open_top(path, create=False)
    except OSError:
        return  # missing (made later), or unusable: the cache says so when it opens
    try:
        for old in _OLD_VERSION_DIRS:
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.stat(old, dir_fd=fd, follow_symlinks=False).st_mode):
                    log.warning(
                        "fastfeed cache %s: %s/ holds shards cached by an older fastfeed, which this version does "
                        "not read (it checksums its entries, in %s/); remove it to free the space: rm -r %s",
                        path,
                        old,
                        _VERSION_DIR,
                        os.path.join(path, old),
                    )
    finally:
        os.close(fd)
    try:
        _open_tree(path, create=False).close()
    except OSError:
        return  # not all there yet


# ------------------------------------------------------------------------ entry checksums


def _chunks(size: int, chunk: int) -> int:
    return -(-size // chunk)


def trailer_size(size: int, chunk: int = _CHUNK) -> int:
    """Bytes of the trailer after an object of ``size`` bytes in its entry."""
    return 4 * _chunks(size, chunk) + _FOOTER.size


def _trailer(size: int, chunk: int, crcs: Sequence[int]) -> bytes:
    table = struct.pack(f"<{len(crcs)}I", *crcs)
    head = _FOOTER.pack(_MAGIC, size, chunk, len(crcs), 0)[:-4]
    return table + head + struct.pack("<I", _native.crc32c(table + head))


class _Damaged(Exception):
    """An entry whose size or trailer is wrong (the message says how)."""


def _read_trailer(fd: int, size: int) -> tuple[int, tuple[int, ...]]:
    """``(chunk, CRCs)`` from the trailer of the entry open at ``fd`` of an object of ``size``
    bytes; raises :class:`_Damaged`."""
    length = os.fstat(fd).st_size
    if length < size + _FOOTER.size:
        raise _Damaged(f"is truncated ({length} bytes; the shard alone has {size})")
    foot = os.pread(fd, _FOOTER.size, length - _FOOTER.size)
    magic, recorded, chunk, count, crc = _FOOTER.unpack(foot)
    low, high = _CHUNK_RANGE
    if magic != _MAGIC or recorded != size or not low <= chunk <= high or count != _chunks(size, chunk):
        raise _Damaged(f"is truncated or its trailer is damaged ({length} bytes)")
    if length != size + 4 * count + _FOOTER.size:
        raise _Damaged(f"is truncated or has extra bytes ({length} bytes, not {size + 4 * count + _FOOTER.size})")
    table = os.pread(fd, 4 * count, size)
    if len(table) != 4 * count or _native.crc32c(table + foot[:-4]) != crc:
        raise _Damaged("has a damaged trailer (its CRC32C does not match)")
    return chunk, struct.unpack(f"<{count}I", table)


class _Checksums:
    """The CRC32C of each ``chunk`` bytes of a stream of bytes fed in order (a fill's)."""

    def __init__(self, chunk: int = _CHUNK) -> None:
        self.chunk = chunk
        self.size = 0
        self.crcs: list[int] = []
        self._crc = 0
        self._filled = 0  # bytes of the current chunk

    def update(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            n = min(self.chunk - self._filled, len(data) - pos)
            self._crc = _native.crc32c(data[pos : pos + n], self._crc)
            self._filled += n
            pos += n
            if self._filled == self.chunk:
                self.crcs.append(self._crc)
                self._crc = self._filled = 0
        self.size += len(data)

    def trailer(self) -> bytes:
        return _trailer(self.size, self.chunk, self.crcs + ([self._crc] if self._filled else []))


def _check_chunks(
    data: memoryview, base: int, chunk: int, crcs: Sequence[int], first: int, last: int, done: bytearray
) -> int | None:
    """[worker thread] Check chunks ``first..last-1`` of an entry whose bytes from offset
    ``base`` are ``data`` against ``crcs``, skipping the runs marked in ``done`` and marking
    those that pass; the first that fails, or None. Each run of unchecked chunks is one native
    call (the GIL is not taken between its chunks)."""
    i = first
    while i < last:
        if done[i]:
            i += 1
            continue
        j = i
        while j < last and not done[j]:
            j += 1
        lo = i * chunk - base
        got = _native.crc32c_chunks(data[lo : lo + (j - i) * chunk], chunk)
        for k, crc in enumerate(got, start=i):
            if crc != crcs[k]:
                return k
            done[k] = 1
        i = j
    return None


class _Entry(NamedTuple):
    """An entry opened for a hit: its descriptor (holding LOCK_SH), its name in the directory
    ``dir_fd``, and its checksums."""

    fd: int
    dir_fd: int
    name: str
    chunk: int
    crcs: tuple[int, ...]


class _Busy:
    """An entry another process holds locked beyond the deadline (read the store instead)."""


_BUSY = _Busy()


# ------------------------------------------------------------------------ file I/O


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise EOFError(f"cache file ended at byte {offset + got}")
        got += n


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


#: Alignment of O_DIRECT writes (memory address, file offset and length): the page size, which
#: is a multiple of every common logical block size.
_DIRECT_ALIGN = mmap.PAGESIZE


def _address(view: memoryview) -> int | None:
    try:
        import numpy as np

        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
    except (TypeError, ValueError):
        return None


def _write_part(fd: int, direct_fd: int | None, data: memoryview, offset: int) -> None:
    """Write a fill's part: through ``direct_fd`` (O_DIRECT) when the part is aligned in memory,
    offset and length (every part of a shard but its last, with pooled buffers), else buffered
    through ``fd``."""
    if (
        direct_fd is not None
        and offset % _DIRECT_ALIGN == 0
        and len(data) % _DIRECT_ALIGN == 0
        and (_address(data) or 1) % _DIRECT_ALIGN == 0
    ):
        try:
            _pwrite_all(direct_fd, data, offset)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _pwrite_all(fd, data, offset)


def _write_and_sum(fd: int, direct_fd: int | None, data: memoryview, offset: int, sums: _Checksums) -> None:
    """[worker thread] Write a fill's part and add it to the fill's checksums."""
    _write_part(fd, direct_fd, data, offset)
    sums.update(data)


def _sum_file(fd: int, size: int, sums: _Checksums) -> None:
    """[worker thread] Add bytes ``[0, size)`` of ``fd`` to ``sums`` (a fill resumed after its
    first filler died)."""
    buf = memoryview(bytearray(_FILL_PART))
    for start in range(0, size, _FILL_PART):
        piece = buf[: min(_FILL_PART, size - start)]
        _pread_into(fd, piece, start)
        sums.update(piece)


def _seal(fd: int, sums: _Checksums) -> None:
    """[worker thread] Append the trailer to a filled part file and make it durable."""
    _pwrite_all(fd, memoryview(sums.trailer()), sums.size)
    os.fsync(fd)


@dataclass
class CacheCounters:
    """This process's cache counters (ints: read without locks)."""

    hits: int = 0
    misses: int = 0
    bytes_from_cache: int = 0
    fills_completed: int = 0
    fills_failed: int = 0
    bypassed: int = 0
    evicted: int = 0
    #: Entries removed because they were truncated or failed a checksum.
    dropped: int = 0


#: ``next_use(url_hash, now_hash)``: when the shard with ``url_hash`` is next read, in epochs
#: from the start of the current one, as seen while the shard ``now_hash`` is being read;
#: ``None`` if the plan does not use it. Provided by the dataset (see :mod:`fastfeed.dataset`).
Planner = Callable[[str, str], float | None]


@dataclass(frozen=True)
class _Source:
    """One shard as the cache sees it: where its bytes come from when they are not on local
    disk (``store``), and who is told about them."""

    info: ObjectInfo
    key: str
    loc: Location
    store: RangeReader
    #: Bytes GET from the store, bytes read from local disk.
    on_fetched: Callable[[int], None] | None
    on_cached: Callable[[int], None] | None
    #: The owner's task set: fills started for it are added (it cancels them on close).
    tasks: set[asyncio.Task[Any]] | None
    part_size: int

    def fetched(self, n: int) -> None:
        if self.on_fetched is not None:
            self.on_fetched(n)


@dataclass
class _Claim:
    """A reader in this process asking its own fill for bytes ``[start, end)`` before they land."""

    end: int
    out: memoryview
    future: asyncio.Future[memoryview | None]


@dataclass
class _FillState:
    """What a running fill of this process has issued, and the claims on parts it has not."""

    #: Parts start at ``base + k * part_size``; bytes before ``issued`` have been asked for.
    base: int = 0
    part_size: int = 1
    size: int = 0
    issued: int = 0
    claims: dict[int, _Claim] = field(default_factory=dict)
    #: CRC32Cs of the bytes written so far (the entry's trailer).
    sums: _Checksums = field(default_factory=_Checksums)

    def is_part(self, start: int, end: int) -> bool:
        """``[start, end)`` is one of the parts the fill will issue."""
        return (
            start >= self.issued
            and (start - self.base) % self.part_size == 0
            and end == min(start + self.part_size, self.size)
        )


class ShardCache:
    """The cache of one directory, as used by one process (see the module docstring).

    Get it with :meth:`for_config` (one per directory per process, recreated after fork).
    Its methods run on the IO loop (``fastfeed._loop``).
    """

    _instances: dict[tuple[int, str], ShardCache] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def for_config(cls, config: CacheConfig) -> ShardCache:
        key = (os.getpid(), config.dir)
        with cls._instances_lock:
            cache = cls._instances.get(key)
            if cache is None or cache.config != config:
                cache = cls(config)
                cls._instances[key] = cache
            return cache

    def __init__(self, config: CacheConfig) -> None:
        """Raises :class:`~fastfeed.errors.ConfigError` for a directory the cache may not use
        (another user's, or writable by others); one it cannot use (unwritable, a file in the
        way) disables the cache with a warning, or raises :class:`CacheError`."""
        self.config = config
        self.root = Path(config.dir, _VERSION_DIR)
        self.entries = self.root / "entries"
        self.tmp = self.root / "tmp"
        self.counters = CacheCounters()
        self.enabled = True
        self._warned: set[str] = set()
        self._fills: dict[str, asyncio.Task[None]] = {}
        #: Set (and replaced) each time a fill of this process lands a part: its readers wake
        #: at once instead of polling the part file's size.
        self._landed: dict[str, asyncio.Event] = {}
        self._failed: set[str] = set()  # keys whose fill failed in this process: not retried
        self._fill_states: dict[str, _FillState] = {}
        #: A lock another process held past ``_LOCK_S``: tried, not waited for, until it is
        #: seen free (``.lock``; entries by key).
        self._lock_stuck = False
        self._stuck_entries: set[str] = set()
        #: Directory trees replaced by a new one after the directory was removed (their
        #: descriptors stay open: a running fill may still use one).
        self._retired: list[_Tree] = []
        self._tree: _Tree | None = None
        try:
            self._open()
        except OSError as exc:
            self._disable(f"cache directory {config.dir} is not usable: {exc}")
            return
        self.cleanup()

    def _open(self) -> None:
        """Open (making them where missing) and check the directories and ``.lock``."""
        tree = _open_tree(self.config.dir, create=True)
        try:
            probe = f".probe-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
            os.close(_create(tree.tmp, probe, os.O_WRONLY))
            os.unlink(probe, dir_fd=tree.tmp)
        except BaseException:
            tree.close()
            raise
        if self._tree is not None:
            self._retired.append(self._tree)
        self._tree = tree

    def close(self) -> None:
        """Close the directory descriptors (entries being read stay readable); the cache is
        disabled from then on."""
        for tree in [*self._retired, *([self._tree] if self._tree is not None else [])]:
            tree.close()
        self._retired.clear()
        self._tree = None
        self.enabled = False

    # ------------------------------------------------------------------ bookkeeping

    def _disable(self, why: str) -> None:
        if self.config.on_error == "raise":
            raise CacheError(why, url=self.config.dir, hint="fix the directory or pass cache_on_error='warn'")
        log.warning("%s; reading from the store without caching", why)
        self.enabled = False

    def _warn_once(self, kind: str, message: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message, *args)

    @property
    def tree(self) -> _Tree:
        assert self._tree is not None, "the cache is disabled or closed"
        return self._tree

    def entry_path(self, key: str) -> str:
        """Where ``key``'s entry is (for messages and tools: the cache itself opens by descriptor)."""
        return str(self.entries / f"{key}{_ENTRY}")

    def tmp_path(self, key: str) -> str:
        return str(self.tmp / f"{key}{_PART}")

    def cleanup(self) -> int:
        """Delete part files no live process is filling (left by a crash), and anything in
        ``tmp/`` fastfeed did not make; returns how many part files were deleted."""
        removed = 0
        tmp = self.tree.tmp
        for name in _listdir(tmp):
            if not name.endswith(_PART):
                continue
            fd = _open_checked(tmp, name, os.O_RDONLY, self.tmp / name)
            if fd is None:
                continue
            try:
                if _try_flock(fd, fcntl.LOCK_EX) and _unlink_if_same(tmp, name, fd):
                    removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info("fastfeed cache %s: removed %d incomplete shard(s) left by a stopped process", self.root, removed)
        return removed

    async def _lock_global(self, lock: int) -> bool:
        """Take ``.lock`` (open at ``lock``; LOCK_EX) within ``_LOCK_S``; False (after one
        warning) if another process holds it longer, and from then on without waiting, until
        it is seen free."""
        if await _flock_within(lock, fcntl.LOCK_EX, 0.0 if self._lock_stuck else _LOCK_S):
            self._lock_stuck = False
            return True
        if not self._lock_stuck:
            self._lock_stuck = True
            log.warning(
                "fastfeed cache: another process has held %s for more than %.0fs (fastfeed holds it only while it "
                "makes room for a shard); shards are read from the store, not cached, until it is free (see who "
                "holds it: fuser -v %s)",
                self.root / ".lock",
                _LOCK_S,
                self.root / ".lock",
            )
        return False

    def _usage(self) -> int:
        return sum(_size_of(n) for n in _listdir(self.tree.entries)) + sum(_size_of(n) for n in _listdir(self.tree.tmp))

    async def _reserve(self, key: str, size: int, planner: Planner | None) -> bool:
        """Make room for a fill of ``size`` bytes whose part file already exists (so it is
        counted); False if the shard should not be cached."""
        lock = self.tree.lock
        if not await self._lock_global(lock):
            return False
        try:
            over = self._usage() - self.config.limit
            if over <= 0:
                return True
            victims = self._victims(key, planner)
            if victims is None:
                return False
            for name in victims:
                if over <= 0:
                    break
                if self._evict(name):
                    over -= _size_of(name)
            return over <= 0
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

    def _victims(self, key: str, planner: Planner | None) -> list[str] | None:
        """Entries in eviction order, or None if the incoming shard is the best one to skip."""
        entries = self.tree.entries
        names = [n for n in _listdir(entries) if n.endswith(_ENTRY)]
        mine = url_hash_of(key)
        stale = [n for n in names if url_hash_of(n) == mine]  # older versions of this object
        rest = [n for n in names if url_hash_of(n) != mine]

        def mtime(name: str) -> float:
            try:
                return os.stat(name, dir_fd=entries, follow_symlinks=False).st_mtime
            except FileNotFoundError:
                return 0.0

        if planner is None:
            return stale + sorted(rest, key=mtime)  # least recently used first
        inf = float("inf")
        nexts: dict[str, float] = {}
        for n in rest:
            t = planner(url_hash_of(n), mine)
            nexts[n] = inf if t is None else t  # not in the plan: never needed again
        order = sorted(rest, key=lambda n: (-nexts[n], mtime(n)))  # farthest next use first
        incoming = planner(mine, mine)
        if incoming is not None:
            # Belady: only shards needed again later than this one make way for it.
            order = [n for n in order if nexts[n] > incoming]
            if not order and not stale:
                return None
        return stale + order

    def _evict(self, name: str) -> bool:
        entries = self.tree.entries
        fd = _open_checked(entries, name, os.O_RDONLY, self.entries / name)
        if fd is None:
            return True  # gone (or not ours, and removed): its space is free
        try:
            if not _try_flock(fd, fcntl.LOCK_EX):
                return False  # being read
            if _unlink_if_same(entries, name, fd):
                self.counters.evicted += 1
            return True
        finally:
            os.close(fd)

    def drop(self, dir_fd: int, name: str, fd: int, url: str, why: str, then: str) -> None:
        """Remove the entry ``name`` (open at ``fd``) that ``why`` says is damaged, with a
        warning naming it, the shard's ``url`` and what happens ``then``."""
        _unlink_if_same(dir_fd, name, fd)
        self.counters.dropped += 1
        log.warning("fastfeed cache: entry %s of %s %s; removed, %s", self.entries / name, url, why, then)

    # ------------------------------------------------------------------ the read path

    async def open(
        self,
        info: ObjectInfo,
        loc: Location,
        store: RangeReader,
        planner: Planner | None = None,
        on_fetched: Callable[[int], None] | None = None,
        on_cached: Callable[[int], None] | None = None,
        tasks: set[asyncio.Task[Any]] | None = None,
        part_size: int = _FILL_PART,
    ) -> Any:
        """Something with ``read_range`` (as :class:`~fastfeed.store.base.Store`) and ``aclose``
        reading ``info``'s object through the cache (a hit, a fill, or a wait on another
        process's fill), or ``store`` itself (bypass: not cached).

        A fill this starts runs on the IO loop, added to ``tasks`` (its owner cancels them when
        it closes: a fill uses the owner's ``store``); ``on_fetched(n)`` counts bytes it GETs
        from the store, ``on_cached(n)`` bytes read from local disk. The result has ``hit``
        (found complete) and ``close()``; a hit's :meth:`_CachedFile.verified_view` gives
        checked views of the mapped entry. A fill GETs ``part_size`` bytes at a time: a reader
        of the shard gets each part as soon as it is written.
        """
        if not self.enabled or info.etag is None:
            return store
        key = entry_key(info)
        if key in self._failed:
            return store
        src = _Source(info, key, loc, store, on_fetched, on_cached, tasks, part_size)
        for _ in range(8):
            entry = await self._open_entry(key, info)
            if isinstance(entry, _Busy):
                self.counters.bypassed += 1
                return store
            if entry is not None:
                self.counters.hits += 1
                return _CachedFile(self, src, entry.fd, None, entry=entry)
            try:
                fd = self._open_part(key)
            except OSError as exc:
                self._fill_failed(key, exc)
                return store
            if fd is None:
                continue  # something fastfeed did not make stood there (removed): look again
            fill = self._fills.get(key)
            if fill is None and _try_flock(fd, fcntl.LOCK_EX):
                tree, name = self.tree, f"{key}{_PART}"
                if not _same_at(tree.tmp, name, fd):
                    os.close(fd)  # unlinked or completed between open and lock: look again
                    continue
                if _exists_at(tree.entries, f"{key}{_ENTRY}"):
                    _unlink_if_same(tree.tmp, name, fd)  # a fill finished just now: drop the new part
                    os.close(fd)
                    continue
                if not await self._reserve(key, info.size, planner):
                    self.counters.bypassed += 1
                    _unlink_if_same(tree.tmp, name, fd)
                    os.close(fd)
                    return store
                self.counters.misses += 1
                try:
                    reader = self._reader_of(tree, name, fd)  # its own description: no lock
                except BaseException:
                    _unlink_if_same(tree.tmp, name, fd)
                    os.close(fd)
                    raise
                return _CachedFile(self, src, reader, self._start_fill(src, fd))
            # Another process (or this one) is filling: read what lands.
            self.counters.misses += 1
            return _CachedFile(self, src, fd, fill)
        return store

    def _open_part(self, key: str) -> int | None:
        """``key``'s part file: a new one (this process made it) or the one another fill
        made; None if something else stood at its name (now removed)."""
        name = f"{key}{_PART}"
        try:
            return _create(self.tree.tmp, name, os.O_RDWR)
        except FileExistsError:
            return _open_checked(self.tree.tmp, name, os.O_RDWR, self.tmp / name)
        except FileNotFoundError:
            # The cache directory was removed under a running job (rm -rf): make it again.
            self._open()
            return _create(self.tree.tmp, name, os.O_RDWR)

    def take_over(self, key: str, locked_fd: int) -> int | None:
        """A reader now holding LOCK_EX on ``key``'s part file at ``locked_fd`` (its filler
        died): a new read descriptor for it if it is still the live part file (then the caller
        continues its fill on ``locked_fd``), else None."""
        tree, name = self.tree, f"{key}{_PART}"
        if not _same_at(tree.tmp, name, locked_fd) or os.fstat(locked_fd).st_nlink != 1:
            return None
        return self._reader_of(tree, name, locked_fd)

    @staticmethod
    def _reader_of(tree: _Tree, name: str, fd: int) -> int:
        """A second descriptor (its own open file description: no lock) of the part file at ``fd``."""
        reader = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=tree.tmp)
        mine, theirs = os.fstat(reader), os.fstat(fd)
        if (mine.st_ino, mine.st_dev) != (theirs.st_ino, theirs.st_dev):
            os.close(reader)
            raise OSError(errno.ESTALE, f"the part file {name} changed while it was locked")
        return reader

    async def _open_entry(self, key: str, info: ObjectInfo) -> _Entry | _Busy | None:
        """``key``'s entry, locked LOCK_SH and its trailer checked; None if there is none (or
        it was damaged or not ours: removed), ``_BUSY`` if another process holds it locked."""
        tree, name = self.tree, f"{key}{_ENTRY}"
        fd = _open_checked(tree.entries, name, os.O_RDONLY, self.entries / name)
        if fd is None:
            return None
        entry: _Entry | None = None
        try:
            # An evictor holds LOCK_EX only for an unlink: anything longer is not fastfeed's.
            stuck = key in self._stuck_entries
            if not await _flock_within(fd, fcntl.LOCK_SH, 0.0 if stuck else _LOCK_S):
                if not stuck:
                    self._stuck_entries.add(key)
                    log.warning(
                        "fastfeed cache: another process has held %s locked for more than %.0fs (fastfeed locks an "
                        "entry only to remove it); reading %s from the store instead (see who holds it: fuser -v %s)",
                        self.entries / name,
                        _LOCK_S,
                        info.url,
                        self.entries / name,
                    )
                return _BUSY
            self._stuck_entries.discard(key)
            if not _same_at(tree.entries, name, fd):
                return None  # evicted between open and lock
            try:
                chunk, crcs = _read_trailer(fd, info.size)
            except _Damaged as exc:
                self.drop(tree.entries, name, fd, info.url, str(exc), "fetching the shard again")
                return None
            with contextlib.suppress(OSError):
                os.utime(fd)  # recently used (LRU)
            entry = _Entry(fd, tree.entries, name, chunk, crcs)
            return entry
        finally:
            if entry is None:
                os.close(fd)

    def map_entry(self, entry: _Entry, size: int) -> memoryview | None:
        """A read-only view of the first ``size`` bytes (the shard) of ``entry``, or None.

        The mapping is made from a second descriptor of the same file: ``mmap`` keeps a
        duplicate of the descriptor it is given for as long as the mapping lives, and a
        duplicate of ``entry.fd`` would hold the lock with it. So closing the entry releases the
        lock (it can be evicted), while views handed to the consumer stay valid after the file
        is unlinked.
        """
        try:
            fd = os.open(entry.name, os.O_RDONLY | _FILE_FLAGS, dir_fd=entry.dir_fd)
        except OSError:
            return None
        try:
            mine, locked = os.fstat(fd), os.fstat(entry.fd)
            if (mine.st_ino, mine.st_dev) != (locked.st_ino, locked.st_dev):
                return None  # not the file we hold (cannot happen while its LOCK_SH is held)
            return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def _start_fill(self, src: _Source, fd: int) -> asyncio.Task[None]:
        """Fill ``src`` on the IO loop; ``fd`` holds LOCK_EX on the part file (the task owns it)."""
        task = asyncio.get_running_loop().create_task(self._fill(src, fd))
        self._fills[src.key] = task
        if src.tasks is not None:
            src.tasks.add(task)
            task.add_done_callback(src.tasks.discard)
        task.add_done_callback(lambda _: self._fills.pop(src.key, None))
        return task

    async def _fill(self, src: _Source, fd: int) -> None:
        """[holds LOCK_EX on the part file] Download the rest of the object, then publish it.

        A part a reader of this process has claimed (:meth:`claim`) is fetched straight into
        the reader's buffer and handed over once written; other parts are fetched into pooled
        buffers. Either way each byte is copied once from the socket and once to the page
        cache, and never read back (its CRC32C is taken in the thread that writes it).
        """
        key, info, tree = src.key, src.info, self.tree
        name = f"{key}{_PART}"
        pool = pool_for(src.part_size)
        direct_fd = self._open_direct(tree, name, fd) if self.config.io == "direct" else None
        # (start, GET, the claim it serves or None, the pooled buffer it fills or None)
        pending: list[tuple[int, asyncio.Task[memoryview], _Claim | None, mmap.mmap | None]] = []
        # Bytes a dead filler left are valid: resume after them (a partial trailer goes).
        offset = os.fstat(fd).st_size
        if offset > info.size:
            os.ftruncate(fd, info.size)
            offset = info.size
        next_start = offset
        state = self._fill_states[key] = _FillState(offset, src.part_size, info.size, offset)
        published = False
        try:
            # The readers that opened this shard run first, so their claims are in before the
            # first GETs are issued.
            await asyncio.sleep(0)
            if offset:
                await _in_thread(_sum_file, fd, offset, state.sums)
            while offset < info.size:
                while len(pending) < _FILL_WINDOW and next_start < info.size:
                    end = min(next_start + src.part_size, info.size)
                    claim = state.claims.pop(next_start, None)
                    if claim is not None and claim.future.done():
                        claim = None  # its reader was cancelled
                    buffer: mmap.mmap | None = None
                    if claim is not None:
                        out = claim.out
                    else:  # parts are at most part_size: the pool's size
                        buffer = pool.take()
                        out = memoryview(buffer)[: end - next_start]
                    read = src.store.read_range(src.loc, next_start, end, info.etag, out=out)
                    pending.append((next_start, asyncio.create_task(read), claim, buffer))
                    next_start = state.issued = end
                start, task, claim, buffer = pending[0]
                data = await task
                await _in_thread(_write_and_sum, fd, direct_fd, data, start, state.sums)
                pending.pop(0)
                src.fetched(len(data))
                offset = start + len(data)
                if claim is not None:
                    _settle(claim, data)
                else:
                    pool.give(buffer)
                self._signal_landed(key)
            try:
                await _in_thread(_seal, fd, state.sums)
            except asyncio.CancelledError:
                # Every byte is here (the owner is closing): publishing is cheap, finish it.
                with contextlib.suppress(OSError):
                    self._publish(tree, key, info, fd)
                    published = True
                raise
            self._publish(tree, key, info, fd)
            published = True
        except BaseException as exc:
            if published:
                raise  # cancelled after publishing: nothing to undo
            for _, task, _, _ in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*(t for _, t, _, _ in pending), return_exceptions=True)
            with contextlib.suppress(OSError):
                _unlink_if_same(tree.tmp, name, fd)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._fill_failed(key, exc)
        finally:
            # Readers whose claim was not served read the part file or the store instead.
            if self._fill_states.get(key) is state:
                del self._fill_states[key]
            for claim in [*state.claims.values(), *(c for _, _, c, _ in pending if c is not None)]:
                _settle(claim, None)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            if direct_fd is not None:
                os.close(direct_fd)
            self._signal_landed(key)

    async def claim(self, key: str, start: int, end: int, out: memoryview) -> memoryview | None:
        """Bytes ``[start, end)`` of ``key`` fetched by this process's fill straight into
        ``out``, returned once they are also on disk; ``None`` when the fill cannot serve them
        that way (no fill of ``key`` runs here, it has already issued that range, or the range
        is not one of its parts): read them from the part file then."""
        state = self._fill_states.get(key)
        if state is None or not state.is_part(start, end) or start in state.claims:
            return None
        claim = _Claim(end, out, asyncio.get_running_loop().create_future())
        state.claims[start] = claim
        try:
            return await claim.future
        finally:
            if state.claims.get(start) is claim:
                del state.claims[start]  # cancelled before the fill issued it

    def _open_direct(self, tree: _Tree, name: str, fd: int) -> int | None:
        """A second, ``O_DIRECT`` descriptor of the part file ``fd`` for its fill's writes; None
        (buffered writes) where the file system or the platform has no direct I/O."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            self._warn_once("direct", "fastfeed cache: O_DIRECT is not available here; fills are buffered")
            return None
        try:
            direct = os.open(name, os.O_WRONLY | flag | _FILE_FLAGS, dir_fd=tree.tmp)
        except OSError as exc:
            self._warn_once("direct", "fastfeed cache %s: no direct I/O (%s); fills are buffered", self.config.dir, exc)
            return None
        mine, theirs = os.fstat(direct), os.fstat(fd)
        if (mine.st_ino, mine.st_dev) != (theirs.st_ino, theirs.st_dev):
            os.close(direct)  # cannot happen while fd holds the part file's LOCK_EX
            return None
        return direct

    def _signal_landed(self, key: str) -> None:
        event = self._landed.pop(key, None)
        if event is not None:
            event.set()

    async def landed(self, key: str, timeout: float) -> None:
        """Wait until this process's fill of ``key`` lands its next part (or ends), at most
        ``timeout`` seconds."""
        event = self._landed.get(key)
        if event is None:
            event = self._landed[key] = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _publish(self, tree: _Tree, key: str, info: ObjectInfo, fd: int) -> None:
        written, expected = os.fstat(fd).st_size, info.size + trailer_size(info.size)
        if written != expected:
            raise OSError(errno.EIO, f"cache fill of {info.url} wrote {written} of {expected} bytes")
        # Atomic: the entry appears complete (a rename never follows a link at its target).
        os.rename(f"{key}{_PART}", f"{key}{_ENTRY}", src_dir_fd=tree.tmp, dst_dir_fd=tree.entries)
        self.counters.fills_completed += 1

    def _fill_failed(self, key: str, exc: BaseException) -> None:
        self.counters.fills_failed += 1
        self._failed.add(key)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            if self.config.on_error == "raise":
                log.error("fastfeed cache %s is full: %s", self.config.dir, exc)
            self._warn_once(
                "full",
                "fastfeed cache %s: the disk is full (%s); shards that do not fit are read from the store "
                "(lower cache_limit to fit the disk)",
                self.config.dir,
                exc,
            )
        elif isinstance(exc, OSError):
            self._warn_once("os", "fastfeed cache %s: %s; reading from the store instead", self.config.dir, exc)
        else:  # the store's error: the reader gets it from its own read of the store
            log.debug("cache fill of %s failed: %r", key, exc)


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


class _CachedFile:
    """One shard read through the cache: from the entry (a hit, each chunk checked against its
    CRC32C before it is served) or from the part file as its bytes land (a fill by this or
    another process); from the store if the fill fails or the entry fails its check."""

    def __init__(
        self,
        cache: ShardCache,
        src: _Source,
        fd: int,
        fill: asyncio.Task[None] | None,
        *,
        entry: _Entry | None = None,
    ):
        self.cache = cache
        self.src = src
        self.info = src.info
        self.key = src.key
        self.fd: int | None = fd
        self.fill = fill
        self.entry = entry
        self.complete = self.hit = entry is not None
        self.bypass = False
        #: For a hit: the whole entry, memory-mapped; readers take views of it (no copy).
        self.mapped: memoryview | None = None
        #: For a hit: 1 for each chunk checked against its CRC32C in this mapping.
        self._checked = bytearray(len(entry.crcs) if entry is not None else 0)
        if entry is not None and self.info.size > 0:
            self.mapped = cache.map_entry(entry, self.info.size)

    def _chunks_of(self, start: int, end: int) -> tuple[int, int]:
        assert self.entry is not None
        chunk = self.entry.chunk
        return start // chunk, max(start // chunk, (end - 1) // chunk + 1)

    def _served(self, n: int) -> None:
        self.cache.counters.bytes_from_cache += n
        if self.src.on_cached is not None:
            self.src.on_cached(n)

    async def verified_view(self, start: int, end: int) -> memoryview | None:
        """For a hit: bytes ``[start, end)`` of the mapped entry as a read-only view (no copy),
        each chunk they touch checked against its CRC32C the first time this mapping serves
        it; None when the shard is not (or no longer) a mapped hit: use :meth:`read_range`."""
        mapped, entry = self.mapped, self.entry
        if mapped is None or entry is None or self.bypass:
            return None
        first, last = self._chunks_of(start, end)
        if _VERIFY and not all(self._checked[first:last]):
            bad = await _in_thread(_check_chunks, mapped, 0, entry.chunk, entry.crcs, first, last, self._checked)
            if bad is not None:
                self._failed_check(bad)
                return None
        # Checked: served even if the entry was closed or another chunk found damaged meanwhile
        # (the mapping lives as long as this view of it).
        view = mapped[start:end]
        self._served(len(view))
        return view

    async def _read_checked(self, start: int, end: int, out: memoryview) -> bool:
        """For a hit that could not be mapped: read ``[start, end)`` into ``out``, checking the
        whole chunks it touches; False if one fails (the shard is then read from the store)."""
        assert self.entry is not None and self.fd is not None
        entry, fd = self.entry, self.fd
        first, last = self._chunks_of(start, end)
        lo, hi = first * entry.chunk, min(last * entry.chunk, self.info.size)
        buf = memoryview(bytearray(hi - lo))

        def read_and_check() -> int | None:
            try:
                _pread_into(fd, buf, lo)
            except EOFError:
                return first  # cut short since it was opened
            done = bytearray(len(entry.crcs))
            return _check_chunks(buf, lo, entry.chunk, entry.crcs, first, last, done) if _VERIFY else None

        bad = await _in_thread(read_and_check)
        if bad is not None:
            self._failed_check(bad)
            return False
        out[:] = buf[start - lo : end - lo]
        self._served(end - start)
        return True

    def _failed_check(self, chunk: int) -> None:
        """Chunk ``chunk`` of the hit failed its CRC32C: drop the entry, read from the store."""
        if self.bypass or self.entry is None or self.fd is None:
            return
        entry = self.entry
        self.mapped = None  # views already handed out stay valid (and were checked)
        self.bypass = True
        lo, hi = chunk * entry.chunk, min((chunk + 1) * entry.chunk, self.info.size)
        self.cache.drop(
            entry.dir_fd,
            entry.name,
            self.fd,
            self.info.url,
            f"fails its CRC32C check in bytes {lo}-{hi - 1}",
            "this read takes the shard from the store and its next read caches it again",
        )

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        view = memoryview(bytearray(end - start)) if out is None else out
        if self.hit and not self.bypass:
            data = await self.verified_view(start, end)
            if data is not None:
                view[:] = data
                return view
            if not self.bypass and self.fd is not None and await self._read_checked(start, end, view):
                return view
        if not self.complete and not self.bypass:
            if self.fill is not None and not self.fill.done():
                # This process fills the shard: take the bytes from the fill itself.
                data = await self.cache.claim(self.key, start, end, view)
                if data is not None:
                    return data
            await self._wait_for(end)
        if self.bypass or self.fd is None:
            data = await self.src.store.read_range(loc, start, end, etag, out=view)
            self.src.fetched(len(data))
            return data
        await _in_thread(_pread_into, self.fd, view, start)
        self._served(len(view))
        return view

    async def _wait_for(self, end: int) -> None:
        assert self.fd is not None
        delay = 0.0005
        landed = -1
        last_progress = time.monotonic()
        last_liveness = 0.0
        while True:
            size = os.fstat(self.fd).st_size
            if size >= self.info.size:
                self.complete = True
                return
            if size >= end:
                return
            now = time.monotonic()
            if size != landed:
                landed, last_progress = size, now
            if self.fill is not None and self.fill.done():
                # This process's fill ended incomplete (its error was logged): use the store.
                self.bypass = True
                return
            if self.fill is None and now - last_liveness > _LIVENESS_S:
                last_liveness = now
                if _try_flock(self.fd, fcntl.LOCK_EX):
                    # The filler is gone. Take over if the part file is still the live one: the
                    # locked descriptor goes to the fill, this reader opens its own.
                    reader = self.cache.take_over(self.key, self.fd)
                    if reader is not None:
                        locked, self.fd = self.fd, reader
                        self.fill = self.cache._start_fill(self.src, locked)
                        continue
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    if os.fstat(self.fd).st_size < self.info.size:
                        self.bypass = True  # removed by a clean-up: read from the store
                        return
                    continue
            if now - last_progress > _STALL_S:
                log.warning("no progress filling %s for %.0fs; reading it from the store", self.info.url, _STALL_S)
                self.bypass = True
                return
            if self.fill is not None and not self.fill.done():
                await self.cache.landed(self.key, _LIVENESS_S)  # our own fill: woken when a part lands
            else:
                await asyncio.sleep(delay)  # another process's fill: poll the part file
                delay = min(delay * 2, 0.02)

    def close(self) -> None:
        """Close the file (releasing a hit's LOCK_SH); further reads go to the store. Views of
        a mapped entry stay valid (the mapping is released with the last of them)."""
        self.mapped = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            self.bypass = True
            os.close(fd)


def _settle(claim: _Claim, data: memoryview | None) -> None:
    if not claim.future.done():
        claim.future.set_result(data)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker thread. If the caller is cancelled, the thread's work still
    ends before the cancellation propagates: it may be using a file descriptor the caller
    closes next (a reused descriptor number would then be another file)."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


def _listdir(dir_fd: int | Path) -> list[str]:
    try:
        return os.listdir(dir_fd)
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------- CLI helpers


@dataclass(frozen=True)
class CacheInfo:
    """What a cache directory holds."""

    dir: str
    entries: int
    entry_bytes: int
    partial: int
    partial_bytes: int


def _root_of(cache_dir: str | os.PathLike[str]) -> Path:
    path = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    root = Path(path, _VERSION_DIR)
    if not root.is_dir():
        old = [d for d in _OLD_VERSION_DIRS if Path(path, d).is_dir()]
        hint = (
            f"it holds a cache of an older fastfeed ({old[0]}/), which this version does not read: remove it"
            if old
            else "pass the cache_dir a dataset used"
        )
        raise ConfigError(f"{cache_dir} is not a fastfeed cache directory", url=path, hint=hint)
    return root


def entry_files(cache_dir: str | os.PathLike[str]) -> list[Path]:
    """The entry files of a cache directory, sorted (each is a shard's bytes and a trailer of
    ``trailer_size(size)`` bytes); for tools and benchmarks."""
    entries = _root_of(cache_dir) / "entries"
    return sorted(entries / n for n in _listdir(entries) if n.endswith(_ENTRY))


def cache_info(cache_dir: str | os.PathLike[str]) -> CacheInfo:
    """Count the entries and part files of a cache directory (no lock taken)."""
    root = _root_of(cache_dir)
    entries = [n for n in _listdir(root / "entries") if n.endswith(_ENTRY)]
    parts = [n for n in _listdir(root / "tmp") if n.endswith(_PART)]
    partial_bytes = 0
    for n in parts:
        with contextlib.suppress(FileNotFoundError):
            partial_bytes += min(os.lstat(root / "tmp" / n).st_size, _size_of(n))
    return CacheInfo(str(root.parent), len(entries), sum(_size_of(n) for n in entries), len(parts), partial_bytes)


def clear_cache(cache_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """Remove every entry not being read and every part file no process is filling; returns
    ``(removed, skipped_in_use)``. Safe while training runs: in-use files are left alone.
    Raises :class:`~fastfeed.errors.ConfigError` for a directory that is not the user's own."""
    root = _root_of(cache_dir)
    tree = _open_tree(str(root.parent), create=False)
    removed = skipped = 0
    try:
        for dir_fd, sub, suffix in ((tree.entries, "entries", _ENTRY), (tree.tmp, "tmp", _PART)):
            for name in _listdir(dir_fd):
                if not name.endswith(suffix):
                    continue
                fd = _open_checked(dir_fd, name, os.O_RDONLY, root / sub / name)
                if fd is None:
                    continue
                try:
                    if _try_flock(fd, fcntl.LOCK_EX):
                        if _unlink_if_same(dir_fd, name, fd):
                            removed += 1
                    else:
                        skipped += 1
                finally:
                    os.close(fd)
    finally:
        tree.close()
    return removed, skipped
