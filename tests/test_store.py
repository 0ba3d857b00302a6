"""Store contract: the same behaviour from every store (SeaweedFS, moto, local files).

The S3 stores are real servers on 127.0.0.1 (two independent implementations), so nothing
quietly depends on one server's quirks.
"""

from __future__ import annotations

import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fastfeed import _loop
from fastfeed.config import S3Config
from fastfeed.errors import BucketNotFoundError, EmptyDatasetError, NotFoundError, StoreError
from fastfeed.store.base import Store
from fastfeed.store.local import LocalStore
from fastfeed.store.s3 import S3Store
from fastfeed.urls import parse_url

T = TypeVar("T")
PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes


def run(coro: Coroutine[Any, Any, T]) -> T:
    io = _loop.acquire()
    try:
        return io.run(coro, timeout=60)
    finally:
        io.release()


class Env:
    """A store plus a way to put objects in it and the URL root they live under."""

    def __init__(self, name: str, root: str, put: Any, make: Any) -> None:
        self.name, self.root, self.put, self.make = name, root, put, make


@pytest.fixture(params=["seaweedfs", "moto", "local"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    if request.param == "local":

        def put_local(rel: str, data: bytes) -> None:
            p = tmp_path / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

        yield Env("local", tmp_path.as_uri(), put_local, lambda: LocalStore())
        return
    server = request.getfixturevalue("seaweed" if request.param == "seaweedfs" else "moto_server")
    client = server.client()
    bucket = f"contract-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    cfg = S3Config(
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        region="us-east-1",
    )
    yield Env(
        request.param,
        f"s3://{bucket}",
        lambda rel, data: client.put_object(Bucket=bucket, Key=rel, Body=data),
        lambda: S3Store.create(cfg),
    )


async def _open(env: Env) -> Store:
    store = env.make()
    if not isinstance(store, Store):
        store = await store
    return store


def test_list_is_sorted_filtered_and_recursive(env: Env) -> None:
    for rel in ["d/b.tar", "d/a.tar", "d/sub/c.tar", "d/notes.txt", "dd/x.tar"]:
        env.put(rel, b"x" * 10)

    async def go() -> list[Any]:
        store = await _open(env)
        try:
            return await store.list(parse_url(f"{env.root}/d/"))
        finally:
            await store.aclose()

    infos = run(go())
    assert [i.url.rsplit("/d/", 1)[1] for i in infos] == ["a.tar", "b.tar", "sub/c.tar"]
    assert all(i.size == 10 for i in infos)
    if env.name != "local":
        assert all(i.etag for i in infos)


def test_head_and_ranged_reads(env: Env) -> None:
    env.put("obj.tar", PAYLOAD)

    async def go() -> tuple[Any, ...]:
        store = await _open(env)
        try:
            loc = parse_url(f"{env.root}/obj.tar")
            info = await store.head(loc)
            whole = await store.read_range(loc, 0, info.size, info.etag)
            middle = await store.read_range(loc, 1000, 70_000, info.etag)
            last = await store.read_range(loc, info.size - 4, info.size, info.etag)
            return info, whole, middle, last
        finally:
            await store.aclose()

    info, whole, middle, last = run(go())
    assert info.size == len(PAYLOAD)
    assert bytes(whole) == PAYLOAD
    assert bytes(middle) == PAYLOAD[1000:70_000]
    assert bytes(last) == b"tail"


def test_missing_objects_and_prefixes(env: Env) -> None:
    env.put("here/a.tar", b"abc")

    async def go() -> list[BaseException]:
        store = await _open(env)
        errors: list[BaseException] = []
        try:
            for op in (
                lambda: store.head(parse_url(f"{env.root}/missing.tar")),
                lambda: store.read_range(parse_url(f"{env.root}/missing.tar"), 0, 3),
                lambda: store.list(parse_url(f"{env.root}/nothing/")),
            ):
                try:
                    await op()
                except StoreError as err:
                    errors.append(err)
            return errors
        finally:
            await store.aclose()

    head_err, read_err, list_err = run(go())
    assert isinstance(head_err, NotFoundError) and "missing.tar" in str(head_err)
    assert isinstance(read_err, NotFoundError) and "missing.tar" in str(read_err)
    assert isinstance(list_err, NotFoundError)  # EmptyDatasetError or a missing directory


def test_changed_object_is_detected_by_etag(env: Env) -> None:
    if env.name == "local":
        pytest.skip("local files have no ETag")
    env.put("v.tar", b"version one" * 100)

    async def go() -> BaseException | None:
        store = await _open(env)
        try:
            loc = parse_url(f"{env.root}/v.tar")
            info = await store.head(loc)
            env.put("v.tar", b"version two" * 100)
            try:
                await store.read_range(loc, 0, 10, info.etag)
            except StoreError as err:
                return err
            return None
        finally:
            await store.aclose()

    err = run(go())
    assert err is not None and "changed" in str(err)


@pytest.mark.parametrize("server_name", ["seaweed", "moto_server"])
def test_missing_bucket_is_named(request: pytest.FixtureRequest, server_name: str) -> None:
    server = request.getfixturevalue(server_name)
    cfg = S3Config(
        endpoint_url=server.endpoint_url, access_key_id=server.access_key, secret_access_key=server.secret_key
    )

    async def go() -> list[BaseException]:
        store = await S3Store.create(cfg)
        errs: list[BaseException] = []
        try:
            for op in (
                lambda: store.list(parse_url("s3://nope-bucket-x/p/")),
                lambda: store.head(parse_url("s3://nope-bucket-x/a.tar")),
            ):
                try:
                    await op()
                except StoreError as err:
                    errs.append(err)
        finally:
            await store.aclose()
        return errs

    errs = run(go())
    assert len(errs) == 2
    assert all(isinstance(e, BucketNotFoundError) and "nope-bucket-x" in str(e) for e in errs)
    assert not isinstance(errs[0], EmptyDatasetError)


def test_store_sets_of_one_config_share_one_client_until_the_last_closes(seaweed: Any) -> None:
    from fastfeed.store.pool import StoreSet

    cfg = S3Config(
        endpoint_url=seaweed.endpoint_url,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
        region="us-east-1",
    )
    other = S3Config(**{**cfg.__dict__, "read_timeout": cfg.read_timeout + 1})
    bucket = seaweed.create_bucket(f"shared-{uuid.uuid4().hex[:8]}")
    seaweed.client().put_object(Bucket=bucket, Key="d/a.tar", Body=PAYLOAD)
    loc = parse_url(f"s3://{bucket}/d/")

    async def scenario() -> None:
        a, b, c = StoreSet(cfg), StoreSet(cfg), StoreSet(other)
        sa, sb, sc = await a.get(loc), await b.get(loc), await c.get(loc)
        assert sa is sb, "one client per configuration"
        assert sc is not sa, "a different configuration gets its own client"
        await a.aclose()
        assert [o.size for o in await sb.list(loc)] == [len(PAYLOAD)], "still open for the other user"
        await b.aclose()
        with pytest.raises(Exception):  # noqa: B017 - closed by the last user: any error will do
            await sb.list(loc)
        fresh = StoreSet(cfg)
        sf = await fresh.get(loc)
        assert sf is not sa and [o.size for o in await sf.list(loc)] == [len(PAYLOAD)]
        await fresh.aclose()
        await c.aclose()

    run(scenario())


def _child_session_state(parent_loader_id: int, queue: Any) -> None:
    from fastfeed.store.s3 import _session

    session = _session(None)
    loader = session.get_component("data_loader")
    queue.put((id(loader) == parent_loader_id, len(getattr(loader, "_cache", {}))))


def test_a_forked_worker_reuses_the_parsed_service_model(seaweed: Any) -> None:
    import multiprocessing

    from fastfeed.store.s3 import S3Store, _session

    cfg = S3Config(
        endpoint_url=seaweed.endpoint_url,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
        region="us-east-1",
    )

    async def make_and_close() -> None:
        await (await S3Store.create(cfg)).aclose()  # parses the S3 model in this process

    run(make_and_close())
    parent = _session(None).get_component("data_loader")
    assert len(parent._cache) > 0
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_session_state, args=(id(parent), queue))
    proc.start()
    try:
        same, cached = queue.get(timeout=60)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert same and cached == len(parent._cache), "the child's new session uses the parent's warm loader"


