"""HTTP/1.1 message framing for :class:`~fastfeed.testing.proxy.FaultProxy`: parsing request and
response heads, delimiting bodies (``Content-Length``, ``chunked``, until close) and reading them
piece by piece, plus the token bucket that throttles response bodies.

Everything here runs on the proxy's event loop thread (only :attr:`TokenBucket.rate` is written
from other threads). Malformed messages raise :class:`ProtocolError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

__all__ = [
    "MAX_HEAD",
    "READ_CHUNK",
    "STREAM_LIMIT",
    "Framing",
    "Head",
    "ProtocolError",
    "TokenBucket",
    "at_end",
    "body_framing",
    "body_pieces",
    "flush",
    "parse_head",
    "pipe_body",
    "read_head",
]

MAX_HEAD = 64 * 1024  # bytes; longer request/response heads are a protocol error
READ_CHUNK = 1024 * 1024  # bytes per body read from either side
STREAM_LIMIT = 4 * 1024 * 1024  # StreamReader buffer; also bounds readuntil()
NO_BODY_STATUSES = (204, 304)


@dataclass
class Head:
    """A parsed request or response head; ``raw`` is forwarded byte for byte."""

    raw: bytes
    first: tuple[str, str, str]  # request: method, target, version; response: version, status, reason
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        """The value of the first header called ``name`` (any case), or ``None``."""
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


class ProtocolError(Exception):
    """Malformed HTTP from the client or the upstream."""


class Framing:
    """How a message body is delimited: ``kind`` is "none", "length", "chunked" or "close"."""

    __slots__ = ("kind", "length")

    def __init__(self, kind: str, length: int = 0) -> None:
        self.kind = kind
        self.length = length


def parse_head(raw: bytes, *, response: bool) -> Head:
    """Parse a request (``response=False``) or response head ending with its blank line."""
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
        raise ProtocolError(f"malformed HTTP head: {exc}") from None
    return Head(raw, (parts[0], parts[1], parts[2]), headers)


def body_framing(head: Head, *, response_to: str | None = None) -> Framing:
    """Body framing of a request (``response_to=None``) or of a response to ``response_to``."""
    if response_to is not None:
        status = int(head.first[1])
        if response_to == "HEAD" or status < 200 or status in NO_BODY_STATUSES:
            return Framing("none")
    if "chunked" in head.tokens("transfer-encoding"):
        return Framing("chunked")
    length = head.get("content-length")
    if length is not None:
        try:
            value = int(length)
        except ValueError:
            raise ProtocolError(f"bad Content-Length {length!r}") from None
        if value < 0:
            raise ProtocolError(f"bad Content-Length {length!r}")
        return Framing("length", value) if value else Framing("none")
    return Framing("close") if response_to is not None else Framing("none")


async def read_head(reader: asyncio.StreamReader, *, response: bool) -> Head | None:
    """Read one head; ``None`` on a clean EOF before its first byte."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed inside an HTTP head") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError("HTTP head too long") from None
    if len(raw) > MAX_HEAD:
        raise ProtocolError("HTTP head too long")
    return parse_head(raw, response=response)


async def body_pieces(reader: asyncio.StreamReader, framing: Framing) -> AsyncGenerator[bytes, None]:
    """Yield a body's raw bytes (chunked framing included) as they arrive."""
    if framing.kind == "length":
        remaining = framing.length
        while remaining:
            data = await reader.read(min(remaining, READ_CHUNK))
            if not data:
                raise ProtocolError(f"connection closed with {remaining} body bytes missing")
            remaining -= len(data)
            yield data
    elif framing.kind == "chunked":
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                raise ProtocolError("bad chunk header") from None
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {line[:40]!r}") from None
            yield line
            if size == 0:
                break
            remaining = size + 2  # chunk data and its CRLF
            while remaining:
                data = await reader.read(min(remaining, READ_CHUNK))
                if not data:
                    raise ProtocolError("connection closed inside a chunk")
                remaining -= len(data)
                yield data
        while True:  # trailer fields, then the empty line
            try:
                line = await reader.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                raise ProtocolError("bad chunked trailer") from None
            yield line
            if line == b"\r\n":
                break
    elif framing.kind == "close":
        while data := await reader.read(READ_CHUNK):
            yield data


class TokenBucket:
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


async def at_end(pieces: AsyncIterator[bytes]) -> bool:
    """Whether an exhausted-looking body really has nothing more (consumes at most one piece)."""
    async for piece in pieces:
        if piece:
            return False
    return True


async def pipe_body(
    pieces: AsyncGenerator[bytes, None],
    writer: asyncio.StreamWriter,
    *,
    buckets: Sequence[TokenBucket] = (),
    cut_at: int | None = None,
    stall_at: int | None = None,
    stall_s: float = 0.0,
    flip_at: int | None = None,
) -> bool:
    """Copy a body; return ``False`` if it stopped at ``cut_at`` bytes (a reset fault).

    Each piece is paid for in every bucket of ``buckets``, in order, before it is written; with
    ``stall_at``, the copy pauses ``stall_s`` seconds once that many bytes went; with
    ``flip_at``, the lowest bit of the byte at that offset is flipped on the way (damage in
    transit that TCP did not catch)."""
    sent = 0
    async with contextlib.aclosing(pieces) as body:
        async for data in body:
            piece = data
            if flip_at is not None and sent <= flip_at < sent + len(piece):
                damaged = bytearray(piece)
                damaged[flip_at - sent] ^= 1
                piece = data = bytes(damaged)
            if cut_at is not None and sent + len(piece) >= cut_at:
                writer.write(piece[: cut_at - sent])
                await flush(writer)
                return sent + len(piece) <= cut_at and await at_end(body)
            if stall_at is not None and sent + len(piece) > stall_at:
                head, piece = piece[: stall_at - sent], piece[stall_at - sent :]
                writer.write(head)
                await writer.drain()
                await asyncio.sleep(stall_s)
                stall_at = None
            for bucket in buckets:
                await bucket.consume(len(piece))
            writer.write(piece)
            await writer.drain()
            sent += len(data)
    return True


async def flush(writer: asyncio.StreamWriter) -> None:
    """Wait until the transport's buffer is empty (not just below the high-water mark)."""
    transport = writer.transport
    transport.set_write_buffer_limits(high=0)
    await writer.drain()
