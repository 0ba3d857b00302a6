"""Object stores behind one narrow async interface: list, head, read a byte range.

Everything above this module (prefetcher, cache, dataset) depends only on :class:`Store`, so a
store can be replaced by a fake in unit tests, wrapped to inject latency in benchmarks, or
swapped for a faster data-plane engine without touching the pipeline.

Two implementations:

* :class:`S3Store`: any S3-compatible endpoint through aiobotocore, plain S3 calls only
  (ListObjectsV2, HeadObject, ranged GetObject) with path-style addressing by default, so it
  works unchanged against MinIO, SeaweedFS, Ceph and AWS. botocore's own retries are off;
  :mod:`fastfeed.store.retry` retries with backoff and jitter, and a transfer broken mid-body resumes
  from the byte already received.
* :class:`LocalStore`: ``file://`` URLs and plain paths, read with ``os.pread`` in a thread.

Stores are created and used on the process's IO loop (:mod:`fastfeed._loop`) and are not
thread-safe.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import functools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastfeed.config import RetryConfig, S3Config
from fastfeed.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConditionFailedError,
    EmptyDatasetError,
    EndpointError,
    FastfeedError,
    NotFoundError,
    NotSupportedError,
    StoreError,
    StoreTimeoutError,
    ThrottledError,
    TransientStoreError,
)
from fastfeed.store.retry import RetryState, retry_async
from fastfeed.urls import Location, parse_url

__all__ = ["LocalStore", "ObjectInfo", "S3Store", "Store", "client_settings", "create_s3_store", "open_store"]

log = logging.getLogger(__name__)

#: Bytes requested per read from an HTTP response body.
_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """An object (or file): its URL, size in bytes and ETag (``None`` for local files)."""

    url: str
    size: int
    etag: str | None = None


class RangeReader(Protocol):
    """What reads of an object's bytes need: :meth:`Store.read_range`."""

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview: ...


class Store(abc.ABC):
    """The narrow interface every store implements (async, used on one event loop)."""

    @abc.abstractmethod
    async def list(self, loc: Location, suffix: str = ".tar") -> list[ObjectInfo]:
        """All objects under the prefix ``loc`` whose names end in ``suffix``, sorted by URL.

        Raises:
            BucketNotFoundError / NotFoundError: the bucket or directory does not exist.
            EmptyDatasetError: nothing matched.
        """

    @abc.abstractmethod
    async def head(self, loc: Location) -> ObjectInfo:
        """Size and ETag of one object. Raises NotFoundError if it does not exist."""

    @abc.abstractmethod
    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        """Bytes ``[start, end)`` of the object, as a memoryview of exactly ``end - start`` bytes.

        With ``out`` (a writable buffer of exactly that length) the bytes are written into it,
        so callers can reuse buffers; otherwise a new buffer is allocated. If ``etag`` is given
        and the object changed, raises :class:`StoreError` instead of returning bytes of a
        different version.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


# --------------------------------------------------------------------------------------------
# Local files


class LocalStore(Store):
    """``file://`` URLs and local paths. Reads run in the loop's default thread pool."""

    def __init__(self, retry: RetryConfig | None = None) -> None:
        self.retry = retry or RetryConfig()

    async def list(self, loc: Location, suffix: str = ".tar") -> list[ObjectInfo]:
        root = Path(loc.path)
        if not root.exists():
            raise NotFoundError(f"directory {root} does not exist", url=loc.url, hint="check the path of the dataset")
        if not root.is_dir():
            raise NotFoundError(f"{root} is not a directory", url=loc.url)
        files = sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())
        if not files:
            raise EmptyDatasetError(
                f"no *{suffix} files under {root}",
                url=loc.url,
                hint="point the source at the directory that holds the shards",
            )
        return [ObjectInfo(p.as_uri(), p.stat().st_size, None) for p in files]

    async def head(self, loc: Location) -> ObjectInfo:
        try:
            st = await asyncio.get_running_loop().run_in_executor(None, os.stat, loc.path)
        except OSError as exc:
            raise _map_os_error(exc, loc.url) from exc
        if not os.path.isfile(loc.path):
            raise NotFoundError(f"{loc.path} is not a regular file", url=loc.url)
        return ObjectInfo(loc.url, st.st_size, None)

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        view = _target(out, end - start)

        def read() -> memoryview:
            fd = os.open(loc.path, os.O_RDONLY)
            try:
                got = 0
                while got < len(view):
                    n = os.preadv(fd, [view[got:]], start + got)
                    if n == 0:
                        raise NotFoundError(
                            f"file shrank while reading: expected {end - start} bytes at offset {start}",
                            url=loc.url,
                        )
                    got += n
            finally:
                os.close(fd)
            return view

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, read)
        except FastfeedError:
            raise
        except OSError as exc:
            raise _map_os_error(exc, loc.url) from exc


