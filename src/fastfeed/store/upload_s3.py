"""The checkpoint store of an S3 prefix (:class:`S3CkptStore`): conditional PUTs with
``If-None-Match: *`` (probed once per endpoint and bucket), multipart uploads whose parts go up
in parallel from a thread pool, and the abort of failed and orphaned uploads.

Every object and part carries its CRC32C (computed anyway for the manifest) in the
``x-amz-checksum-crc32c`` header where the store is seen to check it (probed once per endpoint
and bucket: a PUT with a wrong value must be refused with a digest error). The store then
refuses a body damaged on the way, and fastfeed sends it again; a signed payload SHA256 does
not give that everywhere (SeaweedFS stores a body that fails it). With the check in place, parts
go unsigned (``UNSIGNED-PAYLOAD``) instead of hashed with SHA256, which botocore does for every
body over plain HTTP: a third of a save's client CPU. A store that does not check the header
keeps botocore's signing, and so does a profile that sets ``s3.payload_signing_enabled``.

See :mod:`fastfeed.store.upload` for the design; the interface is
:class:`~fastfeed.store.upload_base.CkptStore`. Reads go through the data-plane
:class:`~fastfeed.store.s3.S3Store`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from fastfeed.config import S3Config
from fastfeed.errors import ConditionFailedError, NotFoundError, NotSupportedError
from fastfeed.store.base import bucket_missing
from fastfeed.store.retry import retry_async
from fastfeed.store.s3 import DIGEST_CODES, S3Store, client_settings, map_s3_error
from fastfeed.store.upload_base import (
    MIN_PART,
    PROBE_PREFIX,
    CkptStore,
    StoredObject,
    Uploaded,
    check_key,
    check_prefix,
    checksum,
    checksum_in_thread,
    effective_part_size,
    too_large,
)
from fastfeed.urls import Location, parse_url

__all__ = ["S3CkptStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _sync_client(config: S3Config, pool_size: int, *, unsigned_payload: bool) -> Any:
    """A plain (thread-safe) botocore S3 client with the data-plane client's settings: part
    uploads run in threads, so the part copies (and request signing, where payloads are signed)
    run in parallel instead of on the one IO-loop thread. ``unsigned_payload``: the parts carry
    a checksum the store checks, so their bodies are not hashed for the signature (unless the
    profile sets ``s3.payload_signing_enabled`` itself)."""
    import botocore.config
    import botocore.session

    options, kwargs = client_settings(config, pool_size)
    session = botocore.session.Session(profile=config.profile)
    if unsigned_payload:
        try:
            profile_s3 = session.get_scoped_config().get("s3") or {}
        except Exception:  # a missing profile fails in create_client below, with botocore's words
            profile_s3 = {}
        if "payload_signing_enabled" not in profile_s3:
            options["s3"] = {**options.get("s3", {}), "payload_signing_enabled": False}
    return session.create_client("s3", config=botocore.config.Config(**options), **kwargs)


def _crc_header(crc: int) -> str:
    """A CRC32C as S3's ``x-amz-checksum-crc32c`` carries it (base64 of 4 big-endian bytes)."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


