"""An S3 data-plane engine on ``obstore`` (Python bindings of Rust's ``object_store``).

:class:`ObstoreS3Store` implements the same :class:`~fastfeed.store.base.Store` contract as the
aiobotocore :class:`~fastfeed.store.s3.S3Store`: sorted, suffix-filtered listing; HEAD with size
and ETag; ranged reads into a caller's buffer, conditional on the ETag; fastfeed's error types;
fastfeed's own retries (obstore's are off), and a transfer broken mid-body, once streaming,
resumes from the byte already received (see below for the first attempt).

How it maps onto obstore (0.12, object_store 0.14):

* One ``obstore.store.S3Store`` per bucket (obstore binds a store to a bucket), created lazily
  and cached; each has its own HTTP connection pool. Requests run on obstore's tokio runtime
  (native threads) and are awaited from the IO loop.
* ``read_range`` is ``get_async`` with ``range`` and ``if_match`` options. A range of at most
  ``whole_body_max`` bytes (16 MiB: every prefetcher part) is first collected natively by obstore
  and copied once into ``out``. Larger ranges, and every retry after a failed attempt, are
  consumed as a stream of chunks of at least ``chunk_size`` bytes, each copied into ``out``: the
  stream is what makes resume possible (fastfeed knows how many bytes have landed, so a retry
  asks for the rest only) but costs one more copy per byte. So a transfer broken on the first,
  whole-body attempt is re-requested whole (at most ``whole_body_max`` bytes fetched twice);
  once streaming, a broken transfer resumes from the byte received, less what obstore still held
  below one chunk when the connection broke. The whole-body path holds each in-flight body in
  obstore's memory until it is copied, outside the prefetcher's byte budget: up to
  ``max_requests x part_size`` more peak memory (+76 MiB measured with 16 x 8 MiB).
* obstore raises ``FileNotFoundError``, ``PermissionDeniedError``, ``UnauthenticatedError``,
  ``PreconditionError`` etc. for the cases ``object_store`` classifies, and ``GenericError`` for
  everything else: 5xx, throttling, timeouts, connection resets, refused connections, 416, and a
  missing bucket on LIST. Those carry no attributes, only a message that ends with the Rust
  ``Debug`` rendering of ``object_store``'s structured error. :func:`map_obstore_error` reads
  three fields from that rendering (``status: <http status>``, ``HttpError { kind: <kind> }``
  and the S3 ``<Code>`` of the response body), because obstore exposes nothing else; the
  exception *type* is used wherever obstore provides one.

Not fork-safe: once obstore has made a request in a process, a child forked from it hangs on
its first obstore request (the tokio runtime's threads do not survive ``fork``). This module
detects that case and raises :class:`~fastfeed.errors.ConfigError` instead of hanging; use the
``spawn`` or ``forkserver`` start method for DataLoader workers with this engine.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastfeed.config import S3Config
from fastfeed.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConfigError,
    EndpointError,
    FastfeedError,
    NotFoundError,
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

if TYPE_CHECKING:
    from obstore import GetOptions
    from obstore.store import ClientConfig, S3Credential
    from obstore.store import RetryConfig as ObstoreRetryConfig

__all__ = ["ObstoreS3Store", "map_obstore_error"]

log = logging.getLogger(__name__)

#: Minimum bytes per chunk handed from obstore's stream to Python. Bigger chunks mean fewer
#: crossings from the tokio runtime to the event loop; smaller ones lose less on a broken
#: transfer (bytes obstore holds below this size are re-fetched).
DEFAULT_CHUNK = 1024 * 1024
#: Ranges up to this size are first requested whole: obstore collects the body natively and it
#: is copied once into ``out``. Streaming costs one more copy (obstore hands each chunk over as a
#: new ``bytes``), ~25% more client CPU per byte, but it is what makes resume possible, so larger
#: ranges, and every retry after a failed attempt, stream. A transfer broken on the fast path is
#: re-requested whole, so at most this many bytes are fetched twice.
DEFAULT_WHOLE_BODY_MAX = 16 * 1024 * 1024
#: Whole-request timeout given to obstore (it defaults to 30 s, which a slow multi-MiB part can
#: exceed). Stalls are caught by ``read_timeout`` and dead stores by the retry deadline instead.
_REQUEST_TIMEOUT_S = 600.0

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

# Fields of object_store's error as obstore renders it ("Debug source:" + Rust {:#?} output).
_STATUS_RE = re.compile(r"\bstatus: (\d{3})\b")
_KIND_RE = re.compile(r"HttpError \{\s*kind: (\w+)")
_CODE_RE = re.compile(r"<Code>([^<]{1,64})</Code>")
#: object_store's HttpErrorKind values that mean the connection failed or broke, not the request.
_NETWORK_KINDS = {"Request", "Interrupted", "Decode", "Unknown"}

# The process that first used obstore's runtime; a forked child must not use it (it would hang).
_runtime_pid: int | None = None
_runtime_lock = threading.Lock()


def _mark_runtime_use() -> None:
    global _runtime_pid
    pid = os.getpid()
    if _runtime_pid == pid:
        return
    with _runtime_lock:
        if _runtime_pid is None:
            _runtime_pid = pid
        elif _runtime_pid != pid:
            raise ConfigError(
                "the obstore S3 engine was used in this process's parent before it forked; its "
                "runtime threads did not survive the fork and every request here would hang",
                hint="use multiprocessing_context='spawn' (or 'forkserver') for DataLoader workers, "
                "or the default aiobotocore engine",
            )


def _parse(exc: BaseException) -> tuple[int, str, str]:
    """``(http status or 0, HttpError kind or "", S3 error code or "")`` from an obstore error."""
    text = str(exc)
    status = _STATUS_RE.search(text)
    kind = _KIND_RE.search(text)
    code = _CODE_RE.search(text)
    return (
        int(status.group(1)) if status else 0,
        kind.group(1) if kind else "",
        code.group(1) if code else "",
    )


def map_obstore_error(exc: BaseException, url: str, *, bucket_url: str | None = None) -> FastfeedError:
    """Map an obstore / asyncio exception to the most specific fastfeed error.

    Exception types decide where obstore provides them; ``GenericError`` (and the base class)
    is classified by the HTTP status, ``HttpError`` kind and S3 error code that obstore renders
    into its message (it exposes no attributes).
    """
    from obstore import exceptions as ox

    if isinstance(exc, FastfeedError):
        return exc
    status, kind, code = _parse(exc)
    bucket = bucket_url or url
    if code == "NoSuchBucket":
        return bucket_missing(bucket)
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"object not found: {url}", url=url, hint="check the key and the endpoint")
    if isinstance(exc, ox.PermissionDeniedError | ox.UnauthenticatedError):
        return AccessDeniedError(
            f"access denied ({code or status or type(exc).__name__}) for {url}", url=url, hint=CREDENTIAL_HINT
        )
    if isinstance(exc, ox.PreconditionError):
        return _changed(url)
    if isinstance(exc, ox.InvalidPathError):
        return StoreError(f"the key cannot be used as an object store path: {url}: {exc}", url=url)
    if isinstance(exc, ox.NotSupportedError | ox.UnknownConfigurationKeyError):
        return StoreError(f"obstore does not support this request for {url}: {exc}", url=url)
    if isinstance(exc, ox.BaseError):  # GenericError, JoinError, NotModifiedError, AlreadyExists
        if status:
            return _from_status(status, code, url, bucket, exc)
        if kind == "Connect":
            return EndpointError(
                f"cannot connect to the S3 endpoint for {url}",
                url=url,
                hint="check AWS_ENDPOINT_URL / endpoint_url and that the store is running",
            )
        if kind == "Timeout":
            return StoreTimeoutError(f"timed out reading {url}", url=url)
        if kind in _NETWORK_KINDS:
            return TransientStoreError(f"connection broken while reading {url} ({kind})", url=url)
        return StoreError(f"S3 client error for {url}: {_first_line(exc)}", url=url)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return StoreTimeoutError(f"timed out reading {url}", url=url)
    if isinstance(exc, ConnectionError):
        return TransientStoreError(f"connection broken while reading {url}: {exc}", url=url)
    if isinstance(exc, ValueError | TypeError):
        return StoreError(f"invalid request for {url}: {exc}", url=url)
    return StoreError(f"unexpected error for {url}: {type(exc).__name__}: {exc}", url=url)


def _from_status(status: int, code: str, url: str, bucket: str, exc: BaseException) -> FastfeedError:
    if status == 404:
        return NotFoundError(f"object not found: {url}", url=url, hint="check the key and the endpoint")
    if status in (401, 403) or code in _DENIED_CODES:
        return AccessDeniedError(f"access denied ({code or status}) for {url}", url=url, hint=CREDENTIAL_HINT)
    if status == 412:
        return _changed(url)
    if code in _THROTTLE_CODES or status in (429, 503):
        return ThrottledError(f"throttled by the store ({code or status}) reading {url}", url=url)
    if status >= 500 or code in ("InternalError", "ServiceUnavailable", "RequestTimeout"):
        return TransientStoreError(f"store error {code or status} for {url}", url=url)
    if status == 416:
        return StoreError(f"byte range not satisfiable for {url} (the object is shorter)", url=url)
    return StoreError(f"S3 error {code or status} for {url}: {_first_line(exc)}", url=url)


def _changed(url: str) -> StoreError:
    return StoreError(
        f"object changed while it was being read: {url}",
        url=url,
        hint="the shard was overwritten during the epoch; restart the epoch to read the new version",
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:300]


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


def _quote_etag(value: str) -> str:
    return value if value.startswith('"') else f'"{value}"'


class _BotocoreCredentials:
    """obstore credential provider backed by botocore's chain (env, profiles, SSO, IMDS, ...),
    so the obstore engine finds the same credentials as the aiobotocore one."""

    def __init__(self, credentials: Any, refreshable: bool) -> None:
        self._credentials = credentials
        self._refreshable = refreshable

    def __call__(self) -> S3Credential:
        frozen = self._credentials.get_frozen_credentials()
        expires = datetime.now(timezone.utc) + timedelta(minutes=5) if self._refreshable else None
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": expires,
        }


@functools.lru_cache(maxsize=8)
def _profile_settings(profile: str | None) -> tuple[str, str | None]:
    """``(region, ca_bundle)`` as botocore resolves them for ``profile``: the region from
    ``AWS_REGION``, ``AWS_DEFAULT_REGION`` or the profile's ``region``, else ``us-east-1``
    (botocore's own default for S3); the CA bundle from ``AWS_CA_BUNDLE`` or the profile's
    ``ca_bundle``, else None (the system's roots)."""
    import botocore.session

    session = botocore.session.Session(profile=profile)
    region = session.get_config_variable("region")
    bundle = session.get_config_variable("ca_bundle")
    return (str(region) if region else "us-east-1"), (str(bundle) if bundle else None)


def _profile_region(profile: str | None) -> str:
    """The region botocore resolves for ``profile`` (see :func:`_profile_settings`)."""
    return _profile_settings(profile)[0]


def _root_certificate(profile: str | None) -> str | None:
    """The PEM text of botocore's CA bundle for ``profile``, if one is configured. obstore adds
    it to the system's roots (botocore replaces them with it): a private CA is trusted alike."""
    bundle = _profile_settings(profile)[1]
    if bundle is None:
        return None
    try:
        return Path(bundle).read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the CA bundle {bundle} (AWS_CA_BUNDLE or the profile's ca_bundle): {exc}",
            hint="point AWS_CA_BUNDLE (or ca_bundle in ~/.aws/config) at a readable PEM file",
        ) from exc


def _credential_provider(profile: str | None) -> _BotocoreCredentials | None:
    import botocore.credentials
    import botocore.session

    session = botocore.session.Session(profile=profile)
    try:
        creds = session.get_credentials()
    except Exception as exc:  # a broken profile: say so now, as botocore would on first request
        raise AccessDeniedError(f"cannot load AWS credentials: {exc}", hint=CREDENTIAL_HINT) from exc
    if creds is None:
        return None
    return _BotocoreCredentials(creds, isinstance(creds, botocore.credentials.RefreshableCredentials))


class ObstoreS3Store(Store):
    """An S3-compatible endpoint via obstore. Create with :meth:`create` on the IO loop."""

    def __init__(
        self, config: S3Config, chunk_size: int = DEFAULT_CHUNK, whole_body_max: int = DEFAULT_WHOLE_BODY_MAX
    ) -> None:
        self.config = config
        self.chunk_size = chunk_size
        self.whole_body_max = whole_body_max
        self._stores: dict[str, Any] = {}
        self._provider: _BotocoreCredentials | None = None
        self._explicit = bool(config.access_key_id) or config.anonymous
        self._provider_loaded = self._explicit

    @classmethod
    async def create(
        cls, config: S3Config, *, chunk_size: int = DEFAULT_CHUNK, whole_body_max: int = DEFAULT_WHOLE_BODY_MAX
    ) -> ObstoreS3Store:
        """Validate ``config`` by building a client (no request is sent yet)."""
        try:
            import obstore  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "the obstore S3 engine needs the 'obstore' package", hint="pip install 'obstore>=0.12'"
            ) from exc
        store = cls(config, chunk_size=chunk_size, whole_body_max=whole_body_max)
        store._build("fastfeed-config-check", None)  # surfaces bad options now, not mid-epoch
        return store

    async def aclose(self) -> None:
        # obstore has no close; dropping the stores drops their connection pools.
        self._stores.clear()

    # ---------------------------------------------------------------- construction

    async def _bucket_store(self, bucket: str) -> Any:
        store = self._stores.get(bucket)
        if store is not None:
            return store
        if not self._explicit:
            if not self._provider_loaded:
                # botocore's chain may read files or query instance metadata: not on the loop.
                loop = asyncio.get_running_loop()
                self._provider = await loop.run_in_executor(None, _credential_provider, self.config.profile)
                self._provider_loaded = True
            if self._provider is None:
                raise AccessDeniedError(
                    f"no usable AWS credentials to read s3://{bucket}", url=f"s3://{bucket}", hint=CREDENTIAL_HINT
                )
        store = self._stores.get(bucket)  # another task may have built it meanwhile
        if store is None:
            store = self._stores[bucket] = self._build(bucket, self._provider)
        return store

    def _build(self, bucket: str, provider: _BotocoreCredentials | None) -> Any:
        from obstore.store import S3Store as ObS3Store

        cfg = self.config
        kwargs: dict[str, Any] = {
            "region": cfg.region or _profile_region(cfg.profile),
            # Set explicitly so AWS_* variables (which obstore reads itself) cannot change them.
            "skip_signature": bool(cfg.anonymous),
            "virtual_hosted_style_request": False,
        }
        endpoint = cfg.endpoint_url
        path = cfg.path_style
        virtual = path is False or (path is None and endpoint is None and "." not in bucket)
        if virtual:
            kwargs["virtual_hosted_style_request"] = True
            if endpoint:  # obstore expects the bucket in the endpoint's host for this style
                scheme, _, rest = endpoint.partition("://")
                endpoint = f"{scheme}://{bucket}.{rest}"
        if endpoint:
            kwargs["endpoint"] = endpoint.rstrip("/")
        if cfg.access_key_id and not cfg.anonymous:
            kwargs["access_key_id"] = cfg.access_key_id
            kwargs["secret_access_key"] = cfg.secret_access_key or ""
            if cfg.session_token:
                kwargs["session_token"] = cfg.session_token
        client_options: ClientConfig = {
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
            "connect_timeout": timedelta(seconds=cfg.connect_timeout),
            "read_timeout": timedelta(seconds=cfg.read_timeout),
            "timeout": timedelta(seconds=max(_REQUEST_TIMEOUT_S, cfg.retry.deadline)),
            "pool_max_idle_per_host": str(cfg.max_pool_connections),
        }
        if not kwargs.get("endpoint", "https://").startswith("http://"):
            root = _root_certificate(cfg.profile)
            if root is not None:
                client_options["root_certificate"] = root
        # fastfeed retries itself (with resume); obstore's retries would multiply attempts.
        retry_config: ObstoreRetryConfig = {"max_retries": 0, "retry_timeout": timedelta(seconds=cfg.retry.deadline)}
        try:
            store = ObS3Store(
                bucket,
                client_options=client_options,
                retry_config=retry_config,
                credential_provider=provider,
                **kwargs,
            )
        except Exception as exc:
            raise ConfigError(f"invalid S3 options for the obstore engine: {exc}") from exc
        return store

    async def _store(self, loc: Location) -> Any:
        _mark_runtime_use()
        return await self._bucket_store(loc.bucket)

    def _mapper(self, loc: Location) -> Any:
        return lambda exc: map_obstore_error(exc, loc.url, bucket_url=f"s3://{loc.bucket}")

    # ---------------------------------------------------------------- Store API

    async def list(self, loc: Location, suffix: str = ".tar") -> list[ObjectInfo]:
        import obstore

        prefix = loc.key
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        store = await self._store(loc)

        async def op() -> list[ObjectInfo]:
            # obstore pages internally; a failure mid-listing restarts the whole listing.
            found: list[ObjectInfo] = []
            stream = obstore.list(store, prefix or None, chunk_size=1000)
            async for batch in stream:
                for meta in batch:
                    key = meta["path"]
                    if key.endswith(suffix):
                        found.append(ObjectInfo(f"s3://{loc.bucket}/{key}", int(meta["size"]), _etag(meta["e_tag"])))
            return found

        bucket_url = f"s3://{loc.bucket}"
        try:
            out = await retry_async(op, self.config.retry, f"listing {loc.url}", self._mapper(loc))
        except NotFoundError as err:
            # ListObjectsV2 answers 404 only for a missing bucket.
            if isinstance(err, BucketNotFoundError):
                raise
            raise bucket_missing(bucket_url) from err
        return sorted_listing(out, f"s3://{loc.bucket}/{prefix}", suffix)

    async def head(self, loc: Location) -> ObjectInfo:
        import obstore

        if not loc.key or loc.key.endswith("/"):
            raise NotFoundError(f"{loc.url} names a prefix, not an object", url=loc.url)
        store = await self._store(loc)

        async def op() -> ObjectInfo:
            meta = await obstore.head_async(store, loc.key)
            return ObjectInfo(loc.url, int(meta["size"]), _etag(meta["e_tag"]))

        try:
            return await retry_async(op, self.config.retry, f"HEAD {loc.url}", self._mapper(loc))
        except NotFoundError as err:
            await self._raise_if_no_bucket(loc, err)
            raise

    async def _raise_if_no_bucket(self, loc: Location, err: NotFoundError) -> None:
        """HEAD has no body, so a missing bucket looks like a missing key: tell them apart."""
        if isinstance(err, BucketNotFoundError) or await self._bucket_exists(loc):
            return
        bucket_url = f"s3://{loc.bucket}"
        raise bucket_missing(bucket_url) from err

    async def _bucket_exists(self, loc: Location) -> bool:
        import obstore

        # One ListObjectsV2 for the missing key itself (tiny); 404 means no bucket.
        try:
            stream = obstore.list(await self._store(loc), loc.key, chunk_size=1)
            async for _ in stream:
                break
        except Exception as exc:
            err = map_obstore_error(exc, f"s3://{loc.bucket}")
            return not isinstance(err, NotFoundError)
        return True

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        import obstore

        length = end - start
        view = target_view(out, length)
        if length == 0:
            return view
        store = await self._store(loc)
        got = 0
        tries = 0  # requests that got a response (the first may take the fast path)
        state = RetryState(self.config.retry, f"GET {loc.url} bytes {start}-{end - 1}")
        while got < length:
            received_before = got
            try:
                # Resume from the byte already received, never from the start of the part.
                options: GetOptions = {"range": (start + got, end)}
                if etag:
                    options["if_match"] = _quote_etag(etag)
                result = await obstore.get_async(store, loc.key, options=options)
                if etag:
                    # Belt and braces for stores that ignore If-Match on GET.
                    served = _etag(result.meta["e_tag"])
                    if served is not None and served != etag:
                        raise _changed(loc.url)
                if tries == 0 and length <= self.whole_body_max:
                    # Fast path: obstore collects the body natively, one copy into ``view``.
                    chunks: Any = _whole(result)
                else:
                    chunks = result.stream(min_chunk_size=self.chunk_size)
                tries += 1
                async for chunk in chunks:
                    got = put_chunk(view, got, chunk, start, loc.url)
                check_received(view, got, start, loc.url)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = map_obstore_error(exc, loc.url, bucket_url=f"s3://{loc.bucket}")
                if type(err) is NotFoundError:
                    try:
                        await self._raise_if_no_bucket(loc, err)
                    except BucketNotFoundError as missing:
                        raise missing from exc
                await state.after_failure(err, exc, progressed=got > received_before)
        return view


async def _whole(result: Any) -> AsyncIterator[Any]:
    """The body of ``result`` as one chunk (an obstore ``Bytes``: Rust memory, no copy)."""
    yield await result.bytes_async()
