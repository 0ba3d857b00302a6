"""An HTTP/1.1 proxy that injects latency, throttling and faults in front of an S3 endpoint.

:class:`FaultProxy` listens on 127.0.0.1 and forwards every request to one upstream endpoint
(a :class:`~fastfeed.testing.servers.SeaweedServer`, say) over a private upstream connection per
client connection. It speaks real HTTP/1.1 framing so client keep-alive works: request and
response bodies are forwarded by ``Content-Length``, ``Transfer-Encoding: chunked`` (which also
carries ``aws-chunked`` payloads) or, for responses, until the upstream closes; ``HEAD``
responses and 1xx interim responses (``Expect: 100-continue``) have no body.

Headers are forwarded untouched, ``Host`` included, so SigV4 signatures made for the proxy's
address verify upstream. What it can do, while traffic flows (all methods are thread-safe):

* :meth:`FaultProxy.set_latency`: delay each response head (emulated first-byte latency).
* :meth:`FaultProxy.set_bandwidth`: throttle response bodies, all connections together;
  :meth:`FaultProxy.set_connection_bandwidth`: each connection on its own.
* :meth:`FaultProxy.inject`: answer the next N matching requests with an S3 XML error
  (``503 SlowDown`` by default) without contacting the upstream.
* :meth:`FaultProxy.inject_reset`: forward the head and K body bytes, then cut the connection.
* :meth:`FaultProxy.inject_stall`: hold a response (before its head or after K body bytes).
* :meth:`FaultProxy.requests` / :meth:`FaultProxy.count` / :meth:`FaultProxy.ranges`: what
  the clients asked for, including each ``Range`` header, to prove what was (re)fetched;
  :meth:`FaultProxy.connections` counts accepted client connections.

Threads: the proxy runs its own asyncio loop in one named daemon thread
(``fastfeed-fault-proxy``); :meth:`FaultProxy.stop` closes every connection and joins it.
Throughput is bounded by Python; measure the ceiling on the machine before trusting figures
taken through it (it is well below a direct loopback connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import itertools
import logging
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from email.utils import formatdate
from types import TracebackType
from xml.sax.saxutils import escape

__all__ = ["FaultProxy", "FaultRule", "ProxyRequest"]

log = logging.getLogger(__name__)

_MAX_HEAD = 64 * 1024  # bytes; longer request/response heads are a protocol error
_READ_CHUNK = 1024 * 1024  # bytes per body read from either side
_STREAM_LIMIT = 4 * 1024 * 1024  # StreamReader buffer; also bounds readuntil()
_NO_BODY_STATUSES = (204, 304)

_DEFAULT_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
}


@dataclass(frozen=True)
class ProxyRequest:
    """One request as the proxy saw it.

    Attributes:
        method: HTTP method, upper case.
        path: URL path, percent-decoded (``/bucket/key`` for path-style S3).
        query: raw query string (without ``?``).
        range: the ``Range`` header, or ``None``.
        fault: ``"error"``, ``"reset"`` or ``"stall"`` if a fault rule was applied, else ``None``.
        started: :func:`time.monotonic` when the request head arrived.
    """

    method: str
    path: str
    query: str
    range: str | None
    fault: str | None
    started: float

    @property
    def has_range(self) -> bool:
        """Whether the request carried a ``Range`` header."""
        return self.range is not None


@dataclass
class FaultRule:
    """A fault waiting for matching requests; returned by the ``inject*`` methods.

    ``remaining`` counts down as requests match (``None`` means unlimited until
    :meth:`FaultProxy.clear_faults`). ``every``: the rule takes every ``every``-th request that
    matches it (1: each one), so ``every=10`` with ``count=None`` faults 10 % of the traffic,
    spread evenly. Read it from any thread; do not modify it.
    """

    kind: str  # "error" | "reset" | "stall"
    remaining: int | None
    method: str | None
    path_regex: re.Pattern[str] | None
    status: int = 503
    code: str = "SlowDown"
    message: str = ""
    after_bytes: int | None = None
    seconds: float = 0.0
    rst: bool = False
    every: int = 1
    #: Requests that matched so far (with ``every`` > 1, most of them pass untouched).
    seen: int = 0
    header: str | None = None  # lower case: only requests that carry this header match

    def matches(self, method: str, path: str, headers: frozenset[str] = frozenset()) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.header is not None and self.header not in headers:
            return False
        return self.path_regex is None or self.path_regex.search(path) is not None


@dataclass
class _Head:
    """A parsed request or response head; ``raw`` is forwarded byte for byte."""

    raw: bytes
    first: tuple[str, str, str]  # request: method, target, version; response: version, status, reason
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of every header called ``name``, lower case."""
        name = name.lower()
        return {
            token.strip().lower()
            for key, value in self.headers
            if key.lower() == name
            for token in value.split(",")
            if token.strip()
        }


