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
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import logging
import math
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, TypeVar

from fastfeed import _native
from fastfeed.config import S3Config, parse_size
from fastfeed.errors import (
    ConditionFailedError,
    ConfigError,
    CorruptCheckpointError,
    FastfeedError,
    NotFoundError,
    NotSupportedError,
    StoreError,
)
from fastfeed.store.base import bucket_missing
from fastfeed.store.retry import retry_async
from fastfeed.store.s3 import S3Store, client_settings, map_s3_error
from fastfeed.urls import Location, parse_url

__all__ = [
    "CkptStore",
    "LocalCkptStore",
    "S3CkptStore",
    "StoredObject",
    "Uploaded",
    "check_key",
    "open_ckpt_store",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: S3's smallest part (all but the last).
MIN_PART = 5 << 20
#: S3's largest number of parts in one upload; larger objects get larger parts.
MAX_PARTS = 10_000
#: Names of the local store's temporary files (``.tmp-``: those of earlier versions).
_LOCAL_TEMP_PREFIXES = (".fastfeed-tmp-", ".tmp-")
_PROBE_PREFIX = ".fastfeed-probe-"
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_MAX_KEY = 1024


@dataclass(frozen=True)
class StoredObject:
    key: str  # relative to the store's prefix
    size: int
    #: Seconds since the object was last written, by the store's clock (None: unknown).
    age: float | None = None
    #: Changes whenever the object is rewritten (the S3 ETag; locally mtime and size).
    etag: str | None = None


class Uploaded(NamedTuple):
    """What :meth:`CkptStore.put_large` wrote: the part size it used (``part_size``, or larger
    to stay within S3's 10,000 parts) and the :func:`checksum` of each part-sized slice."""

    part_size: int
    crcs: list[int]


def check_key(key: str, url: str) -> str:
    """``key`` if it names an object inside the prefix ``url``; else a
    :class:`~fastfeed.errors.CorruptCheckpointError` (keys come from manifests, which anyone
    with write access to the bucket can change)."""
    if (
        type(key) is not str
        or not key
        or len(key) > _MAX_KEY
        or any(p in ("", ".", "..") for p in key.split("/"))
        or _BAD_KEY_CHARS.search(key)
    ):
        raise CorruptCheckpointError(
            f"refusing the object name {str(key)[:200]!r}: it is not a plain relative name inside {url}",
            url=url,
            hint="a manifest may only name objects of its own checkpoint; this one was damaged or tampered with",
        )
    return key


def _check_prefix(prefix: str, url: str) -> str:
    """A listing prefix: ``""`` or a key, optionally ending with ``/``."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix, url)
    return prefix


class CkptStore(abc.ABC):
    """Keys are relative to the checkpoint prefix (``step-000000000042/MANIFEST.json``)."""

    url: str
    #: Whether ``put(if_absent=True)`` is enforced by the store (see the module docstring);
    #: known after :meth:`check_writable`.
    conditional_writes: bool = True

    @abc.abstractmethod
    async def check_writable(self) -> None:
        """Raise a clear error now if the prefix cannot be written (missing bucket, denied);
        probe conditional writes (cached per store)."""

    @abc.abstractmethod
    async def _put_object(self, key: str, data: memoryview, *, if_absent: bool) -> None:
        """One write; with ``if_absent`` a conditional one (raises ConditionFailedError or, where
        the store turns out not to support it, NotSupportedError)."""

    async def put(self, key: str, data: memoryview, *, if_absent: bool = False) -> None:
        """Write one object. ``if_absent``: only if the key is free, else
        :class:`~fastfeed.errors.ConditionFailedError` (and nothing is replaced where the store
        has conditional writes; see the module docstring for the others)."""
        if not if_absent:
            await self._put_object(key, data, if_absent=False)
            return
        if self.conditional_writes:
            try:
                await self._put_object(key, data, if_absent=True)
                return
            except ConditionFailedError as err:
                if await self._holds(key, data):  # an earlier attempt of this very write landed
                    return
                raise self._exists(key) from err
            except NotSupportedError as err:
                self._lacks_conditional_writes(err)
        await self._put_verified(key, data)

    async def _put_verified(self, key: str, data: memoryview) -> None:
        """``if_absent`` without conditional writes: check, write, read back."""
        try:
            await self.head(key)
        except NotFoundError:
            pass
        else:
            raise self._exists(key)
        await self._put_object(key, data, if_absent=False)
        if not await self._holds(key, data):
            raise self._exists(key)

    async def _holds(self, key: str, data: memoryview) -> bool:
        """Whether ``key`` holds exactly ``data``."""
        try:
            return await self.get(key, limit=len(data)) == data
        except (NotFoundError, CorruptCheckpointError):
            return False

    def _exists(self, key: str) -> ConditionFailedError:
        return ConditionFailedError(
            f"{self.url}{key} exists already: another writer created it first (nothing was replaced)",
            url=self.url + key,
            hint="another job writes to this prefix: give each job its own",
        )

    def _lacks_conditional_writes(self, err: BaseException | None) -> None:
        self.conditional_writes = False
        log.warning(
            "%s does not support conditional writes%s; fastfeed falls back to check-write-verify there, "
            "which detects most but not all races between two writers of the same object",
            self.url,
            f" ({err})" if err is not None else "",
        )

    async def put_large(
        self, key: str, data: memoryview, *, part_size: int, concurrency: int, if_absent: bool = False
    ) -> Uploaded:
        """Write ``data`` as one object, in parallel parts when large; the part size used and
        the :func:`checksum` of each part (computed while the parts go up)."""
        part = effective_part_size(len(data), part_size)
        crcs = await asyncio.gather(*(_checksum(data[s : s + part]) for s in range(0, len(data), part)))
        await self.put(key, data, if_absent=if_absent)
        return Uploaded(part, list(crcs))

    @abc.abstractmethod
    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        """The whole object; one larger than ``limit`` bytes raises
        :class:`~fastfeed.errors.CorruptCheckpointError` before its body is read."""

    @abc.abstractmethod
    async def head(self, key: str) -> StoredObject:
        """Size and ETag of one object (NotFoundError if it does not exist)."""

    @abc.abstractmethod
    async def read_range(self, key: str, start: int, end: int, out: memoryview, etag: str | None = None) -> None:
        """Bytes ``[start, end)`` into ``out`` (exactly that long); with ``etag``, refuse
        another version of the object. An object that ends early raises
        :class:`~fastfeed.errors.CorruptCheckpointError`."""

    async def get_into(
        self, key: str, out: memoryview, *, part_size: int, concurrency: int, etag: str | None = None
    ) -> None:
        """Read the whole object (exactly ``len(out)`` bytes) into ``out``, in parallel ranges."""
        limit = asyncio.Semaphore(concurrency)

        async def part(start: int) -> None:
            end = min(start + part_size, len(out))
            async with limit:
                await self.read_range(key, start, end, out[start:end], etag)

        await asyncio.gather(*(part(s) for s in range(0, len(out), part_size)))

    @abc.abstractmethod
    async def list_objects(self, prefix: str = "") -> list[StoredObject]:
        """Every object under ``prefix`` (keys relative to the store's prefix)."""

    @abc.abstractmethod
    async def delete(self, keys: list[str]) -> None:
        """Delete ``keys`` (missing ones are fine)."""

    @abc.abstractmethod
    async def abort_orphaned_uploads(self, prefix: str, *, older_than: float, match: Callable[[str], object]) -> int:
        """Abort the incomplete uploads under ``prefix`` whose key ``match`` accepts, started
        more than ``older_than`` seconds ago (by the store's clock); how many. Locally: remove
        this store's temporary files, last written that long ago."""

    async def aclose(self) -> None:
        return None


def effective_part_size(size: int, part_size: int) -> int:
    """``part_size``, or larger so that ``size`` bytes fit in S3's 10,000 parts."""
    return max(part_size, math.ceil(size / MAX_PARTS))


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
    loc = parse_url(url.rstrip("/") + "/")
    if loc.scheme == "file":
        return LocalCkptStore(loc.path)
    return S3CkptStore(await S3Store.create(s3), loc, s3)


def _sync_client(config: S3Config, pool_size: int) -> Any:
    """A plain (thread-safe) botocore S3 client with the data-plane client's settings: part
    uploads run in threads, so request signing (a SHA256 of each part over plain HTTP) and the
    part copies run in parallel instead of on the one IO-loop thread."""
    import botocore.config
    import botocore.session

    options, kwargs = client_settings(config, pool_size)
    session = botocore.session.Session(profile=config.profile)
    return session.create_client("s3", config=botocore.config.Config(**options), **kwargs)


#: (endpoint URL, bucket) -> whether the store honours If-None-Match (probed once per process).
_conditional: dict[tuple[str | None, str], bool] = {}
_conditional_lock = threading.Lock()


def _server_now(resp: Any) -> float:
    """The store's clock from a response's ``Date`` header (ours if it has none)."""
    try:
        date = resp["ResponseMetadata"]["HTTPHeaders"]["date"]
        return parsedate_to_datetime(date).timestamp()
    except (KeyError, TypeError, ValueError, IndexError):
        return time.time()


class S3CkptStore(CkptStore):
    def __init__(self, store: S3Store, loc: Location, config: S3Config | None = None) -> None:
        self._store = store
        self._config = config or store.config
        self._sync: Any = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._copies: list[bytearray] = []  # part-sized bodies, reused across parts and saves
        self._client: Any = store._client
        self._retry = store.config.retry
        #: upload id -> key of uploads whose abort failed: retried by aclose().
        self._unaborted: dict[str, str] = {}
        self.bucket = loc.bucket
        self.prefix = loc.key if loc.key.endswith("/") or not loc.key else loc.key + "/"
        self.url = f"s3://{self.bucket}/{self.prefix}"
        cached = _conditional.get((self._config.endpoint_url, self.bucket))
        self.conditional_writes = True if cached is None else cached

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key, self.url)

    def _object_url(self, full: str) -> str:
        return f"s3://{self.bucket}/{full}"

    async def _call(self, what: str, url: str, op: Callable[[], Awaitable[T]]) -> T:
        mapper = functools.partial(map_s3_error, url=url, bucket_url=f"s3://{self.bucket}")
        return await retry_async(op, self._retry, what, lambda exc: mapper(exc))

    async def check_writable(self) -> None:
        # The bucket first (some servers create a missing bucket on PUT), then a write probe.
        await self._call(
            f"listing {self.url}",
            self.url,
            functools.partial(self._client.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1),
        )
        probe = f"{_PROBE_PREFIX}{secrets.token_hex(8)}"
        where = (self._config.endpoint_url, self.bucket)
        try:
            if where in _conditional:
                await self._put_object(probe, memoryview(b""), if_absent=False)
            else:
                supported = await self._probe_conditional_writes(probe)
                with _conditional_lock:
                    first = where not in _conditional
                    _conditional.setdefault(where, supported)
                if not supported and first:
                    self._lacks_conditional_writes(None)
        except NotFoundError as err:
            raise bucket_missing(f"s3://{self.bucket}") from err
        finally:
            with contextlib.suppress(Exception):  # the probe may not exist (denied): that error wins
                await self.delete([probe])
        self.conditional_writes = _conditional[where]

    async def _probe_conditional_writes(self, probe: str) -> bool:
        """Whether the store refuses a conditional PUT of an existing key (by the error code)."""
        empty = memoryview(b"")
        try:
            await self._put_object(probe, empty, if_absent=True)
        except NotSupportedError:
            await self._put_object(probe, empty, if_absent=False)  # writable at all?
            return False
        except ConditionFailedError:
            return True  # a retried first PUT met the object its lost first attempt wrote
        try:
            await self._put_object(probe, empty, if_absent=True)
        except ConditionFailedError:
            return True
        except NotSupportedError:
            return False
        return False  # it replaced an existing object: the store ignores If-None-Match

    async def _put_object(self, key: str, data: memoryview, *, if_absent: bool) -> None:
        full = self._key(key)
        url = self._object_url(full)
        body = bytes(data)

        async def op() -> Any:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": body}
            if if_absent:
                kwargs["IfNoneMatch"] = "*"
            return await self._client.put_object(**kwargs)

        await self._call(f"PUT {url}", url, op)

    async def put_large(
        self, key: str, data: memoryview, *, part_size: int, concurrency: int, if_absent: bool = False
    ) -> Uploaded:
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be >= {MIN_PART} bytes for S3 multipart uploads")
        part_size = effective_part_size(len(data), part_size)
        if len(data) <= part_size:
            crcs = [await _checksum(data)]
            await self.put(key, data, if_absent=if_absent)
            return Uploaded(part_size, crcs)
        full = self._key(key)
        url = self._object_url(full)
        conditional = if_absent and self.conditional_writes
        if if_absent and not conditional:
            with contextlib.suppress(NotFoundError):
                await self.head(key)
                raise self._exists(key)
        creating = asyncio.ensure_future(
            self._call(
                f"create multipart upload {url}",
                url,
                lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=full),
            )
        )
        try:
            created = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # Cancelled while the request was out: the store may have created the upload anyway.
            with contextlib.suppress(Exception):
                await self._abort(full, str((await creating)["UploadId"]))
            raise
        upload_id = str(created["UploadId"])
        limit = asyncio.Semaphore(concurrency)
        starts = list(range(0, len(data), part_size))
        crcs = [0] * len(starts)

        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="fastfeed-upload")
            self._sync = _sync_client(self._config, concurrency)
        threads = self._threads
        sending: set[concurrent.futures.Future[tuple[int, str]]] = set()  # part requests in threads

        def send(number: int, start: int) -> tuple[int, str]:
            view = data[start : start + part_size]
            crc = checksum(view)
            with _part_copy(self._copies, len(view)) as body:
                body[:] = view  # botocore takes bytes or bytearray: a reused one, not a new bytes
                resp = self._sync.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body
                )
            return crc, str(resp["ETag"])

        def submit(number: int, start: int) -> asyncio.Future[tuple[int, str]]:
            fut = threads.submit(send, number, start)
            sending.add(fut)
            fut.add_done_callback(sending.discard)
            return asyncio.wrap_future(fut)

        async def part(number: int, start: int) -> dict[str, Any]:
            async with limit:
                crc, etag = await self._call(
                    f"upload part {number} of {url}", url, functools.partial(submit, number, start)
                )
            crcs[number - 1] = crc
            return {"PartNumber": number, "ETag": etag}

        async def complete(parts: list[dict[str, Any]]) -> Any:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": full,
                "UploadId": upload_id,
                "MultipartUpload": {"Parts": parts},
            }
            if conditional:
                kwargs["IfNoneMatch"] = "*"
            return await self._client.complete_multipart_upload(**kwargs)

        tasks = [asyncio.ensure_future(part(i + 1, s)) for i, s in enumerate(starts)]
        try:
            parts = await asyncio.gather(*tasks)
            try:
                await self._call(f"complete multipart upload {url}", url, functools.partial(complete, list(parts)))
            except ConditionFailedError as err:
                raise self._exists(key) from err
        except BaseException:
            self._unaborted[upload_id] = full  # until the abort below succeeds (else aclose retries)
            for task in tasks:
                task.cancel()  # the parts not sent yet are not sent at all
            await asyncio.gather(*tasks, return_exceptions=True)
            if sending:  # parts in flight in threads: an abort before they end may not stick
                await asyncio.to_thread(concurrent.futures.wait, list(sending), self._request_timeout())
            await self._abort(full, upload_id)
            raise
        return Uploaded(part_size, crcs)

    def _request_timeout(self) -> float:
        return float(self._config.connect_timeout + self._config.read_timeout) + 5.0

    async def _abort(self, full: str, upload_id: str) -> None:
        """Abort an upload of ours; if that fails, remember it for :meth:`aclose`."""
        url = self._object_url(full)
        try:
            await self._call(
                f"abort multipart upload {url}",
                url,
                lambda: self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id),
            )
        except NotFoundError:
            self._unaborted.pop(upload_id, None)  # completed or aborted already
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._unaborted[upload_id] = full
            log.warning("could not abort the multipart upload %s of %s (retried at close): %s", upload_id, url, exc)
        else:
            self._unaborted.pop(upload_id, None)

    async def abort_orphaned_uploads(self, prefix: str, *, older_than: float, match: Callable[[str], object]) -> int:
        full = self.prefix + _check_prefix(prefix, self.url)
        url = self._object_url(full)
        aborted = 0
        markers: dict[str, str] = {}
        while True:
            resp = await self._call(
                f"listing multipart uploads under {url}",
                url,
                functools.partial(self._client.list_multipart_uploads, Bucket=self.bucket, Prefix=full, **markers),
            )
            now = _server_now(resp)
            for upload in resp.get("Uploads", []):
                key = str(upload.get("Key", ""))
                initiated = upload.get("Initiated")
                if not key.startswith(self.prefix) or not match(key[len(self.prefix) :]) or initiated is None:
                    continue
                age = now - initiated.timestamp()
                if age < older_than:
                    continue
                log.warning(
                    "aborting the multipart upload of %s started %.0f s ago and never completed "
                    "(its writer died or failed to abort it)",
                    self._object_url(key),
                    age,
                )
                await self._abort(key, str(upload["UploadId"]))
                aborted += 1
            if not resp.get("IsTruncated"):
                return aborted
            markers = {"KeyMarker": resp.get("NextKeyMarker", ""), "UploadIdMarker": resp.get("NextUploadIdMarker", "")}

    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        full = self._key(key)
        url = self._object_url(full)

        async def op() -> bytes:
            resp = await self._client.get_object(Bucket=self.bucket, Key=full)
            async with resp["Body"] as body:
                size = int(resp.get("ContentLength", 0))
                if limit is not None and size > limit:
                    raise _too_large(url, size, limit)
                data: bytes = await body.read()
            if limit is not None and len(data) > limit:
                raise _too_large(url, len(data), limit)
            return data

        return await self._call(f"GET {url}", url, op)

    async def head(self, key: str) -> StoredObject:
        info = await self._store.head(parse_url(self._object_url(self._key(key))))
        return StoredObject(key, info.size, etag=info.etag)

    async def read_range(self, key: str, start: int, end: int, out: memoryview, etag: str | None = None) -> None:
        if end > start:
            await self._store.read_range(parse_url(self._object_url(self._key(key))), start, end, etag=etag, out=out)

    async def list_objects(self, prefix: str = "") -> list[StoredObject]:
        out: list[StoredObject] = []
        token: str | None = None
        full = self.prefix + _check_prefix(prefix, self.url)
        url = self._object_url(full)
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            resp = await self._call(f"listing {url}", url, functools.partial(self._client.list_objects_v2, **kwargs))
            now = _server_now(resp)
            for item in resp.get("Contents", []):
                modified = item.get("LastModified")
                age = None if modified is None else now - modified.timestamp()
                etag = str(item["ETag"]).strip('"') if item.get("ETag") else None
                out.append(StoredObject(item["Key"][len(self.prefix) :], int(item["Size"]), age, etag))
            if not resp.get("IsTruncated"):
                return out
            token = resp.get("NextContinuationToken")

    async def delete(self, keys: list[str]) -> None:
        for key in keys:  # one by one: every S3 implementation has DeleteObject
            full = self._key(key)
            url = self._object_url(full)
            await self._call(
                f"DELETE {url}", url, functools.partial(self._client.delete_object, Bucket=self.bucket, Key=full)
            )

    async def aclose(self) -> None:
        try:
            for upload_id, full in list(self._unaborted.items()):
                await self._abort(full, upload_id)
            if self._unaborted:
                log.warning(
                    "%d incomplete multipart upload(s) under %s could not be aborted; the next writer of "
                    "this prefix aborts them once they are older than its orphan_age",
                    len(self._unaborted),
                    self.url,
                )
        finally:
            if self._threads is not None:
                self._threads.shutdown(wait=True)
                self._sync.close()
            await self._store.aclose()


