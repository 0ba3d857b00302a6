"""fastfeed.bench.peers: each peer adapter reads the same shards from the real local S3 server and
must deliver every sample. torch and webdataset run in the project venv; litdata, MosaicML
Streaming and s3torchconnector only where installed (benchmarks/cache/README_peers.md)."""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch.utils.data

from fastfeed.bench.peers import (
    PEERS,
    Expected,
    Peer,
    PeerContext,
    PeerError,
    PeerUnavailable,
    StreamingPeer,
    TorchPeer,
    WebDatasetPeer,
    convert_mds,
    iter_tar_samples,
    make_peer,
    sample_fields,
    shard_stats,
    streaming_shm_names,
    streaming_shm_owner,
)
from fastfeed.config import S3Config
from fastfeed.testing.shards import upload_dir, write_synthetic_shards

SHARDS = 3
PER_SHARD = 10
SAMPLE = 3000
TOTAL = SHARDS * PER_SHARD


@pytest.fixture
def ctx(bucket: Any, tmp_path: Path) -> PeerContext:
    """3 shards x 10 samples uploaded under ``train/`` (plus a non-tar object there), read
    with batch 4 (partial last batches) and 2 workers."""
    local = tmp_path / "shards"
    paths = write_synthetic_shards(local, num_shards=SHARDS, samples_per_shard=PER_SHARD, sample_bytes=SAMPLE)
    upload_dir(bucket.client, bucket.name, local, prefix="train/")
    bucket.client.put_object(Bucket=bucket.name, Key="train/_info.txt", Body=b"not a shard")
    s3 = S3Config(
        endpoint_url=bucket.server.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
        region=bucket.server.region,
    )
    return PeerContext.from_url(
        f"s3://{bucket.name}/train/",
        s3=s3,
        work_dir=tmp_path / "work",
        batch_size=4,
        num_workers=2,
        local_shards=paths,
        loader_timeout_s=60,
    )


def check(m: Any, name: str) -> None:
    assert m.name == name
    assert (m.samples, m.bytes) == (TOTAL, TOTAL * SAMPLE)
    assert m.seconds > 0
    assert 0 < m.first_sample_s <= m.seconds
    assert m.cpu_s > 0
    assert m.samples_per_s == pytest.approx(TOTAL / m.seconds)


def keys_under(bucket: Any, prefix: str) -> list[str]:
    resp = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=prefix)
    return [o["Key"] for o in resp.get("Contents", [])]


# -- module surface ---------------------------------------------------------------------------


def test_make_peer_covers_every_name() -> None:
    assert PEERS == ("torch", "webdataset", "litdata", "streaming", "s3torchconnector")
    for name in PEERS:
        peer = make_peer(name)
        assert peer.name == name
        assert make_peer(name) is not peer
    assert make_peer("litdata").has_cache and make_peer("streaming").has_cache
    assert not make_peer("torch").has_cache and not make_peer("s3torchconnector").has_cache
    with pytest.raises(ValueError, match="unknown peer 'nope'"):
        make_peer("nope")
    with pytest.raises(ValueError, match="opener"):
        WebDatasetPeer(opener="aws")
    curl = make_peer("webdataset", opener="curl")
    assert isinstance(curl, WebDatasetPeer) and curl.opener == "curl"
    assert isinstance(make_peer("webdataset"), WebDatasetPeer) and make_peer("webdataset").opener == "python"
    with pytest.raises(TypeError):
        make_peer("torch", opener="curl")


def test_context_lists_only_tar_shards_and_counts_them(ctx: PeerContext) -> None:
    assert ctx.shard_urls == [f"{ctx.prefix_url}shard-{i:06d}.tar" for i in range(SHARDS)]
    assert ctx.expected_counts() == Expected(TOTAL, TOTAL * SAMPLE, SAMPLE)
    assert ctx.files_per_shard() == PER_SHARD
    assert ctx.converted == "train-peers/"
    assert ctx.converted_url("mds") == f"s3://{ctx.bucket}/train-peers/mds/"
    samples = list(iter_tar_samples(ctx.source_shards()[1], ctx.fields))
    assert len(samples) == PER_SHARD
    assert all(set(s) == {"bin", "cls"} and len(s["bin"]) == SAMPLE for s in samples)
    assert [s["cls"] for s in samples] == [(PER_SHARD + i) % 10 for i in range(PER_SHARD)]


def test_context_downloads_shards_when_none_are_local(ctx: PeerContext) -> None:
    remote_only = PeerContext(
        s3=ctx.s3, bucket=ctx.bucket, prefix=ctx.prefix, shard_urls=ctx.shard_urls, work_dir=ctx.work_dir
    )
    assert remote_only.expected_counts() == Expected(TOTAL, TOTAL * SAMPLE, SAMPLE)
    sources = remote_only.source_shards()
    assert [p.parent for p in sources] == [ctx.work_dir / "source"] * SHARDS
    assert [p.read_bytes() for p in sources] == [p.read_bytes() for p in ctx.source_shards()]