#: (endpoint URL, bucket) -> whether the store refuses a body that fails its CRC32C header.
_verifies_checksums: dict[tuple[str | None, str], bool] = {}


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
    """The checkpoint store of the prefix ``loc`` on S3 (``store`` serves the reads)."""

    def __init__(self, store: S3Store, loc: Location, config: S3Config | None = None) -> None:
        self._store = store
        self._config = config or store.config
        self._sync: Any = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._copies: list[bytearray] = []  # part-sized bodies, reused across parts and saves
        self._client: Any = store.client
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

    async def check_readable(self) -> None:
        await self._call(
            f"listing {self.url}",
            self.url,
            functools.partial(self._client.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1),
        )

    async def check_writable(self) -> None:
        # The bucket first (some servers create a missing bucket on PUT), then a write probe.
        await self.check_readable()
        probe = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
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
                    self.note_no_conditional_writes(None)
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

    async def _checks_checksums(self) -> bool:
        """Whether the store refuses a body that does not match its ``x-amz-checksum-crc32c``
        header (probed once per endpoint and bucket with a deliberately wrong one, decided by
        the error code). Anything else, an error included, counts as no: payloads stay signed."""
        where = (self._config.endpoint_url, self.bucket)
        known = _verifies_checksums.get(where)
        if known is not None:
            return known
        from botocore.exceptions import ClientError

        probe = self._key(f"{PROBE_PREFIX}{secrets.token_hex(8)}")
        body = b"fastfeed checksum probe"  # a SHA256 mismatch code would not do: SeaweedFS ignores those
        try:
            await self._client.put_object(
                Bucket=self.bucket, Key=probe, Body=body, ChecksumCRC32C=_crc_header(checksum(body) ^ 0xFFFFFFFF)
            )
            checked = False  # the store took a body its header says is damaged
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            checked = code in DIGEST_CODES
            if not checked and int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) >= 500:
                log.debug("checksum probe of %s failed (%s): payloads stay signed for this upload", self.url, code)
                return False  # not cached: a later upload asks again
        except Exception as exc:
            log.debug("checksum probe of %s failed (%s): payloads stay signed for this upload", self.url, exc)
            return False
        finally:
            with contextlib.suppress(Exception):
                await self._client.delete_object(Bucket=self.bucket, Key=probe)
        log.debug("%s checks CRC32C headers: %s", self.url, checked)
        return _verifies_checksums.setdefault(where, checked)

    async def _put_object(self, key: str, data: memoryview, *, if_absent: bool, crc: int | None = None) -> None:
        full = self._key(key)
        url = self._object_url(full)
        body = bytes(data)
        extra: dict[str, Any] = {}
        if await self._checks_checksums():  # so that a body damaged on the way is refused
            if crc is None:
                crc = await checksum_in_thread(data) if len(data) > 1 << 20 else checksum(data)
            extra["ChecksumCRC32C"] = _crc_header(crc)

        async def op() -> Any:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": body, **extra}
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
            crc = await checksum_in_thread(data)
            await self.put(key, data, if_absent=if_absent, crc=crc)
            return Uploaded(part_size, [crc])
        full = self._key(key)
        url = self._object_url(full)
        conditional = if_absent and self.conditional_writes
        if if_absent and not conditional:
            with contextlib.suppress(NotFoundError):
                await self.head(key)
                raise self.exists_error(key)
        checked = await self._checks_checksums()
        algorithm = {"ChecksumAlgorithm": "CRC32C"} if checked else {}
        creating = asyncio.ensure_future(
            self._call(
                f"create multipart upload {url}",
                url,
                lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=full, **algorithm),
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
            self._sync = _sync_client(self._config, concurrency, unsigned_payload=checked)
        threads = self._threads
        sending: set[concurrent.futures.Future[tuple[int, str]]] = set()  # part requests in threads

        def send(number: int, start: int) -> tuple[int, str]:
            view = data[start : start + part_size]
            crc = checksum(view)
            extra = {"ChecksumCRC32C": _crc_header(crc)} if checked else {}
            with _part_copy(self._copies, len(view)) as body:
                body[:] = view  # botocore takes bytes or bytearray: a reused one, not a new bytes
                resp = self._sync.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body, **extra
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
            if checked:
                return {"PartNumber": number, "ETag": etag, "ChecksumCRC32C": _crc_header(crc)}
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
                raise self.exists_error(key) from err
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
        full = self.prefix + check_prefix(prefix, self.url)
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
                    raise too_large(url, size, limit)
                data: bytes = await body.read()
            if limit is not None and len(data) > limit:
                raise too_large(url, len(data), limit)
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
        full = self.prefix + check_prefix(prefix, self.url)
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
