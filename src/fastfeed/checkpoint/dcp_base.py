"""What the DCP writer (:mod:`fastfeed.checkpoint.dcp_writer`) and reader
(:mod:`fastfeed.checkpoint.dcp_reader`) share: the names and limits of the layout described in
:mod:`fastfeed.checkpoint.dcp`, the records that travel between ranks and into the manifest,
checkpoint ids, and :class:`StoreClient`, which opens the checkpoint store on fastfeed's IO loop.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import torch

from fastfeed import _loop
from fastfeed.config import S3Config
from fastfeed.errors import (
    ConfigError,
    NotFoundError,
)
from fastfeed.store.upload import (
    CkptStore,
    open_ckpt_store,
    transfer_settings,
)
from fastfeed.urls import parse_url

__all__ = [
    "ALIGN",
    "DATA_KEY",
    "DCP_VERSION",
    "DEFAULT_ORPHAN_AGE",
    "FORMAT",
    "MANIFEST",
    "MAX_MANIFEST",
    "OBJECT_NAME",
    "TAMPERED",
    "DataObject",
    "Item",
    "RankObject",
    "StoreClient",
    "Written",
    "align",
    "checkpoint_dir",
    "dist_ready",
    "dtype_name",
    "valid_id",
]

log = logging.getLogger(__name__)

#: The ``format`` of the manifests this module writes and reads.
FORMAT: Final = "fastfeed-dcp/1"
#: The commit record of a checkpoint directory.
MANIFEST: Final = "MANIFEST.json"
#: DCP's own metadata version (``torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION``).
DCP_VERSION: Final = "1.0.0"
ALIGN: Final = 64
#: The largest manifest read (real ones are kilobytes to a few megabytes).
MAX_MANIFEST: Final = 64 << 20
#: Data object names (``rank-00003.data`` in earlier versions): one file name, never a path.
OBJECT_NAME: Final = re.compile(r"rank-[0-9]{5,9}(-[0-9a-f]{8,64})?\.data")
#: Keys of data objects under the root (in any checkpoint directory), for the orphan sweep.
DATA_KEY: Final = re.compile(r"(.+/)?rank-[0-9]{5,9}(-[0-9a-f]{8,64})?\.data")
TAMPERED: Final = "the checkpoint was damaged or tampered with"
#: Default ``orphan_age`` (as for :class:`~fastfeed.Checkpointer`).
DEFAULT_ORPHAN_AGE: Final = 24 * 3600.0


def align(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a torch dtype (``"float32"``)."""
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------
# What travels between ranks (pickled by DCP over the process group, never stored)


@dataclass(frozen=True)
class RankObject:
    """``SavePlan.storage_data``: the object one rank writes (a name in the checkpoint dir)."""

    name: str


@dataclass(frozen=True)
class DataObject:
    """One written data object: its size and the CRC32C of each ``part_size`` slice."""

    name: str
    size: int
    part_size: int
    crc32c: tuple[int, ...]


@dataclass(frozen=True)
class Item:
    """Where one DCP item lives (``Metadata.storage_data`` values, and the manifest's items)."""

    object: str
    start: int
    length: int
    crc32c: int
    kind: str  # "tensor" (raw bytes) or "value" (a fastfeed-tree/1 header + array leaves)
    object_size: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    header: int | None = None


@dataclass(frozen=True)
class Written:
    """``WriteResult.storage_data``: the item and the object it went into."""

    item: Item
    obj: DataObject


# ------------------------------------------------------------------------------------------
# Checkpoint ids


def checkpoint_dir(root: str, checkpoint_id: str | os.PathLike[str] | None) -> str:
    """The checkpoint directory relative to ``root`` (``""`` or ``"a/b/"``)."""
    if checkpoint_id is None:
        return ""
    text = os.fspath(checkpoint_id)
    if not isinstance(text, str):
        raise ConfigError(f"checkpoint_id must be a str or a path, got {checkpoint_id!r}")
    if "://" in text or os.path.isabs(text):
        loc = parse_url(text)
        full = (loc.url if loc.scheme == "s3" else "file://" + os.path.abspath(loc.path)).rstrip("/") + "/"
        if not full.startswith(root):
            raise ConfigError(
                f"checkpoint_id {text!r} is not under this storage's URL {root}",
                url=root,
                hint="pass a checkpoint_id relative to the URL the writer/reader was created with",
            )
        text = full[len(root) :]
    parts = [p for p in text.replace(os.sep, "/").split("/") if p and p != "."]
    if ".." in parts:
        raise ConfigError(f"checkpoint_id {text!r} must not contain '..'", url=root)
    return "".join(p + "/" for p in parts)


# ------------------------------------------------------------------------------------------
# Store access shared by the writer and the reader


def _shutdown(io_loop: _loop.IOLoop, store: CkptStore) -> None:
    try:
        io_loop.run(store.aclose(), timeout=60)
    except Exception as exc:  # closing must not mask anything
        log.debug("closing the checkpoint store failed: %r", exc)
    finally:
        io_loop.release()


_Client = TypeVar("_Client", bound="StoreClient")


class StoreClient:
    """Opens the :class:`CkptStore` of ``url`` on fastfeed's IO loop (lazily after unpickling)."""

    url: str
    part_size: int
    max_concurrency: int
    _spec: str
    _s3: S3Config
    _io: _loop.IOLoop | None
    _store: CkptStore | None
    _finalizer: Any
    _dir: str

    def _configure(
        self,
        url: str | os.PathLike[str],
        s3: S3Config | None,
        endpoint_url: str | None,
        part_size: int | str,
        max_concurrency: int,
    ) -> None:
        self.part_size, self.max_concurrency, s3 = transfer_settings(part_size, max_concurrency, s3, endpoint_url)
        self._spec = os.fspath(url)
        self._s3 = s3
        self._io = None
        self._store = None
        self._finalizer = None
        self._dir = ""
        self.url = self._open()[1].url

    def _open(self) -> tuple[_loop.IOLoop, CkptStore]:
        if self._io is None or self._store is None:
            io_loop = _loop.acquire()
            try:
                store = io_loop.run(open_ckpt_store(self._spec, self._s3))
            except BaseException:
                io_loop.release()
                raise
            self._io, self._store = io_loop, store
            self._finalizer = weakref.finalize(self, _shutdown, io_loop, store)
        return self._io, self._store

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the store's connections and the IO thread reference (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()
        self._io = self._store = self._finalizer = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_io=None, _store=None, _finalizer=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def checkpoint_id(self) -> str:
        """The URL of the current checkpoint directory."""
        return self.url + self._dir

    def _object_url(self, name: str) -> str:
        return self.url + self._dir + name

    def _manifest(self) -> bytes | None:
        """The current checkpoint's manifest, or None if it is not committed."""
        io_loop, store = self._open()
        try:
            return io_loop.run(store.get(self._dir + MANIFEST, limit=MAX_MANIFEST))
        except NotFoundError:
            return None


def dist_ready() -> bool:
    """Whether a default process group is initialised."""
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def valid_id(checkpoint_id: str | os.PathLike[str]) -> bool:
    """Whether ``checkpoint_id`` can name a checkpoint (a non-empty path or a parsable URL)."""
    try:
        text = os.fspath(checkpoint_id)
        if not isinstance(text, str) or not text:
            return False
        if "://" in text:
            parse_url(text)
    except (TypeError, ConfigError):
        return False
    return True