def _target(out: memoryview | None, length: int) -> memoryview:
    if out is None:
        return memoryview(bytearray(length))
    if out.readonly or out.nbytes != length or out.itemsize != 1:
        raise ValueError(f"out must be a writable byte buffer of {length} bytes, got {out.nbytes}")
    return out


def _map_os_error(exc: OSError, url: str) -> StoreError:
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"no such file: {exc.filename}", url=url, hint="check the path")
    if isinstance(exc, PermissionError):
        return AccessDeniedError(f"permission denied reading {exc.filename}", url=url)
    if exc.errno in (errno.EIO, errno.ETIMEDOUT):
        return TransientStoreError(f"I/O error: {exc}", url=url)
    return StoreError(f"cannot read: {exc}", url=url)


# --------------------------------------------------------------------------------------------
# S3


_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "Forbidden",
}
BUCKET_HINT = "create the bucket or fix the URL; check AWS_ENDPOINT_URL points at the right store"
CREDENTIAL_HINT = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that they may read this bucket"


def bucket_missing(bucket_url: str) -> BucketNotFoundError:
    """The error for a bucket that does not exist (every S3 engine raises this one)."""
    return BucketNotFoundError(f"bucket does not exist: {bucket_url}", url=bucket_url, hint=BUCKET_HINT)


def sorted_listing(found: list[ObjectInfo], prefix_url: str, suffix: str) -> list[ObjectInfo]:
    """A listing's shards sorted by URL, or :class:`EmptyDatasetError` naming the prefix."""
    if not found:
        raise EmptyDatasetError(
            f"no *{suffix} objects under {prefix_url}",
            url=prefix_url,
            hint="check the prefix (listing is case-sensitive) and the endpoint",
        )
    return sorted(found, key=lambda o: o.url)


