"""The ``litdata`` peer: ``litdata.optimize`` converts the shards once (:func:`convert_litdata`)
and they are uploaded; each epoch reads them through a new ``litdata.StreamingDataset`` in
``litdata.StreamingDataLoader``, with a local chunk cache (warm runs).

``litdata.optimize`` puts its working folders in :func:`tempfile.gettempdir` (the peer's process
has its own ``TMPDIR``), and LitData's obstore client is told to allow ``http://`` endpoints
(:func:`litdata_allow_http`, in the peer's process).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fastfeed.bench.peers.base import Peer, delete_keys, import_error, iterate_loader, loader_kwargs, quiet, upload_dir
from fastfeed.bench.peers.common import DEFAULT_FIELDS, DEFAULT_REGION
from fastfeed.bench.peers.context import PeerContext
from fastfeed.bench.peers.tar import TarSamples
from fastfeed.config import S3Config

__all__ = [
    "LitdataCollate",
    "LitdataPeer",
    "convert_litdata",
    "litdata_allow_http",
    "litdata_storage_options",
    "open_litdata_dataset",
]


def litdata_allow_http() -> str:
    """Let LitData's obstore chunk downloads use a plain-HTTP endpoint.

    LitData fetches chunks with obstore, whose client refuses ``http://`` URLs unless its
    ``allow_http`` client option is set, and LitData passes fixed client options (no env or
    ``storage_options`` route to it). Adds ``allow_http`` to them (process-wide: the
    peer calls it in its own process)."""
    import litdata.streaming.downloader as downloader

    options: dict[str, str] = downloader._OBSTORE_CLIENT_OPTIONS  # a plain dict at run time
    options["allow_http"] = "true"
    return "obstore client option allow_http=true added (the endpoint is http://)"


def litdata_storage_options(s3: S3Config, region: str = DEFAULT_REGION) -> dict[str, Any]:
    """``storage_options`` for LitData's boto3 client, as its README documents for custom endpoints."""
    from botocore.config import Config

    opts: dict[str, Any] = {
        "region_name": s3.region or region,
        "config": Config(
            s3={"addressing_style": "path" if s3.path_style else "auto"},
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    }
    for key, value in (
        ("endpoint_url", s3.endpoint_url),
        ("aws_access_key_id", s3.access_key_id),
        ("aws_secret_access_key", s3.secret_access_key),
        ("aws_session_token", s3.session_token),
    ):
        if value is not None:
            opts[key] = value
    return opts


def convert_litdata(
    paths: Sequence[str | os.PathLike[str]], out: Path, fields: Mapping[str, str], samples_per_file: int
) -> None:
    """``litdata.optimize`` the samples of the tar shards ``paths`` into ``out``:
    ``chunk_size=samples_per_file``, one worker, no compression, input order kept."""
    import litdata

    litdata.optimize(
        fn=TarSamples(fields),
        inputs=[str(p) for p in paths],
        output_dir=str(out),
        chunk_size=samples_per_file,
        num_workers=1,
        reorder_files=False,
        verbose=False,
        start_method="fork",
    )


def _in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a forked child process (spawned where fork is unavailable); its result
    or exception comes back here, and whatever it leaves behind ends with the child."""
    import concurrent.futures
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method)) as pool:
        return pool.submit(fn, *args).result()


def open_litdata_dataset(url: str, cache_dir: Path, s3: S3Config, region: str = DEFAULT_REGION, **kwargs: Any) -> Any:
    """``litdata.StreamingDataset(url, cache_dir=..., storage_options=...)`` (``kwargs`` passed on)."""
    import litdata

    return litdata.StreamingDataset(
        url, cache_dir=str(cache_dir), storage_options=litdata_storage_options(s3, region), **kwargs
    )


class LitdataCollate:
    """LitData loader collation: ``bytes`` fields as lists of ``bytes``, ``int`` fields as a tensor.

    LitData yields ``bytes`` columns as memoryviews into its mmap'ed chunk, which cannot be
    pickled to the main process, and torch's ``default_collate`` takes a memoryview for a
    sequence and transposes a batch of them into one tiny tensor per byte. Copying each to
    ``bytes`` in the worker gives the batch the MosaicML loader gives."""

    def __init__(self, fields: Mapping[str, str] = DEFAULT_FIELDS) -> None:
        self.fields = dict(fields)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            f: [bytes(s[f]) for s in samples] if kind == "bytes" else torch.tensor([int(s[f]) for s in samples])
            for f, kind in self.fields.items()
        }


class LitdataPeer(Peer):
    """LitData: chunks written once by :func:`convert_litdata` and uploaded;
    :func:`open_litdata_dataset` (a new object per epoch) in
    ``litdata.StreamingDataLoader(ds, batch_size=..., num_workers=..., collate_fn=LitdataCollate)``."""

    name = "litdata"
    has_cache = True
    data_format = "litdata chunks"

    def __init__(self) -> None:
        super().__init__()
        self._keys: list[str] = []

    def available(self) -> str | None:
        reason = import_error("litdata", "litdata")
        return reason if reason is not None else import_error("boto3", "boto3")

    def _config(self, ctx: PeerContext) -> str:
        return "StreamingDataset(s3 url, cache_dir, storage_options) in StreamingDataLoader(collate_fn=bytes copy)"

    def _setup_process(self, ctx: PeerContext) -> None:
        if (ctx.s3.endpoint_url or "").startswith("http://"):
            note = litdata_allow_http()
            if note not in self.notes:
                self.notes.append(note)

    def _prepare(self, ctx: PeerContext) -> None:
        out = ctx.work_dir / self.name / "litdata-out"
        shutil.rmtree(out, ignore_errors=True)
        with quiet("litdata"):
            # In a child process: optimize leaves queues (and their feeder threads) referenced
            # from module globals in the process that called it.
            _in_child(convert_litdata, ctx.source_shards(), out, dict(ctx.fields), ctx.files_per_shard())
        self._keys = upload_dir(ctx, out, "litdata")
        shutil.rmtree(out, ignore_errors=True)

    def _epoch(self, ctx: PeerContext, epoch: int) -> Generator[tuple[int, int], None, None]:
        import litdata

        with quiet("litdata"):
            ds = open_litdata_dataset(ctx.converted_url("litdata"), self.cache_dir(ctx), ctx.s3, ctx.region)
            loader = litdata.StreamingDataLoader(
                ds,
                batch_size=ctx.batch_size,
                collate_fn=LitdataCollate(ctx.fields),
                **loader_kwargs(ctx, ctx.num_workers),
            )
            yield from iterate_loader(loader, ctx)

    def _cleanup(self, ctx: PeerContext) -> None:
        if self._keys:
            delete_keys(ctx, self._keys)
            self._keys = []
