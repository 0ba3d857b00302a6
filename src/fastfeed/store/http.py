"""Shards served over ``http://`` and ``https://``: ranged GETs against any web server that honours
``Range`` (the Hugging Face Hub, a CDN, nginx, a bucket's public website endpoint).

An object's version is its ``ETag`` (or, without one, ``Last-Modified``, kept as ``"lm:<date>"``):
every ranged GET sends it back as ``If-Match`` / ``If-Unmodified-Since``, and a response that
names another version is an error, so an epoch never mixes two versions of a shard, and the node
cache keys entries by URL, version and size as for S3. A plain web server has no listing: name
the shards (a list, a brace pattern) or a manifest. Redirects are followed (the Hub redirects
downloads to its CDN). Errors and retries are the S3 store's: 404 is :class:`NotFoundError`,
401/403 :class:`AccessDeniedError`, 408/429/5xx and connection failures are retried with
backoff, resuming a part from the byte where a broken response stopped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastfeed.config import RetryConfig
from fastfeed.errors import (
    AccessDeniedError,
    EndpointError,
    FastfeedError,
    InvalidURLError,
    NotFoundError,
    StoreError,
    ThrottledError,
    TransientStoreError,
)
from fastfeed.store.base import ObjectInfo, Store, check_received, put_chunk, target_view
from fastfeed.store.retry import RetryState, retry_async
from fastfeed.urls import Location

__all__ = ["HttpStore"]

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20
_LAST_MODIFIED = "lm:"


def _version(headers: Any) -> str | None:
    etag = headers.get("ETag")
    if etag:
        return str(etag)
    modified = headers.get("Last-Modified")
    return _LAST_MODIFIED + str(modified) if modified else None


def _status_error(status: int, url: str, what: str) -> FastfeedError:
    if status == 404 or status == 410:
        return NotFoundError(f"{what}: no such object: {url} (HTTP {status})", url=url, hint="check the URL")
    if status in (401, 403):
        return AccessDeniedError(
            f"{what}: access denied to {url} (HTTP {status})",
            url=url,
            hint="the server refused the request: check the URL and whether it needs a token",
        )
    if status == 429 or status == 503:
        return ThrottledError(f"{what}: the server is throttling requests for {url} (HTTP {status})", url=url)
    if status == 408 or status >= 500:
        return TransientStoreError(f"{what}: server error for {url} (HTTP {status})", url=url)
    if status == 412:
        return StoreError(
            f"{what}: {url} changed while it was being read (HTTP 412)",
            url=url,
            hint="the shard was replaced during the epoch; start the epoch again to read the new version",
        )
    return StoreError(f"{what}: unexpected HTTP {status} for {url}", url=url)


def _map_error(exc: BaseException, url: str) -> FastfeedError:
    import aiohttp

    if isinstance(exc, FastfeedError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return EndpointError(f"cannot connect to the server of {url}: {exc}", url=url)
    if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | ConnectionError | OSError):
        return TransientStoreError(f"connection error reading {url}: {type(exc).__name__}: {exc}", url=url)
    return StoreError(f"unexpected error for {url}: {type(exc).__name__}: {exc}", url=url)


class HttpStore(Store):
    """Shards over http(s) with ranged GETs (aiohttp). Create and use on the IO loop."""

    def __init__(self, retry: RetryConfig, connect_timeout: float = 5.0, read_timeout: float = 20.0) -> None:
        self.retry = retry
        self._timeouts = (connect_timeout, read_timeout)
        self._session: Any = None

    def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            connect, read = self._timeouts
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._session

    async def list(self, loc: Location, suffix: str = ".tar") -> list[ObjectInfo]:
        raise InvalidURLError(
            f"cannot list {loc.url}: a web server has no listing",
            url=loc.url,
            hint="name the shards: a brace pattern (https://host/train-{000000..000099}.tar), a list, or a manifest",
        )

    async def head(self, loc: Location) -> ObjectInfo:
        async def once() -> ObjectInfo:
            async with self._client().head(loc.url, allow_redirects=True) as resp:
                if resp.status != 200:
                    raise _status_error(resp.status, loc.url, "HEAD")
                size = resp.headers.get("Content-Length")
                if size is None or not size.isdigit():
                    raise StoreError(
                        f"{loc.url} has no Content-Length: its size is unknown",
                        url=loc.url,
                        hint="serve the shards as static files (with Content-Length and Range support)",
                    )
                return ObjectInfo(loc.url, int(size), _version(resp.headers))

        return await retry_async(once, self.retry, f"HEAD {loc.url}", lambda exc: _map_error(exc, loc.url))

    async def read_range(
        self, loc: Location, start: int, end: int, etag: str | None = None, out: memoryview | None = None
    ) -> memoryview:
        length = end - start
        view = target_view(out, length)
        got = 0
        state = RetryState(self.retry, f"GET {loc.url} bytes {start}-{end - 1}")
        while got < length:
            received_before = got
            try:
                headers = {"Range": f"bytes={start + got}-{end - 1}", "Accept-Encoding": "identity"}
                if etag and etag.startswith(_LAST_MODIFIED):
                    headers["If-Unmodified-Since"] = etag[len(_LAST_MODIFIED) :]
                elif etag:
                    headers["If-Match"] = etag
                async with self._client().get(loc.url, headers=headers, allow_redirects=True) as resp:
                    if resp.status == 200:
                        raise StoreError(
                            f"the server of {loc.url} ignored the Range header (HTTP 200 instead of 206)",
                            url=loc.url,
                            hint="serve the shards from a server that supports HTTP range requests",
                        )
                    if resp.status != 206:
                        raise _status_error(resp.status, loc.url, "GET")
                    version = _version(resp.headers)
                    if etag and version and version != etag and not etag.startswith(_LAST_MODIFIED):
                        raise StoreError(
                            f"{loc.url} changed while it was being read (ETag {version}, expected {etag})",
                            url=loc.url,
                            hint="the shard was replaced during the epoch; start the epoch again",
                        )
                    while got < length:
                        chunk = await resp.content.read(min(_READ_CHUNK, length - got))
                        if not chunk:
                            break
                        got = put_chunk(view, got, chunk, start, loc.url)
                    check_received(view, got, start, loc.url)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await state.after_failure(_map_error(exc, loc.url), exc, progressed=got > received_before)
        return view

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
