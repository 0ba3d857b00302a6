"""What every peer adapter shares: the :class:`Peer` lifecycle, run in the peer's own process
(:class:`~fastfeed.bench.peers.process.PeerProcess`), and the helpers the adapters read their
loaders and manage their copies with.

:class:`Peer` is used from the benchmarking process: :meth:`Peer.available` checks the imports
here; :meth:`Peer.prepare`, :meth:`Peer.run` and :meth:`Peer.cleanup` compute what an epoch must
deliver here, then do the work in the peer's process, started by :meth:`Peer.prepare` with the
environment the peer asks for (:meth:`Peer.environment`) and a ``TMPDIR`` of its own, and
stopped by :meth:`Peer.cleanup` (or after a call that failed: the next call starts a fresh one).
Between calls the peer's state (conversions uploaded, notes, Streaming's shared-memory prefixes)
is carried here, so a fresh process carries on where the last one stopped. The timed epoch runs
in the peer's process as it ran in the benchmarking process before: the figures
(:func:`fastfeed.bench.measure.measure_batches`: time, CPU of that process and its children,
peak memory) are that process's.

Subclasses implement the hooks that run in the peer's process: ``_epoch`` (required),
``_prepare``, ``_setup_process``, ``_after_epoch``, ``_cleanup``, ``_config`` and ``_workers``.
"""

from __future__ import annotations

import abc
import contextlib
import gc
import importlib
import re
import shutil
import warnings
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from fastfeed.bench.measure import Measurement, measure_batches
from fastfeed.bench.peers.common import Expected, PeerError, PeerUnavailable
from fastfeed.bench.peers.context import PeerContext, boto3_client
from fastfeed.bench.peers.process import PeerProcess

__all__ = [
    "Peer",
    "cache_snapshot",
    "count_batch",
    "delete_keys",
    "dir_stats",
    "import_error",
    "iterate_loader",
    "loader_kwargs",
    "quiet",
    "shutdown_loader_iter",
    "snapshot_diff",
    "upload_dir",
]


@contextlib.contextmanager
def quiet(*modules: str) -> Iterator[None]:
    """Ignore warnings raised from ``modules`` (and their submodules) in the block; worker
    processes forked in it inherit the filter."""
    with warnings.catch_warnings():
        for m in modules:
            warnings.filterwarnings("ignore", module=rf"{re.escape(m)}(\..*)?$")
        yield


def import_error(module: str, pip_name: str) -> str | None:
    """``None`` if ``module`` imports, else ``"pip install <pip_name> (<the error>)"``."""
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"pip install {pip_name} ({type(exc).__name__}: {exc})"
    return None


def shutdown_loader_iter(it: Any) -> None:
    """Stop a torch DataLoader iterator's worker processes now (also on an error mid-epoch)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def loader_kwargs(ctx: PeerContext, workers: int) -> dict[str, Any]:
    """A peer DataLoader's ``num_workers`` and ``timeout`` (``ctx.loader_timeout_s`` with workers)."""
    return {"num_workers": workers, "timeout": ctx.loader_timeout_s if workers else 0}


def count_batch(batch: Any, names: Sequence[str], byte_fields: Sequence[str]) -> tuple[int, int]:
    """(samples, payload bytes) of a collated batch: a dict by field name, or a tuple in
    ``names`` order. ``bytes`` fields must be lists of ``bytes``-like values."""
    if isinstance(batch, dict):
        cols = batch
    elif isinstance(batch, list | tuple):
        cols = dict(zip(names, batch, strict=True))
    else:
        raise PeerError(f"unexpected batch type {type(batch).__name__}")
    try:
        n = len(cols[names[0]])
        payload = sum(len(v) for f in byte_fields for v in cols[f])
    except KeyError as exc:
        raise PeerError(f"batch has no field {exc}") from None
    return n, payload


def iterate_loader(
    loader: Iterable[Any], ctx: PeerContext, names: Sequence[str] | None = None
) -> Iterator[tuple[int, int]]:
    """``(samples, payload bytes)`` of each batch of ``loader`` (:func:`count_batch`; tuples in
    ``names`` order, default ``ctx.fields``); its workers are stopped when this ends."""
    names = list(ctx.fields) if names is None else names
    byte_fields = ctx.byte_fields
    it = iter(loader)
    try:
        for batch in it:
            yield count_batch(batch, names, byte_fields)
    finally:
        shutdown_loader_iter(it)


def cache_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every regular file under ``root``: relative path -> (size, inode). A re-downloaded file
    is written anew (new inode or size), a removed or added one changes the key set. ``.lock``
    files are ignored."""
    out = {}
    if root.exists():
        for p in root.rglob("*"):
            if p.is_file() and not p.name.endswith(".lock"):
                st = p.stat()
                out[str(p.relative_to(root))] = (st.st_size, st.st_ino)
    return out


def snapshot_diff(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Files added, removed and rewritten between two :func:`cache_snapshot` results."""
    return {
        "files_added": len(after.keys() - before.keys()),
        "files_removed": len(before.keys() - after.keys()),
        "files_rewritten": sum(1 for k in before.keys() & after.keys() if before[k] != after[k]),
    }


