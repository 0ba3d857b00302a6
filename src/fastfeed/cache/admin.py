"""Inspecting and emptying a cache directory from outside a training run: the functions behind
``fastfeed cache info`` and ``fastfeed cache clear`` (and the benchmarks' look at the entries).
They take the same locks and make the same checks as the cache itself
(:mod:`fastfeed.cache.node`, :mod:`fastfeed.cache.files`), so they are safe while training runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from fastfeed.cache.entries import ENTRY_SUFFIX, PART_SUFFIX, size_of
from fastfeed.cache.files import (
    OLD_VERSION_DIRS,
    VERSION_DIR,
    listdir,
    open_checked,
    open_tree,
    try_flock,
    unlink_if_same,
)
from fastfeed.errors import ConfigError

__all__ = ["CacheInfo", "cache_info", "clear_cache", "entry_files"]


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
    root = Path(path, VERSION_DIR)
    if not root.is_dir():
        old = [d for d in OLD_VERSION_DIRS if Path(path, d).is_dir()]
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
    return sorted(entries / n for n in listdir(entries) if n.endswith(ENTRY_SUFFIX))


def cache_info(cache_dir: str | os.PathLike[str]) -> CacheInfo:
    """Count the entries and part files of a cache directory (no lock taken)."""
    root = _root_of(cache_dir)
    entries = [n for n in listdir(root / "entries") if n.endswith(ENTRY_SUFFIX)]
    parts = [n for n in listdir(root / "tmp") if n.endswith(PART_SUFFIX)]
    partial_bytes = 0
    for n in parts:
        with contextlib.suppress(FileNotFoundError):
            partial_bytes += min(os.lstat(root / "tmp" / n).st_size, size_of(n))
    return CacheInfo(str(root.parent), len(entries), sum(size_of(n) for n in entries), len(parts), partial_bytes)


def clear_cache(cache_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """Remove every entry not being read and every part file no process is filling; returns
    ``(removed, skipped_in_use)``. Safe while training runs: in-use files are left alone.
    Raises :class:`~fastfeed.errors.ConfigError` for a directory that is not the user's own."""
    root = _root_of(cache_dir)
    tree = open_tree(str(root.parent), create=False)
    removed = skipped = 0
    try:
        for dir_fd, sub, suffix in ((tree.entries, "entries", ENTRY_SUFFIX), (tree.tmp, "tmp", PART_SUFFIX)):
            for name in listdir(dir_fd):
                if not name.endswith(suffix):
                    continue
                fd = open_checked(dir_fd, name, os.O_RDONLY, root / sub / name)
                if fd is None:
                    continue
                try:
                    if try_flock(fd, fcntl.LOCK_EX):
                        if unlink_if_same(dir_fd, name, fd):
                            removed += 1
                    else:
                        skipped += 1
                finally:
                    os.close(fd)
    finally:
        tree.close()
    return removed, skipped
