"""Any S3-compatible endpoint as a :class:`~fastfeed.store.base.Store`, through aiobotocore.

Plain S3 calls only (ListObjectsV2, HeadObject, ranged GetObject) with path-style addressing by
default, so it works unchanged against MinIO, SeaweedFS, Ceph and AWS. botocore's own retries
are off: :mod:`fastfeed.store.retry` retries with backoff and jitter, and a transfer broken
mid-body resumes from the byte already received. Errors of botocore, aiohttp and asyncio become
fastfeed's (:func:`map_s3_error`, also used by the write path).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from typing import Any

from fastfeed.config import S3Config
from fastfeed.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConditionFailedError,
    EndpointError,
    FastfeedError,
    NotFoundError,
    NotSupportedError,
    StoreError,
    StoreTimeoutError,
    ThrottledError,
    TransientStoreError,
)
from fastfeed.store.base import (
    CREDENTIAL_HINT,
    ObjectInfo,
    Store,
    bucket_missing,
    check_received,
    put_chunk,
    sorted_listing,
    target_view,
)
from fastfeed.store.retry import RetryState, retry_async
from fastfeed.urls import Location

__all__ = ["DIGEST_CODES", "S3Store", "client_settings", "map_s3_error"]

log = logging.getLogger(__name__)

#: Bytes requested per read from an HTTP response body.
_READ_CHUNK = 1024 * 1024


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

#: A store checked a body against its checksum header (or its signed SHA256) and refused it: the
#: body was damaged on the way (AWS and SeaweedFS: BadDigest; MinIO: XAmzContentChecksumMismatch;
#: AWS and MinIO for the SHA256: XAmzContentSHA256Mismatch). Sent again, it arrives whole.
DIGEST_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"})


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
        if code in DIGEST_CODES:
            return TransientStoreError(f"the store received a damaged body for {url} ({code})", url=url)
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
        # Plain S3 only: no CRC trailers that older S3-compatible stores reject.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    if config.anonymous:
        from botocore import UNSIGNED

        options["signature_version"] = UNSIGNED
    # Addressing and region as botocore resolves them (the profile's, its defaults) unless set:
    # path-style for a custom endpoint, which S3-compatible stores need.
    style = {True: "path", False: "virtual", None: None}[config.path_style]
    if config.addressing_style == "auto":
        style = "auto"
    if style is not None:
        options["s3"] = {"addressing_style": style}
    kwargs: dict[str, Any] = {}
    if config.region:
        kwargs["region_name"] = config.region
    if config.endpoint_url:
        kwargs["endpoint_url"] = config.endpoint_url
        if config.endpoint_url.lower().startswith("http://"):
            # No TLS on a plain-HTTP endpoint: without this, every client still builds SSL
            # contexts with the system's CA bundle (35-70 ms of CPU each, measured here).
            kwargs["verify"] = False
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

    @property
    def client(self) -> Any:
        """The aiobotocore S3 client (owned by this store: :meth:`aclose` closes it), for the
        requests that :class:`~fastfeed.store.upload_s3.S3CkptStore` sends on top of reads."""
        return self._client

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
        view = target_view(out, length)
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
                        got = put_chunk(view, got, chunk, start, loc.url)
                finally:
                    body.close()
                check_received(view, got, start, loc.url)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = map_s3_error(exc, loc.url, bucket_url=f"s3://{loc.bucket}")
                await state.after_failure(err, exc, progressed=got > received_before)
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


def _reset_sessions_after_fork() -> None:
    global _sessions_lock
    _sessions_lock = threading.Lock()  # may have been held by a thread that does not exist here


os.register_at_fork(after_in_child=_reset_sessions_after_fork)
