"""Fixtures shared by every test module.

Hygiene (autouse, every test):
    ``_clean_aws_env``  no AWS_* variable, config file or instance metadata leaks in.
    ``_no_leaks``       a test fails if a thread or child process it started outlives it.
                        (A session-scoped fixture that owns a thread or process adds it to
                        ``_SESSION_THREADS`` / ``_SESSION_PIDS``; multiprocessing's resource
                        tracker and forkserver, which live until exit, are exempt.)

Servers (session scope, stopped at the end of the session even after failures):
    ``seaweed``      a :class:`~fastfeed.testing.SeaweedServer` (started on first use).
    ``moto_server``  a :class:`~fastfeed.testing.MotoServer` (started on first use).

Per test:
    ``bucket``       a fresh bucket on ``seaweed``: ``.name``, ``.server``, ``.client``, ``.url(key)``.
    ``s3_env``       AWS_ENDPOINT_URL / keys / region of ``seaweed`` set in the environment.
    ``fault_proxy``  a started :class:`~fastfeed.testing.FaultProxy` in front of ``seaweed``.

Data (session scope):
    ``shard_dir``    4 synthetic shards x 50 samples x 1 KiB ``.bin`` (plus ``.cls``, ``.json``).
    ``s3_shards``    the same shards in a session bucket: ``(bucket_name, prefix, local_paths)``;
                     ``prefix`` ends with ``/``.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from fastfeed.testing.proxy import FaultProxy
from fastfeed.testing.servers import LocalS3Server, MotoServer, SeaweedServer
from fastfeed.testing.shards import upload_dir, write_synthetic_shards

pytest_plugins = ["pytester"]  # for the test of _no_leaks itself

log = logging.getLogger(__name__)

SHARDS = 4
SAMPLES_PER_SHARD = 50
SAMPLE_BYTES = 1024
_LEAK_GRACE_S = 5.0

# Processes and threads owned by session-scoped fixtures: they outlive the test that happened
# to start them, by design, so _no_leaks does not count them.
_SESSION_PIDS: set[int] = set()
_SESSION_THREADS: set[threading.Thread] = set()

# Process-lifetime helpers the standard library starts on first use and keeps until exit.
_LIFETIME_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


# -- hygiene ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _no_aws_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Paths (that do not exist) to point the AWS config and credentials files at."""
    base = tmp_path_factory.mktemp("no-aws")
    return str(base / "config-does-not-exist"), str(base / "credentials-do-not-exist")


def _scrub_aws_env(mp: pytest.MonkeyPatch, files: tuple[str, str]) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            mp.delenv(name)
    mp.setenv("AWS_CONFIG_FILE", files[0])
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", files[1])
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(autouse=True)
def _clean_aws_env(monkeypatch: pytest.MonkeyPatch, _no_aws_files: tuple[str, str]) -> None:
    """Remove every AWS_* variable and hide the machine's AWS files for the test."""
    _scrub_aws_env(monkeypatch, _no_aws_files)


def _children() -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    except psutil.Error:  # pragma: no cover - our own process always exists
        return {}


