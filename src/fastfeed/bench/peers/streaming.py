"""The ``streaming`` peer: MosaicML Streaming. ``MDSWriter`` converts the shards once
(:func:`convert_mds`) and they are uploaded; each epoch reads them through a new
``streaming.StreamingDataset`` in ``torch.utils.data.DataLoader``, with a local shard cache
(warm runs).

Streaming reads its endpoint (``S3_ENDPOINT_URL``) and credentials from the environment and puts
its file locks in :func:`tempfile.gettempdir`: the peer's process gets both
(:meth:`StreamingPeer.environment`, its own ``TMPDIR``). A CUDA-less torchvision makes ``import
streaming`` fail, which :func:`import_streaming` works around. Streaming's shared-memory blocks
(named by a machine-wide prefix number) are unlinked after each of its epochs, only those of the
peer's own datasets (:func:`unlink_streaming_shm`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import shutil
import sys
import types
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.utils.data

from fastfeed.bench.peers.base import Peer, delete_keys, import_error, iterate_loader, loader_kwargs, quiet, upload_dir
from fastfeed.bench.peers.common import Expected, PeerError
from fastfeed.bench.peers.context import PeerContext, aws_env
from fastfeed.bench.peers.tar import iter_tar_samples, shard_stats

__all__ = [
    "StreamingPeer",
    "convert_mds",
    "drop_streaming_clients",
    "import_streaming",
    "open_streaming_dataset",
    "streaming_shm_names",
    "streaming_shm_owner",
    "unlink_streaming_shm",
]


def import_streaming() -> str | None:
    """Import MosaicML Streaming; return a note if a workaround was needed.

    PyPI's torchvision wheels are CUDA builds: next to torch's CPU build their C ops fail to load
    and ``import torchvision`` raises. Streaming imports torchvision only in ``streaming.vision``
    (its CIFAR/ImageNet dataset classes), which ``streaming/__init__`` imports eagerly and MDS
    reading never uses; in that case that one subpackage is replaced by an empty module.
    """
    note = None
    if "streaming" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except ModuleNotFoundError:
            pass  # no torchvision: nothing to work around here
        except Exception as exc:
            sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
            note = f"torchvision unusable ({type(exc).__name__}: {exc}); streaming.vision stubbed out (not used by MDS)"
    with quiet("streaming"):
        importlib.import_module("streaming")
    return note


def convert_mds(
    paths: Sequence[str | os.PathLike[str]], out: Path, fields: Mapping[str, str], samples_per_file: int
) -> Expected:
    """Write the samples of the tar shards ``paths`` to MDS under ``out`` (``bytes`` columns
    for ``bytes`` fields, ``int`` for ``int`` ones; no compression or hashes), about
    ``samples_per_file`` samples per shard file: ``size_limit`` is that many of the largest
    sample plus 64 bytes each. Returns what was written."""
    from streaming import MDSWriter

    largest = max((s[2] for s in shard_stats(paths, fields)), default=0)
    n = nbytes = 0
    byte_fields = [f for f, k in fields.items() if k == "bytes"]
    columns = {f: "bytes" if k == "bytes" else "int" for f, k in fields.items()}
    with MDSWriter(out=str(out), columns=columns, size_limit=samples_per_file * (largest + 64)) as w:
        for path in paths:
            for s in iter_tar_samples(path, fields):
                w.write(s)
                n += 1
                nbytes += sum(len(s[f]) for f in byte_fields)
    return Expected(n, nbytes, largest)


def open_streaming_dataset(remote: str, local: Path, batch_size: int) -> Any:
    """``streaming.StreamingDataset(remote=..., local=..., batch_size=..., shuffle=False)``,
    everything else at its defaults (``cache_limit=None``: nothing evicted). It reads the S3
    endpoint and credentials from the environment (``S3_ENDPOINT_URL``, ``AWS_*``).

    The returned dataset holds no S3 client made in this process
    (:func:`drop_streaming_clients`), so it can be handed to forked DataLoader workers."""
    import streaming

    ds = streaming.StreamingDataset(remote=remote, local=str(local), batch_size=batch_size, shuffle=False)
    drop_streaming_clients(ds)
    return ds


def drop_streaming_clients(ds: Any) -> int:
    """Make every stream of the MosaicML ``StreamingDataset`` ``ds`` forget the cloud client
    it made in this process; returns how many S3 clients were dropped.

    With an empty ``local``, the constructor downloads ``index.json`` in this process, and the
    stream's downloader keeps that boto3 client, with its idle keep-alive connection, for
    later downloads. DataLoader workers forked from here inherit the client *and the socket*:
    both workers then send their shard GETs on one TCP connection and read each other's
    responses. A worker either writes another shard's bytes (same length) into its shard file,
    and decoding fails (``IndexError: index 0 is out of bounds`` in an MDS ``int`` column,
    ``Relative sample index 0 is not present``), or waits for a response that the other worker
    already consumed until the 60 s read timeout. Only pickling for ``spawn`` drops the client
    (``S3Downloader.__getstate__``), and spawn workers cannot import ``streaming`` where
    :func:`import_streaming` had to stub out torchvision. ``downloader.clean_up()`` is
    Streaming's own way to drop it: each worker then makes its own client on first use."""
    dropped = 0
    for stream in getattr(ds, "streams", ()):
        downloader = getattr(stream, "_downloader", None)
        if downloader is None:
            continue
        dropped += getattr(downloader, "_s3_client", None) is not None
        downloader.clean_up()
    return dropped


