"""The peer's own process: each peer of ``fastfeed bench --compare`` runs in a Python child
process of its own, so that what its library needs process-wide (credentials and an endpoint in
``os.environ``, a temporary directory for its file locks and working folders, patched module
state) never touches the benchmarking process.

:class:`PeerProcess` starts ``python -c "...serve(...)"`` with its own environment: the parent's,
plus what the peer asks for, plus ``TMPDIR`` pointing at a fresh directory of its own (short, so
that multiprocessing's ``AF_UNIX`` sockets under it stay within the path length limit), which is
removed when the process stops. :meth:`PeerProcess.call` sends a picklable object and the name
of one of its public methods over a pipe; :func:`serve` runs the method there and sends back the
result (or the exception, with the child's traceback as a note) and the object as the call left
it, so its state can be carried on by the caller. The request and reply pipes are dedicated file
descriptors: a library writing to stdout cannot garble them.

A call waits for its reply without a deadline: the peers' loaders fail a batch that is not ready
in :attr:`~fastfeed.bench.peers.context.PeerContext.loader_timeout_s`, and a process that dies
ends the wait (:class:`~fastfeed.bench.peers.common.PeerError`). :meth:`PeerProcess.stop` (also
run when the object is garbage collected, or at exit) closes the request pipe, which ends the
child's loop, and kills it if it has not exited after ``stop_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import traceback
import weakref
from collections.abc import Mapping
from typing import IO, Any, NamedTuple

from fastfeed.bench.peers.common import PeerError

__all__ = ["PeerProcess", "Reply", "serve"]

log = logging.getLogger(__name__)

_SERVE = "import sys; from fastfeed.bench.peers.process import serve; serve(int(sys.argv[1]), int(sys.argv[2]))"


class Reply(NamedTuple):
    """What a :meth:`PeerProcess.call` came back with."""

    #: The object the method ran on, as the call left it (its state, to carry on).
    target: Any
    #: The method's result (``None`` when it raised).
    value: Any
    #: What the method raised, the child's traceback added as a note; ``None`` if it returned.
    error: BaseException | None


class PeerProcess:
    """A child Python process that runs methods of objects sent to it (see the module docstring).

    Args:
        name: names the process's temporary directory (``fastfeed-peer-<name>-*``) and errors.
        env: variables set in the child on top of this process's environment (``TMPDIR`` is
            always the child's own directory).
        stop_timeout: seconds :meth:`stop` waits for the child to exit before killing it.
    """

    def __init__(self, name: str, env: Mapping[str, str] = {}, *, stop_timeout: float = 30.0) -> None:
        self.name = name
        #: The child's ``TMPDIR`` (removed when it stops).
        self.tmpdir = tempfile.mkdtemp(prefix=f"fastfeed-peer-{name}-")
        child_env = {**os.environ, **env, "TMPDIR": self.tmpdir}
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _SERVE, str(request_r), str(reply_w)],
                env=child_env,
                stdin=subprocess.DEVNULL,
                pass_fds=(request_r, reply_w),
            )
        except BaseException:
            for fd in (request_r, request_w, reply_r, reply_w):
                os.close(fd)
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise
        os.close(request_r)
        os.close(reply_w)
        self.pid = proc.pid
        self._proc = proc
        self._requests: IO[bytes] = os.fdopen(request_w, "wb")
        self._replies: IO[bytes] = os.fdopen(reply_r, "rb")
        self._finalizer = weakref.finalize(
            self, _stop, proc, self._requests, self._replies, self.tmpdir, name, stop_timeout
        )
        log.debug("peer process %s started (pid %d, TMPDIR %s)", name, proc.pid, self.tmpdir)

    @property
    def running(self) -> bool:
        """Whether the child is alive and has not been stopped."""
        return self._finalizer.alive and self._proc.poll() is None

    def call(self, target: Any, method: str, *args: Any) -> Reply:
        """``target.method(*args)`` in the child (``target`` and ``args`` are pickled).

        Raises:
            PeerError: the process is stopped, or died before it replied. What the method itself
                raised comes back in :attr:`Reply.error`.
        """
        if not self.running:
            raise PeerError(f"the {self.name} peer process is not running")
        try:
            pickle.dump((target, method, args), self._requests, protocol=pickle.HIGHEST_PROTOCOL)
            self._requests.flush()
            ok, value, child_traceback, after = pickle.load(self._replies)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            status = self._proc.poll()
            raise PeerError(
                f"the {self.name} peer process ended during {method}() (exit status {status}): {exc!r}"
            ) from None
        if not ok:
            if child_traceback:
                value.add_note(f"in the {self.name} peer process (pid {self.pid}):\n{child_traceback}")
            return Reply(after, None, value)
        return Reply(after, value, None)

    def stop(self) -> None:
        """End the child (see the module docstring) and remove its ``TMPDIR``; idempotent."""
        self._finalizer()


def _stop(
    proc: subprocess.Popen[bytes],
    requests: IO[bytes],
    replies: IO[bytes],
    tmpdir: str,
    name: str,
    timeout: float,
) -> None:
    """:meth:`PeerProcess.stop`, a module-level function so the finalizer holds no reference to
    the object."""
    with contextlib.suppress(OSError):
        requests.close()  # EOF: the child's loop ends
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("peer process %s (pid %d) did not exit in %.0f s; killing it", name, proc.pid, timeout)
        proc.kill()
        proc.wait()
    with contextlib.suppress(OSError):
        replies.close()
    shutil.rmtree(tmpdir, ignore_errors=True)


def serve(request_fd: int, reply_fd: int) -> None:
    """The child's loop: read ``(target, method, args)`` requests from ``request_fd`` until EOF,
    run ``target.method(*args)`` for each and write ``(ok, result or exception, traceback,
    target)`` to ``reply_fd``. An exception that cannot be pickled comes back as a
    :class:`~fastfeed.bench.peers.common.PeerError` naming it."""
    for fd in (request_fd, reply_fd):
        os.set_inheritable(fd, False)  # not for the commands a peer runs (forked workers share them)
    with os.fdopen(request_fd, "rb") as requests, os.fdopen(reply_fd, "wb") as replies:
        while True:
            try:
                target, method, args = pickle.load(requests)
            except EOFError:
                return
            try:
                reply: tuple[bool, Any, str, Any] = (True, getattr(target, method)(*args), "", target)
            except BaseException as exc:  # carried to the caller, which raises it
                reply = (False, exc, traceback.format_exc(), target)
            try:
                data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                error = reply[1] if not reply[0] else exc
                fallback = PeerError(f"{type(error).__name__}: {error}")
                data = pickle.dumps((False, fallback, reply[2] or traceback.format_exc(), target))
            replies.write(data)
            replies.flush()
