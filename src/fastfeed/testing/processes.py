"""Child-process plumbing of the local S3 servers (:mod:`fastfeed.testing.servers`): free ports
held until launch, the environment a server runs with, the tail of its log, and stopping its
process group (SIGTERM, then SIGKILL) with the Unix socket files it leaves behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "clean_env",
    "die_with_parent",
    "free_port",
    "log_tail",
    "remove_stale_sockets",
    "reserve_ports",
    "stop_process_group",
]

log = logging.getLogger(__name__)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the server when the process that started it dies,
    even by ``kill -9`` (when no cleanup of ours can run); ``None`` elsewhere. The C function is
    looked up here, before the fork, so the child only makes the call. Linux ties this to the
    starting *thread*: start servers from a thread that outlives them (the main thread, as the
    fixtures and the benchmarks do)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: nobody will stop us
            os._exit(1)

    return preexec


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a ``torch.distributed`` rendezvous
    the caller starts right away)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reserve_ports(count: int, *, paired_offset: int | None = None) -> tuple[list[int], list[socket.socket]]:
    """Bind ``count`` distinct free TCP ports on 127.0.0.1 and keep the sockets open.

    With ``paired_offset``, the last two ports are ``p`` and ``p + paired_offset`` (both free).
    The caller closes the returned sockets just before launching the process that binds them.
    """
    held: list[socket.socket] = []

    def bind(port: int) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            return None
        held.append(sock)
        return sock

    try:
        plain = count - (2 if paired_offset is not None else 0)
        for _ in range(plain):
            if bind(0) is None:  # pragma: no cover - port 0 always binds
                raise OSError("could not bind an ephemeral port on 127.0.0.1")
        if paired_offset is not None:
            for _ in range(200):
                first = bind(0)
                assert first is not None
                port = first.getsockname()[1]
                if port + paired_offset <= 65535 and bind(port + paired_offset) is not None:
                    break
                held.remove(first)
                first.close()
            else:
                raise OSError(f"no free pair of ports {paired_offset} apart on 127.0.0.1")
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return [s.getsockname()[1] for s in held], held


def clean_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """The current environment without any ``AWS_*`` variable, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(overrides)
    return env


def log_tail(path: Path, limit: int = 4000) -> str:
    """The last ``limit`` bytes of the log file ``path`` as text (or why it cannot be read)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"


def remove_stale_sockets(paths: Sequence[Path]) -> list[Path]:
    """Remove the Unix socket files in ``paths`` that nobody listens on; return those removed.

    A socket file some live process still accepts on (a port number reused by another server
    after ours exited) is left alone.
    """
    removed = []
    for path in paths:
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):
                continue
        except FileNotFoundError:
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(0.5)
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        finally:
            probe.close()
    return removed


def stop_process_group(
    proc: subprocess.Popen[bytes],
    name: str,
    stop_timeout: float,
    sockets: Sequence[Path],
    owned_dir: Path | None,
) -> None:
    """Stop ``proc`` (SIGTERM to its group, SIGKILL after ``stop_timeout``) and clean up.

    A module-level function so the finalizer holds no reference to the server object.
    """
    if proc.poll() is None:
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM for %.1f s; sending SIGKILL", name, proc.pid, stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10.0)
        log.info("%s (pid %d) stopped in %.2f s", name, proc.pid, time.monotonic() - started)
    else:
        # The leader is gone; make sure nothing else it started in its group survives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    removed = remove_stale_sockets(sockets)
    if removed:
        log.debug("%s left socket files behind, removed: %s", name, ", ".join(map(str, removed)))
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)