class StreamingPeer(Peer):
    """MosaicML Streaming: MDS written once by :func:`convert_mds` and uploaded;
    :func:`open_streaming_dataset` (a new object per epoch, never iterated in this process:
    one iterated here and then forked into workers hangs them; holding no S3 client made here,
    see :func:`drop_streaming_clients`) in
    ``torch.utils.data.DataLoader(ds, batch_size=..., num_workers=...)``, as its docs show.
    After each epoch the dataset's shared-memory blocks are unlinked
    (:func:`unlink_streaming_shm`; other processes' blocks are left alone)."""

    name = "streaming"
    has_cache = True
    data_format = "MDS"

    def __init__(self) -> None:
        super().__init__()
        self._keys: list[str] = []
        #: Shared-memory prefix of each dataset this peer opened, in order (see
        #: :func:`streaming_shm_names`); their blocks are unlinked after each epoch.
        self.shm_prefixes: list[int] = []
        self._live_shm: list[tuple[int, str]] = []

    def available(self) -> str | None:
        try:
            note = import_streaming()
        except Exception as exc:
            return f"pip install mosaicml-streaming ({type(exc).__name__}: {exc})"
        if note and note not in self.notes:
            self.notes.append(note)
        return import_error("boto3", "boto3")

    def environment(self, ctx: PeerContext) -> dict[str, str]:
        return aws_env(ctx)  # its endpoint (S3_ENDPOINT_URL) and credentials

    def _setup_process(self, ctx: PeerContext) -> None:
        note = import_streaming()
        if note and note not in self.notes:
            self.notes.append(note)

    def _config(self, ctx: PeerContext) -> str:
        return "StreamingDataset(remote, local, batch_size, shuffle=False) in DataLoader"

    def _prepare(self, ctx: PeerContext) -> None:
        out = ctx.work_dir / self.name / "mds-out"
        shutil.rmtree(out, ignore_errors=True)
        with quiet("streaming"):
            got = convert_mds(ctx.source_shards(), out, ctx.fields, ctx.files_per_shard())
        self._check_conversion(got, ctx.expected_counts())
        self._keys = upload_dir(ctx, out, "mds")
        shutil.rmtree(out, ignore_errors=True)

    def _check_conversion(self, got: Expected, expected: Expected) -> None:
        if (got.samples, got.payload_bytes) != (expected.samples, expected.payload_bytes):
            raise PeerError(f"{self.name}: conversion wrote {got}, expected {expected}")

    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        with quiet("streaming"):
            local = self.cache_dir(ctx)
            ds = open_streaming_dataset(ctx.converted_url("mds"), local, ctx.batch_size)
            prefix = getattr(ds, "_shm_prefix_int", None)
            if isinstance(prefix, int):
                self.shm_prefixes.append(prefix)
                self._live_shm.append((prefix, str(local)))
            loader = torch.utils.data.DataLoader(ds, batch_size=ctx.batch_size, **loader_kwargs(ctx, ctx.num_workers))
            yield from iterate_loader(loader, ctx)

    def _after_epoch(self, ctx: PeerContext) -> None:
        self._release_shm()

    def _cleanup(self, ctx: PeerContext) -> None:
        gc.collect()
        self._release_shm()  # also after an epoch that raised (no _after_epoch then)
        if self._keys:
            delete_keys(ctx, self._keys)
            self._keys = []

    def _release_shm(self) -> None:
        while self._live_shm:
            prefix, local = self._live_shm.pop()
            with contextlib.suppress(Exception):
                unlink_streaming_shm(prefix, local)


