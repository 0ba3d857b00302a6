"""The node-local shard cache (fastfeed.cache.node) against the real S3 server, through a counting
proxy: every GET the store sees is counted there, across processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fastfeed import ConfigError, DataLoader, StreamingDataset
from fastfeed.cache.admin import cache_info, clear_cache, entry_files
from fastfeed.cache.entries import trailer_size
from fastfeed.config import S3Config
from fastfeed.store.buffers import pool_for
from fastfeed.testing.servers import free_port
from fastfeed.testing.shards import upload_dir, write_synthetic_shards

SHARDS = 6
PER_SHARD = 20
SAMPLE = 20_000  # ~400 KiB shards


@pytest.fixture
def data(bucket: Any, fault_proxy: Any, tmp_path: Path) -> dict[str, Any]:
    local = tmp_path / "shards"
    paths = write_synthetic_shards(local, num_shards=SHARDS, samples_per_shard=PER_SHARD, sample_bytes=SAMPLE)
    upload_dir(bucket.client, bucket.name, local, prefix="c/")
    s3 = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
    )
    return {
        "url": f"s3://{bucket.name}/c/",
        "s3": s3,
        "paths": paths,
        "bytes": sum(p.stat().st_size for p in paths),
        "cache": str(tmp_path / "cache"),
        "bucket": bucket,
        "proxy": fault_proxy,
    }


def payloads(cache: str) -> list[bytes]:
    """The shard bytes of each entry of ``cache`` (an entry is the shard, then its checksums),
    sorted; checks each entry's length."""
    out = []
    for path in entry_files(cache):
        size = int(path.stem.rsplit("-", 1)[1])
        raw = path.read_bytes()
        assert len(raw) == size + trailer_size(size), path
        out.append(raw[:size])
    return sorted(out)


def shard_bytes(data: dict[str, Any]) -> list[bytes]:
    return sorted(p.read_bytes() for p in data["paths"])


def gets(proxy: Any) -> int:
    return int(proxy.count(method="GET", path_regex=r"\.tar"))


def keys(samples: Any) -> list[str]:
    return [f"{s['__url__']}#{s['__key__']}" for s in samples]


def dataset(data: dict[str, Any], **kw: Any) -> StreamingDataset:
    kw.setdefault("cache_limit", "1GB")
    return StreamingDataset(data["url"], s3=data["s3"], cache_dir=data["cache"], **kw)


def test_second_epoch_is_read_from_the_cache(data: dict[str, Any]) -> None:
    proxy = data["proxy"]
    reference = keys(StreamingDataset([str(p) for p in data["paths"]]))
    proxy.reset_counters()
    ds = dataset(data)
    first = keys(ds)
    fetched = gets(proxy)
    assert fetched >= SHARDS
    assert [k.split("#")[1] for k in first] == [k.split("#")[1] for k in reference]
    io = ds.io_stats()
    assert io["cache_misses"] == SHARDS and io["cache_hits"] == 0
    info = cache_info(data["cache"])
    assert info.entries == SHARDS and info.entry_bytes == data["bytes"] and info.partial == 0
    ds.set_epoch(1)
    assert keys(ds) == first
    assert gets(proxy) == fetched, "a warm epoch sends no GET to the store"
    io = ds.io_stats()
    assert io["cache_hits"] == SHARDS and io["bytes_from_cache"] >= data["bytes"]


def test_a_warm_pass_gives_the_idle_part_buffers_back(data: dict[str, Any], tmp_path: Path) -> None:
    # A cold pass keeps its part buffers pooled for the next cold pass; a pass served entirely
    # by mapped hits uses none, so the pool then gives them back instead of holding the whole
    # byte budget through every warm epoch.
    ds = StreamingDataset(data["url"], s3=data["s3"], cache_dir=str(tmp_path / "c"), cache_limit="1GB")
    pool = pool_for(ds.prefetch_config.part_size)
    pool.trim()
    assert len(keys(ds)) > 0 and ds.io_stats()["cache_misses"] == SHARDS
    assert pool.idle_bytes > 0, "a cold pass keeps its buffers for the next one"
    ds.set_epoch(1)
    assert len(keys(ds)) > 0 and ds.io_stats()["cache_hits"] == SHARDS
    assert pool.idle_bytes == 0


