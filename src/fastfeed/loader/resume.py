"""Where the training loop is in an epoch, for ``DataLoader.state_dict()`` and
``load_state_dict()``: the loader's two resume trackers, one per kind of dataset.

* :class:`SamplerProgress` (map-style datasets): the index batches consumed and the random
  states the epoch's order and worker seeds were drawn from (:class:`SamplerDraw`); resuming
  replays the sampler's draws, not data.
* :class:`Progress` (:class:`~fastfeed.StreamingDataset`): each stream's position after the
  last batch delivered; resuming reads only the block each stream was in
  (:mod:`fastfeed.order.streams`), on another world size re-split (:mod:`fastfeed.order.reshard`).

The loader owns one of each; its iterations report to them (``begin``/``consumed``,
``start``/``delivered``), naming themselves by an owner token, so only the latest iteration's
progress counts. A loaded state waits here (``peek``) until the next ``iter()`` draws from it.
"""

from __future__ import annotations

import base64
import itertools
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fastfeed.errors import ConfigError
from fastfeed.loader.streaming import is_streaming
from fastfeed.order.reshard import close_segment
from fastfeed.order.source import Segment
from fastfeed.order.streams import StreamPos

__all__ = ["LoaderShape", "Progress", "Resume", "SamplerDraw", "SamplerProgress"]

log = logging.getLogger(__name__)


class LoaderShape(Protocol):
    """What the resume trackers read of their loader (a :class:`fastfeed.DataLoader`): a state
    is saved with, and resumes only into, a loader that batches the same way."""

    @property
    def dataset(self) -> Any: ...

    @property
    def batch_size(self) -> int | None: ...

    @property
    def drop_last(self) -> bool: ...

    @property
    def num_streams(self) -> int: ...


