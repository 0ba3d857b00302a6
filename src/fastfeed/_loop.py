"""The per-process IO thread: one asyncio event loop (thread name ``fastfeed-io``).

Every network and file read of a process runs on this loop. It is reference-counted: the first
:func:`acquire` starts it, the last :func:`IOLoop.release` stops and joins it, so a closed
dataset leaves no thread behind. It is fork-aware: a child process (a DataLoader worker under
the ``fork`` start method) never touches its parent's loop; it starts its own on first use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["IOLoop", "acquire"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_lock = threading.Lock()
_current: IOLoop | None = None

#: Seconds ``release`` waits for the loop thread to finish its pending callbacks and exit.
_JOIN_TIMEOUT = 10.0


class IOLoop:
    """A handle on the process's IO loop; call :meth:`release` exactly once when done."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._refs = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastfeed-io", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            finally:
                self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("IOLoop.run called from the IO thread itself (would deadlock)")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def call_soon(self, callback: Any, *args: Any) -> None:
        """Thread-safe ``loop.call_soon``; a no-op once the loop is closed."""
        with contextlib.suppress(RuntimeError):  # loop already closed: nothing left to notify
            self.loop.call_soon_threadsafe(callback, *args)

    def release(self) -> None:
        """Drop this reference; the last one stops the loop and joins the thread."""
        global _current
        with _lock:
            if os.getpid() != self.pid:
                return  # a forked child's copy of the parent's handle: the thread is not ours
            self._refs -= 1
            if self._refs > 0:
                return
            if _current is self:
                _current = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_JOIN_TIMEOUT)
        if self._thread.is_alive():
            log.warning("fastfeed-io thread did not stop within %.0fs", _JOIN_TIMEOUT)


def acquire() -> IOLoop:
    """Return the process's IO loop, starting it if needed, with one more reference."""
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid() or not _current._thread.is_alive():
            _current = IOLoop()
        _current._refs += 1
        return _current


def _after_fork_in_child() -> None:
    # The parent's IO thread does not exist in the child, and the lock may have been held by a
    # thread that does not exist either: start from a clean slate.
    global _lock, _current
    _lock = threading.Lock()
    _current = None


os.register_at_fork(after_in_child=_after_fork_in_child)