def test_context_rejects_bad_settings(ctx: PeerContext) -> None:
    base: dict[str, Any] = {"s3": ctx.s3, "bucket": ctx.bucket, "shard_urls": ctx.shard_urls, "work_dir": ctx.work_dir}
    with pytest.raises(ValueError, match="ending with '/'"):
        PeerContext(prefix="train", **base)
    with pytest.raises(ValueError, match="must not overlap"):
        PeerContext(prefix="train/", converted_prefix="train/converted/", **base)
    with pytest.raises(ValueError, match="must be under"):
        PeerContext(prefix="val/", **base)
    with pytest.raises(ValueError, match="fields"):
        PeerContext(prefix="train/", fields={"bin": "float"}, **base)
    with pytest.raises(ValueError, match="one file per shard"):
        PeerContext(prefix="train/", local_shards=[], **base)


def test_a_missing_field_is_an_error(ctx: PeerContext) -> None:
    with pytest.raises(PeerError, match=r"no field\(s\) \['label'\]"):
        shard_stats(ctx.source_shards()[:1], {"bin": "bytes", "label": "int"})
    ctx.fields = {"bin": "bytes", "label": "int"}
    ctx.expected = Expected(TOTAL, TOTAL * SAMPLE)  # skip the header scan: the loader must notice
    ctx.num_workers = 0
    with pytest.raises(PeerError, match="label"):
        TorchPeer().run(ctx)


def test_peers_read_the_fields_the_dataset_has(tmp_path: Path) -> None:
    """The synthetic datasets' bin/cls; any other dataset's every field, as payload: a jpg/cls
    dataset is read, not refused for lacking .bin."""
    (demo,) = write_synthetic_shards(tmp_path / "demo", num_shards=1, samples_per_shard=3, sample_bytes=16)
    (photos,) = write_synthetic_shards(
        tmp_path / "photos", num_shards=1, samples_per_shard=3, sample_bytes=16, extensions=("jpg", "cls")
    )
    assert sample_fields(demo) == {"bin": "bytes", "cls": "int"}
    fields = sample_fields(photos)
    assert fields == {"jpg": "bytes", "cls": "bytes"}
    with tarfile.open(photos) as tar:
        member_bytes = sum(m.size for m in tar if m.isfile())
    samples, payload, _ = shard_stats([photos], fields)[0]
    assert (samples, payload) == (3, member_bytes), "every field counts as payload"
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(PeerError, match="no samples"):
        sample_fields(empty)


# -- torch and webdataset (project venv) --------------------------------------------------------


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers > 2 CPUs here
@pytest.mark.parametrize("workers", [0, 2, 5])
def test_torch_reads_every_sample(ctx: PeerContext, workers: int) -> None:
    ctx.num_workers = workers
    peer = make_peer("torch")
    assert peer.available() is None
    try:
        cold = peer.run(ctx, epoch=0, warm=False)
        warm = peer.run(ctx, epoch=1, warm=True)
    finally:
        peer.cleanup()
    for m in (cold, warm):
        check(m, "torch")
        assert m.extra["num_workers"] == min(workers, SHARDS)
        assert m.extra["batch_size"] == 4 and m.extra["from_cache"] is False
    assert (cold.extra["warm"], warm.extra["warm"], warm.extra["epoch"]) == (False, True, 1)


def test_a_short_epoch_fails_the_check(ctx: PeerContext) -> None:
    ctx.expected = Expected(TOTAL + 1, (TOTAL + 1) * SAMPLE)
    with pytest.raises(PeerError, match=rf"delivered {TOTAL} samples / {TOTAL * SAMPLE} payload bytes, expected"):
        make_peer("torch").run(ctx)


@pytest.mark.parametrize("opener", ["python", "curl"])
def test_webdataset_reads_every_sample(ctx: PeerContext, opener: str) -> None:
    pytest.importorskip("webdataset")
    if opener == "curl" and shutil.which("curl") is None:
        pytest.skip("no curl here")
    peer = WebDatasetPeer(opener=opener)
    assert peer.available() is None
    urls = peer.urls(ctx) if opener == "curl" else None
    try:
        m = peer.run(ctx)
        if opener == "python":
            urls = peer.urls(ctx)
            cfg = ctx.work_dir / "webdataset" / "s3.json"
            assert cfg.stat().st_mode & 0o077 == 0, "credentials file readable by others"
            assert all(u.startswith("pipe:") and ctx.s3.secret_access_key not in u for u in urls)
    finally:
        peer.cleanup()
    check(m, "webdataset")
    assert m.extra["num_workers"] == 2
    assert urls is not None and len(urls) == SHARDS
    if opener == "curl":
        assert all(u.startswith(f"{ctx.s3.endpoint_url}/{ctx.bucket}/train/shard-") for u in urls)
    assert not (ctx.work_dir / "webdataset").exists(), "cleanup leaves the opener files"