@dataclass
class SamplerDraw:
    """The random states an epoch of a map-style dataset was drawn from: ``seed_state``, the
    state of the generator the workers' base seed came from, before that draw; the sampler
    chain's generators and torch's global generator, before the sampler drew the epoch; and
    ``skip``, the batches a resumed iteration skips."""

    seed_state: torch.Tensor | None
    generator_states: list[torch.Tensor]
    global_state: torch.Tensor
    skip: int = 0


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(bytes(state.numpy())).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class SamplerProgress:
    """Progress through a map-style dataset's epoch: the index batches consumed by the loader's
    current iteration (delivered, or raised by the dataset), and the random states its order and
    worker seeds were drawn from. Resuming replays those draws, not data: the sampler's
    generators are set to the saved states, torch's global generator is set to its saved state
    for the draw and put back right after, so a resumed run consumes nothing from it."""

    VERSION = 2

    def __init__(self, index_sampler: Any, generator: torch.Generator | None) -> None:
        """``index_sampler``: the loader's (batch) sampler; ``generator``: its ``generator=``."""
        self.index_sampler = index_sampler
        generators = _sampler_generators(self.index_sampler)
        if generator is not None and all(g is not generator for g in generators):
            generators.append(generator)  # the workers' base seed is drawn from it
        self.generators = generators
        self._lock = threading.Lock()
        self.pending: SamplerDraw | None = None  # a loaded state, for the next iteration
        self.current: SamplerDraw | None = None
        self.owner: Any = None
        self.batches = 0

    def peek(self) -> SamplerDraw | None:
        """A loaded state, if any, for the next iteration (it stays until one begins with it)."""
        with self._lock:
            return self.pending

    def snapshot(self, seed_state: torch.Tensor | None) -> SamplerDraw:
        """The random states the sampler is about to draw from (and the base seed's)."""
        return SamplerDraw(seed_state, [g.get_state() for g in self.generators], torch.get_rng_state())

    def open(self, resume: SamplerDraw | None, *, eager: bool) -> Iterable[Any]:
        """The sampler's iterator for a new iteration, in the calling thread. ``eager``: its
        whole epoch drawn now (when the sampler has a ``len()``; one without may be endless and
        is read as batches are made). A loaded state is replayed from its saved states, its
        skipped batches drawn too, so every generator ends where the saved epoch left it, and
        torch's global generator is put back as it was."""
        if resume is None:
            it = iter(self.index_sampler)
            return list(it) if eager and _has_len(self.index_sampler) else it
        for g, state in zip(self.generators, resume.generator_states, strict=True):
            g.set_state(state)
        outer = torch.get_rng_state()
        torch.set_rng_state(resume.global_state)
        try:
            it = iter(self.index_sampler)
            next(itertools.islice(it, resume.skip, resume.skip), None)  # draw (and drop) the skipped batches
            return list(it) if eager and _has_len(self.index_sampler) else it
        finally:
            torch.set_rng_state(outer)

    def begin(self, owner: Any, record: SamplerDraw | None) -> None:
        """``owner`` (an iteration) is the one ``state()`` describes from now on."""
        with self._lock:
            self.owner = owner
            self.current = record
            self.batches = record.skip if record is not None else 0
            if record is not None and record is self.pending:
                self.pending = None  # used once

    def consumed(self, owner: Any) -> None:
        """One more index batch of ``owner``'s epoch used up (delivered, or raised by the dataset)."""
        with self._lock:
            if owner is self.owner:
                self.batches += 1

    def state(self, loader: LoaderShape) -> dict[str, Any]:
        """The ``state_dict()`` of a map-style loader (a loaded state not yet used: that one)."""
        with self._lock:
            record = self.current if self.pending is None else self.pending
            batches = self.batches if self.pending is None else self.pending.skip
        state: dict[str, Any] = {
            "version": self.VERSION,
            "kind": "sampler",
            "batches": batches,
            "batch_size": loader.batch_size,
            "drop_last": loader.drop_last,
            "dataset_len": _len_or_none(loader.dataset),
            "started": record is not None,
        }
        if record is not None:
            state["seed_state"] = _b64(record.seed_state) if record.seed_state is not None else None
            state["generators"] = [_b64(s) for s in record.generator_states]
            state["global_rng"] = _b64(record.global_state)
        return state

    def load(self, loader: LoaderShape, state: dict[str, Any]) -> None:
        """Check ``state`` against ``loader`` and keep it for the next iteration."""
        if state.get("kind") != "sampler" or state.get("version") != self.VERSION:
            raise ConfigError(
                f"cannot resume: this is not a map-style loader state of version {self.VERSION} "
                f"(kind={state.get('kind')!r}, version={state.get('version')!r})",
                hint="load the state_dict() of a loader over the same kind of dataset, saved by this fastfeed "
                "(states of fastfeed 0.1's map-style loaders cannot be replayed: restart the epoch)",
            )
        expect = {
            "batch_size": loader.batch_size,
            "drop_last": loader.drop_last,
            "dataset_len": _len_or_none(loader.dataset),
        }
        for key, value in expect.items():
            if state.get(key) != value:
                raise ConfigError(
                    f"cannot resume: the saved loader state has {key}={state.get(key)!r}, this loader {value!r}",
                    hint="resume with the same dataset, batch size and sampler",
                )
        if not state.get("started"):
            with self._lock:
                self.pending = None
            return
        saved = state["generators"]
        if len(saved) != len(self.generators):
            raise ConfigError(
                f"cannot resume: the sampler draws from {len(self.generators)} random generators, the saved "
                f"state from {len(saved)}",
                hint="resume with the same sampler (and the same generator= argument)",
            )
        seed = state.get("seed_state")
        record = SamplerDraw(
            _unb64(seed) if seed is not None else None,
            [_unb64(text) for text in saved],
            _unb64(state["global_rng"]),
            int(state["batches"]),
        )
        with self._lock:
            self.pending = record


