"""``StreamingDataset``: WebDataset shards from S3-compatible storage or local files.

Data flow per process (the training process, or each DataLoader worker)::

    epoch plan (plan.py) -> Prefetcher (prefetch.py, IO thread) -> tar reader (reader.py)
        -> optional shuffle buffer -> samples

The dataset object itself holds only plain, picklable configuration and the resolved shard
list, so it travels to DataLoader workers under both ``fork`` and ``spawn``; each process opens
its own IO loop and connections on first iteration.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import random
from collections.abc import Generator, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from fastfeed.cache.config import CacheConfig
from fastfeed.cache.entries import entry_key, url_hash_of
from fastfeed.cache.files import check_cache_dir
from fastfeed.cache.node import Planner, ShardCache
from fastfeed.config import PrefetchConfig, S3Config
from fastfeed.errors import ConfigError
from fastfeed.order.plan import Piece, rank_pieces, rank_sample_count, shard_order, worker_pieces
from fastfeed.order.reshard import segment_rank_pieces
from fastfeed.order.source import Segment
from fastfeed.read.prefetch import FetchStats, Prefetcher
from fastfeed.read.reader import Sample, iter_samples
from fastfeed.read.sources import SourceItem, count_shard_samples, resolve_source
from fastfeed.read.stages import Staged, apply_stages
from fastfeed.store.base import ObjectInfo
from fastfeed.store.pool import StoreSet

__all__ = ["StreamingDataset"]

log = logging.getLogger(__name__)

Source = SourceItem | Sequence[SourceItem]
T = TypeVar("T")


class StreamingDataset(Staged, IterableDataset[Sample]):
    """Stream WebDataset-style tar shards as sample dicts.

    Args:
        source: ``s3://bucket/prefix/`` or a local directory (every ``*.tar`` under it, sorted),
            a brace pattern like ``s3://bucket/train/shard-{000000..000099}.tar``, a single shard,
            ``file://`` URLs or plain paths, ``http(s)://`` shards, a dataset manifest (a
            :class:`~fastfeed.shards.DatasetManifest` or the URL of its ``.json``: no listing,
            no HEAD per shard, and a shard changed since it was made fails its first read), or
            a list of any of these.
        shuffle: shuffle the shard order and samples (through a buffer of ``shuffle_buffer``
            samples per worker). The order is a pure function of ``(seed, epoch)`` and the
            rank/worker layout: the same seed gives the same order on every run.
        seed: the shuffle seed.
        shuffle_buffer: samples held for sample-level shuffling (memory: this many samples).
        endpoint_url: S3 endpoint (MinIO, SeaweedFS, ...). Default: ``AWS_ENDPOINT_URL`` or AWS.
        s3: full S3 options (credentials, region, addressing style, timeouts, retries);
            ``endpoint_url`` overrides its endpoint.
        prefetch: the prefetch settings whole (a :class:`~fastfeed.PrefetchConfig`), instead of
            the four keywords below (giving both is an error).
        part_size: bytes per ranged GET (``"8MiB"``).
        max_requests: concurrent GETs per process.
        shards_in_flight: shards fetched ahead, including the one being read.
        byte_budget: bound on fetched-but-unparsed bytes per process (``"256MiB"``); a
            sample larger than it is still read, held as one copy on top of it.
        rank, world_size: this process's place among DDP ranks. Default: from
            ``torch.distributed`` if initialized (construct the dataset after
            ``init_process_group``), else the ``RANK`` / ``WORLD_SIZE`` environment variables,
            else a single rank.
        remainder: with several ranks, every rank yields exactly the same number of samples
            per epoch; ``"drop"`` skips the last ``total % world_size`` samples of the epoch's
            order, ``"pad"`` wraps around and repeats up to ``world_size - 1`` samples.
        cache_dir, cache_limit: cache shards on this node's local disk, bounded by
            ``cache_limit`` bytes (``"500GB"``): each shard is fetched from the store once per
            node and shared by every worker, rank and job of the user there (see
            :mod:`fastfeed.cache.node`). A limit that cannot hold ``shards_in_flight`` of the largest
            shard is an error, and so is a ``cache_dir`` owned by another user or writable by
            group or others (use a private directory, e.g. ``/scratch/$USER/fastfeed``).
        cache: the node cache's settings whole (a :class:`~fastfeed.CacheConfig`), instead of
            the ``cache_*`` keywords (giving both is an error); its ``io`` may be ``"auto"``.
        cache_on_error: ``"warn"`` (default) or ``"raise"`` when the cache directory is not
            writable or its disk is full; with ``"warn"`` reading continues from the store.
        cache_policy: ``"belady"`` (default; evicts the shard this dataset needs again
            farthest in the future, by its deterministic plan) or ``"lru"``.
        cache_io: how fills write to the cache: ``"auto"`` (default) writes with ``O_DIRECT``
            where the file system takes it (no copy into the page cache: a fill costs little
            CPU, and pushes nothing else out of memory), else buffered; ``"direct"`` does the
            same but warns when it falls back; ``"buffered"`` writes through the page cache (the
            next epoch of a dataset that fits in memory then reads it from memory).
        index_cache: where per-shard sample counts of objects in a store are remembered (keyed by
            URL, ETag and size), so a dataset is scanned once per machine when counts are needed
            (several ranks, ``len()``); ``None`` disables it.
        zero_copy: sample values are read-only ``memoryview`` objects instead of ``bytes``.
            Cache hits are then views of the memory-mapped entry, with no copy at all (what
            LitData hands out); other reads are views of a copy. Every view stays valid for as
            long as it is referenced, also after its entry is evicted. For consumers that take
            any buffer (``np.frombuffer``, ``torch.frombuffer``, ``io.BytesIO``); a view keeps
            its whole entry mapped. ``fastfeed.DataLoader``'s batches are unaffected.

    Each sample is a dict: ``"__key__"``, ``"__url__"`` and one ``bytes`` value per file
    extension, exactly as WebDataset yields them (``memoryview`` with ``zero_copy=True``).

    Splitting: samples are divided between ranks (see :mod:`fastfeed.order.plan`), then shard pieces
    round-robin between DataLoader workers. Call :meth:`set_epoch` before each epoch to get a
    new shuffle order (in ``fastfeed.DataLoader`` also with ``persistent_workers=True``; in
    torch's DataLoader persistent workers keep the epoch they started with, as for any iterable
    dataset).

    Errors (all :class:`fastfeed.errors.FastfeedError`): a missing bucket or object, denied
    access, an unreachable endpoint, an empty prefix or a malformed URL raise at construction;
    a corrupt or truncated shard raises when it is reached, naming the shard.
    """

    def __init__(
        self,
        source: Source,
        *,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        endpoint_url: str | None = None,
        s3: S3Config | None = None,
        prefetch: PrefetchConfig | None = None,
        part_size: int | str | None = None,
        max_requests: int | None = None,
        shards_in_flight: int | None = None,
        byte_budget: int | str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        remainder: str = "drop",
        index_cache: str | os.PathLike[str] | None = "~/.cache/fastfeed/counts",
        cache: CacheConfig | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | str | None = None,
        cache_on_error: str | None = None,
        cache_policy: str | None = None,
        cache_io: str | None = None,
        zero_copy: bool = False,
    ) -> None:
        super().__init__()
        self.zero_copy = bool(zero_copy)
        if s3 is None:
            self.s3_config = S3Config.resolve(endpoint_url=endpoint_url)
        elif endpoint_url is not None:
            self.s3_config = S3Config(**{**s3.__dict__, "endpoint_url": endpoint_url})
        else:
            self.s3_config = s3
        fields = {
            "part_size": part_size,
            "max_requests": max_requests,
            "shards_in_flight": shards_in_flight,
            "byte_budget": byte_budget,
        }
        if prefetch is not None:
            _not_both("prefetch", fields)
            self.prefetch_config = prefetch
        else:
            self.prefetch_config = PrefetchConfig.from_args(
                part_size=part_size,
                max_requests=max_requests,
                shards_in_flight=shards_in_flight,
                byte_budget=byte_budget,
            )
        if shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        rank_sample_count(1, 1, remainder)  # validates `remainder`
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.remainder = remainder
        self.index_cache = os.path.expanduser(os.fspath(index_cache)) if index_cache is not None else None
        self.rank, self.world_size = _distributed_place(rank, world_size)
        self.epoch = 0
        # After a resume on another world size: the closed segments of epoch _segments_epoch
        # (see fastfeed.order.reshard) and, cached, this rank's pieces of the segment after them.
        self._segments: tuple[Segment, ...] = ()
        self._segments_epoch = -1
        # This rank's pieces of the segment after some closed segments of an epoch, by key.
        self._segment_pieces: tuple[tuple[int, tuple[Segment, ...]], list[Piece]] | None = None
        self._io_done = FetchStats()  # finished iterations of this process
        self._io_live: list[FetchStats] = []  # iterations (streams) in progress
        self.shards: list[ObjectInfo] = resolve_source(source, StoreSet(self._control_plane))
        cache_fields = {
            "cache_dir": cache_dir,
            "cache_limit": cache_limit,
            "cache_on_error": cache_on_error,
            "cache_policy": cache_policy,
            "cache_io": cache_io,
        }
        if cache is not None:
            _not_both("cache", cache_fields)
            self.cache_config: CacheConfig | None = self._check_cache(
                cache.dir, cache.limit, cache.on_error, cache.policy, cache.io
            )
        else:
            self.cache_config = self._check_cache(
                cache_dir, cache_limit, cache_on_error or "warn", cache_policy or "belady", cache_io or "auto"
            )
        self._read_streams = 1
        self._planners: dict[tuple[int, int], Planner] = {}
        self._counts: list[int] | None = None
        if self.world_size > 1:
            self._counts = self._count_samples()
        log.info(
            "fastfeed dataset: %d shards, %.1f MiB, rank %d/%d",
            len(self.shards),
            sum(s.size for s in self.shards) / 2**20,
            self.rank,
            self.world_size,
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned (and persistent) DataLoader workers: without the cache planners
        (closures, rebuilt on first use) and this process's live I/O counters."""
        state = self.__dict__.copy()
        state["_planners"] = {}
        state["_io_live"] = []
        return state

    # ------------------------------------------------------------------ public API

    @property
    def _control_plane(self) -> S3Config:
        """The S3 config for work done where the dataset is built (listing, HEAD, counting):
        always aiobotocore, so a parent process never starts obstore's runtime, which would
        hang DataLoader workers forked from it. Iteration uses ``s3_config.engine``."""
        return dataclasses.replace(self.s3_config, engine="aiobotocore")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (shuffled) order the next iteration produces. An iteration
        already started (``iter()`` called) keeps reading the epoch it started with."""
        if int(epoch) != self._segments_epoch:
            self._segments, self._segments_epoch = (), -1
        self.epoch = int(epoch)

    def set_read_streams(self, streams: int) -> None:
        """Tell the dataset how many streams an epoch is read as (:class:`fastfeed.DataLoader`
        calls this with its ``num_streams``; with a plain torch DataLoader, call it with
        ``num_workers`` or leave the default 1). Only the node cache uses it: its eviction
        plans by when each stream reads each shard next. The samples read do not change."""
        streams = int(streams)
        if streams < 1:
            raise ConfigError(f"read streams must be at least 1, got {streams}")
        self._read_streams = streams

    @property
    def read_streams(self) -> int:
        """Streams an epoch is read as, for the cache's plan (see :meth:`set_read_streams`)."""
        return self._read_streams

    @property
    def shard_sample_counts(self) -> list[int]:
        """Samples per shard (computed on first use by scanning the shards' headers)."""
        if self._counts is None:
            self._counts = self._count_samples()
        return list(self._counts)

    @property
    def total_samples(self) -> int:
        """Samples in the whole dataset (all ranks)."""
        return sum(self.shard_sample_counts)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (over all of its DataLoader workers)."""
        return rank_sample_count(self.total_samples, self.world_size, self.remainder)

    def io_stats(self) -> dict[str, float]:
        """Cumulative I/O counters of this process's iterations: ``fetch_wait_s`` (time the
        reader waited for bytes from the store), ``bytes_fetched``, ``requests``, the cache's
        counters, ``bytes_copied`` (bytes the reader copied to join samples that straddle
        parts), and the largest bytes any one prefetcher held at once (``held_peak``), of which
        the copy of a straddling sample (``copy_peak``), and by how much the rest ever exceeded
        the byte budget (``over_budget``; see :mod:`fastfeed.read.prefetch`)."""
        totals = {
            "fetch_wait_s": self._io_done.wait_s,
            "bytes_fetched": float(self._io_done.bytes_fetched),
            "requests": float(self._io_done.requests),
        }
        for live in list(self._io_live):
            totals["fetch_wait_s"] += live.wait_s
            totals["bytes_fetched"] += live.bytes_fetched
            totals["requests"] += live.requests
        done = self._io_done
        totals["cache_hits"] = float(done.cache_hits + sum(x.cache_hits for x in self._io_live))
        totals["cache_misses"] = float(done.cache_misses + sum(x.cache_misses for x in self._io_live))
        totals["bytes_from_cache"] = float(done.bytes_from_cache + sum(x.bytes_from_cache for x in self._io_live))
        totals["bytes_copied"] = float(done.bytes_copied + sum(x.bytes_copied for x in self._io_live))
        for peak in ("held_peak", "copy_peak", "over_budget"):
            totals[peak] = float(max([getattr(x, peak) for x in (done, *self._io_live)]))
        return totals

    def plan(
        self,
        worker: int = 0,
        num_workers: int = 1,
        epoch: int | None = None,
        segments: Sequence[Segment] | None = None,
    ) -> list[Piece]:
        """The shard pieces a worker of this rank reads in ``epoch`` (default: the current one).

        ``segments``: the epoch's closed segments (see :mod:`fastfeed.order.reshard`); default: the
        current epoch's when ``epoch`` is the current one, else none.
        """
        if epoch is None:
            epoch = self.epoch
        if segments is None:
            segments = self.segments if epoch == self.epoch else ()
        if segments:
            pieces = self._segment_rank_pieces(int(epoch), tuple(segments))
            counts = self.shard_sample_counts
            return worker_pieces(pieces, worker=worker, num_workers=num_workers, counts=counts)
        order = shard_order(len(self.shards), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        counts_or_none = self._counts if self.world_size > 1 else None
        pieces = rank_pieces(
            order, counts_or_none, rank=self.rank, world_size=self.world_size, remainder=self.remainder
        )
        return worker_pieces(pieces, worker=worker, num_workers=num_workers, counts=counts_or_none)

    def _segment_rank_pieces(self, epoch: int, segments: tuple[Segment, ...]) -> list[Piece]:
        """This rank's pieces of the segment after ``segments`` of ``epoch`` (cached)."""
        key = (epoch, segments)
        cached = self._segment_pieces
        if cached is not None and cached[0] == key:
            return cached[1]
        dataset = self
        if epoch != self.epoch:
            # segment_rank_pieces reads the dataset's epoch: give it a copy at ``epoch``
            # (sharing the sample counts, computed first so that the copy does not scan again).
            self.shard_sample_counts  # noqa: B018
            dataset = copy.copy(self)
            dataset.epoch = epoch
        pieces = segment_rank_pieces(dataset, segments, self.rank, self.world_size)
        self._segment_pieces = (key, pieces)
        return pieces

    @property
    def segment(self) -> int:
        """How many times the current epoch was resumed on a different world size (0: never)."""
        return len(self._segments) if self._segments_epoch == self.epoch else 0

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The current epoch's closed segments (see :mod:`fastfeed.order.reshard`)."""
        return self._segments if self.segment else ()

    def resume_segments(self, epoch: int, segments: tuple[Segment, ...]) -> None:
        """Read the rest of ``epoch`` after ``segments`` (called by the loader's resume)."""
        self.epoch = int(epoch)
        self._segments, self._segments_epoch = tuple(segments), int(epoch)

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch  # this iteration's, whatever set_epoch does meanwhile
        pieces = self.plan(worker, num_workers)
        samples = self._read(pieces, epoch)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = _rng(self.seed, epoch, self.rank, worker)
            samples = _shuffle(samples, self.shuffle_buffer, rng)
        return apply_stages(samples, self.stages) if self.stages else samples

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def prefetching(self, pieces: list[Piece], share: int = 1, epoch: int | None = None) -> Iterator[Prefetcher]:
        """A prefetcher over ``pieces``' shards whose I/O counters feed :meth:`io_stats`.

        ``share``: how many prefetchers of this dataset run at once in this process (one per
        stream); each gets that fraction of the byte budget, requests and shards in flight, so
        the process as a whole stays within the configured bounds. ``epoch``: the epoch the
        pieces are of (default: the current one), for the cache's plan.
        """
        shards = [self.shards[p.shard] for p in pieces]
        cfg = self.stream_prefetch_config(share)
        cache = planner = None
        if self.cache_config is not None:
            cache = ShardCache.for_config(self.cache_config)
            planner = self._cache_planner(epoch) if self.cache_config.policy == "belady" else None
        prefetcher = Prefetcher(shards, StoreSet(self.s3_config), cfg, cache, planner)
        self._io_live.append(prefetcher.stats)
        try:
            yield prefetcher
        finally:
            prefetcher.close()
            self._io_live = [x for x in self._io_live if x is not prefetcher.stats]
            self._io_done.wait_s += prefetcher.stats.wait_s
            self._io_done.bytes_fetched += prefetcher.stats.bytes_fetched
            self._io_done.requests += prefetcher.stats.requests
            self._io_done.cache_hits += prefetcher.stats.cache_hits
            self._io_done.cache_misses += prefetcher.stats.cache_misses
            self._io_done.bytes_from_cache += prefetcher.stats.bytes_from_cache
            self._io_done.bytes_copied += prefetcher.stats.bytes_copied
            for peak in ("held_peak", "copy_peak", "over_budget"):
                setattr(self._io_done, peak, max(getattr(self._io_done, peak), getattr(prefetcher.stats, peak)))

    def stream_prefetch_config(self, share: int = 1) -> PrefetchConfig:
        """The prefetch bounds of one of ``share`` prefetchers running at once in a process. Each
        keeps at least two parts of budget (one a reader may hold, one to fetch the next) and,
        unless configured to one, two shards in flight: with one, a stream could not start
        fetching its next shard before it had parsed the last byte of the current one, and
        the samples of a batch spanning the two would be copied out first."""
        cfg = self.prefetch_config
        if share > 1:
            cfg = dataclasses.replace(
                cfg,
                byte_budget=max(2 * cfg.part_size, cfg.byte_budget // share),
                max_requests=max(2, cfg.max_requests // share),
                shards_in_flight=max(min(2, cfg.shards_in_flight), cfg.shards_in_flight // share),
            )
        return cfg

    def _check_cache(
        self,
        cache_dir: str | os.PathLike[str] | None,
        cache_limit: int | str | None,
        on_error: str,
        policy: str,
        io: str = "auto",
    ) -> CacheConfig | None:
        if cache_dir is None:
            if cache_limit is not None:
                raise ConfigError("cache_limit needs a cache_dir")
            return None
        if cache_limit is None:
            raise ConfigError("cache_dir needs a cache_limit", hint='e.g. cache_limit="500GB"')
        cached = [s.size for s in self.shards if not s.url.startswith("file://")]
        config = CacheConfig.of(cache_dir, cache_limit, on_error, policy, io)
        check_cache_dir(config.dir)  # another user's, or open to others: refused here, not in a worker
        need = max(cached, default=0) * self.prefetch_config.shards_in_flight
        if need > config.limit:
            raise ConfigError(
                f"cache_limit {config.limit} bytes cannot hold the largest shard ({max(cached)} bytes) times the "
                f"{self.prefetch_config.shards_in_flight} shards a reader keeps in flight ({need} bytes)",
                url=config.dir,
                hint="raise cache_limit or lower shards_in_flight",
            )
        return config

    def _cache_planner(self, epoch: int | None = None) -> Planner:
        """The cache's view of the future (see :mod:`fastfeed.cache.node`): when each shard is read
        next, in epochs from the start of ``epoch`` (default: the current one). All ranks and
        streams of a node advance together, so a shard's time in an epoch is its offset along
        the stream that reads it, over that stream's length."""
        epoch = self.epoch if epoch is None else epoch
        key = (epoch, self._read_streams)
        planner = self._planners.get(key)
        if planner is None:
            times = [self._use_times(epoch), self._use_times(epoch + 1)]

            def next_use(url_hash: str, now_hash: str) -> float | None:
                current = times[0].get(now_hash, [0.0])
                now = min(current) if current else 0.0
                later = [t for t in times[0].get(url_hash, []) if t > now]
                if later:
                    return min(later)
                following = times[1].get(url_hash)
                return 1.0 + min(following) if following else None

            planner = self._planners[key] = next_use
        return planner

    def _use_times(self, epoch: int) -> dict[str, list[float]]:
        counts = self._counts
        out: dict[str, list[float]] = {}
        order = shard_order(len(self.shards), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        streams = self._read_streams
        for rank in range(self.world_size):
            if self.world_size > 1 and counts is not None:
                base = rank_pieces(order, counts, rank=rank, world_size=self.world_size, remainder=self.remainder)
            else:
                base = rank_pieces(order, None, rank=0, world_size=1)
            for v in range(streams):
                pieces = worker_pieces(
                    base, worker=v, num_workers=streams, counts=counts if self.world_size > 1 else None
                )
                sizes = [p.size(counts) if counts is not None else 1 for p in pieces]
                total = max(1, sum(sizes))
                offset = 0
                for piece, size in zip(pieces, sizes, strict=True):
                    url_hash = url_hash_of(entry_key(self.shards[piece.shard]))
                    out.setdefault(url_hash, []).append(offset / total)
                    offset += size
        return out

    def _read(self, pieces: list[Piece], epoch: int | None = None) -> Iterator[Sample]:
        if not pieces:
            return
        with self.prefetching(pieces, epoch=epoch) as prefetcher:
            for piece, fetch in zip(pieces, prefetcher, strict=False):
                try:
                    samples = iter_samples(
                        fetch.url, fetch.chunks(), skip=piece.skip, limit=piece.limit, zero_copy=self.zero_copy
                    )
                    if piece.rows is None:
                        yield from samples
                    else:
                        wanted = {r - piece.skip for r in piece.rows}
                        yield from (x for i, x in enumerate(samples) if i in wanted)
                finally:
                    fetch.close()

    def _count_samples(self) -> list[int]:
        import torch.distributed as dist

        stores = StoreSet(self._control_plane)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Each rank scans a disjoint share of the shards, then all ranks exchange counts.
            world, rank = dist.get_world_size(), dist.get_rank()
            mine = list(range(rank, len(self.shards), world))
            local = count_shard_samples([self.shards[i] for i in mine], stores, self.prefetch_config, self.index_cache)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, dict(zip(mine, local, strict=True)))
            merged: dict[int, int] = {}
            for part in gathered:
                merged.update(part)
            return [merged[i] for i in range(len(self.shards))]
        return count_shard_samples(self.shards, stores, self.prefetch_config, self.index_cache)


def _distributed_place(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            auto_rank, auto_world = dist.get_rank(), dist.get_world_size()
        else:
            auto_rank = int(os.environ.get("RANK", "0"))
            auto_world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = auto_rank if rank is None else rank
        world_size = auto_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid distributed place: rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def _rng(seed: int, epoch: int, rank: int, worker: int) -> random.Random:
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank, worker, 0x5B0F]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def _shuffle(samples: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Reservoir-style shuffle buffer: holds at most ``size`` samples."""
    buffer: list[Sample] = []
    try:
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            j = rng.randrange(size)
            out, buffer[j] = buffer[j], sample
            yield out
        rng.shuffle(buffer)
        yield from buffer
    finally:
        if isinstance(samples, Generator):
            samples.close()  # stop the prefetcher now, not at garbage collection


def _not_both(whole: str, fields: dict[str, Any]) -> None:
    """A config object given whole together with any of its fields as keywords is an error."""
    given = sorted(k for k, v in fields.items() if v is not None)
    if given:
        raise ConfigError(
            f"StreamingDataset got {whole}= and also {', '.join(given)}",
            hint=f"set those fields in the {whole} object, or leave {whole}= out",
        )
