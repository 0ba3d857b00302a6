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

The HTTP/1.1 framing lives in :mod:`fastfeed.testing.http1`; the fault rules, the record of
requests and the made-up S3 error responses in :mod:`fastfeed.testing.faults`. This module owns
the server: the loop thread, the connections and the knobs.

Threads: the proxy runs its own asyncio loop in one named daemon thread
(``fastfeed-fault-proxy``); :meth:`FaultProxy.stop` closes every connection and joins it.
Throughput is bounded by Python; measure the ceiling on the machine before trusting figures
taken through it (it is well below a direct loopback connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl as _ssl
import struct
import threading
import urllib.parse
from types import TracebackType

from fastfeed.testing.faults import (
    DEFAULT_MESSAGES,
    FaultBook,
    FaultRule,
    ProxyRequest,
    compile_pattern,
    error_response,
)
from fastfeed.testing.http1 import (
    STREAM_LIMIT,
    Framing,
    Head,
    ProtocolError,
    TokenBucket,
    body_framing,
    body_pieces,
    pipe_body,
    read_head,
)

__all__ = ["FaultProxy", "FaultRule", "ProxyRequest"]

log = logging.getLogger(__name__)


class _Upstream:
    """The upstream connection owned by one client connection (opened lazily)."""

    def __init__(self, connection_rate: float | None = None) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        #: This client connection's own response-body throttle (``set_connection_bandwidth``).
        self.bucket = TokenBucket()
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
        ssl: serve TLS with this server context (clients then use ``https://``; the upstream
            connection stays plain HTTP): an HTTPS endpoint with a certificate of the test's
            own CA, for ``AWS_CA_BUNDLE`` and ``ca_bundle`` checks.

    Use as a context manager, or :meth:`start` then :meth:`stop`.
    """

    def __init__(self, upstream_url: str, *, connect_timeout: float = 10.0, ssl: _ssl.SSLContext | None = None) -> None:
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme != "http" or not parsed.hostname or parsed.port is None:
            raise ValueError(f"FaultProxy needs an http://host:port upstream, got {upstream_url!r}")
        self.upstream_url = upstream_url
        self._upstream_addr = (parsed.hostname, parsed.port)
        self._connect_timeout = connect_timeout
        self._ssl = ssl
        self._book = FaultBook()
        self._latency_s = 0.0
        self._bucket = TokenBucket()
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
        """``http://127.0.0.1:<port>`` (``https://`` when serving TLS) to point clients at."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self._port}"

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
        return self._book.add(
            FaultRule(
                "error",
                count,
                method,
                compile_pattern(path_regex),
                status=status,
                code=code,
                message=message or DEFAULT_MESSAGES.get(code, f"Injected {code} (fastfeed FaultProxy)."),
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
        pattern = compile_pattern(path_regex)
        rule = FaultRule("reset", count, method, pattern, after_bytes=after_bytes, rst=rst, every=every)
        return self._book.add(rule)

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
            "stall", count, method, compile_pattern(path_regex), seconds=seconds, after_bytes=after_bytes, every=every
        )
        return self._book.add(rule)

    def inject_corruption(
        self, at: int = 0, count: int | None = 1, method: str | None = "PUT", path_regex: str | None = None
    ) -> FaultRule:
        """Flip the lowest bit of the request body's byte at offset ``at`` on its way upstream
        (damage in transit); the headers, the signature among them, pass unchanged."""
        if at < 0:
            raise ValueError(f"at must be >= 0, got {at}")
        return self._book.add(FaultRule("corrupt", count, method, compile_pattern(path_regex), after_bytes=at))

    def clear_faults(self) -> None:
        """Drop every pending fault rule (latency and bandwidth settings stay)."""
        self._book.clear()

    # -- counters (any thread) ----------------------------------------------------------------

    def requests(self) -> list[ProxyRequest]:
        """Every request seen since the last :meth:`reset_counters`, in arrival order."""
        return self._book.requests()

    def count(self, method: str | None = None, path_regex: str | None = None) -> int:
        """How many requests matched ``method`` (``None``: any) and ``path_regex``."""
        return len(self._book.select(method, path_regex))

    def ranges(self, path_regex: str | None = None, method: str | None = "GET") -> list[str | None]:
        """The ``Range`` header (or ``None``) of each matching request, in arrival order."""
        return [r.range for r in self._book.select(method, path_regex)]

    def connections(self) -> int:
        """How many client connections were accepted (keep-alive reuse keeps this low)."""
        return self._book.connections()

    def reset_counters(self) -> None:
        """Forget the recorded requests and the connection count."""
        self._book.reset()

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
        server = await asyncio.start_server(
            self._serve_client, "127.0.0.1", 0, limit=STREAM_LIMIT, reuse_address=True, ssl=self._ssl
        )
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
        self._book.connection_accepted()
        upstream = _Upstream(self._connection_rate)
        rst = False
        try:
            while await self._exchange(creader, cwriter, upstream):
                pass
        except _CloseClient as exc:
            rst = exc.rst
        except (ConnectionError, ProtocolError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
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
        request = await read_head(creader, response=False)
        if request is None:
            return False
        method = request.first[0]
        raw_path, _, query = request.first[1].partition("?")
        path = urllib.parse.unquote(raw_path)
        record, rule = self._book.admit(method, path, query, request.headers, request.get("range"))
        req_framing = body_framing(request)
        expects_continue = "100-continue" in request.tokens("expect")
        client_keep = "close" not in request.tokens("connection") and request.first[2] != "HTTP/1.0"

        if rule is not None and rule.kind == "error":
            if expects_continue and req_framing.kind != "none":
                # The client holds its body back until we say 100; answering with a final status
                # instead leaves the body unsent, so this connection cannot be reused (RFC 9110).
                client_keep = False
            else:
                async with contextlib.aclosing(body_pieces(creader, req_framing)) as pieces:
                    async for _ in pieces:
                        pass
            await self._delay(self._latency_s)
            cwriter.write(error_response(rule, record, method, self._request_id(), close=not client_keep))
            await cwriter.drain()
            return client_keep

        if not upstream.usable():
            upstream.close()
            try:
                upstream.reader, upstream.writer = await asyncio.wait_for(
                    asyncio.open_connection(*self._upstream_addr, limit=STREAM_LIMIT), self._connect_timeout
                )
            except (OSError, asyncio.TimeoutError) as exc:
                log.debug("FaultProxy cannot reach %s: %r", self.upstream_url, exc)
                bad = FaultRule("error", None, None, None, status=502, code="BadGateway")
                bad.message = f"FaultProxy could not connect to {self.upstream_url}: {exc}"
                cwriter.write(error_response(bad, record, method, self._request_id(), close=True))
                await cwriter.drain()
                return False
        flip_at = rule.after_bytes if rule is not None and rule.kind == "corrupt" else None
        response, body_sent = await self._roundtrip(request, req_framing, creader, cwriter, upstream, flip_at)

        resp_framing = body_framing(response, response_to=method)
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
        finished = await pipe_body(
            body_pieces(upstream.reader, resp_framing),
            cwriter,
            buckets=(self._bucket, upstream.bucket),
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

    async def _next_response(self, ureader: asyncio.StreamReader) -> Head:
        response = await read_head(ureader, response=True)
        if response is None:
            raise ProtocolError("upstream closed the connection before responding")
        return response

    async def _roundtrip(
        self,
        request: Head,
        framing: Framing,
        creader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        upstream: _Upstream,
        flip_at: int | None = None,
    ) -> tuple[Head, bool]:
        """Send a request upstream; return its final response head and whether the body went
        (with ``flip_at``, one bit of the body's byte at that offset flipped on the way).

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
        pump = asyncio.ensure_future(pipe_body(body_pieces(creader, framing), uwriter, flip_at=flip_at))
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

    async def _next_final_response(self, ureader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> Head:
        """Read the upstream's response, forwarding interim 1xx responses to the client."""
        while True:
            response = await self._next_response(ureader)
            status = int(response.first[1])
            if status >= 200 or status == 101:
                return response
            cwriter.write(response.raw)
            await cwriter.drain()

    def _request_id(self) -> str:
        """A fresh ``x-amz-request-id`` for a response the proxy makes up."""
        return f"FFPROXY{next(self._request_ids):09d}"

    @staticmethod
    async def _delay(seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)