def _len_or_none(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _sampler_generators(sampler: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects behind a (batch) sampler chain (``.generator`` attributes
    along ``.sampler`` links)."""
    gens: list[torch.Generator] = []
    obj, seen = sampler, set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not x for x in gens):
            gens.append(g)
        obj = getattr(obj, "sampler", None)
    return gens


def _has_len(sampler: Any) -> bool:
    try:
        len(sampler)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------- resume: StreamingDataset


class Progress:
    """What the training loop has received this epoch of a StreamingDataset (written by the
    loader's current iteration on each batch)."""

    VERSION = 3

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._lock = threading.Lock()
        self.epoch = int(getattr(dataset, "epoch", 0))
        self.segments: tuple[Segment, ...] = tuple(dataset.segments) if is_streaming(dataset) else ()
        self.positions: dict[int, StreamPos] = {}
        self.next_stream = 0
        self.base_seed: int | None = None
        self.resume: Resume | None = None
        self.owner: Any = None

    def peek(self, epoch: int) -> Resume | None:
        """A loaded state for ``epoch``, if any (it stays until an iteration starts with it)."""
        with self._lock:
            resume = self.resume
        if resume is not None and resume.epoch != epoch:
            log.warning("ignoring the loaded state of epoch %d: the dataset is at epoch %d", resume.epoch, epoch)
            return None
        return resume

    def start(self, owner: Any, streams: Any, resume: Resume | None) -> None:
        """``owner`` (an iteration reading ``streams``, its StreamConfig) is the one ``state()``
        describes from now on."""
        with self._lock:
            self.owner = owner
            self.epoch = streams.epoch
            self.segments = streams.segments
            self.positions = dict(streams.starts)
            self.next_stream = streams.next_stream
            self.base_seed = streams.base_seed
            self.resume = None  # used once (or a stale one of another epoch: ignored)

    def delivered(self, owner: Any, stream: int, after: StreamPos) -> None:
        """``owner`` handed the training loop a batch of ``stream``, which is now at ``after``."""
        with self._lock:
            if owner is self.owner:
                self.positions[stream] = after
                self.next_stream = stream + 1  # taken modulo num_streams when resuming

    def state(self, loader: LoaderShape) -> dict[str, Any]:
        """The ``state_dict()`` of a StreamingDataset loader."""
        ds = self.dataset
        with self._lock:
            return {
                "version": self.VERSION,
                "epoch": self.epoch,
                "num_streams": loader.num_streams,
                "batch_size": loader.batch_size,
                "drop_last": loader.drop_last,
                "seed": ds.seed,
                "shuffle": ds.shuffle,
                "shuffle_buffer": ds.shuffle_buffer,
                "remainder": ds.remainder,
                "rank": ds.rank,
                "world_size": ds.world_size,
                "shards": len(ds.shards),
                "segments": [seg.as_dict() for seg in self.segments],
                "next_stream": self.next_stream % loader.num_streams,
                "streams": {str(v): p.as_dict() for v, p in sorted(self.positions.items())},
                "base_seed": self.base_seed,
            }

    def load(self, loader: LoaderShape, state: dict[str, Any]) -> None:
        """Check ``state`` against the dataset and ``loader`` (on another world size, close the
        saved epoch's segment for re-splitting) and keep it for the next iteration."""
        ds = self.dataset
        if state.get("version") not in (1, 2, self.VERSION):
            raise ConfigError(
                f"cannot resume: loader state version {state.get('version')!r} is not supported",
                hint=f"this fastfeed reads versions 1 to {self.VERSION}",
            )
        # What the epoch consists of: must match for any resume.
        expect: dict[str, Any] = {
            "seed": getattr(ds, "seed", None),
            "shuffle": getattr(ds, "shuffle", None),
            "shuffle_buffer": getattr(ds, "shuffle_buffer", None),
            "shards": len(getattr(ds, "shards", ())),
            "remainder": getattr(ds, "remainder", None),
        }
        same_world = state.get("world_size") == getattr(ds, "world_size", None)
        if same_world:
            # Exact continuation: this rank's own streams, read the same way.
            expect.update(
                num_streams=loader.num_streams,
                batch_size=loader.batch_size,
                drop_last=loader.drop_last,
                rank=getattr(ds, "rank", None),
            )
        for key, value in expect.items():
            have = state.get(key, "drop" if key == "remainder" else None)
            if have != value:
                raise ConfigError(
                    f"cannot resume: the saved loader state has {key}={have!r}, this loader {value!r}",
                    hint="resume with the same dataset, seed, shuffle settings and remainder; on the same "
                    "world size each rank loads its own state with the same batch size and num_streams",
                )
        epoch = int(state["epoch"])
        segments = tuple(Segment.from_dict(d) for d in state.get("segments", []))
        positions = {int(v): StreamPos(**p) for v, p in state["streams"].items()}
        next_stream = int(state["next_stream"])
        seed = state.get("base_seed")
        base_seed = int(seed) if seed is not None and same_world else None
        if not same_world:
            closed = close_segment(
                ds,
                world_size=int(state["world_size"]),
                num_streams=int(state["num_streams"]),
                batch_size=int(state["batch_size"]),
                positions=positions,
            )
            segments += (closed,)
            positions, next_stream = {}, 0
            log.info(
                "resuming epoch %d on %d ranks from a state saved on %d: the samples not yet delivered are "
                "split across the ranks (none repeated; see fastfeed.order.reshard)",
                epoch,
                ds.world_size,
                closed.world_size,
            )
        ds.resume_segments(epoch, segments)
        with self._lock:
            self.resume = Resume(epoch, positions, next_stream, base_seed)


@dataclass
class Resume:
    """A loaded StreamingDataset state for the next iteration of ``epoch``: each stream's position,
    the stream to read next, and the workers' base seed (``None`` on another world size)."""

    epoch: int
    positions: dict[int, StreamPos]
    next_stream: int
    base_seed: int | None = None