def test_loader_stats_report_the_cache(data: dict[str, Any]) -> None:
    # Small parts: the last part of a stream (the tar's end blocks) is read after its last batch.
    loader = DataLoader(dataset(data, part_size="64KiB"), batch_size=8, num_workers=2)
    list(loader)
    cold = loader.stats()
    assert cold.cache_misses == SHARDS
    # Fills GET whole shards; the part a fill finishes after the stream's last batch is not
    # reported to the training process.
    assert 0.5 * data["bytes"] <= cold.bytes_fetched <= data["bytes"]
    list(loader)
    warm = loader.stats()
    assert warm.cache_hits - cold.cache_hits == SHARDS
    assert warm.bytes_fetched == cold.bytes_fetched, "nothing more from the store"
    # From disk: what the streams read (a stream stops reading a shard where its piece ends),
    # never more than the shards. (I/O is reported with the batches, so reads
    # that finish after a worker's last message are not counted).
    assert 0.5 * data["bytes"] <= warm.bytes_from_cache - cold.bytes_from_cache <= data["bytes"]


def test_a_changed_object_is_never_served_stale(data: dict[str, Any], tmp_path: Path) -> None:
    list(dataset(data))
    bucket = data["bucket"]
    first = data["paths"][0]
    (new,) = write_synthetic_shards(
        tmp_path / "v2", num_shards=1, samples_per_shard=PER_SHARD + 3, sample_bytes=SAMPLE, seed=7
    )
    bucket.client.upload_file(str(new), bucket.name, f"c/{first.name}")
    ds = dataset(data)  # lists the new ETag
    samples = [s for s in ds if s["__url__"].endswith(first.name)]
    assert len(samples) == PER_SHARD + 3
    expected = [s["bin"] for s in StreamingDataset(str(new))]
    assert [s["bin"] for s in samples] == expected
    assert ds.io_stats()["cache_misses"] == 1
    assert cache_info(data["cache"]).entries == SHARDS + 1  # the old version stays until evicted


def test_limits_that_cannot_work_fail_at_construction(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="cannot hold the largest shard"):
        dataset(data, cache_limit=100_000)
    with pytest.raises(ConfigError, match="needs a cache_limit"):
        StreamingDataset(data["url"], s3=data["s3"], cache_dir=data["cache"])
    with pytest.raises(ConfigError, match="cache_limit"):
        dataset(data, cache_limit="lots")


