"""The cache directory on a node shared with other users: the checks that make it this user's
alone, and the descriptor-relative file operations every other cache module goes through.

It owns the trust model below: :func:`open_tree` checks ``cache_dir`` and makes or checks its
``v2/``, ``v2/entries/`` and ``v2/tmp/`` (:class:`Tree` holds their descriptors);
:func:`open_checked` and :func:`create_file` are the only ways a cache file is opened or made;
:func:`check_cache_dir` refuses a directory up front. The fills, hits and eviction that use
them are in :mod:`fastfeed.cache.node`; the entry format is in :mod:`fastfeed.cache.entries`.

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
  tried for ``_LOCK_S`` (10 s, :mod:`fastfeed.cache.node`); if another process still holds the
  lock, the shard is read from the store, not cached, with a warning naming the file, and until
  the lock is seen free again it is tried once, not waited for. A reader of a part file whose
  filler holds its lock but lands no byte for ``_STALL_S`` (120 s,
  :mod:`fastfeed.cache.reading`) reads the shard from the store. Every other lock is only tried
  (``LOCK_NB``). Nothing blocks in ``flock``.
* *Verified entries.* Opening an entry for a hit checks its size and trailer (two ``pread``
  calls, before any byte is served): a truncated entry or a damaged trailer is removed and the
  shard fetched (and cached) again at once, with a warning naming it. Each chunk's CRC32C is
  checked the first time a read of the mapping touches it, in a worker thread, at memory speed
  (CRC32C with SSE4.2), before its bytes are handed out; every new mapping (every hit) checks
  again. A chunk that fails: the entry is removed, the rest of the shard is read from the
  store, its next read caches it again, and a warning names the entry and the bytes
  (:mod:`fastfeed.cache.reading`; the trailer's format is in :mod:`fastfeed.cache.entries`).

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
import logging
import os
import pwd
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastfeed.errors import ConfigError

__all__ = [
    "FILE_FLAGS",
    "OLD_VERSION_DIRS",
    "VERSION_DIR",
    "Tree",
    "check_cache_dir",
    "create_file",
    "flock_within",
    "in_thread",
    "listdir",
    "open_checked",
    "open_tree",
    "pread_into",
    "same_at",
    "try_flock",
    "unlink_if_same",
]

log = logging.getLogger(__name__)

#: The directory (in ``cache_dir``) of this version's layout.
VERSION_DIR = "v2"
#: Layouts of older versions, not read (a notice says they can be removed).
OLD_VERSION_DIRS = ("v1",)
#: Flags of every open of a cache file: never through a symbolic link, never blocked by a
#: FIFO, never inherited by a program the process runs.
FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# ------------------------------------------------------------------------ files


def try_flock(fd: int, flags: int) -> bool:
    """``flock(fd, flags)`` without waiting; False if another process holds a conflicting lock."""
    try:
        fcntl.flock(fd, flags | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


async def flock_within(fd: int, flags: int, timeout: float) -> bool:
    """``flock(fd, flags)``, tried until ``timeout`` seconds have passed (on the event loop:
    never blocks it); False if another process still holds a conflicting lock."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not try_flock(fd, flags):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def same_at(dir_fd: int, name: str, fd: int) -> bool:
    """``name`` in ``dir_fd`` is (still) the file open at ``fd``."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


def unlink_if_same(dir_fd: int, name: str, fd: int) -> bool:
    """Unlink ``name`` from ``dir_fd`` if it is (still) the file open at ``fd``; whether it did."""
    if same_at(dir_fd, name, fd):
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


def open_checked(dir_fd: int, name: str, flags: int, where: Path) -> int | None:
    """``name`` in the cache directory ``dir_fd`` opened with ``flags`` (and ``FILE_FLAGS``)
    if it is a file fastfeed made for this user; None if nothing usable stands there (nothing,
    or something else, which is then removed with a warning)."""
    try:
        fd = os.open(name, flags | FILE_FLAGS, dir_fd=dir_fd)
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


def create_file(dir_fd: int, name: str, flags: int) -> int:
    """A new file ``name`` in ``dir_fd`` (FileExistsError if anything stands there), mode 0600."""
    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o600, dir_fd=dir_fd)
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
class Tree:
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


def open_tree(cache_dir: str, create: bool) -> Tree:
    """Check (and with ``create``, make) ``cache_dir`` and its ``v2/`` tree, and with
    ``create`` open (or make) ``.lock``; ConfigError for a directory the cache may not use,
    OSError for one it cannot."""
    top = _open_top(cache_dir, create)
    opened: list[int] = []
    try:
        root_path = Path(cache_dir, VERSION_DIR)
        opened.append(_open_subdir(top, VERSION_DIR, root_path, create))
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
    return Tree(*opened)


def _open_lock(root: int, where: Path) -> int:
    for _ in range(3):
        with contextlib.suppress(FileExistsError):
            return create_file(root, ".lock", os.O_RDWR)
        fd = open_checked(root, ".lock", os.O_RDWR, where)
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
        for old in OLD_VERSION_DIRS:
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.stat(old, dir_fd=fd, follow_symlinks=False).st_mode):
                    log.warning(
                        "fastfeed cache %s: %s/ holds shards cached by an older fastfeed, which this version does "
                        "not read (it checksums its entries, in %s/); remove it to free the space: rm -r %s",
                        path,
                        old,
                        VERSION_DIR,
                        os.path.join(path, old),
                    )
    finally:
        os.close(fd)
    try:
        open_tree(path, create=False).close()
    except OSError:
        return  # not all there yet


# ------------------------------------------------------------------------ file I/O


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the bytes of ``fd`` from ``offset``; EOFError if the file ends first."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise EOFError(f"cache file ended at byte {offset + got}")
        got += n


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
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


def listdir(dir_fd: int | Path) -> list[str]:
    """The names in a directory (a descriptor or a path); none if it is gone."""
    try:
        return os.listdir(dir_fd)
    except FileNotFoundError:
        return []