_DAMAGED = "it was damaged or tampered with (or is being rewritten by something other than fastfeed)"


def _too_large(url: str, size: int, limit: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{url} has {size} bytes, more than the {limit} it may have", url=url, hint=_DAMAGED)


#: The checksum recorded per part in manifests (CRC32C: the CPU computes it at several GB/s).
CHECKSUM = "crc32c"


def checksum(data: memoryview | bytes) -> int:
    """The :data:`CHECKSUM` of ``data`` (the GIL is released while it runs)."""
    return _native.crc32c(data)


async def _checksum(view: memoryview) -> int:
    return await asyncio.to_thread(checksum, view)


@contextlib.contextmanager
def _part_copy(free: list[bytearray], size: int) -> Iterator[bytearray]:
    """A ``size``-byte buffer for one part's body: taken from ``free`` and given back after,
    so a save writes into buffers whose pages are already mapped (a fresh ``bytes`` of a 32 MiB
    part costs page faults on every 4 KiB, about as much as sending it)."""
    body = next((b for b in free if len(b) == size), None)
    if body is None:
        body = bytearray(size)
    else:
        free.remove(body)  # list ops are atomic under the GIL: threads never share a buffer
    try:
        yield body
    finally:
        free.append(body)


# ------------------------------------------------------------------------------------------
# Local directories

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
#: errno values of an O_NOFOLLOW open that met a symbolic link.
_LINK_ERRNOS = (errno.ELOOP, errno.EMLINK)
#: errno values of os.link on a file system without hard links.
_NO_LINK_ERRNOS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV)