def test_a_plain_http_endpoint_loads_no_ca_bundle_and_https_keeps_verification(
    seaweed: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client for ``http://`` is made with ``verify=False``: there is no TLS to verify, and
    loading the CA bundle tripled the CPU of making a client. ``https://`` and AWS's default
    endpoints keep botocore's verification (AWS_CA_BUNDLE and all)."""
    import aiobotocore.httpsession

    import fastfeed.store.s3 as s3_module
    from fastfeed.store.s3 import S3Store, client_settings

    assert client_settings(S3Config(endpoint_url="http://127.0.0.1:9000"))[1]["verify"] is False
    assert "verify" not in client_settings(S3Config(endpoint_url="https://minio.example:9000"))[1]
    assert "verify" not in client_settings(S3Config())[1]

    # A spy (not a fault): aiobotocore asks for the CA bundle's path only when it verifies.
    asked: list[object] = []
    real_path = aiobotocore.httpsession.get_cert_path
    monkeypatch.setattr(aiobotocore.httpsession, "get_cert_path", lambda v: asked.append(v) or real_path(v))
    config = S3Config(
        endpoint_url=seaweed.endpoint_url, access_key_id=seaweed.access_key, secret_access_key=seaweed.secret_key
    )

    async def one_request() -> None:
        store = await S3Store.create(config)
        try:
            await store.client.list_buckets()
        finally:
            await store.aclose()

    run(one_request())
    assert asked == [], "an http:// client loaded a CA bundle"
    real_settings = client_settings

    def verifying(cfg: S3Config, pool_size: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        options, kwargs = real_settings(cfg, pool_size)
        kwargs.pop("verify", None)
        return options, kwargs

    monkeypatch.setattr(s3_module, "client_settings", verifying)  # the spy sees it when it happens
    run(one_request())
    assert asked, "the spy did not see a verifying client"
