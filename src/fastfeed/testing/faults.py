"""What :class:`~fastfeed.testing.proxy.FaultProxy` records and injects: each request it saw
(:class:`ProxyRequest`), the fault rules waiting for matching requests (:class:`FaultRule`), and
the S3 error responses it answers with (:func:`error_response`).
"""

from __future__ import annotations

import http
import re
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from xml.sax.saxutils import escape

__all__ = ["DEFAULT_MESSAGES", "FaultBook", "FaultRule", "ProxyRequest", "compile_pattern", "error_response"]

#: The ``<Message>`` of an injected error, per S3 error code, unless the rule gives one.
DEFAULT_MESSAGES = {
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
        fault: ``"error"``, ``"reset"``, ``"stall"`` or ``"corrupt"`` if a fault rule was
            applied, else ``None``.
        started: :func:`time.monotonic` when the request head arrived.
        headers: the request's headers as ``(lower-case name, value)`` pairs, in order.
    """

    method: str
    path: str
    query: str
    range: str | None
    fault: str | None
    started: float
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def has_range(self) -> bool:
        """Whether the request carried a ``Range`` header."""
        return self.range is not None

    def header(self, name: str) -> str | None:
        """The value of the first header called ``name`` (any case), or ``None``."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@dataclass
class FaultRule:
    """A fault waiting for matching requests; returned by the ``inject*`` methods.

    ``remaining`` counts down as requests match (``None`` means unlimited until
    :meth:`FaultProxy.clear_faults`). ``every``: the rule takes every ``every``-th request that
    matches it (1: each one), so ``every=10`` with ``count=None`` faults 10 % of the traffic,
    spread evenly. Read it from any thread; do not modify it.
    """

    kind: str  # "error" | "reset" | "stall" | "corrupt"
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


def error_response(rule: FaultRule, record: ProxyRequest, method: str, request_id: str, *, close: bool) -> bytes:
    """The raw HTTP/1.1 response that answers ``record`` for an ``"error"`` ``rule``: an S3 XML
    error naming ``request_id`` (an empty body for a ``rule.status`` below 300; no body at all for
    ``HEAD``), with ``Connection: close`` when ``close``."""
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


def compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """``pattern`` compiled, or ``None`` for no pattern (matches every path)."""
    return re.compile(pattern) if pattern is not None else None


class FaultBook:
    """The fault rules waiting for requests and the record of the requests seen, shared by the
    threads that set up a test and the proxy's loop thread (one lock guards both)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _rules, _log, _accepted
        self._rules: list[FaultRule] = []
        self._log: list[ProxyRequest] = []
        self._accepted = 0

    def add(self, rule: FaultRule) -> FaultRule:
        """Check ``rule`` and queue it after the rules already waiting; returns it."""
        if rule.remaining is not None and rule.remaining < 1:
            raise ValueError(f"count must be >= 1 or None, got {rule.remaining}")
        if rule.every < 1:
            raise ValueError(f"every must be >= 1, got {rule.every}")
        if rule.method is not None:
            rule.method = rule.method.upper()
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every waiting rule."""
        with self._lock:
            self._rules.clear()

    def requests(self) -> list[ProxyRequest]:
        """Every request recorded since the last :meth:`reset`, in arrival order."""
        with self._lock:
            return list(self._log)

    def select(self, method: str | None, path_regex: str | None) -> list[ProxyRequest]:
        """The recorded requests with ``method`` (``None``: any) whose path matches ``path_regex``."""
        pattern = compile_pattern(path_regex)
        method = method.upper() if method is not None else None
        return [
            r
            for r in self.requests()
            if (method is None or r.method == method) and (pattern is None or pattern.search(r.path))
        ]

    def connection_accepted(self) -> None:
        """Count one accepted client connection."""
        with self._lock:
            self._accepted += 1

    def connections(self) -> int:
        """Client connections accepted since the last :meth:`reset`."""
        with self._lock:
            return self._accepted

    def reset(self) -> None:
        """Forget the recorded requests and the connection count (the rules stay)."""
        with self._lock:
            self._log.clear()
            self._accepted = 0

    def admit(
        self, method: str, path: str, query: str, pairs: list[tuple[str, str]], range_header: str | None
    ) -> tuple[ProxyRequest, FaultRule | None]:
        """Record a request (``path`` decoded, ``pairs`` its headers) and take the first fault
        rule that matches it."""
        header_pairs = tuple((key.lower(), value) for key, value in pairs)
        headers = frozenset(key for key, _ in header_pairs)
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
            fault = rule.kind if rule else None
            record = ProxyRequest(method, path, query, range_header, fault, time.monotonic(), header_pairs)
            self._log.append(record)
        return record, rule