def dir_stats(root: Path) -> dict[str, int]:
    """``{"files": n, "bytes": total}`` of the regular files under ``root`` (none if missing)."""
    files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def upload_dir(ctx: PeerContext, src: Path, fmt: str) -> list[str]:
    """Upload every file under ``src`` to ``ctx.converted_url(fmt)``; returns the keys."""
    client = boto3_client(ctx.s3)
    base = f"{ctx.converted}{fmt}/"
    keys = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        key = base + path.relative_to(src).as_posix()
        client.upload_file(str(path), ctx.bucket, key)
        keys.append(key)
    return keys


def delete_keys(ctx: PeerContext, keys: Sequence[str]) -> None:
    """Delete ``keys`` from ``ctx.bucket`` (what :func:`upload_dir` uploaded), 1000 per request."""
    client = boto3_client(ctx.s3)
    for i in range(0, len(keys), 1000):
        client.delete_objects(
            Bucket=ctx.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
        )


class Peer(abc.ABC):
    """One peer library: :meth:`available`, :meth:`prepare` (untimed), :meth:`run` (one
    timed, checked epoch), :meth:`cleanup`; the work runs in the peer's own process (see the
    module docstring)."""

    #: One of :data:`~fastfeed.bench.peers.PEERS`.
    name: ClassVar[str] = ""
    #: Whether the peer keeps a local copy that a ``warm=True`` run reads from.
    has_cache: ClassVar[bool] = False
    #: The on-store format it reads.
    data_format: ClassVar[str] = "webdataset tar"

    def __init__(self) -> None:
        self._ctx: PeerContext | None = None
        self._prepared = False
        self._process: PeerProcess | None = None
        self.notes: list[str] = []  # workarounds applied, for reports

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    #: This process's bookkeeping of a peer, which does not travel to the peer's process.
    _LOCAL_STATE: ClassVar[tuple[str, ...]] = ("_ctx", "_prepared", "_process")

    def __getstate__(self) -> dict[str, Any]:
        # What travels to the peer's process and back: the peer's own state (the context goes
        # as an argument of each call).
        state = {k: v for k, v in vars(self).items() if k not in self._LOCAL_STATE}
        state.update(_ctx=None, _prepared=False, _process=None)
        return state

    @abc.abstractmethod
    def available(self) -> str | None:
        """``None`` if the peer can run in this interpreter, else why not (e.g. ``"pip install litdata"``)."""

    def environment(self, ctx: PeerContext) -> dict[str, str]:
        """Variables the peer's process gets on top of this process's environment (and its own
        ``TMPDIR``): none by default; :func:`~fastfeed.bench.peers.context.aws_env` for a library
        that reads its credentials from the environment."""
        return {}

    def prepare(self, ctx: PeerContext) -> None:
        """Untimed set-up: compute what an epoch must deliver, start the peer's process, convert
        and upload the data there if the peer needs its own format. Raises
        :class:`PeerUnavailable` if it cannot run."""
        reason = self.available()
        if reason is not None:
            raise PeerUnavailable(self.name, reason)
        self._ctx = ctx
        ctx.expected_counts()  # here, once: the context goes to the peer's process with it
        self._stop_process()  # a fresh process, with this context's environment
        self._call(ctx, "prepare_here", ctx)
        self._prepared = True

    def run(self, ctx: PeerContext, *, epoch: int = 0, warm: bool = False) -> Measurement:
        """Time one full epoch in the peer's process and check it delivered every sample (count
        and payload bytes).

        ``warm=False`` on a peer with a cache empties the cache first (the epoch reads from the
        store and fills it); ``warm=True`` reads from the filled cache (filled first, untimed, if
        empty) and fails if the cache changed. For peers without a cache ``warm`` changes
        nothing but ``extra["warm"]``. ``epoch`` is recorded in ``extra``: no peer shuffles.

        Raises:
            PeerUnavailable: not installed / cannot run.
            PeerError: a wrong sample count or payload size, or a warm epoch that re-downloaded.
        """
        if not self._prepared or self._ctx is not ctx:
            self.prepare(ctx)
        result: Measurement = self._call(ctx, "run_here", ctx, epoch, warm)
        return result

    def cleanup(self) -> None:
        """Remove what :meth:`prepare` and :meth:`run` left: the local cache and scratch files,
        converted copies uploaded to the store, the peer's process. Never raises."""
        ctx = self._ctx
        if ctx is None:
            self._stop_process()
            return
        if self._process is not None or type(self)._cleanup is not Peer._cleanup:
            with contextlib.suppress(Exception):
                self._call(ctx, "cleanup_here", ctx)
        self._stop_process()
        shutil.rmtree(ctx.work_dir / self.name, ignore_errors=True)
        self._prepared = False
        self._ctx = None

    def cache_dir(self, ctx: PeerContext) -> Path:
        """The peer's local cache (peers with :attr:`has_cache`)."""
        return ctx.work_dir / self.name / "cache"

    # -- in the benchmarking process: the peer's process ---------------------------------------

    def _call(self, ctx: PeerContext, method: str, *args: Any) -> Any:
        """``self.method(*args)`` in the peer's process (started, and set up, if none runs);
        the state the call left is carried back here. A call that raised stops the process."""
        if self._process is None or not self._process.running:
            self._stop_process()
            self._process = PeerProcess(self.name, self.environment(ctx))
            self._call_in(self._process, "setup_here", ctx)
        return self._call_in(self._process, method, *args)

    def _call_in(self, process: PeerProcess, method: str, *args: Any) -> Any:
        try:
            reply = process.call(self, method, *args)
        except BaseException:
            self._stop_process()
            raise
        if isinstance(reply.target, Peer):
            carried = reply.target.__getstate__()
            self.__dict__.update({k: v for k, v in carried.items() if k not in self._LOCAL_STATE})
        if reply.error is not None:
            self._stop_process()
            raise reply.error
        return reply.value

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop()

    # -- in the peer's process ---------------------------------------------------------------

    def setup_here(self, ctx: PeerContext) -> None:
        """Runs in the peer's process, once, before its first call: process-wide set-up the
        peer's library needs there (:meth:`_setup_process`)."""
        self._setup_process(ctx)

    def prepare_here(self, ctx: PeerContext) -> None:
        """The work of :meth:`prepare`, in the peer's process: convert and upload (:meth:`_prepare`)."""
        self._prepare(ctx)

    def run_here(self, ctx: PeerContext, epoch: int, warm: bool) -> Measurement:
        """The work of :meth:`run`, in the calling process (the peer's process)."""
        expected = ctx.expected_counts()
        cache = self.cache_dir(ctx)
        before: dict[str, tuple[int, int]] = {}
        filled_first = False
        if self.has_cache:
            if not warm:
                shutil.rmtree(cache, ignore_errors=True)
            elif not cache_snapshot(cache):
                self._check(self._time(ctx, epoch), expected, "filling the cache")
                filled_first = True
            before = cache_snapshot(cache) if warm else {}
        m = self._time(ctx, epoch)
        self._check(m, expected, "warm" if warm and self.has_cache else "cold")
        from_cache = warm and self.has_cache
        m.extra.update(
            epoch=epoch,
            warm=warm,
            from_cache=from_cache,
            format=self.data_format,
            batch_size=ctx.batch_size,
            num_workers=self._workers(ctx),
            config=self._config(ctx),
            cpu_includes_children=True,
        )
        if self.notes:
            m.extra["notes"] = list(self.notes)
        if self.has_cache:
            m.extra["cache"] = dir_stats(cache)
            m.extra["filled_cache_first"] = filled_first
        if from_cache:
            diff = snapshot_diff(before, cache_snapshot(cache))
            m.extra.update(diff)
            if any(diff.values()):
                raise PeerError(f"{self.name}: the local cache changed during a warm epoch (re-downloaded?): {diff}")
        return m

    def cleanup_here(self, ctx: PeerContext) -> None:
        """The work of :meth:`cleanup` in the peer's process: delete the uploaded copies (:meth:`_cleanup`)."""
        self._cleanup(ctx)

    # -- hooks (in the peer's process) ---------------------------------------------------------

    def _setup_process(self, ctx: PeerContext) -> None:
        return None

    def _prepare(self, ctx: PeerContext) -> None:
        return None

    @abc.abstractmethod
    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        """Read one epoch: yield ``(samples, payload bytes)`` per batch; stop every worker
        process before returning (also when closed early)."""

    def _config(self, ctx: PeerContext) -> str:
        return ""

    def _workers(self, ctx: PeerContext) -> int:
        return ctx.num_workers

    def _time(self, ctx: PeerContext, epoch: int) -> Measurement:
        """One epoch through :func:`fastfeed.bench.measure.measure_batches`, as fastfeed's own runs are
        timed: the same latency percentiles, wait fraction, timeline, CPU (workers included)."""
        gen = self._epoch(ctx, epoch)
        try:
            m = measure_batches(self.name, lambda: gen, size_of=lambda item: item[1], count_of=lambda item: item[0])
        finally:
            gen.close()
        gc.collect()  # datasets and loaders of the epoch go now (a peer may refuse a second live one)
        self._after_epoch(ctx)
        return m

    def _after_epoch(self, ctx: PeerContext) -> None:
        """Untimed clean-up after each epoch."""
        return None

    def _check(self, m: Measurement, expected: Expected, what: str) -> None:
        if m.samples != expected.samples or m.bytes != expected.payload_bytes:
            raise PeerError(
                f"{self.name} ({what}): delivered {m.samples} samples / {m.bytes} payload bytes, "
                f"expected {expected.samples} / {expected.payload_bytes}"
            )

    def _cleanup(self, ctx: PeerContext) -> None:
        return None