def streaming_shm_names(prefix: int) -> list[str]:
    """The names of the shared-memory blocks MosaicML Streaming may create for a dataset that
    registered shared-memory prefix ``prefix`` (``/dev/shm/<name>`` on Linux)."""
    from streaming.base.constant import SHM_TO_CLEAN

    return [_streaming_shm_name(prefix, name) for name in SHM_TO_CLEAN]


def streaming_shm_owner(prefix: int) -> list[str] | None:
    """The local dirs that the dataset holding shared-memory prefix ``prefix`` registered (its
    ``<prefix>_locals`` block), or ``None`` if no dataset holds it now."""
    from streaming.base.shared import SharedMemory

    try:
        shm = SharedMemory(_streaming_shm_name(prefix, "locals"), create=False, auto_cleanup=False)
    except FileNotFoundError:
        return None
    try:
        data = bytes(shm.buf)
    finally:
        shm.cleanup()  # closes it; an attached block is neither unlinked nor tracked
    # Streaming's layout (streaming.base.shared.prefix): int32 size, then the dirs and the
    # prefix, each followed by a NUL but the last.
    size = int.from_bytes(data[:4], sys.byteorder, signed=True)
    return data[4:size].decode("utf-8", "replace").split("\0")[:-1]


def unlink_streaming_shm(prefix: int, local: str | os.PathLike[str]) -> list[str]:
    """Unlink the shared-memory blocks of MosaicML Streaming's prefix ``prefix``, if the dataset
    that registered it read ``local`` (else someone else holds that prefix now: nothing is
    touched); returns the names unlinked.

    A ``StreamingDataset`` unlinks its blocks only at interpreter exit, and
    ``streaming.base.util.clean_stale_shared_memory()`` unlinks every prefix from 0 on until
    the first free one, whoever holds it: on a machine where other processes read with
    Streaming it pulls the blocks from under their live datasets (a loader next to such a
    sweeping loop hung here), and it leaves ours that sit behind a free prefix. Streaming's own
    error message advises calling it once, before the first dataset, for blocks that crashed
    runs left; its prefix search steps over those anyway. This removes ours, and only ours,
    once the epoch's workers are gone.
    """
    from multiprocessing.shared_memory import SharedMemory

    owner = streaming_shm_owner(prefix)
    if owner is None or os.path.abspath(local) not in owner:
        return []
    removed = []
    for name in streaming_shm_names(prefix):
        try:
            shm = SharedMemory(name, create=False)  # tracked by this process's resource tracker ...
        except FileNotFoundError:
            continue
        shm.close()
        shm.unlink()  # ... and untracked here
        removed.append(name)
    return removed


def _streaming_shm_name(prefix: int, name: str) -> str:
    return f"{prefix:06}_{name}"