def map_s3_error(exc: BaseException, url: str, *, bucket_url: str | None = None) -> FastfeedError:
    """Map a botocore / aiohttp / asyncio exception to the most specific fastfeed error."""
    import aiohttp
    import botocore.exceptions as bex

    if isinstance(exc, FastfeedError):
        return exc
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            bucket = bucket_url or url
            return bucket_missing(bucket)
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return NotFoundError(f"object not found: {url}", url=url, hint="check the key and the endpoint")
        if code in _DENIED_CODES or status == 403:
            return AccessDeniedError(f"access denied ({code or status}) for {url}", url=url, hint=CREDENTIAL_HINT)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            # A read with If-Match (a shard overwritten mid-epoch) or a write with If-None-Match
            # (the object exists already); writers catch the type and say which.
            return ConditionFailedError(
                f"object changed while it was being read: {url}",
                url=url,
                hint="the shard was overwritten during the epoch; restart the epoch to read the new version",
            )
        if code == "NotImplemented" or status == 501:  # not a transient 5xx: it will not change
            return NotSupportedError(f"the store does not implement this request ({code or status}) for {url}", url=url)
        if code in _THROTTLE_CODES or status in (429, 503):
            return ThrottledError(f"throttled by the store ({code or status}) reading {url}", url=url)
        if status >= 500 or code in ("InternalError", "ServiceUnavailable", "RequestTimeout"):
            return TransientStoreError(f"store error {code or status} for {url}", url=url)
        return StoreError(f"S3 error {code or status} for {url}: {error.get('Message', '')}", url=url)
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return AccessDeniedError(f"no usable AWS credentials to read {url}", url=url, hint=CREDENTIAL_HINT)
    if isinstance(exc, bex.ConnectTimeoutError):
        return StoreTimeoutError(f"timed out connecting to the endpoint for {url}", url=url)
    if isinstance(exc, bex.ReadTimeoutError | asyncio.TimeoutError | TimeoutError):
        return StoreTimeoutError(f"timed out reading {url}", url=url)
    if isinstance(exc, bex.EndpointConnectionError | aiohttp.ClientConnectorError):
        return EndpointError(
            f"cannot connect to the S3 endpoint for {url}: {exc}",
            url=url,
            hint="check AWS_ENDPOINT_URL / endpoint_url and that the store is running",
        )
    if isinstance(
        exc,
        bex.ResponseStreamingError
        | bex.ConnectionClosedError
        | bex.IncompleteReadError
        | aiohttp.ClientPayloadError
        | aiohttp.ServerDisconnectedError
        | aiohttp.ClientOSError
        | ConnectionError,
    ):
        return TransientStoreError(f"connection broken while reading {url}: {exc}", url=url)
    if isinstance(exc, bex.ParamValidationError):
        return StoreError(f"invalid request for {url}: {exc}", url=url)
    if isinstance(exc, bex.BotoCoreError):
        return StoreError(f"S3 client error for {url}: {exc}", url=url)
    return StoreError(f"unexpected error for {url}: {type(exc).__name__}: {exc}", url=url)


