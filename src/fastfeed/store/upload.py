"""Where checkpoints (and shards written by :mod:`fastfeed.shards`) are written: an S3 prefix or
a local directory, behind one small async interface used on the fastfeed IO loop.

Keys are relative to the store's prefix and checked by :func:`check_key` before any request or
file system call: ``/``-separated components, none empty, ``.`` or ``..``, no backslash or control
character. Nothing a manifest names can reach outside the prefix. The local store also opens
every directory and file below its root with ``O_NOFOLLOW`` through directory descriptors, so
a symbolic link planted in a checkpoint directory is refused, never followed.

Conditional writes. ``put(..., if_absent=True)`` creates an object only if its key is free and
raises :class:`~fastfeed.errors.ConditionFailedError` otherwise; it never replaces an object.
On S3 it sends ``If-None-Match: *``. Whether a store honours that header is probed once per
(endpoint, bucket) and process by :meth:`CkptStore.check_writable` (two conditional PUTs of a
fresh probe key: the second must be refused with 412), or learnt from a ``501 NotImplemented``
answer later; a lost first answer whose retry meets the object is recognised by reading the
object back. Locally it is a hard link of the fsynced temporary file, which fails if the name
exists. A store without conditional writes (``conditional_writes`` False, logged once as a
warning) gets check-write-verify instead: HEAD (exists: refused), PUT, read back (someone
else's bytes: refused). That detects a race in most interleavings but cannot prevent one: two
writers whose three steps overlap can both succeed, the later PUT winning.

Multipart uploads (:meth:`CkptStore.put_large`): parts go up in parallel from a thread pool; a
failed upload is aborted, and an abort that fails is remembered and retried by ``aclose()``.
:meth:`CkptStore.abort_orphaned_uploads` aborts the incomplete uploads (locally: removes the
temporary files) that processes which died left under a prefix, once older than an age
threshold, by the store's own clock.

This module is the front: :func:`open_ckpt_store` and the checked transfer settings; the
interface and what the stores share are in :mod:`fastfeed.store.upload_base`, the stores in
:mod:`fastfeed.store.upload_s3` and :mod:`fastfeed.store.upload_local`.
"""

from __future__ import annotations

import dataclasses
import math

from fastfeed.config import S3Config, parse_size
from fastfeed.errors import ConfigError
from fastfeed.store.s3 import S3Store
from fastfeed.store.upload_base import (
    CHECKSUM,
    MAX_PARTS,
    MIN_PART,
    CkptStore,
    StoredObject,
    Uploaded,
    check_key,
    checksum,
    effective_part_size,
)
from fastfeed.store.upload_local import LocalCkptStore
from fastfeed.store.upload_s3 import S3CkptStore
from fastfeed.urls import parse_url

__all__ = [
    "CHECKSUM",
    "MAX_PARTS",
    "MIN_PART",
    "CkptStore",
    "LocalCkptStore",
    "S3CkptStore",
    "StoredObject",
    "Uploaded",
    "check_age",
    "check_key",
    "checksum",
    "effective_part_size",
    "open_ckpt_store",
    "transfer_settings",
]


def transfer_settings(
    part_size: int | str, max_concurrency: int, s3: S3Config | None, endpoint_url: str | None
) -> tuple[int, int, S3Config]:
    """``(part_size, max_concurrency, s3)`` of a checkpoint writer or reader, checked: parts of
    at least S3's 5 MiB, at least one in flight, and the S3 config (AWS_* variables by default;
    ``endpoint_url`` overrides)."""
    size = parse_size(part_size, name="part_size")
    if size < MIN_PART:
        raise ConfigError(f"part_size must be at least 5 MiB (S3's smallest multipart part), got {part_size!r}")
    if s3 is None:
        s3 = S3Config.resolve(endpoint_url=endpoint_url)
    elif endpoint_url is not None:
        s3 = dataclasses.replace(s3, endpoint_url=endpoint_url)
    return size, max(1, int(max_concurrency)), s3


def check_age(orphan_age: float) -> float:
    """A checked ``orphan_age`` (seconds, > 0)."""
    if isinstance(orphan_age, bool) or not isinstance(orphan_age, int | float) or not orphan_age > 0:
        raise ConfigError(f"orphan_age must be a number of seconds > 0, got {orphan_age!r}")
    if not math.isfinite(orphan_age):
        raise ConfigError(f"orphan_age must be finite, got {orphan_age!r}")
    return float(orphan_age)


async def open_ckpt_store(url: str, s3: S3Config) -> CkptStore:
    """The checkpoint store of ``url``: a local directory (``file://`` or a path) or an S3
    prefix (``s3://bucket/prefix/``)."""
    loc = parse_url(url.rstrip("/") + "/")
    if loc.scheme == "file":
        return LocalCkptStore(loc.path)
    return S3CkptStore(await S3Store.create(s3), loc, s3)