class _ProtocolError(Exception):
    """Malformed HTTP from the client or the upstream."""


class _Framing:
    """How a message body is delimited: ``kind`` is "none", "length", "chunked" or "close"."""

    __slots__ = ("kind", "length")

    def __init__(self, kind: str, length: int = 0) -> None:
        self.kind = kind
        self.length = length


def _parse_head(raw: bytes, *, response: bool) -> _Head:
    try:
        text = raw.decode("latin-1")
        lines = text[:-4].split("\r\n")
        parts = lines[0].split(" ", 2)
        if response:
            if len(parts) == 2:
                parts.append("")
            if len(parts) != 3 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise ValueError(lines[0])
        elif len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise ValueError(lines[0])
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ValueError(line)
            headers.append((name, value.strip()))
    except ValueError as exc:
        raise _ProtocolError(f"malformed HTTP head: {exc}") from None
    return _Head(raw, (parts[0], parts[1], parts[2]), headers)


def _body_framing(head: _Head, *, response_to: str | None = None) -> _Framing:
    """Body framing of a request (``response_to=None``) or of a response to ``response_to``."""
    if response_to is not None:
        status = int(head.first[1])
        if response_to == "HEAD" or status < 200 or status in _NO_BODY_STATUSES:
            return _Framing("none")
    if "chunked" in head.tokens("transfer-encoding"):
        return _Framing("chunked")
    length = head.get("content-length")
    if length is not None:
        try:
            value = int(length)
        except ValueError:
            raise _ProtocolError(f"bad Content-Length {length!r}") from None
        if value < 0:
            raise _ProtocolError(f"bad Content-Length {length!r}")
        return _Framing("length", value) if value else _Framing("none")
    return _Framing("close") if response_to is not None else _Framing("none")


async def _read_head(reader: asyncio.StreamReader, *, response: bool) -> _Head | None:
    """Read one head; ``None`` on a clean EOF before its first byte."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise _ProtocolError("connection closed inside an HTTP head") from None
    except asyncio.LimitOverrunError:
        raise _ProtocolError("HTTP head too long") from None
    if len(raw) > _MAX_HEAD:
        raise _ProtocolError("HTTP head too long")
    return _parse_head(raw, response=response)


async def _body_pieces(reader: asyncio.StreamReader, framing: _Framing) -> AsyncGenerator[bytes, None]:
    """Yield a body's raw bytes (chunked framing included) as they arrive."""
    if framing.kind == "length":
        remaining = framing.length
        while remaining:
            data = await reader.read(min(remaining, _READ_CHUNK))
            if not data:
                raise _ProtocolError(f"connection closed with {remaining} body bytes missing")
            remaining -= len(data)
            yield data
    elif framing.kind == "chunked":
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                raise _ProtocolError("bad chunk header") from None
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _ProtocolError(f"bad chunk size {line[:40]!r}") from None
            yield line
            if size == 0:
                break
            remaining = size + 2  # chunk data and its CRLF
            while remaining:
                data = await reader.read(min(remaining, _READ_CHUNK))
                if not data:
                    raise _ProtocolError("connection closed inside a chunk")
                remaining -= len(data)
                yield data
        while True:  # trailer fields, then the empty line
            try:
                line = await reader.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                raise _ProtocolError("bad chunked trailer") from None
            yield line
            if line == b"\r\n":
                break
    elif framing.kind == "close":
        while data := await reader.read(_READ_CHUNK):
            yield data


