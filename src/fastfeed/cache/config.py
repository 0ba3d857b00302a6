"""What the node cache is told and what it counts: :class:`CacheConfig` (the dataset's
``cache_*`` arguments, checked) and :class:`CacheCounters` (one process's hits, misses and
fills). Every other cache module takes these; this one depends on none of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fastfeed.config import parse_size
from fastfeed.errors import ConfigError

__all__ = ["CacheConfig", "CacheCounters"]


@dataclass(frozen=True)
class CacheConfig:
    """Where shards are cached and how much space they may take.

    Args:
        dir: the cache directory (created 0700 if missing); shared by every process of the user
            on the node. It must be the user's own and not writable by group or others (see the
            trust model in :mod:`fastfeed.cache.files`).
        limit: bytes the cache may use (int or ``"500GB"``); entries and fills in progress.
        on_error: ``"warn"`` (default): a full disk or unwritable directory logs a warning and
            reading continues from the store; ``"raise"``: raise :class:`~fastfeed.errors.CacheError`. (A
            directory the cache may not trust is always a ConfigError.)
        policy: ``"belady"`` (default): evict by the dataset's known future, falling back to
            least recently used for shards it does not plan to read; ``"lru"``: least recently
            used only.
        io: how fills write: ``"auto"`` (default): ``O_DIRECT`` where the file system takes
            it, else buffered, silently; ``"direct"``: the same, with a warning when it falls
            back; ``"buffered"``: through the page cache. Direct writes cost no copy into the page
            cache (a fill then costs a few percent of the epoch's CPU instead of about a third,
            measured on a 2-core VM) and push nothing else out of it; the first warm epoch reads
            the entries from the disk, and the next ones find them in the page cache.
    """

    dir: str
    limit: int
    on_error: str = "warn"
    policy: str = "belady"
    io: str = "auto"

    @classmethod
    def of(
        cls,
        cache_dir: str | os.PathLike[str],
        cache_limit: int | str,
        on_error: str = "warn",
        policy: str = "belady",
        io: str = "auto",
    ) -> CacheConfig:
        """A checked config from the dataset's arguments (``cache_limit`` may be ``"500GB"``;
        ``cache_dir`` is made absolute, ``~`` expanded); ConfigError for a value that cannot work."""
        if io not in ("auto", "buffered", "direct"):
            raise ConfigError(f"cache io={io!r} is invalid", hint="use 'auto', 'buffered' or 'direct'")
        if on_error not in ("warn", "raise"):
            raise ConfigError(f"cache on_error={on_error!r} is invalid", hint="use 'warn' or 'raise'")
        if policy not in ("belady", "lru"):
            raise ConfigError(f"cache policy={policy!r} is invalid", hint="use 'belady' or 'lru'")
        limit = parse_size(cache_limit, name="cache_limit")
        if limit <= 0:
            raise ConfigError(f"cache_limit must be > 0, got {cache_limit!r}")
        return cls(os.path.abspath(os.path.expanduser(os.fspath(cache_dir))), limit, on_error, policy, io)


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