def _is_exempt(proc: psutil.Process) -> bool:
    """A session server or its descendant, a process-lifetime helper, or already dead."""
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        if proc.pid in _SESSION_PIDS or any(p.pid in _SESSION_PIDS for p in proc.parents()):
            return True
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:  # gone already
        return True
    return any(helper in cmdline for helper in _LIFETIME_HELPERS)


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} {proc.status()}: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail the test if a thread or child process started during it is still alive after it.

    Threads and processes get ``_LEAK_GRACE_S`` seconds to finish (joins in flight, garbage
    collection). Threads and processes of session-scoped fixtures are exempt.
    """
    threads_before = set(threading.enumerate())
    children_before = set(_children())
    yield

    def leaked_threads() -> list[threading.Thread]:
        return [
            t for t in threading.enumerate() if t not in threads_before and t not in _SESSION_THREADS and t.is_alive()
        ]

    def leaked_processes() -> list[psutil.Process]:
        return [p for pid, p in _children().items() if pid not in children_before and not _is_exempt(p)]

    deadline = time.monotonic() + _LEAK_GRACE_S
    collected = False
    while True:
        threads, procs = leaked_threads(), leaked_processes()
        if not threads and not procs:
            return
        if not collected:  # finalizers of unreachable objects often join/stop what is left
            gc.collect()
            collected = True
            continue
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    lines = [f"thread {t.name!r} (daemon={t.daemon}, ident={t.ident})" for t in threads]
    lines += [f"process {_describe(p)}" for p in procs]
    pytest.fail(
        f"the test leaked {len(threads)} thread(s) and {len(procs)} process(es) still alive "
        f"{_LEAK_GRACE_S:.0f} s after it ended:\n  " + "\n  ".join(lines),
        pytrace=False,
    )


# -- servers ---------------------------------------------------------------------------------


_Server = TypeVar("_Server", bound=LocalS3Server)


def _session_server(server: _Server, files: tuple[str, str]) -> Iterator[_Server]:
    with pytest.MonkeyPatch.context() as mp:  # the probe client must not read the machine's AWS setup
        _scrub_aws_env(mp, files)
        server.start()
    _SESSION_PIDS.add(server.pid)
    try:
        yield server
    finally:
        _SESSION_PIDS.discard(server.pid)
        server.stop()


@pytest.fixture(scope="session")
def seaweed(_no_aws_files: tuple[str, str]) -> Iterator[SeaweedServer]:
    """A SeaweedFS S3 server for the whole session (random credentials, free ports)."""
    yield from _session_server(SeaweedServer(), _no_aws_files)


@pytest.fixture(scope="session")
def moto_server(_no_aws_files: tuple[str, str]) -> Iterator[MotoServer]:
    """moto's standalone S3 server for the whole session (started by its first user)."""
    yield from _session_server(MotoServer(), _no_aws_files)


@dataclass(frozen=True)
class BucketRef:
    """A bucket on a local server, with a client that can write to it."""

    name: str
    server: LocalS3Server
    client: Any

    def url(self, key: str) -> str:
        """``s3://<bucket>/<key>``."""
        return f"s3://{self.name}/{key.lstrip('/')}"


def _unique_bucket_name(tag: str = "t") -> str:
    return f"ff{tag}-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def bucket(seaweed: SeaweedServer) -> Iterator[BucketRef]:
    """A fresh, uniquely named, empty bucket on ``seaweed``; deleted (with its contents) after."""
    client = seaweed.client()
    name = seaweed.create_bucket(_unique_bucket_name())
    yield BucketRef(name, seaweed, client)
    # SeaweedFS deletes non-empty buckets (their collections), which keeps its volume count bounded.
    try:
        client.delete_bucket(Bucket=name)
    except Exception as exc:  # the test may have deleted it, or left the server stopped
        log.warning("could not delete bucket %s: %r", name, exc)


@pytest.fixture
def s3_env(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> SeaweedServer:
    """Point the standard AWS environment variables at ``seaweed`` for this test."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", seaweed.region)
    return seaweed


@pytest.fixture
def fault_proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``seaweed``, stopped (thread joined) after the test."""
    with FaultProxy(seaweed.endpoint_url) as proxy:
        yield proxy


# -- data ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only ``shard-000000.tar`` .. ``shard-000003.tar`` (seed 0)."""
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(
        out, num_shards=SHARDS, samples_per_shard=SAMPLES_PER_SHARD, sample_bytes=SAMPLE_BYTES, seed=0
    )
    return out


@pytest.fixture(scope="session")
def s3_shards(seaweed: SeaweedServer, shard_dir: Path) -> tuple[str, str, list[Path]]:
    """``shard_dir`` uploaded to a session bucket: ``(bucket_name, "shards/", local_paths)``."""
    name = seaweed.create_bucket(_unique_bucket_name("s"))
    prefix = "shards/"
    upload_dir(seaweed.client(), name, shard_dir, prefix)
    return name, prefix, sorted(shard_dir.glob("*.tar"))