def test_webdataset_in_process(ctx: PeerContext) -> None:
    pytest.importorskip("webdataset")
    ctx.num_workers = 0
    peer = make_peer("webdataset")
    try:
        check(peer.run(ctx), "webdataset")
    finally:
        peer.cleanup()


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("litdata", "litdata"),
        ("streaming", "streaming"),
        ("s3torchconnector", "s3torchconnector"),
        ("webdataset", "webdataset"),
        ("torch", "boto3"),
    ],
)
def test_an_unimportable_peer_gives_a_reason(
    ctx: PeerContext, monkeypatch: pytest.MonkeyPatch, name: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError
    peer = make_peer(name)
    reason = peer.available()
    assert reason is not None and "pip install" in reason
    with pytest.raises(PeerUnavailable) as info:
        peer.run(ctx)
    assert info.value.peer == name and info.value.reason == reason
    assert not ctx.work_dir.exists() or not (ctx.work_dir / name).exists()


# -- peers that need their own install (benchmarks/cache/README_peers.md) -----------------------


def require(name: str) -> Peer:
    """The peer, or skip the test if it cannot run here (``available()`` applies the import
    workarounds a plain ``pytest.importorskip`` would not: see ``import_streaming``)."""
    peer = make_peer(name)
    reason = peer.available()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return peer


def _cache_peer(ctx: PeerContext, bucket: Any, name: str, fmt: str) -> None:
    peer = require(name)
    try:
        peer.prepare(ctx)
        assert keys_under(bucket, f"train-peers/{fmt}/"), "converted copy uploaded"
        cold = peer.run(ctx, epoch=0, warm=False)
        check(cold, name)
        assert cold.extra["from_cache"] is False and cold.extra["cache"]["files"] > 0
        warm = peer.run(ctx, epoch=1, warm=True)
        check(warm, name)
        assert warm.extra["from_cache"] is True and warm.extra["filled_cache_first"] is False
        assert warm.extra["files_added"] == warm.extra["files_rewritten"] == 0
        # A cold run empties the cache first.
        cache = peer.cache_dir(ctx)
        marker = cache / "marker.bin"
        marker.write_bytes(b"x")
        check(peer.run(ctx, warm=False), name)
        assert not marker.exists()
        # A warm run on an empty cache fills it first, untimed.
        shutil.rmtree(cache)
        warm = peer.run(ctx, epoch=2, warm=True)
        check(warm, name)
        assert warm.extra["filled_cache_first"] is True
    finally:
        peer.cleanup()
    assert not keys_under(bucket, "train-peers/"), "cleanup deletes the converted copy"
    assert keys_under(bucket, "train/"), "the shards stay"
    assert not (ctx.work_dir / name).exists()
    if isinstance(peer, StreamingPeer):
        assert len(peer.shm_prefixes) == 5  # one dataset per epoch (the last warm run fills first)
        assert_no_streaming_shm(peer, cache)


def assert_no_streaming_shm(peer: StreamingPeer, local: Path) -> None:
    """None of the shared-memory blocks of ``peer``'s datasets is left: no Streaming prefix is
    registered to ``local``, and (on Linux) the blocks of a prefix nobody holds are gone."""
    for prefix in peer.shm_prefixes:
        owner = streaming_shm_owner(prefix)
        assert owner is None or str(local) not in owner, f"prefix {prefix} still registered to {local}"
        if owner is None and Path("/dev/shm").is_dir():  # else another process holds it now
            left = [n for n in streaming_shm_names(prefix) if Path("/dev/shm", n).exists()]
            assert not left, f"left in /dev/shm: {left}"


def test_litdata_cold_and_warm(ctx: PeerContext, bucket: Any) -> None:
    _cache_peer(ctx, bucket, "litdata", "litdata")


def test_streaming_cold_and_warm(ctx: PeerContext, bucket: Any) -> None:
    _cache_peer(ctx, bucket, "streaming", "mds")


def test_streaming_workers_do_not_share_the_index_download_connection(
    bucket: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fastfeed bench --demo --compare streaming``'s shape (16 shards x 163 samples, 163 per
    MDS file, batch 64, 2 workers; smaller payloads): a cold epoch downloads ``index.json`` in
    this process, and its boto3 client (with the keep-alive socket) must not go to the forked
    workers. When it did, both workers used that one connection, read each other's responses,
    and a shard file got another shard's bytes (``IndexError`` decoding the ``cls`` int, or
    ``Relative sample index 0 is not present``) or a worker waited 60 s for a stolen response.
    Also: cold after warm, two peers in a row in one process, no shared memory left behind."""
    peer0 = require("streaming")
    local = tmp_path / "shards"
    paths = write_synthetic_shards(local, num_shards=16, samples_per_shard=163, sample_bytes=1024)
    upload_dir(bucket.client, bucket.name, local, prefix="train/")
    s3 = S3Config(
        endpoint_url=bucket.server.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
        region=bucket.server.region,
    )
    reference = tmp_path / "mds-reference"  # what the converted (and uploaded) MDS files hold
    convert_mds(paths, reference, {"bin": "bytes", "cls": "int"}, 163)
    expected_files = {p.name: p.read_bytes() for p in reference.iterdir()}

    clients_at_fork: list[list[Any]] = []

    class RecordingLoader(torch.utils.data.DataLoader):  # type: ignore[type-arg]
        def __init__(self, dataset: Any, *args: Any, **kwargs: Any) -> None:
            streams = getattr(dataset, "streams", [])
            clients_at_fork.append([getattr(s._downloader, "_s3_client", None) for s in streams])
            super().__init__(dataset, *args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", RecordingLoader)
    # The peer runs here, not in a process of its own (its *_here methods, which its process
    # runs), so that the recorder sees its loaders; its environment and temporary directory are
    # set as its process would get them, and restored after the test.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for run, peer in enumerate([peer0, require("streaming")]):  # two peers in a row, one process
        assert isinstance(peer, StreamingPeer)
        ctx = PeerContext.from_url(
            f"s3://{bucket.name}/train/",
            s3=s3,
            work_dir=tmp_path / f"work{run}",
            batch_size=64,
            num_workers=2,
            local_shards=paths,
            loader_timeout_s=30,  # a worker waiting on a stolen response fails in 30 s, not 60
        )
        for name, value in peer.environment(ctx).items():
            monkeypatch.setenv(name, value)
        cache = peer.cache_dir(ctx)
        try:
            peer.setup_here(ctx)
            peer.prepare_here(ctx)
            for warm in (False, True, False):  # a cold run after a warm one, too
                m = peer.run_here(ctx, 0, warm)
                assert (m.samples, m.bytes) == (16 * 163, 16 * 163 * 1024)
                assert {p.name: p.read_bytes() for p in cache.iterdir()} == expected_files, "a shard got wrong bytes"
                assert_no_streaming_shm(peer, cache)  # after each epoch, not only at cleanup
        finally:
            peer.cleanup_here(ctx)
            peer.cleanup()
        assert len(peer.shm_prefixes) == 3
        assert_no_streaming_shm(peer, cache)
    assert len(clients_at_fork) == 6
    assert all(c == [None] for c in clients_at_fork), (
        f"workers forked with S3 clients of this process: {clients_at_fork}"
    )


def test_a_warm_epoch_that_downloads_again_fails(ctx: PeerContext) -> None:
    peer = require("litdata")
    try:
        peer.run(ctx, warm=False)
        chunks = sorted(peer.cache_dir(ctx).rglob("chunk-*.bin"))
        assert chunks
        chunks[0].unlink()
        with pytest.raises(PeerError, match="cache changed"):
            peer.run(ctx, warm=True)
    finally:
        peer.cleanup()


@pytest.mark.parametrize("workers", [0, 2])
def test_s3torchconnector_reads_every_sample(ctx: PeerContext, workers: int) -> None:
    ctx.num_workers = workers
    peer = require("s3torchconnector")
    try:
        cold = peer.run(ctx, warm=False)
        warm = peer.run(ctx, warm=True)
    finally:
        peer.cleanup()
    for m in (cold, warm):
        check(m, "s3torchconnector")
        assert m.extra["num_workers"] == workers and m.extra["from_cache"] is False


@pytest.mark.parametrize("name", ["torch", "s3torchconnector"])
def test_a_peer_leaves_this_process_environment_and_tempdir_alone(ctx: PeerContext, name: str) -> None:
    """A peer runs in a process of its own, started with the environment it needs (the AWS
    credentials for s3torchconnector's CRT client) and a TMPDIR of its own: this process's
    os.environ and tempfile.tempdir are the same during and after the run, and the peer's
    temporary directory is gone after cleanup."""
    peer = make_peer(name) if name == "torch" else require(name)
    environ, tempdir = dict(os.environ), tempfile.tempdir
    try:
        check(peer.run(ctx), name)
        assert dict(os.environ) == environ, "os.environ changed by the run"
        assert tempfile.tempdir == tempdir, "tempfile.tempdir changed by the run"
    finally:
        peer.cleanup()
    assert dict(os.environ) == environ
    assert tempfile.tempdir == tempdir
    assert not list(Path(tempfile.gettempdir()).glob(f"fastfeed-peer-{name}-*")), "the peer's TMPDIR is left"