class _TokenBucket:
    """Shared response-body throttle; only the proxy's loop thread calls :meth:`consume`."""

    def __init__(self) -> None:
        self.rate: float | None = None  # bytes/s; written by any thread (an atomic store)
        self._tokens = 0.0
        self._stamp = time.monotonic()

    async def consume(self, amount: int) -> None:
        rate = self.rate
        if not rate:
            return
        now = time.monotonic()
        burst = max(rate * 0.05, 64 * 1024.0)
        self._tokens = min(burst, self._tokens + (now - self._stamp) * rate) - amount
        self._stamp = now
        if self._tokens < 0:  # in debt: wait until the rate has paid for these bytes
            await asyncio.sleep(-self._tokens / rate)


class _Upstream:
    """The upstream connection owned by one client connection (opened lazily)."""

    def __init__(self, connection_rate: float | None = None) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        #: This client connection's own response-body throttle (``set_connection_bandwidth``).
        self.bucket = _TokenBucket()
        self.bucket.rate = connection_rate

    def usable(self) -> bool:
        return (
            self.reader is not None
            and self.writer is not None
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class _CloseClient(Exception):
    """Stop serving this client connection (the response was already written)."""

    def __init__(self, *, rst: bool = False) -> None:
        super().__init__()
        self.rst = rst


class FaultProxy:
    """HTTP/1.1 fault- and latency-injecting proxy in front of one S3 endpoint.

    Args:
        upstream_url: ``http://host:port`` of the endpoint to forward to.
        connect_timeout: seconds to wait for an upstream connection before answering 502.

    Use as a context manager, or :meth:`start` then :meth:`stop`.
    """

    def __init__(self, upstream_url: str, *, connect_timeout: float = 10.0) -> None:
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme != "http" or not parsed.hostname or parsed.port is None:
            raise ValueError(f"FaultProxy needs an http://host:port upstream, got {upstream_url!r}")
        self.upstream_url = upstream_url
        self._upstream_addr = (parsed.hostname, parsed.port)
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()  # guards _rules, _log, _accepted
        self._rules: list[FaultRule] = []
        self._log: list[ProxyRequest] = []
        self._accepted = 0
        self._latency_s = 0.0
        self._bucket = _TokenBucket()
        self._connection_rate: float | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._port: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._request_ids = itertools.count(1)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>`` to point clients at."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        """The listening port."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    def start(self, timeout: float = 10.0) -> FaultProxy:
        """Start the loop thread and wait until the proxy listens."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy is already started")
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="fastfeed-fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"FaultProxy did not start listening within {timeout} s")
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            self._thread.join(timeout)
            self._thread = None
            raise RuntimeError("FaultProxy failed to start") from error
        log.debug("FaultProxy %s -> %s", self.endpoint_url, self.upstream_url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection and join the loop thread; safe to call more than once.

        Raises:
            RuntimeError: the thread did not finish within ``timeout`` seconds.
        """
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"FaultProxy thread did not stop within {timeout} s")
        self._thread = None
        self._port = None

    def __enter__(self) -> FaultProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._port is not None else "stopped"
        return f"<FaultProxy {where} -> {self.upstream_url}>"

    # -- knobs (any thread) -------------------------------------------------------------------

    def set_latency(self, ms: float) -> None:
        """Delay every response head by ``ms`` milliseconds (0 turns it off)."""
        if ms < 0:
            raise ValueError(f"latency must be >= 0 ms, got {ms}")
        self._latency_s = ms / 1000.0

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        """Throttle response bodies of all connections together (``None`` or 0: unlimited)."""
        if bytes_per_s is not None and bytes_per_s < 0:
            raise ValueError(f"bandwidth must be >= 0, got {bytes_per_s}")
        self._bucket.rate = float(bytes_per_s) if bytes_per_s else None

    def set_connection_bandwidth(self, bytes_per_s: float | None) -> None:
        """Throttle the response bodies of each client connection on its own (``None`` or 0:
        unlimited), as an object store bounds the throughput of one connection; applies to
        connections accepted from now on."""
        if bytes_per_s is not None and bytes_per_s < 0:
            raise ValueError(f"bandwidth must be >= 0, got {bytes_per_s}")
        self._connection_rate = float(bytes_per_s) if bytes_per_s else None

    def inject(
        self,
        status: int = 503,
        code: str = "SlowDown",
        count: int | None = 1,
        method: str | None = "GET",
        path_regex: str | None = None,
        message: str | None = None,
        *,
        every: int = 1,
        header: str | None = None,
    ) -> FaultRule:
        """Answer the next ``count`` matching requests with an S3 XML error, upstream untouched
        (a ``status`` below 300 answers with an empty body instead: a success the store never saw).

        Args:
            status: HTTP status of the error.
            code: S3 error code (``<Code>``), e.g. ``"SlowDown"``, ``"InternalError"``.
            count: how many requests get it; ``None`` for every match until :meth:`clear_faults`.
            method: HTTP method to match; ``None`` matches any.
            path_regex: :func:`re.search` pattern on the decoded path (``/bucket/key``).
            message: ``<Message>``; a generic one per code by default.
            every: fault only every ``every``-th matching request (see :class:`FaultRule`).
            header: match only requests that carry this header (any value; case-insensitive),
                e.g. ``"If-None-Match"`` to play a store that rejects conditional writes.
        """
        return self._add(
            FaultRule(
                "error",
                count,
                method,
                _compile(path_regex),
                status=status,
                code=code,
                message=message or _DEFAULT_MESSAGES.get(code, f"Injected {code} (fastfeed FaultProxy)."),
                every=every,
                header=None if header is None else header.lower(),
            )
        )

    def inject_reset(
        self,
        after_bytes: int = 0,
        count: int | None = 1,
        method: str | None = "GET",
        path_regex: str | None = None,
        *,
        rst: bool = False,
        every: int = 1,
    ) -> FaultRule:
        """Forward the response head and ``after_bytes`` body bytes, then cut the connection.

        The client receives exactly ``after_bytes`` body bytes before the connection ends (a
        short read). With ``rst=True`` the socket is closed with SO_LINGER 0 (a TCP reset),
        which may also discard bytes the client has not read yet. A body shorter than
        ``after_bytes`` is forwarded whole and the connection is closed after it.
        """
        if after_bytes < 0:
            raise ValueError(f"after_bytes must be >= 0, got {after_bytes}")
        rule = FaultRule("reset", count, method, _compile(path_regex), after_bytes=after_bytes, rst=rst, every=every)
        return self._add(rule)

    def inject_stall(
        self,
        seconds: float,
        count: int | None = 1,
        method: str | None = "GET",
        path_regex: str | None = None,
        *,
        after_bytes: int | None = None,
        every: int = 1,
    ) -> FaultRule:
        """Hold matching responses for ``seconds``, then carry on normally.

        By default the stall comes before the response head (a first-byte timeout); with
        ``after_bytes`` it comes after that many body bytes (a read timeout mid-body).
        """
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        rule = FaultRule(
            "stall", count, method, _compile(path_regex), seconds=seconds, after_bytes=after_bytes, every=every
        )
        return self._add(rule)

    def clear_faults(self) -> None:
        """Drop every pending fault rule (latency and bandwidth settings stay)."""
        with self._lock:
            self._rules.clear()

    # -- counters (any thread) ----------------------------------------------------------------

    def requests(self) -> list[ProxyRequest]:
        """Every request seen since the last :meth:`reset_counters`, in arrival order."""
        with self._lock:
            return list(self._log)

    def count(self, method: str | None = None, path_regex: str | None = None) -> int:
        """How many requests matched ``method`` (``None``: any) and ``path_regex``."""
        return len(self._select(method, path_regex))

    def ranges(self, path_regex: str | None = None, method: str | None = "GET") -> list[str | None]:
        """The ``Range`` header (or ``None``) of each matching request, in arrival order."""
        return [r.range for r in self._select(method, path_regex)]

    def connections(self) -> int:
        """How many client connections were accepted (keep-alive reuse keeps this low)."""
        with self._lock:
            return self._accepted

    def reset_counters(self) -> None:
        """Forget the recorded requests and the connection count."""
        with self._lock:
            self._log.clear()
            self._accepted = 0

    # -- internals: bookkeeping -----------------------------------------------------------------

    def _add(self, rule: FaultRule) -> FaultRule:
        if rule.remaining is not None and rule.remaining < 1:
            raise ValueError(f"count must be >= 1 or None, got {rule.remaining}")
        if rule.every < 1:
            raise ValueError(f"every must be >= 1, got {rule.every}")
        if rule.method is not None:
            rule.method = rule.method.upper()
        with self._lock:
            self._rules.append(rule)
        return rule

    def _select(self, method: str | None, path_regex: str | None) -> list[ProxyRequest]:
        pattern = _compile(path_regex)
        method = method.upper() if method is not None else None
        return [
            r
            for r in self.requests()
            if (method is None or r.method == method) and (pattern is None or pattern.search(r.path))
        ]

    def _admit(self, head: _Head) -> tuple[ProxyRequest, FaultRule | None]:
        """Record a request and take the first fault rule that matches it."""
        method, target, _ = head.first
        raw_path, _, query = target.partition("?")
        path = urllib.parse.unquote(raw_path)
        headers = frozenset(key.lower() for key, _ in head.headers)
        with self._lock:
            rule = None
            for candidate in self._rules:
                if candidate.matches(method, path, headers):
                    candidate.seen += 1
                    if candidate.seen % candidate.every == 0:
                        rule = candidate
                        break
            if rule is not None and rule.remaining is not None:
                rule.remaining -= 1
            record = ProxyRequest(method, path, query, head.get("range"), rule.kind if rule else None, time.monotonic())
            self._log.append(record)
        return record, rule

    # -- internals: the loop thread -------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start(), or logged if it happens later
            if not self._ready.is_set():
                self._start_error = exc
            else:
                log.exception("FaultProxy loop failed")
        finally:
            self._ready.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                self._loop = None

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(self._serve_client, "127.0.0.1", 0, limit=_STREAM_LIMIT, reuse_address=True)
        try:
            self._port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop_event.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5.0)
            await server.wait_closed()

    async def _serve_client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._accepted += 1
        upstream = _Upstream(self._connection_rate)
        rst = False
        try:
            while await self._exchange(creader, cwriter, upstream):
                pass
        except _CloseClient as exc:
            rst = exc.rst
        except (ConnectionError, _ProtocolError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            log.debug("FaultProxy connection ended: %r", exc)
        except asyncio.CancelledError:
            pass  # stop(): fall through to close the sockets
        finally:
            upstream.close()
            if rst:
                sock = cwriter.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                cwriter.transport.abort()
            else:
                cwriter.close()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(cwriter.wait_closed(), 2.0)
            self._tasks.discard(task)

    async def _exchange(
        self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter, upstream: _Upstream
    ) -> bool:
        """Serve one request; return whether the client connection stays open."""
        request = await _read_head(creader, response=False)
        if request is None:
            return False
        method = request.first[0]
        record, rule = self._admit(request)
        req_framing = _body_framing(request)
        expects_continue = "100-continue" in request.tokens("expect")
        client_keep = "close" not in request.tokens("connection") and request.first[2] != "HTTP/1.0"

        if rule is not None and rule.kind == "error":
            if expects_continue and req_framing.kind != "none":
                # The client holds its body back until we say 100; answering with a final status
                # instead leaves the body unsent, so this connection cannot be reused (RFC 9110).
                client_keep = False
            else:
                async with contextlib.aclosing(_body_pieces(creader, req_framing)) as pieces:
                    async for _ in pieces:
                        pass
            await self._delay(self._latency_s)
            cwriter.write(self._error_response(rule, record, method, close=not client_keep))
            await cwriter.drain()
            return client_keep

        if not upstream.usable():
            upstream.close()
            try:
                upstream.reader, upstream.writer = await asyncio.wait_for(
                    asyncio.open_connection(*self._upstream_addr, limit=_STREAM_LIMIT), self._connect_timeout
                )
            except (OSError, asyncio.TimeoutError) as exc:
                log.debug("FaultProxy cannot reach %s: %r", self.upstream_url, exc)
                bad = FaultRule("error", None, None, None, status=502, code="BadGateway")
                bad.message = f"FaultProxy could not connect to {self.upstream_url}: {exc}"
                cwriter.write(self._error_response(bad, record, method, close=True))
                await cwriter.drain()
                return False
        response, body_sent = await self._roundtrip(request, req_framing, creader, cwriter, upstream)

        resp_framing = _body_framing(response, response_to=method)
        upstream_keep = resp_framing.kind != "close" and "close" not in response.tokens("connection")
        client_keep = client_keep and body_sent and "close" not in response.tokens("connection")
        client_keep = client_keep and resp_framing.kind != "close"

        delay = self._latency_s
        if rule is not None and rule.kind == "stall" and rule.after_bytes is None:
            delay += rule.seconds
        await self._delay(delay)
        cwriter.write(response.raw)
        cut = rule.after_bytes if rule is not None and rule.kind == "reset" else None
        stall_at = rule.after_bytes if rule is not None and rule.kind == "stall" else None
        assert upstream.reader is not None
        finished = await self._pipe(
            _body_pieces(upstream.reader, resp_framing),
            cwriter,
            throttle=True,
            connection_bucket=upstream.bucket,
            cut_at=cut,
            stall_at=stall_at,
            stall_s=rule.seconds if rule is not None else 0.0,
        )
        if not finished:  # a reset rule cut the body: the upstream stream is mid-body too
            upstream.close()
            assert rule is not None
            raise _CloseClient(rst=rule.rst)
        if not upstream_keep or not body_sent:
            upstream.close()
        if rule is not None and rule.kind == "reset":  # the body ended before the cut point
            raise _CloseClient(rst=False)
        return client_keep

    async def _next_response(self, ureader: asyncio.StreamReader) -> _Head:
        response = await _read_head(ureader, response=True)
        if response is None:
            raise _ProtocolError("upstream closed the connection before responding")
        return response

    async def _roundtrip(
        self,
        request: _Head,
        framing: _Framing,
        creader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        upstream: _Upstream,
    ) -> tuple[_Head, bool]:
        """Send a request upstream; return its final response head and whether the body went.

        The body is pumped while the response is awaited, so ``Expect: 100-continue`` works
        both ways (the upstream's 100 reaches the client, which then sends the body) and an
        upstream that answers before reading the whole body (a 403, say) is still heard. A
        body that did not go through whole leaves both connections unusable for another request.
        """
        ureader, uwriter = upstream.reader, upstream.writer
        assert ureader is not None and uwriter is not None
        uwriter.write(request.raw)
        if framing.kind == "none":
            return await self._next_final_response(ureader, cwriter), True
        pump = asyncio.ensure_future(self._pipe(_body_pieces(creader, framing), uwriter))
        answer = asyncio.ensure_future(self._next_final_response(ureader, cwriter))
        try:
            await asyncio.wait({pump, answer}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                pump_error = pump.exception()
                if pump_error is None:
                    await answer
                else:  # the upstream may still explain why it stopped reading
                    await asyncio.wait({answer}, timeout=self._connect_timeout)
                    if not answer.done():
                        raise pump_error
            response = answer.result()
            if not pump.done():  # a final answer normally comes after the whole body
                await asyncio.wait({pump}, timeout=0.05)
            body_sent = pump.done() and not pump.cancelled() and pump.exception() is None
            return response, body_sent
        finally:
            for task in (pump, answer):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                elif not task.cancelled():
                    task.exception()  # mark retrieved; the outcome was handled above

    async def _next_final_response(self, ureader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> _Head:
        """Read the upstream's response, forwarding interim 1xx responses to the client."""
        while True:
            response = await self._next_response(ureader)
            status = int(response.first[1])
            if status >= 200 or status == 101:
                return response
            cwriter.write(response.raw)
            await cwriter.drain()

    async def _pipe(
        self,
        pieces: AsyncGenerator[bytes, None],
        writer: asyncio.StreamWriter,
        *,
        throttle: bool = False,
        connection_bucket: _TokenBucket | None = None,
        cut_at: int | None = None,
        stall_at: int | None = None,
        stall_s: float = 0.0,
    ) -> bool:
        """Copy a body; return ``False`` if it stopped at ``cut_at`` bytes (a reset fault)."""
        sent = 0
        async with contextlib.aclosing(pieces) as body:
            async for data in body:
                piece = data
                if cut_at is not None and sent + len(piece) >= cut_at:
                    writer.write(piece[: cut_at - sent])
                    await self._flush(writer)
                    return sent + len(piece) <= cut_at and await _at_end(body)
                if stall_at is not None and sent + len(piece) > stall_at:
                    head, piece = piece[: stall_at - sent], piece[stall_at - sent :]
                    writer.write(head)
                    await writer.drain()
                    await asyncio.sleep(stall_s)
                    stall_at = None
                if throttle:
                    await self._bucket.consume(len(piece))
                    if connection_bucket is not None:
                        await connection_bucket.consume(len(piece))
                writer.write(piece)
                await writer.drain()
                sent += len(data)
        return True

    @staticmethod
    async def _flush(writer: asyncio.StreamWriter) -> None:
        """Wait until the transport's buffer is empty (not just below the high-water mark)."""
        transport = writer.transport
        transport.set_write_buffer_limits(high=0)
        await writer.drain()

    @staticmethod
    async def _delay(seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    def _error_response(self, rule: FaultRule, record: ProxyRequest, method: str, *, close: bool) -> bytes:
        request_id = f"FFPROXY{next(self._request_ids):09d}"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(rule.code)}</Code><Message>{escape(rule.message)}</Message>"
            f"<Resource>{escape(record.path)}</Resource><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        if rule.status < 300:  # a success the store never saw (e.g. a PUT a store would ignore)
            body = b""
        try:
            reason = http.HTTPStatus(rule.status).phrase
        except ValueError:
            reason = "Error"
        lines = [
            f"HTTP/1.1 {rule.status} {reason}",
            "Content-Type: application/xml",
            f"Content-Length: {len(body)}",
            f"x-amz-request-id: {request_id}",
            f"Date: {formatdate(usegmt=True)}",
            "Server: fastfeed-fault-proxy",
        ]
        if rule.status < 300:
            lines.append(f'ETag: "{request_id.lower()}"')
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if method == "HEAD" else head + body


async def _at_end(pieces: AsyncIterator[bytes]) -> bool:
    """Whether an exhausted-looking body really has nothing more (consumes at most one piece)."""
    async for piece in pieces:
        if piece:
            return False
    return True


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    return re.compile(pattern) if pattern is not None else None


def main(argv: list[str] | None = None) -> int:
    """``python -m fastfeed.testing.proxy UPSTREAM [--latency-ms N] [--bandwidth BYTES_PER_S]``:
    run a proxy in its own process (so its Python work does not share a GIL with the process
    being measured). Prints its endpoint URL on the first line of stdout, then serves until
    stdin is closed or the process is terminated."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m fastfeed.testing.proxy", description=main.__doc__)
    parser.add_argument("upstream", help="http://host:port of the S3 endpoint")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes per second, all connections")
    parser.add_argument("--connection-bandwidth", type=float, default=None, help="bytes per second, per connection")
    args = parser.parse_args(argv)
    proxy = FaultProxy(args.upstream).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def until_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    try:
        proxy.set_latency(args.latency_ms)
        proxy.set_bandwidth(args.bandwidth)
        proxy.set_connection_bandwidth(args.connection_bandwidth)
        print(proxy.endpoint_url, flush=True)  # noqa: T201 - the parent reads this line
        stop.wait()
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