def test_an_unwritable_cache_dir_warns_and_streams(data: dict[str, Any], tmp_path: Path, caplog: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ds = StreamingDataset(data["url"], s3=data["s3"], cache_dir=str(blocker / "cache"), cache_limit="1GB")
    assert len(keys(ds)) == SHARDS * PER_SHARD
    assert "not usable" in caplog.text
    with pytest.raises(Exception, match="not usable"):
        list(
            StreamingDataset(
                data["url"], s3=data["s3"], cache_dir=str(blocker / "c"), cache_limit="1GB", cache_on_error="raise"
            )
        )


def test_cache_cli_info_and_clear(data: dict[str, Any]) -> None:
    list(dataset(data))
    out = subprocess.run(
        [sys.executable, "-m", "fastfeed.cli", "cache", "info", data["cache"], "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    info = json.loads(out.stdout)
    assert info["entries"] == SHARDS and info["entry_bytes"] == data["bytes"]
    assert clear_cache(data["cache"]) == (SHARDS, 0)
    assert cache_info(data["cache"]).entries == 0


# ------------------------------------------------------------------------ several processes

_READER = """
import json, sys
from fastfeed import DataLoader, StreamingDataset
from fastfeed.config import S3Config
cfg = json.loads(sys.argv[1])
ds = StreamingDataset(cfg["url"], s3=S3Config(**cfg["s3"]), cache_dir=cfg["cache"], cache_limit="1GB",
                      shuffle=True, seed=cfg["seed"])
loader = DataLoader(ds, batch_size=7, num_workers=cfg["workers"], collate_fn=lambda s: [x["__key__"] for x in s])
keys = [k for batch in loader for k in batch]
print(json.dumps({"samples": len(keys), "unique": len(set(keys))}))
"""


def _reader_args(data: dict[str, Any], seed: int, workers: int) -> list[str]:
    s3 = {k: data["s3"].__dict__[k] for k in ("endpoint_url", "access_key_id", "secret_access_key")}
    cfg = {"url": data["url"], "s3": s3, "cache": data["cache"], "seed": seed, "workers": workers}
    return [sys.executable, "-c", _READER, json.dumps(cfg)]


def test_jobs_and_workers_sharing_a_cache_fetch_each_shard_once(data: dict[str, Any]) -> None:
    proxy = data["proxy"]
    proxy.set_bandwidth(4_000_000)  # slow enough that the three jobs overlap
    proxy.reset_counters()
    jobs = [subprocess.Popen(_reader_args(data, seed, 2), stdout=subprocess.PIPE, text=True) for seed in (1, 2, 3)]
    try:
        outs = [json.loads(job.communicate(timeout=120)[0]) for job in jobs]
    finally:
        for job in jobs:
            job.kill()
    assert all(o == {"samples": SHARDS * PER_SHARD, "unique": SHARDS * PER_SHARD} for o in outs)
    assert [job.returncode for job in jobs] == [0, 0, 0]
    assert gets(proxy) == SHARDS, "three jobs with two workers each: every shard fetched once"
    assert cache_info(data["cache"]).entries == SHARDS


_FILLER = """
import json, sys
from fastfeed import StreamingDataset
from fastfeed.config import S3Config
cfg = json.loads(sys.argv[1])
ds = StreamingDataset(cfg["url"], s3=S3Config(**cfg["s3"]), cache_dir=cfg["cache"], cache_limit="1GB",
                      part_size="64KiB")
for sample in ds:
    pass
"""


def test_kill_9_during_a_fill_leaves_a_cache_the_next_run_uses(data: dict[str, Any]) -> None:
    proxy = data["proxy"]
    proxy.set_bandwidth(300_000)  # a fill takes seconds, in 64 KiB parts: the kill lands mid-fill
    args = _reader_args(data, 0, 0)
    args[2] = _FILLER
    job = subprocess.Popen(args)
    tmp = Path(data["cache"], "v2", "tmp")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = [p for p in tmp.glob("*.part") if p.stat().st_size > 0] if tmp.exists() else []
            if parts:
                break
            time.sleep(0.02)
        assert parts, "the filler never started writing"
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        job.kill()
    assert cache_info(data["cache"]).partial >= 1, "the killed fill left its part file"
    proxy.set_bandwidth(None)
    reference = {
        f"{Path(s['__url__']).name}#{s['__key__']}": s["bin"] for s in StreamingDataset([str(p) for p in data["paths"]])
    }
    ds = dataset(data)
    got = {f"{Path(s['__url__']).name}#{s['__key__']}": s["bin"] for s in ds}
    assert got == reference
    info = cache_info(data["cache"])
    assert info.partial == 0 and info.entries == SHARDS, "leftovers cleaned, every shard cached"
    assert payloads(data["cache"]) == shard_bytes(data), "entries are exact"


def test_a_full_disk_warns_and_loses_nothing(data: dict[str, Any]) -> None:
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n" + _READER  # every shard is bigger
    )
    args = _reader_args(data, 0, 0)
    args[2] = script
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"samples": SHARDS * PER_SHARD, "unique": SHARDS * PER_SHARD}
    assert "disk is full" in out.stderr and out.stderr.count("disk is full") == 1, out.stderr
    info = cache_info(data["cache"])
    assert info.entries == 0 and info.partial == 0


# ------------------------------------------------------------------- real process groups


def _rank_main(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ds = StreamingDataset(
            cfg["url"], s3=S3Config(**cfg["s3"]), cache_dir=cfg["cache"], cache_limit="1GB", shuffle=True,
            seed=5, index_cache=cfg["index"],
        )  # fmt: skip
        epochs = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            epochs.append([s["__key__"] + "@" + s["__url__"] for s in ds])
            dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps({"epochs": epochs, "io": ds.io_stats()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_share_the_node_cache_across_epochs(data: dict[str, Any], tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    proxy = data["proxy"]
    s3 = {k: data["s3"].__dict__[k] for k in ("endpoint_url", "access_key_id", "secret_access_key")}
    cfg = {"url": data["url"], "s3": s3, "cache": data["cache"], "index": str(tmp_path / "counts")}
    StreamingDataset(data["url"], s3=data["s3"], index_cache=cfg["index"]).shard_sample_counts  # noqa: B018 - count once
    proxy.reset_counters()
    mp.start_processes(_rank_main, args=(2, free_port(), cfg, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        both = ranks[0]["epochs"][epoch] + ranks[1]["epochs"][epoch]
        assert len(both) == len(set(both)) == SHARDS * PER_SHARD
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1], "shuffled: each rank reads other shards in epoch 2"
    assert gets(proxy) == SHARDS, "two ranks, two epochs: each shard fetched once for the node"
    assert sum(r["io"]["cache_hits"] for r in ranks) >= SHARDS


# ---------------------------------------------------------------------------- eviction


@pytest.mark.parametrize("shuffle", [False, True])
def test_half_size_cache_belady_fetches_half_per_epoch_lru_more(data: dict[str, Any], shuffle: bool) -> None:
    total = data["bytes"]
    limit = total // 2
    fetched: dict[str, list[float]] = {}
    for policy in ("belady", "lru"):
        ds = StreamingDataset(
            data["url"], s3=data["s3"], cache_dir=f"{data['cache']}-{policy}", cache_limit=limit,
            cache_policy=policy, shards_in_flight=1, shuffle=shuffle, seed=3,
        )  # fmt: skip
        before = 0.0
        fetched[policy] = []
        for epoch in range(3):
            ds.set_epoch(epoch)
            assert len(keys(ds)) == SHARDS * PER_SHARD
            now = ds.io_stats()["bytes_fetched"]
            fetched[policy].append((now - before) / total)
            before = now
            assert cache_info(f"{data['cache']}-{policy}").entry_bytes <= limit
    assert fetched["belady"][0] == fetched["lru"][0] == 1.0  # cold
    # Six shards of nearly equal size, three fit: Belady re-fetches about half each epoch.
    assert all(0.3 <= f <= 0.7 for f in fetched["belady"][1:]), fetched
    if not shuffle:  # the same order every epoch: LRU evicts each shard just before it is needed
        assert fetched["lru"][1:] == [1.0, 1.0], fetched
    assert sum(fetched["belady"][1:]) < sum(fetched["lru"][1:]), fetched


def test_a_shard_being_read_is_never_evicted_and_live_fills_survive_cleanup(data: dict[str, Any]) -> None:
    import fcntl

    from fastfeed.cache.config import CacheConfig
    from fastfeed.cache.node import ShardCache

    list(dataset(data))
    cache = ShardCache(CacheConfig.of(data["cache"], "1GB"))
    entries = sorted(os.listdir(cache.entries))
    reader = os.open(cache.entries / entries[0], os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)  # a reader, as a hit holds it
    try:
        assert not cache._evict(entries[0]) and (cache.entries / entries[0]).exists()
        assert cache._evict(entries[1]) and not (cache.entries / entries[1]).exists()
    finally:
        os.close(reader)
    # A part file whose filler is alive (holds LOCK_EX) survives the start-up clean-up; an
    # abandoned one does not.
    live, dead = cache.tmp / "live-0-1.part", cache.tmp / "dead-0-1.part"
    for path, byte in ((live, b"x"), (dead, b"y")):  # as fastfeed makes them: 0600
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, byte)
        os.close(fd)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(live)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert cache.cleanup() == 1
        assert live.exists() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert cache.cleanup() == 1 and not live.exists(), "once its process is gone, it is a leftover"
    cache.close()


def test_samples_flow_while_the_shard_is_still_being_written(data: dict[str, Any]) -> None:
    data["proxy"].set_bandwidth(400_000)  # ~1.2 s per shard, written in 64 KiB parts
    ds = dataset(data, part_size="64KiB", shards_in_flight=1)
    it = iter(ds)
    first = next(it)
    info = cache_info(data["cache"])
    assert info.entries == 0 and info.partial == 1, "the first sample came before its shard was complete"
    assert 0 < info.partial_bytes < data["paths"][0].stat().st_size
    data["proxy"].set_bandwidth(None)
    rest = list(it)
    assert first["__key__"] == "000000_00000000" and len(rest) == SHARDS * PER_SHARD - 1
    assert cache_info(data["cache"]).entries == SHARDS


def test_hits_stay_valid_when_entries_are_removed_while_mapped(data: dict[str, Any]) -> None:
    reference = {
        f"{Path(s['__url__']).name}#{s['__key__']}": s["bin"] for s in StreamingDataset([str(p) for p in data["paths"]])
    }
    list(dataset(data))  # warm
    loader = DataLoader(dataset(data), batch_size=7)
    got: dict[str, bytes] = {}
    for i, batch in enumerate(loader):
        if i == 1:
            removed, _ = clear_cache(data["cache"])  # entries unlinked under the readers' mappings
            assert removed >= 1
        for url, key, value in zip(batch["__url__"], batch["__key__"], batch["bin"], strict=True):
            got[f"{Path(url).name}#{key}"] = value
    assert got == reference


def test_zero_copy_samples_are_views_of_the_mapped_entry_and_outlive_it(data: dict[str, Any]) -> None:
    import mmap

    reference = {
        f"{Path(s['__url__']).name}#{s['__key__']}": s for s in StreamingDataset([str(p) for p in data["paths"]])
    }
    cold = list(dataset(data, zero_copy=True))  # misses: views of copies, same type as hits
    assert all(isinstance(s["bin"], memoryview) and s["bin"].readonly for s in cold)
    assert not any(isinstance(s["bin"].obj, mmap.mmap) for s in cold)
    warm = list(dataset(data, zero_copy=True))
    assert all(isinstance(s["bin"].obj, mmap.mmap) for s in warm), "a hit is a view of the entry, not a copy"
    removed, _ = clear_cache(data["cache"])  # the entries are unlinked; the views must not change
    assert removed == SHARDS
    for samples in (cold, warm):
        got = {f"{Path(s['__url__']).name}#{s['__key__']}": s for s in samples}
        assert got.keys() == reference.keys()
        for name, s in got.items():
            assert bytes(s["bin"]) == reference[name]["bin"] and bytes(s["cls"]) == reference[name]["cls"]


def test_a_cache_dir_removed_under_a_running_job_is_made_again(data: dict[str, Any], caplog: Any) -> None:
    import logging
    import shutil

    ds = dataset(data)
    first = keys(ds)
    shutil.rmtree(data["cache"])  # rm -rf between epochs, the process (and its cache object) lives on
    ds.set_epoch(1)
    with caplog.at_level(logging.WARNING, logger="fastfeed"):
        assert keys(ds) == first
    assert "reading from the store instead" not in caplog.text
    assert cache_info(data["cache"]).entries == SHARDS, "the shards were cached again"


def test_an_all_hit_epoch_builds_no_s3_client(data: dict[str, Any]) -> None:
    from fastfeed.store.pool import shared_s3_clients_created

    ds = dataset(data)
    first = keys(ds)  # cold: fills the cache through a client
    before = shared_s3_clients_created()
    ds.set_epoch(1)
    assert keys(ds) == first
    assert shared_s3_clients_created() == before, "every shard was a hit: no client was needed"


def test_a_cold_read_takes_its_fills_bytes_in_place_never_reading_them_back(data: dict[str, Any]) -> None:
    reference = {
        f"{Path(s['__url__']).name}#{s['__key__']}": s["bin"] for s in StreamingDataset([str(p) for p in data["paths"]])
    }
    ds = dataset(data, part_size="64KiB")  # several parts per shard, each claimed by the reader
    got = {f"{Path(s['__url__']).name}#{s['__key__']}": s["bin"] for s in ds}
    assert got == reference
    io = ds.io_stats()
    assert io["cache_misses"] == SHARDS
    assert io["bytes_fetched"] == data["bytes"], "every byte was fetched once, by the fills"
    assert io["bytes_from_cache"] == 0, "the reader got each part from its own fill, not from the part file"
    assert len(entry_files(data["cache"])) == SHARDS
    assert payloads(data["cache"]) == shard_bytes(data)


def test_a_reader_closed_with_claims_outstanding_stops_at_once(data: dict[str, Any]) -> None:
    data["proxy"].set_bandwidth(300_000)  # the fills are slow: the readers' claims wait on them
    ds = dataset(data, part_size="64KiB")
    it = iter(ds)
    next(it)
    start = time.monotonic()
    it.close()  # cancels the readers waiting on claims, and the fills
    assert time.monotonic() - start < 5
    data["proxy"].set_bandwidth(None)
    assert len(keys(dataset(data))) == SHARDS * PER_SHARD
    info = cache_info(data["cache"])
    assert info.entries == SHARDS and info.partial == 0


@pytest.mark.parametrize("part_size", ["64KiB", "100000"])  # page-aligned parts, and parts that are not
def test_direct_fills_write_exact_entries_that_later_epochs_hit(
    data: dict[str, Any], part_size: str, caplog: Any
) -> None:
    import logging

    caplog.set_level(logging.WARNING, logger="fastfeed")
    proxy = data["proxy"]
    reference = {
        f"{Path(s['__url__']).name}#{s['__key__']}": s["bin"] for s in StreamingDataset([str(p) for p in data["paths"]])
    }
    ds = dataset(data, cache_io="direct", part_size=part_size)
    assert ds.cache_config is not None and ds.cache_config.io == "direct"
    got = {f"{Path(s['__url__']).name}#{s['__key__']}": s["bin"] for s in ds}
    assert got == reference
    assert payloads(data["cache"]) == shard_bytes(data), "exact copies"
    fetched = gets(proxy)
    ds.set_epoch(1)
    again = {f"{Path(s['__url__']).name}#{s['__key__']}": s["bin"] for s in ds}
    assert again == reference and gets(proxy) == fetched, "a warm epoch reads the direct-written entries"
    assert "fills are buffered" not in caplog.text, "this file system takes O_DIRECT: the fills used it"


def test_direct_fills_fall_back_to_buffered_where_the_file_system_refuses(
    data: dict[str, Any], caplog: Any, monkeypatch: Any
) -> None:
    import errno
    import logging

    # Fault injection: file systems without O_DIRECT refuse the open with EINVAL; none of the
    # file systems this test may run on does (tmpfs has it since Linux 6.6).
    real_open = os.open

    def refuse_direct(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refuse_direct)
    with caplog.at_level(logging.WARNING, logger="fastfeed"):
        ds = dataset(data, cache_io="direct")
        assert len(keys(ds)) == SHARDS * PER_SHARD
    assert "fills are buffered" in caplog.text
    assert cache_info(data["cache"]).entries == SHARDS
    assert payloads(data["cache"]) == shard_bytes(data)


def test_cache_io_auto_writes_direct_where_the_file_system_takes_it_and_falls_back_silently(
    data: dict[str, Any], caplog: Any, monkeypatch: Any
) -> None:
    import errno
    import logging
    import shutil

    assert dataset(data).cache_config.io == "auto"  # type: ignore[union-attr]
    real_open = os.open
    direct_opens: list[str] = []

    def watch(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            direct_opens.append(str(path))
        return real_open(path, flags, *args, **kw)

    # A spy, not a fault: which opens ask for O_DIRECT.
    monkeypatch.setattr(os, "open", watch)
    with caplog.at_level(logging.WARNING, logger="fastfeed"):
        assert len(keys(dataset(data))) == SHARDS * PER_SHARD
    assert len(direct_opens) == SHARDS and all(p.endswith(".part") for p in direct_opens)
    assert payloads(data["cache"]) == shard_bytes(data)
    # Fault injection: a file system without O_DIRECT refuses it (EINVAL); auto falls back quietly.
    shutil.rmtree(data["cache"])

    def refuse_direct(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refuse_direct)
    with caplog.at_level(logging.WARNING, logger="fastfeed"):
        assert len(keys(dataset(data))) == SHARDS * PER_SHARD
    assert "fills are buffered" not in caplog.text, "auto chose direct I/O: falling back is not worth a warning"
    assert cache_info(data["cache"]).entries == SHARDS
    assert payloads(data["cache"]) == shard_bytes(data)
    assert dataset(data, cache_io="buffered").cache_config.io == "buffered"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="cache io"):
        dataset(data, cache_io="mmap")