class LocalCkptStore(CkptStore):
    """A local (or network-mounted) directory; writes are a temp file + fsync + rename (or a
    hard link, for ``if_absent``). Every path below the root is opened relative to a directory
    descriptor with ``O_NOFOLLOW``: symbolic links inside the root are refused."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root + "/"
        self.conditional_writes = True

    def _display(self, key: str) -> str:
        return "file://" + os.path.join(self.root, *key.split("/"))

    def _walk(self, parts: list[str], *, create: bool) -> int:
        """A descriptor of the directory ``root/parts...`` (the caller closes it); with
        ``create``, missing directories are made. Raises FileNotFoundError / a symlink error."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            for part in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[tuple[int, os.stat_result]]:
        """The regular file ``key``, opened for reading without following any link."""
        parts = check_key(key, self.url).split("/")
        url = self._display(key)
        try:
            dfd = self._walk(parts[:-1], create=False)
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dfd)
            finally:
                os.close(dfd)
        except FileNotFoundError as exc:
            raise NotFoundError(f"{url} does not exist", url=url) from exc
        except OSError as exc:
            raise self._map(exc, key) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptCheckpointError(f"{url} is not a regular file", url=url, hint=_DAMAGED)
            yield fd, st
        finally:
            os.close(fd)

    def _map(self, exc: OSError, key: str) -> FastfeedError:
        url = self._display(key)
        if exc.errno == errno.ENOTDIR:
            return CorruptCheckpointError(f"a directory above {url} is a file", url=url, hint=_DAMAGED)
        if exc.errno in _LINK_ERRNOS:
            return CorruptCheckpointError(
                f"{url} (or a directory above it) is a symbolic link: checkpoint objects are never links, "
                "refusing to follow it",
                url=url,
                hint="something other than fastfeed changed the checkpoint directory",
            )
        if isinstance(exc, PermissionError):
            return StoreError(f"permission denied for {url}", url=url, hint="check the permissions")
        return StoreError(f"cannot access {url}: {exc}", url=url, hint="check space and permissions")

    async def check_writable(self) -> None:
        def probe() -> None:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot write checkpoints to {self.root}: {exc}", url=self.url, hint="pick a writable directory"
                ) from exc

        await asyncio.to_thread(probe)
        name = f"{_PROBE_PREFIX}{secrets.token_hex(8)}"
        try:
            await self._put_object(name, memoryview(b""), if_absent=True)
        except NotSupportedError as err:
            self._lacks_conditional_writes(err)
        finally:
            await self.delete([name])

    async def _put_object(self, key: str, data: memoryview, *, if_absent: bool) -> None:
        parts = check_key(key, self.url).split("/")
        url = self._display(key)

        def write() -> None:
            dfd = self._walk(parts[:-1], create=True)
            try:
                tmp = f"{_LOCAL_TEMP_PREFIXES[0]}{secrets.token_hex(8)}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    if if_absent:
                        os.link(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                        os.unlink(tmp, dir_fd=dfd)
                    else:
                        os.replace(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
                os.fsync(dfd)  # the new name is durable too
            finally:
                os.close(dfd)

        try:
            await asyncio.to_thread(write)
        except FileExistsError as exc:
            raise ConditionFailedError(f"{url} exists already", url=url) from exc
        except OSError as exc:
            if if_absent and exc.errno in _NO_LINK_ERRNOS:
                raise NotSupportedError(f"the file system of {self.root} has no hard links", url=url) from exc
            raise self._map(exc, key) from exc

    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        def read() -> bytes:
            with self._open(key) as (fd, st):
                if limit is not None and st.st_size > limit:
                    raise _too_large(self._display(key), st.st_size, limit)
                # Sized by the file, not by the limit: read(n) allocates n bytes up front.
                want = st.st_size + 1 if limit is None else min(st.st_size, limit) + 1
                with os.fdopen(os.dup(fd), "rb") as f:
                    return f.read(want) if st.st_size else f.read()

        data = await asyncio.to_thread(read)
        if limit is not None and len(data) > limit:  # it grew since fstat
            raise _too_large(self._display(key), len(data), limit)
        return data

    async def head(self, key: str) -> StoredObject:
        def stat_() -> StoredObject:
            with self._open(key) as (_, st):
                return StoredObject(key, st.st_size, time.time() - st.st_mtime, _local_etag(st))

        return await asyncio.to_thread(stat_)

    async def read_range(self, key: str, start: int, end: int, out: memoryview, etag: str | None = None) -> None:
        url = self._display(key)

        def read() -> None:
            with self._open(key) as (fd, st):
                if etag is not None and _local_etag(st) != etag:
                    raise ConditionFailedError(f"{url} changed while it was being read", url=url)
                got = 0
                while got < end - start:
                    n = os.preadv(fd, [out[got:]], start + got)
                    if n == 0:
                        raise CorruptCheckpointError(
                            f"{url} ends at byte {start + got}, before the {end} its manifest says",
                            url=url,
                            hint=_DAMAGED,
                        )
                    got += n

        if end > start:
            await asyncio.to_thread(read)

    async def get_into(
        self, key: str, out: memoryview, *, part_size: int, concurrency: int, etag: str | None = None
    ) -> None:
        url = self._display(key)

        def read() -> None:
            with self._open(key) as (fd, st):
                if st.st_size != len(out):
                    raise CorruptCheckpointError(
                        f"{url} has {st.st_size} bytes, expected {len(out)}", url=url, hint=_DAMAGED
                    )
                got = 0
                while got < len(out):
                    n = os.preadv(fd, [out[got:]], got)
                    if n == 0:
                        raise CorruptCheckpointError(f"{url} shrank to {got} bytes while read", url=url, hint=_DAMAGED)
                    got += n

        await asyncio.to_thread(read)

    def _scan(self, prefix: str) -> Iterator[tuple[str, str, os.stat_result]]:
        """``(key, name, stat)`` of every regular file below the root (links are skipped)."""
        stack = [""]
        while stack:
            rel = stack.pop()
            top = os.path.join(self.root, *rel.split("/")) if rel else self.root
            try:
                entries = list(os.scandir(top))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                key = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        stack.append(key)
                elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        yield key, entry.name, entry.stat(follow_symlinks=False)

    async def list_objects(self, prefix: str = "") -> list[StoredObject]:
        _check_prefix(prefix, self.url)

        def walk() -> list[StoredObject]:
            now = time.time()
            return [
                StoredObject(key, st.st_size, now - st.st_mtime, _local_etag(st))
                for key, name, st in self._scan(prefix)
                if not name.startswith((*_LOCAL_TEMP_PREFIXES, _PROBE_PREFIX))
            ]

        return await asyncio.to_thread(walk)

    async def abort_orphaned_uploads(self, prefix: str, *, older_than: float, match: Callable[[str], object]) -> int:
        _check_prefix(prefix, self.url)

        def sweep() -> int:
            now = time.time()
            stale = [
                key
                for key, name, st in self._scan(prefix)
                if name.startswith(_LOCAL_TEMP_PREFIXES) and now - st.st_mtime >= older_than
            ]
            for key in stale:
                log.warning(
                    "removing %s, an unfinished write last touched over %.0f s ago", self._display(key), older_than
                )
            self._remove(stale)
            return len(stale)

        return await asyncio.to_thread(sweep)

    def _remove(self, keys: list[str]) -> None:
        for key in keys:
            parts = check_key(key, self.url).split("/")
            try:
                dfd = self._walk(parts[:-1], create=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._map(exc, key) from exc
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(parts[-1], dir_fd=dfd)
            except OSError as exc:
                raise self._map(exc, key) from exc
            finally:
                os.close(dfd)
            if len(parts) > 1:  # the directory, once empty
                with contextlib.suppress(OSError):
                    gfd = self._walk(parts[:-2], create=False)
                    try:
                        os.rmdir(parts[-2], dir_fd=gfd)
                    finally:
                        os.close(gfd)

    async def delete(self, keys: list[str]) -> None:
        await asyncio.to_thread(self._remove, list(keys))


def _local_etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"
