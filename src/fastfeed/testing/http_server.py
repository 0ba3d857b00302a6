"""A static-file HTTP server with ``Range`` support, for tests of http(s) shards.

Python's ``http.server`` answers every GET with the whole file; web servers that serve datasets
(nginx, a CDN, the Hugging Face Hub) honour ``Range`` and send ``ETag`` and ``Last-Modified``.
:class:`RangeServer` does what they do, on 127.0.0.1 and a free port, in its own thread and loop
(aiohttp's server), with switches to play a server without ranges or without ETags::

    with RangeServer(directory) as server:
        ds = StreamingDataset(server.url + "shard-{000000..000003}.tar")

``GET``/``HEAD`` of a file under ``root``: 200 with the whole file, or 206 with one range
(``bytes=a-b``, ``bytes=a-``, ``bytes=-n``), 416 for a range outside the file; ``If-Match`` and
``If-Unmodified-Since`` are checked (412); 404 for anything else. The ETag is the file's size
and modification time, so replacing a file changes it. :attr:`RangeServer.requests` records
``(method, path, Range header)`` of every request.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import re
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["RangeServer"]

log = logging.getLogger(__name__)


class RangeServer:
    """Serve ``root`` over HTTP with range requests (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], *, ranges: bool = True, etags: bool = True) -> None:
        self.root = Path(root).resolve()
        #: Honour ``Range`` (False: answer 200 with the whole file, as ``http.server`` does).
        self.ranges = ranges
        #: Send ``ETag`` (False: only ``Last-Modified``).
        self.etags = etags
        self.requests: list[tuple[str, str, str | None]] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._port: int | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/`` (with the trailing slash)."""
        if self._port is None:
            raise RuntimeError("RangeServer is not running")
        return f"http://127.0.0.1:{self._port}/"

    def start(self, timeout: float = 10.0) -> RangeServer:
        self._thread = threading.Thread(target=self._run, name="fastfeed-range-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError("RangeServer did not start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"RangeServer thread did not stop within {timeout} s")
        self._thread = None
        self._port = None

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the server's thread -----------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        from aiohttp import web

        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self._port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        self.requests.append((request.method, request.path, request.headers.get("Range")))
        path = (self.root / request.match_info["path"]).resolve()
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        if self.root not in path.parents or not path.is_file():
            return web.Response(status=404)
        stat = path.stat()
        size = stat.st_size
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        headers = {"Last-Modified": modified, "Accept-Ranges": "bytes" if self.ranges else "none"}
        if self.etags:
            headers["ETag"] = etag
        if_match = request.headers.get("If-Match")
        if if_match is not None and (not self.etags or if_match.strip() not in ("*", etag)):
            return web.Response(status=412, headers=headers)
        since = request.headers.get("If-Unmodified-Since")
        if since is not None:
            parsed = email.utils.parsedate_to_datetime(since).timestamp()
            if int(stat.st_mtime) > parsed:
                return web.Response(status=412, headers=headers)
        start, end, status = 0, size, 200
        spec = request.headers.get("Range")
        if spec and self.ranges:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
            if match is None or (not match.group(1) and not match.group(2)):
                return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            if match.group(1):
                start = int(match.group(1))
                end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            else:
                start, end = max(0, size - int(match.group(2))), size
            if start >= size or start >= end:
                return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        return web.Response(status=status, body=body, headers=headers)
