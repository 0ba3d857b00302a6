"""The store contract and the retry behaviour, run against the obstore engine.

The contract tests of ``test_store.py`` are imported and run again here with an ``env`` fixture
that builds :class:`~fastfeed.store.obstore.ObstoreS3Store` on SeaweedFS and moto. The fault
cases of ``test_retry.py`` that concern the store (503 SlowDown and 5xx retried, a reset or a
stall mid-body resumed from the byte received, persistent throttling reported) run through the
real :class:`~fastfeed.testing.FaultProxy`, at the store level and once end to end through the
prefetcher and the tar reader.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("obstore")

from obstore import exceptions as ox

from fastfeed import StreamingDataset
from fastfeed.config import RetryConfig, S3Config
from fastfeed.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConfigError,
    EmptyDatasetError,
    EndpointError,
    NotFoundError,
    StoreError,
    StoreTimeoutError,
    ThrottledError,
    TransientStoreError,
)
from fastfeed.read.prefetch import Prefetcher
from fastfeed.read.reader import iter_samples
from fastfeed.store import obstore as store_obstore
from fastfeed.store.base import Store
from fastfeed.store.obstore import ObstoreS3Store, map_obstore_error
from fastfeed.store.pool import StoreSet
from fastfeed.testing.shards import upload_dir, write_synthetic_shards
from fastfeed.urls import Location, parse_url
from test_store import (
    PAYLOAD,
    Env,
    run,
    test_changed_object_is_detected_by_etag,
    test_head_and_ranged_reads,
    test_list_is_sorted_filtered_and_recursive,
    test_missing_objects_and_prefixes,
)

__all__ = [  # the imported contract tests run here too, against the obstore engine
    "test_changed_object_is_detected_by_etag",
    "test_head_and_ranged_reads",
    "test_list_is_sorted_filtered_and_recursive",
    "test_missing_objects_and_prefixes",
]

PART = 64 * 1024


def _config(server: Any, **overrides: Any) -> S3Config:
    values: dict[str, Any] = {
        "endpoint_url": server.endpoint_url,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        "region": "us-east-1",
    }
    values.update(overrides)
    return S3Config(**values)


@pytest.fixture(params=["seaweedfs", "moto"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    server = request.getfixturevalue("seaweed" if request.param == "seaweedfs" else "moto_server")
    client = server.client()
    bucket = f"contract-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    cfg = _config(server)
    out = Env(
        request.param,
        f"s3://{bucket}",
        lambda rel, data: client.put_object(Bucket=bucket, Key=rel, Body=data),
        lambda: ObstoreS3Store.create(cfg),
    )
    out.config = cfg  # type: ignore[attr-defined]
    yield out


# -- contract additions ------------------------------------------------------------------------


@pytest.mark.parametrize("whole_body_max", [16 * 2**20, 0], ids=["whole", "streamed"])
def test_read_range_fills_the_callers_buffer(env: Env, whole_body_max: int) -> None:
    env.put("buf.tar", PAYLOAD)

    async def go() -> tuple[memoryview, bytearray]:
        store = await ObstoreS3Store.create(
            env.config,  # type: ignore[attr-defined]
            chunk_size=64 * 1024,
            whole_body_max=whole_body_max,
        )
        try:
            loc = parse_url(f"{env.root}/buf.tar")
            info = await store.head(loc)
            buffer = bytearray(300_000)
            view = await store.read_range(loc, 5, 300_005, info.etag, out=memoryview(buffer))
            return view, buffer
        finally:
            await store.aclose()

    view, buffer = run(go())
    assert view.obj is buffer and view.nbytes == 300_000
    assert bytes(buffer) == PAYLOAD[5:300_005]


@pytest.mark.parametrize("server_name", ["seaweed", "moto_server"])
def test_missing_bucket_is_named(request: pytest.FixtureRequest, server_name: str) -> None:
    cfg = _config(request.getfixturevalue(server_name))

    async def go() -> list[BaseException]:
        store = await ObstoreS3Store.create(cfg)
        errs: list[BaseException] = []
        try:
            for op in (
                lambda: store.list(parse_url("s3://nope-bucket-x/p/")),
                lambda: store.head(parse_url("s3://nope-bucket-x/a.tar")),
                lambda: store.read_range(parse_url("s3://nope-bucket-x/a.tar"), 0, 3),
            ):
                try:
                    await op()
                except StoreError as err:
                    errs.append(err)
        finally:
            await store.aclose()
        return errs

    errs = run(go())
    assert len(errs) == 3
    assert all(isinstance(e, BucketNotFoundError) and "nope-bucket-x" in str(e) for e in errs), errs
    assert not isinstance(errs[0], EmptyDatasetError)


def test_bad_credentials_are_access_denied(seaweed: Any, bucket: Any) -> None:
    bucket.client.put_object(Bucket=bucket.name, Key="a.tar", Body=b"abc")
    cfg = _config(seaweed, access_key_id="AKIDNOTVALID", secret_access_key="wrong")

    async def go() -> list[BaseException]:
        store = await ObstoreS3Store.create(cfg)
        errs: list[BaseException] = []
        try:
            for op in (
                lambda: store.head(parse_url(bucket.url("a.tar"))),
                lambda: store.read_range(parse_url(bucket.url("a.tar")), 0, 3),
                lambda: store.list(parse_url(bucket.url(""))),
            ):
                try:
                    await op()
                except StoreError as err:
                    errs.append(err)
        finally:
            await store.aclose()
        return errs

    errs = run(go())
    assert len(errs) == 3
    assert all(isinstance(e, AccessDeniedError) for e in errs), errs


def test_credentials_come_from_botocores_chain(s3_env: Any, bucket: Any) -> None:
    """No keys in the config: the same chain as the aiobotocore engine (here: the environment)."""
    bucket.client.put_object(Bucket=bucket.name, Key="a.tar", Body=b"abcd")
    cfg = S3Config.resolve()
    assert cfg.access_key_id is None

    async def go() -> Any:
        store = await ObstoreS3Store.create(cfg)
        try:
            return await store.head(parse_url(bucket.url("a.tar")))
        finally:
            await store.aclose()

    assert run(go()).size == 4


def test_no_credentials_is_access_denied(seaweed: Any) -> None:
    cfg = S3Config(endpoint_url=seaweed.endpoint_url)

    async def go() -> BaseException:
        store = await ObstoreS3Store.create(cfg)
        try:
            await store.head(parse_url("s3://any-bucket/a.tar"))
        except StoreError as err:
            return err
        finally:
            await store.aclose()
        raise AssertionError("no error")

    assert isinstance(run(go()), AccessDeniedError)


def test_unreachable_endpoint_is_an_endpoint_error() -> None:
    cfg = S3Config(
        endpoint_url="http://127.0.0.1:1",
        access_key_id="a",
        secret_access_key="b",
        retry=RetryConfig(max_connect_attempts=2, base_delay=0.01, max_delay=0.02),
    )

    async def go() -> BaseException:
        store = await ObstoreS3Store.create(cfg)
        try:
            await store.head(parse_url("s3://some-bucket/a.tar"))
        except StoreError as err:
            return err
        finally:
            await store.aclose()
        raise AssertionError("no error")

    err = run(go())
    assert isinstance(err, EndpointError)
    assert isinstance(err.__cause__, ox.BaseError)


def _obstore_error(cls: type[BaseException], status: int | None, *, kind: str | None = None, code: str = "") -> Any:
    """An exception shaped like obstore's: a message ending in object_store's Debug rendering."""
    body = f"<Error><Code>{code}</Code></Error>" if code else ""
    inner = (
        f'inner: Status {{\n    status: {status},\n    body: Some("{body}"),\n}}'
        if status
        else f"source: HttpError {{\n    kind: {kind},\n    source: reqwest::Error {{ kind: Body }},\n}}"
    )
    return cls(f"Generic S3 error: Error performing GET u: {body}\n\nDebug source:\nGeneric {{\n{inner}\n}}")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_obstore_error(ox.GenericError, 503, code="SlowDown"), ThrottledError),
        (_obstore_error(ox.GenericError, 503), ThrottledError),
        (_obstore_error(ox.GenericError, 429), ThrottledError),
        (_obstore_error(ox.GenericError, 500, code="InternalError"), TransientStoreError),
        (_obstore_error(ox.GenericError, 502), TransientStoreError),
        (_obstore_error(ox.GenericError, 404, code="NoSuchBucket"), BucketNotFoundError),
        (_obstore_error(ox.GenericError, 404), NotFoundError),
        (_obstore_error(ox.GenericError, 403, code="AccessDenied"), AccessDeniedError),
        (_obstore_error(ox.GenericError, 416, code="InvalidRange"), StoreError),
        (_obstore_error(ox.GenericError, None, kind="Connect"), EndpointError),
        (_obstore_error(ox.GenericError, None, kind="Timeout"), StoreTimeoutError),
        (_obstore_error(ox.GenericError, None, kind="Interrupted"), TransientStoreError),
        (_obstore_error(ox.GenericError, None, kind="Request"), TransientStoreError),
        (ox.PermissionDeniedError("denied"), AccessDeniedError),
        (ox.UnauthenticatedError("who"), AccessDeniedError),
        (ox.PreconditionError("412"), StoreError),
        (FileNotFoundError("gone"), NotFoundError),
        (ox.GenericError("something without a rendering"), StoreError),
        (TimeoutError(), StoreTimeoutError),
    ],
)
def test_error_mapping(exc: BaseException, expected: type[StoreError]) -> None:
    err = map_obstore_error(exc, "s3://b/k.tar", bucket_url="s3://b")
    assert type(err) is expected, (err, exc)
    if isinstance(exc, ox.PreconditionError):
        assert "changed" in str(err)
    if expected is BucketNotFoundError:
        assert err.url == "s3://b"


def test_use_after_fork_fails_fast_instead_of_hanging(seaweed: Any, bucket: Any) -> None:
    """A child forked after obstore was used must get an error, not hang on its runtime."""
    bucket.client.put_object(Bucket=bucket.name, Key="a.tar", Body=b"abc")
    cfg = _config(seaweed)
    loc = parse_url(bucket.url("a.tar"))

    async def head() -> Any:
        store = await ObstoreS3Store.create(cfg)
        try:
            return await store.head(loc)
        finally:
            await store.aclose()

    assert run(head()).size == 3  # the runtime now has threads in this process
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_fd)
            try:
                asyncio.run(asyncio.wait_for(head(), 10))
                outcome = "ok"
            except BaseException as exc:
                outcome = type(exc).__name__
            os.write(write_fd, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        os.waitpid(pid, 0)
        outcome = os.read(read_fd, 200).decode()
    finally:
        os.close(read_fd)
    assert outcome == "ConfigError"


def test_fork_guard_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_obstore, "_runtime_pid", os.getpid() + 1)
    with pytest.raises(ConfigError, match="spawn"):
        store_obstore._mark_runtime_use()


# -- retries through the fault proxy -------------------------------------------------------------


@pytest.fixture
def proxied(bucket: Any, fault_proxy: Any, tmp_path: Path) -> tuple[str, S3Config, list[bytes], Path]:
    """One ~320 KiB shard uploaded; an S3 config that goes through the proxy."""
    paths = write_synthetic_shards(tmp_path, num_shards=1, samples_per_shard=10, sample_bytes=30_000)
    upload_dir(bucket.client, bucket.name, tmp_path, prefix="r/")
    s3 = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
        retry=RetryConfig(max_attempts=5, base_delay=0.01, max_delay=0.05),
    )
    reference = [s["bin"] for s in StreamingDataset(str(paths[0]))]
    return f"s3://{bucket.name}/r/{paths[0].name}", s3, reference, paths[0]


def _read_part(url: str, s3: S3Config, start: int, end: int, chunk: int = 4096, whole_body_max: int = 0) -> bytes:
    """Read one range through a fresh store; by default every attempt streams (resumable)."""

    async def go() -> bytes:
        store = await ObstoreS3Store.create(s3, chunk_size=chunk, whole_body_max=whole_body_max)
        try:
            loc = parse_url(url)
            info = await store.head(loc)
            return bytes(await store.read_range(loc, start, end, info.etag))
        finally:
            await store.aclose()

    return run(go())


def test_slowdown_is_retried(proxied: Any, fault_proxy: Any) -> None:
    url, s3, _, path = proxied
    fault_proxy.reset_counters()
    fault_proxy.inject(status=503, code="SlowDown", count=3, method="GET")
    fault_proxy.inject(status=503, code="SlowDown", count=1, method="HEAD")
    assert _read_part(url, s3, 0, PART) == path.read_bytes()[:PART]
    assert fault_proxy.count(method="GET") == 1 + 3
    assert fault_proxy.count(method="HEAD") == 1 + 1


def test_server_errors_are_retried(proxied: Any, fault_proxy: Any) -> None:
    url, s3, _, path = proxied
    fault_proxy.inject(status=500, code="InternalError", count=2, method="GET")
    fault_proxy.inject(status=502, code="BadGateway", count=1, method="GET")
    assert _read_part(url, s3, 100, 100 + PART) == path.read_bytes()[100 : 100 + PART]


def test_broken_transfer_resumes_from_the_byte_received(proxied: Any, fault_proxy: Any) -> None:
    url, s3, _, path = proxied
    fault_proxy.reset_counters()
    fault_proxy.inject_reset(after_bytes=10_000, count=1, method="GET")
    assert _read_part(url, s3, 0, PART, chunk=4096) == path.read_bytes()[:PART]
    ranges = fault_proxy.ranges()
    assert ranges[0] == f"bytes=0-{PART - 1}"
    # Resumed from what had reached fastfeed: the 10000 bytes sent, less what obstore still held
    # below one chunk (4 KiB here) when the connection broke.
    match = re.fullmatch(rf"bytes=(\d+)-{PART - 1}", ranges[1] or "")
    assert match and 10_000 - 4096 <= int(match.group(1)) <= 10_000, ranges


def test_whole_body_attempt_is_retried_whole_then_streams_and_resumes(proxied: Any, fault_proxy: Any) -> None:
    url, s3, _, path = proxied
    fault_proxy.reset_counters()
    fault_proxy.inject_reset(after_bytes=10_000, count=2, method="GET")
    assert _read_part(url, s3, 0, PART, chunk=4096, whole_body_max=PART) == path.read_bytes()[:PART]
    ranges = fault_proxy.ranges()
    # The first attempt collects the body whole, so nothing had landed when it broke: the retry
    # asks for the whole range again, streaming; it breaks too and the next one resumes.
    assert ranges[:2] == [f"bytes=0-{PART - 1}", f"bytes=0-{PART - 1}"], ranges
    match = re.fullmatch(rf"bytes=(\d+)-{PART - 1}", ranges[2] or "")
    assert match and 10_000 - 4096 <= int(match.group(1)) <= 10_000, ranges


def test_read_timeout_mid_body_is_retried(proxied: Any, fault_proxy: Any) -> None:
    url, s3, _, path = proxied
    s3 = S3Config(**{**s3.__dict__, "read_timeout": 0.5})
    fault_proxy.reset_counters()
    fault_proxy.inject_stall(3.0, count=1, method="GET", after_bytes=5000)
    assert _read_part(url, s3, 0, PART, chunk=1024) == path.read_bytes()[:PART]
    ranges = fault_proxy.ranges()
    assert re.fullmatch(r"bytes=(\d+)-\d+", ranges[1] or "")
    assert int(re.findall(r"\d+", ranges[1] or "0")[0]) >= 5000 - 1024  # resumed, not restarted


def test_persistent_throttling_gives_up_with_a_clear_error(proxied: Any, fault_proxy: Any) -> None:
    url, s3, _, _ = proxied
    fault_proxy.inject(status=503, code="SlowDown", count=None, method="GET")
    with pytest.raises(ThrottledError) as info:
        _read_part(url, s3, 0, PART)
    assert "shard-000000.tar" in str(info.value)
    assert isinstance(info.value.__cause__, ox.GenericError)


class _ObstoreStoreSet(StoreSet):
    """A StoreSet whose S3 store is the obstore engine (what ``engine="obstore"`` would build)."""

    def __init__(self, s3: S3Config) -> None:
        super().__init__(s3)
        self._obstore: ObstoreS3Store | None = None

    async def get(self, loc: Location) -> Store:
        if loc.scheme == "file":
            return await super().get(loc)
        async with self._lock:
            if self._obstore is None:
                self._obstore = await ObstoreS3Store.create(self.s3_config)
            return self._obstore

    async def aclose(self) -> None:
        if self._obstore is not None:
            store, self._obstore = self._obstore, None
            await store.aclose()
        await super().aclose()


def test_end_to_end_through_the_prefetcher_with_faults(proxied: Any, fault_proxy: Any) -> None:
    url, s3, reference, _ = proxied
    ds = StreamingDataset(url, s3=s3, part_size=PART, max_requests=2)
    fault_proxy.inject(status=503, code="SlowDown", count=2, method="GET")
    fault_proxy.inject_reset(after_bytes=20_000, count=2, method="GET")
    got: list[bytes] = []
    with Prefetcher(ds.shards, _ObstoreStoreSet(ds.s3_config), ds.prefetch_config) as prefetcher:
        for fetch in prefetcher:
            try:
                got.extend(bytes(s["bin"]) for s in iter_samples(fetch.url, fetch.chunks()))
            finally:
                fetch.close()
    assert got == reference


_FORK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from torch.utils.data import DataLoader
    from fastfeed import StreamingDataset
    from fastfeed.config import S3Config
    from fastfeed.read.prefetch import Prefetcher
    from fastfeed.read.reader import iter_samples
    from fastfeed.store.pool import StoreSet
    from fastfeed.store.obstore import ObstoreS3Store

    class ObstoreSet(StoreSet):
        async def get(self, loc):
            async with self._lock:
                if self._s3 is None:
                    self._s3 = await ObstoreS3Store.create(self.s3_config)
                return self._s3

        async def aclose(self):
            if self._s3 is not None:
                store, self._s3 = self._s3, None
                await store.aclose()

    class Dataset(StreamingDataset):  # listing at construction: aiobotocore; reads: obstore
        def _read(self, pieces, epoch=None):
            shards = [self.shards[p.shard] for p in pieces]
            with Prefetcher(shards, ObstoreSet(self.s3_config), self.prefetch_config) as pf:
                for piece, fetch in zip(pieces, pf):
                    try:
                        yield from iter_samples(fetch.url, fetch.chunks(), skip=piece.skip, limit=piece.limit)
                    finally:
                        fetch.close()

    args = json.loads(sys.argv[1])
    ds = Dataset(args["url"], s3=S3Config(**args["s3"]))
    def keys(workers):
        context = "fork" if workers else None
        loader = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context=context)
        return sorted(s["__key__"] for s in loader)
    out = {"fork_clean_parent": keys(2), "in_process": keys(0)}
    try:
        keys(2)  # the parent has now used obstore itself
        out["fork_after_use"] = "no error"
    except Exception as exc:
        out["fork_after_use"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
    """
)


def test_fork_started_dataloader_workers(seaweed: Any, s3_shards: Any, shard_dir: Path) -> None:
    """Workers forked from a parent that listed with aiobotocore read through obstore; once the
    parent itself has read through obstore, forked workers fail fast instead of hanging."""
    name, prefix, _ = s3_shards
    reference = sorted(s["__key__"] for s in StreamingDataset(str(shard_dir)))
    s3 = {"endpoint_url": seaweed.endpoint_url, "access_key_id": seaweed.access_key}
    s3["secret_access_key"] = seaweed.secret_key
    arg = json.dumps({"url": f"s3://{name}/{prefix}", "s3": s3})
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, arg], capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fork_clean_parent"] == reference
    assert out["in_process"] == reference
    assert "ConfigError" in out["fork_after_use"] and "spawn" in out["fork_after_use"], out["fork_after_use"]