def client_settings(config: S3Config, pool_size: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config options, create_client keyword arguments)`` for a botocore-family S3 client of
    ``config``: the async data-plane client here, and the sync client that uploads checkpoint
    parts from threads (:mod:`fastfeed.store.upload`)."""
    options: dict[str, Any] = {
        "connect_timeout": config.connect_timeout,
        "read_timeout": config.read_timeout,
        "max_pool_connections": pool_size or config.max_pool_connections,
        # fastfeed retries itself (with resume); botocore's retries would multiply attempts.
        "retries": {"total_max_attempts": 1},
        "s3": {"addressing_style": config.addressing_style},
        # Plain S3 only: no CRC trailers that older S3-compatible stores reject.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    if config.anonymous:
        from botocore import UNSIGNED

        options["signature_version"] = UNSIGNED
    kwargs: dict[str, Any] = {"region_name": config.region or "us-east-1"}
    if config.endpoint_url:
        kwargs["endpoint_url"] = config.endpoint_url
    if config.access_key_id:
        kwargs["aws_access_key_id"] = config.access_key_id
        kwargs["aws_secret_access_key"] = config.secret_access_key
        kwargs["aws_session_token"] = config.session_token
    return options, kwargs


class S3Store(Store):
    """An S3-compatible endpoint via aiobotocore. Create with :meth:`create` on the IO loop."""

    def __init__(self, config: S3Config, client: Any, client_cm: Any) -> None:
        self.config = config
        self._client = client
        self._client_cm = client_cm

    @classmethod
    async def create(cls, config: S3Config) -> S3Store:
        """Open a client for ``config`` (no request is sent yet)."""
        from aiobotocore.config import AioConfig

        session = _session(config.profile)
        options, kwargs = client_settings(config)
        kwargs["config"] = AioConfig(**options)
        try:
            client_cm = session.create_client("s3", **kwargs)
            client = await client_cm.__aenter__()
        except Exception as exc:
            raise map_s3_error(exc, config.endpoint_url or "s3://") from exc
        return cls(config, client, client_cm)

    async def aclose(self) -> None:
        await self._client_cm.__aexit__(None, None, None)

    def _map(self, loc: Location) -> Any:
        return lambda exc: map_s3_error(exc, loc.url, bucket_url=f"s3://{loc.bucket}")

    async def list(self, loc: Location, suffix: str = ".tar") -> list[ObjectInfo]:
        prefix = loc.key
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        out: list[ObjectInfo] = []

        async def page(token: str | None) -> dict[str, Any]:
            kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            result: dict[str, Any] = await self._client.list_objects_v2(**kwargs)
            return result

        token: str | None = None
        while True:
            resp = await retry_async(
                functools.partial(page, token), self.config.retry, f"listing {loc.url}", self._map(loc)
            )
            for item in resp.get("Contents", []):
                key = item["Key"]
                if key.endswith(suffix):
                    out.append(ObjectInfo(f"s3://{loc.bucket}/{key}", int(item["Size"]), _etag(item.get("ETag"))))
            if not resp.get("IsTruncated"):
                break
            token = resp.get("NextContinuationToken")
        return sorted_listing(out, f"s3://{loc.bucket}/{prefix}", suffix)

    async def head(self, loc: Location) -> ObjectInfo:
        if not loc.key or loc.key.endswith("/"):
            raise NotFoundError(f"{loc.url} names a prefix, not an object", url=loc.url)

        async def op() -> ObjectInfo:
            resp = await self._client.head_object(Bucket=loc.bucket, Key=loc.key)
            return ObjectInfo(loc.url, int(resp["ContentLength"]), _etag(resp.get("ETag")))

        try:
            return await retry_async(op, self.config.retry, f"HEAD {loc.url}", self._map(loc))
        except NotFoundError as err:
            # HEAD has no body, so a missing bucket looks like a missing key: tell them apart.
            if not isinstance(err, BucketNotFoundError) and not await self._bucket_exists(loc):
                raise bucket_missing(f"s3://{loc.bucket}") from err
            raise

    async def _bucket_exists(self, loc: Location) -> bool:
        try:
            await self._client.head_bucket(Bucket=loc.bucket)
        except Exception as exc:
            err = map_s3_error(exc, f"s3://{loc.bucket}")
            return not isinstance(err, NotFoundError)
        return True

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        length = end - start
        view = _target(out, length)
        got = 0
        state = RetryState(self.config.retry, f"GET {loc.url} bytes {start}-{end - 1}")
        while got < length:
            received_before = got
            try:
                kwargs: dict[str, Any] = {
                    "Bucket": loc.bucket,
                    "Key": loc.key,
                    # Resume from the byte already received, never from the start of the part.
                    "Range": f"bytes={start + got}-{end - 1}",
                }
                if etag:
                    kwargs["IfMatch"] = _quote_etag(etag)
                resp = await self._client.get_object(**kwargs)
                body = resp["Body"]
                try:
                    while got < length:
                        chunk = await body.read(min(_READ_CHUNK, length - got))
                        if not chunk:
                            break
                        n = len(chunk)
                        if got + n > length:
                            raise StoreError(
                                f"server sent more bytes than requested for range {start}-{end - 1}",
                                url=loc.url,
                            )
                        view[got : got + n] = chunk
                        got += n
                finally:
                    body.close()
                if got < length:
                    raise TransientStoreError(
                        f"response ended early: got {got} of {length} bytes of range {start}-{end - 1}",
                        url=loc.url,
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = map_s3_error(exc, loc.url, bucket_url=f"s3://{loc.bucket}")
                if got > received_before:
                    # Progress was made: a reset mid-body is not a reason to give up sooner.
                    state.attempt = max(0, state.attempt - 1)
                try:
                    await state.backoff(err)
                except FastfeedError as final:
                    if final is exc:
                        raise
                    raise final from exc
        return view


_sessions: dict[tuple[int, str | None], Any] = {}
_sessions_lock = threading.Lock()


def _session(profile: str | None) -> Any:
    """A new aiobotocore session for ``profile`` that shares the process's data loader.

    The data loader caches the parsed S3 service model and endpoint rules (a large JSON file); a
    session that parses them again cost ~150 ms of CPU per client on this project's benchmark
    machine, one that shares them a few ms. The session itself is new each time: it resolves
    credentials (botocore's chain) for its own client, never reusing ones an earlier client
    resolved under another environment. Keyed by pid so a forked DataLoader worker builds its own.
    """
    from aiobotocore.session import get_session

    key = (os.getpid(), profile)
    with _sessions_lock:
        template = _sessions.get(key)
        if template is None:
            template = get_session()
            inherited = next((s for (pid, p), s in _sessions.items() if p == profile), None)
            if inherited is not None:
                # A forked worker: reuse the parent's data loader, whose cache holds the parsed
                # service model and endpoint rules (plain data, copied with the fork), so each
                # worker of each epoch does not parse them again.
                template.register_component("data_loader", inherited.get_component("data_loader"))
            _sessions[key] = template
        loader = template.get_component("data_loader")
    session = get_session()
    if profile:
        session.set_config_variable("profile", profile)
    session.register_component("data_loader", loader)
    return session


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


def _quote_etag(value: str) -> str:
    return value if value.startswith('"') else f'"{value}"'


# --------------------------------------------------------------------------------------------


class StoreSet:
    """The stores one pipeline uses, by scheme, created lazily on the IO loop.

    The S3 store (its client and connection pool) is shared with every other :class:`StoreSet`
    of the same configuration on this process's IO loop, and closed when the last of them
    closes: a client takes tens of milliseconds of CPU to build (endpoint rules, the service
    model), which every stream of every epoch would otherwise pay, even when all its shards are
    cache hits.
    """

    def __init__(self, s3: S3Config, retry: RetryConfig | None = None) -> None:
        self.s3_config = s3
        self._local = LocalStore(retry or s3.retry)
        self._s3: Store | None = None
        self._lock = asyncio.Lock()

    async def get(self, loc: Location) -> Store:
        """The store for ``loc``'s scheme."""
        if loc.scheme == "file":
            return self._local
        async with self._lock:
            if self._s3 is None:
                self._s3 = await _shared_s3.acquire(self.s3_config)
            return self._s3

    async def aclose(self) -> None:
        if self._s3 is not None:
            self._s3 = None
            await _shared_s3.release(self.s3_config)


class _SharedS3Stores:
    """S3 stores shared by configuration on the running loop, reference-counted (IO loop only)."""

    def __init__(self) -> None:
        # (pid, id(loop), config) -> [task creating the store, references]. The pid keeps a
        # forked worker off its parent's clients; the loop id keeps loops apart.
        self._entries: dict[tuple[int, int, S3Config], list[Any]] = {}
        #: Clients built by this process so far.
        self.created = 0

    @staticmethod
    def _key(config: S3Config) -> tuple[int, int, S3Config]:
        return (os.getpid(), id(asyncio.get_running_loop()), config)

    async def acquire(self, config: S3Config) -> Store:
        key = self._key(config)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = [asyncio.ensure_future(create_s3_store(config)), 0]
            self.created += 1
        entry[1] += 1
        try:
            return await asyncio.shield(entry[0])
        except BaseException:
            await self.release(config)
            raise

    async def release(self, config: S3Config) -> None:
        key = self._key(config)
        entry = self._entries.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del self._entries[key]
        task = entry[0]
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().aclose()
        elif not task.done():
            task.cancel()


_shared_s3 = _SharedS3Stores()


async def create_s3_store(config: S3Config) -> Store:
    """The S3 store of ``config.engine``: :class:`S3Store` or the obstore engine."""
    if config.engine == "obstore":
        from fastfeed.store.obstore import ObstoreS3Store

        return await ObstoreS3Store.create(config)
    return await S3Store.create(config)


async def open_store(url: str, config: S3Config) -> Store:
    """Create the store for ``url``'s scheme (the caller closes it with ``aclose``)."""
    loc = parse_url(url)
    if loc.scheme == "file":
        return LocalStore(config.retry)
    return await create_s3_store(config)


async def gather_limited(coros: Sequence[Any], limit: int) -> list[Any]:
    """Run awaitables with at most ``limit`` in flight; results in input order."""
    sem = asyncio.Semaphore(limit)

    async def run(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(run(c) for c in coros)))


def _reset_sessions_after_fork() -> None:
    global _sessions_lock
    _sessions_lock = threading.Lock()  # may have been held by a thread that does not exist here


os.register_at_fork(after_in_child=_reset_sessions_after_fork)
