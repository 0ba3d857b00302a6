"""Where checkpoints are written: an S3 prefix or a local directory, behind one small async
interface (used on the fastfeed IO loop by :mod:`fastfeed.checkpoint`).

Writes of large objects go up as multipart uploads with parts in parallel; a failed one is
aborted, so it leaves nothing behind that looks like an object. ``put(..., if_absent=True)``
is a conditional write (``If-None-Match: *``) where the store supports it, a plain write
where it does not (the checkpointer is the only writer of its prefix).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from fastfeed import _native
from fastfeed.config import S3Config, parse_size
from fastfeed.errors import ConfigError, FastfeedError, NotFoundError, StoreError
from fastfeed.retry import retry_async
from fastfeed.store import S3Store, bucket_missing, client_settings, map_s3_error
from fastfeed.urls import Location, parse_url

__all__ = ["CkptStore", "LocalCkptStore", "S3CkptStore", "StoredObject", "open_ckpt_store"]

T = TypeVar("T")

#: S3's smallest part (all but the last).
MIN_PART = 5 << 20


@dataclass(frozen=True)
class StoredObject:
    key: str  # relative to the store's prefix
    size: int


class CkptStore(abc.ABC):
    """Keys are relative to the checkpoint prefix (``step-000000000042/MANIFEST.json``)."""

    url: str

    @abc.abstractmethod
    async def check_writable(self) -> None:
        """Raise a clear error now if the prefix cannot be written (missing bucket, denied)."""

    @abc.abstractmethod
    async def put(self, key: str, data: memoryview, *, if_absent: bool = False) -> None:
        """Write one object; ``if_absent``: a conditional write where the store supports it."""

    async def put_large(self, key: str, data: memoryview, *, part_size: int, concurrency: int) -> list[int]:
        """Write ``data`` as one object, in parallel parts when large; returns the
        :func:`checksum` of each ``part_size`` slice of ``data`` (for the manifest; computed
        while the parts go up)."""
        crcs = await asyncio.gather(*(_checksum(data[s : s + part_size]) for s in range(0, len(data), part_size)))
        await self.put(key, data)
        return list(crcs)

    @abc.abstractmethod
    async def get(self, key: str) -> bytes:
        """The whole object."""

    @abc.abstractmethod
    async def get_into(self, key: str, out: memoryview, *, part_size: int, concurrency: int) -> None:
        """Read the whole object (exactly ``len(out)`` bytes) into ``out``, in parallel ranges."""

    @abc.abstractmethod
    async def list_objects(self, prefix: str = "") -> list[StoredObject]:
        """Every object under ``prefix`` (keys relative to the store's prefix)."""

    @abc.abstractmethod
    async def delete(self, keys: list[str]) -> None:
        """Delete ``keys`` (missing ones are fine)."""

    async def aclose(self) -> None:
        return None


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


class S3CkptStore(CkptStore):
    def __init__(self, store: S3Store, loc: Location, config: S3Config | None = None) -> None:
        self._store = store
        self._config = config or store.config
        self._sync: Any = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._copies: list[bytearray] = []  # part-sized bodies, reused across parts and saves
        self._client: Any = store._client
        self._retry = store.config.retry
        self.bucket = loc.bucket
        self.prefix = loc.key if loc.key.endswith("/") or not loc.key else loc.key + "/"
        self.url = f"s3://{self.bucket}/{self.prefix}"

    def _key(self, key: str) -> str:
        return self.prefix + key

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
        probe = self._key(f".fastfeed-probe-{os.getpid()}")
        url = f"s3://{self.bucket}/{probe}"
        try:
            await self._call(
                f"PUT {url}", url, lambda: self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
            )
        except NotFoundError as err:
            raise bucket_missing(f"s3://{self.bucket}") from err
        await self._call(f"DELETE {url}", url, lambda: self._client.delete_object(Bucket=self.bucket, Key=probe))

    async def put(self, key: str, data: memoryview, *, if_absent: bool = False) -> None:
        full = self._key(key)
        url = f"s3://{self.bucket}/{full}"
        body = bytes(data)

        async def op() -> Any:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": body}
            if if_absent:
                kwargs["IfNoneMatch"] = "*"
            return await self._client.put_object(**kwargs)

        try:
            await self._call(f"PUT {url}", url, op)
        except StoreError as err:
            if if_absent and _unsupported_condition(err):
                await self.put(key, data)  # the store does not do conditional writes
                return
            raise

    async def put_large(self, key: str, data: memoryview, *, part_size: int, concurrency: int) -> list[int]:
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be >= {MIN_PART} bytes for S3 multipart uploads")
        if len(data) <= part_size:
            crcs = [await _checksum(data)]
            await self.put(key, data)
            return crcs
        full = self._key(key)
        url = f"s3://{self.bucket}/{full}"
        created = await self._call(
            f"create multipart upload {url}",
            url,
            lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=full),
        )
        upload_id = created["UploadId"]
        limit = asyncio.Semaphore(concurrency)
        starts = list(range(0, len(data), part_size))
        crcs = [0] * len(starts)

        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="fastfeed-upload")
            self._sync = _sync_client(self._config, concurrency)
        loop = asyncio.get_running_loop()

        def send(number: int, start: int) -> tuple[int, str]:
            view = data[start : start + part_size]
            crc = checksum(view)
            with _part_copy(self._copies, len(view)) as body:
                body[:] = view  # botocore takes bytes or bytearray: a reused one, not a new bytes
                resp = self._sync.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body
                )
            return crc, str(resp["ETag"])

        async def part(number: int, start: int) -> dict[str, Any]:
            async with limit:
                crc, etag = await self._call(
                    f"upload part {number} of {url}",
                    url,
                    lambda: loop.run_in_executor(self._threads, send, number, start),
                )
            crcs[number - 1] = crc
            return {"PartNumber": number, "ETag": etag}

        try:
            parts = await asyncio.gather(*(part(i + 1, s) for i, s in enumerate(starts)))
            await self._call(
                f"complete multipart upload {url}",
                url,
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": list(parts)}
                ),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
                )
            raise
        return crcs

    async def get(self, key: str) -> bytes:
        full = self._key(key)
        url = f"s3://{self.bucket}/{full}"

        async def op() -> bytes:
            resp = await self._client.get_object(Bucket=self.bucket, Key=full)
            async with resp["Body"] as body:
                data: bytes = await body.read()
            return data

        return await self._call(f"GET {url}", url, op)

    async def get_into(self, key: str, out: memoryview, *, part_size: int, concurrency: int) -> None:
        loc = parse_url(f"s3://{self.bucket}/{self._key(key)}")
        limit = asyncio.Semaphore(concurrency)

        async def part(start: int) -> None:
            end = min(start + part_size, len(out))
            async with limit:
                await self._store.read_range(loc, start, end, out=out[start:end])

        await asyncio.gather(*(part(s) for s in range(0, len(out), part_size)))

    async def list_objects(self, prefix: str = "") -> list[StoredObject]:
        out: list[StoredObject] = []
        token: str | None = None
        full = self._key(prefix)
        url = f"s3://{self.bucket}/{full}"
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            resp = await self._call(f"listing {url}", url, functools.partial(self._client.list_objects_v2, **kwargs))
            for item in resp.get("Contents", []):
                out.append(StoredObject(item["Key"][len(self.prefix) :], int(item["Size"])))
            if not resp.get("IsTruncated"):
                return out
            token = resp.get("NextContinuationToken")

    async def delete(self, keys: list[str]) -> None:
        for key in keys:  # one by one: every S3 implementation has DeleteObject
            full = self._key(key)
            url = f"s3://{self.bucket}/{full}"
            await self._call(
                f"DELETE {url}", url, functools.partial(self._client.delete_object, Bucket=self.bucket, Key=full)
            )

    async def aclose(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._sync.close()
        await self._store.aclose()


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


def _unsupported_condition(err: FastfeedError) -> bool:
    text = str(err)
    return "NotImplemented" in text or "501" in text or "not implemented" in text.lower()


class LocalCkptStore(CkptStore):
    """A local (or network-mounted) directory; writes are a temp file + fsync + rename."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root + "/"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    async def check_writable(self) -> None:
        def probe() -> None:
            try:
                os.makedirs(self.root, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=self.root, prefix=".fastfeed-probe-"):
                    pass
            except OSError as exc:
                raise StoreError(
                    f"cannot write checkpoints to {self.root}: {exc}", url=self.url, hint="pick a writable directory"
                ) from exc

        await asyncio.to_thread(probe)

    async def put(self, key: str, data: memoryview, *, if_absent: bool = False) -> None:
        path = self._path(key)

        def write() -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if if_absent:
                    os.link(tmp, path)  # fails if it exists: a conditional write
                    os.unlink(tmp)
                else:
                    os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

        try:
            await asyncio.to_thread(write)
        except FileExistsError as exc:
            raise StoreError(f"{path} exists already", url=self.url) from exc
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}", url=self.url, hint="check space and permissions") from exc

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(_read_file, path)
        except FileNotFoundError as exc:
            raise NotFoundError(f"{path} does not exist", url="file://" + path) from exc

    async def get_into(self, key: str, out: memoryview, *, part_size: int, concurrency: int) -> None:
        data = await self.get(key)
        if len(data) != len(out):
            raise StoreError(f"{self._path(key)} has {len(data)} bytes, expected {len(out)}", url=self.url)
        out[:] = data

    async def list_objects(self, prefix: str = "") -> list[StoredObject]:
        def walk() -> list[StoredObject]:
            found = []
            for dirpath, _, files in os.walk(self.root):
                for name in files:
                    if name.startswith(".tmp-") or name.startswith(".fastfeed-probe-"):
                        continue
                    full = os.path.join(dirpath, name)
                    key = os.path.relpath(full, self.root).replace(os.sep, "/")
                    if key.startswith(prefix):
                        found.append(StoredObject(key, os.path.getsize(full)))
            return found

        return await asyncio.to_thread(walk)

    async def delete(self, keys: list[str]) -> None:
        def remove() -> None:
            for key in keys:
                path = self._path(key)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(path))  # the step directory, once empty

        await asyncio.to_thread(remove)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
