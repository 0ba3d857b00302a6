"""fastfeed.DataLoader: batches, workers, the host ring, the device feeder, stats, shutdown."""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, default_collate

from batch_compare import assert_same_batch
from fastfeed import CorruptShardError, DataLoader, RaggedBytes, StreamingDataset, TruncatedShardError
from fastfeed.batch.assemble import tree_map_tensors
from fastfeed.batch.device import DeviceFeeder
from fastfeed.batch.ring import HostRing
from fastfeed.loader.slots import SlotFlags, SlotTable
from fastfeed.testing.shards import write_synthetic_shards


class Records(Dataset[dict[str, Any]]):
    """A map-style dataset of mixed fields, deterministic per index."""

    def __init__(self, n: int = 50, fail_at: int | None = None) -> None:
        self.n = n
        self.fail_at = fail_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i == self.fail_at:
            raise ValueError(f"record {i} is broken")
        rng = np.random.default_rng(i)
        return {
            "x": rng.standard_normal((3, 4)).astype(np.float32),
            "t": torch.arange(5, dtype=torch.int32) + i,
            "label": i % 7,
            "weight": float(i) / 3,
            "flag": i % 2 == 0,
            "raw": bytes(rng.integers(0, 256, size=i % 13, dtype=np.uint8)),
            "name": f"rec{i}",
            "pair": (i, np.full(2, i, dtype=np.int16)),
        }


def check_batch(batch: dict[str, Any], indices: list[int]) -> None:
    """The batch is default_collate's, exactly (types, dtypes, shapes, bytes)."""
    assert_same_batch(batch, default_collate([Records()[i] for i in indices]))
    assert batch["label"].dtype == torch.int64 and batch["weight"].dtype == torch.float64
    assert isinstance(batch["raw"], list) and isinstance(batch["pair"], list)


@pytest.mark.parametrize("workers", [0, 2])
def test_map_style_batches_match_default_collate(workers: int) -> None:
    loader = DataLoader(Records(), batch_size=8, num_workers=workers)
    batches = list(loader)
    assert len(batches) == len(loader) == 7
    for b, batch in enumerate(batches):
        check_batch(batch, list(range(b * 8, min(50, b * 8 + 8))))
    s = loader.stats()
    assert (s.batches, s.samples) == (7, 50)
    assert s.bytes > 50 * (48 + 20)
    assert s.collate_s > 0


def test_shuffle_sampler_and_drop_last() -> None:
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(Records(), batch_size=8, shuffle=True, drop_last=True, generator=g)
    seen = [name for batch in loader for name in batch["name"]]
    assert len(seen) == 48 and len(set(seen)) == 48
    assert seen != sorted(seen, key=lambda s: int(s[3:]))


@pytest.mark.parametrize("workers", [0, 2])
def test_user_collate_fn_is_used(workers: int) -> None:
    loader = DataLoader(Records(10), batch_size=4, num_workers=workers, collate_fn=lambda s: [x["name"] for x in s])
    assert list(loader) == [[f"rec{i}" for i in range(j, min(10, j + 4))] for j in (0, 4, 8)]


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_dataset_batches(shard_dir: Path, workers: int) -> None:
    ds = StreamingDataset(str(shard_dir))
    expected = {s["__key__"]: s for s in ds}
    loader = DataLoader(ds, batch_size=16, num_workers=workers)
    n = 0
    for batch in loader:
        assert set(batch) == {"__key__", "__url__", "bin", "cls", "json"}
        assert isinstance(batch["bin"], RaggedBytes)
        for i, key in enumerate(batch["__key__"]):
            assert batch["bin"][i] == expected[key]["bin"]
            assert batch["json"][i] == expected[key]["json"]
        n += len(batch["__key__"])
    assert n == len(expected)
    assert loader.stats().samples == n


def test_cpu_batches_stay_valid_while_held_and_slots_return(caplog: pytest.LogCaptureFixture) -> None:
    loader = DataLoader(Records(64), batch_size=4, prefetch_batches=1, ring_slots=3)
    caplog.set_level(logging.WARNING)
    held = list(loader)  # hoard every batch: the ring overflows but nothing is overwritten
    for b, batch in enumerate(held):
        check_batch(batch, list(range(b * 4, b * 4 + 4)))
    assert "ring slots are held" in caplog.text
    ring = loader._ring
    assert ring.overflows > 0
    del held, batch
    gc.collect()
    assert ring.wait_all_free(5.0), "slots must come back once the batches are freed"


def test_ring_reuses_slots_when_batches_are_dropped() -> None:
    loader = DataLoader(Records(200), batch_size=4, prefetch_batches=2, ring_slots=5)
    for batch in loader:
        assert batch["x"].shape[0] == 4
    assert loader._ring.overflows == 0


class FakeOps:
    """A simulated device: copies complete only when the test says so."""

    def __init__(self) -> None:
        self.completed: set[int] = set()
        self.events = 0
        self.handed: list[int] = []

    def copy(self, batch: Any) -> tuple[Any, Any]:
        self.events += 1
        return {"copied": batch}, self.events

    def done(self, event: Any) -> bool:
        return event in self.completed

    def synchronize(self, event: Any) -> None:
        self.completed.add(event)

    def hand_over(self, batch: Any, event: Any) -> None:
        self.handed.append(event)


def test_device_feeder_holds_host_slots_until_copies_complete() -> None:
    ring = HostRing(2)
    ops = FakeOps()
    feeder = DeviceFeeder(ops)
    from fastfeed.batch.collate import collate_into

    for i in range(2):
        slot = ring.acquire()
        host = collate_into([np.full(4, i, dtype=np.float32)], slot.arena, slot.base)
        feeder.copy(host)
        del host, slot
    gc.collect()
    assert ring.free_slots() == 0, "slots must stay reserved while their copies are in flight"
    assert feeder.reap() == 0
    ops.completed.add(1)
    assert feeder.reap() == 1
    gc.collect()
    assert ring.free_slots() == 1
    assert feeder.wait_oldest() and ops.completed == {1, 2}
    gc.collect()
    assert ring.free_slots() == 2
    feeder.hand_over({"b": 1}, 7)
    assert ops.handed == [7]


def test_device_cpu_delivers_batches() -> None:
    loader = DataLoader(Records(16), batch_size=8, device="cpu")
    for b, batch in enumerate(loader):
        check_batch(batch, list(range(b * 8, b * 8 + 8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_bit_identical_to_cpu() -> None:
    cpu = list(DataLoader(Records(40), batch_size=8))
    for ref, got in zip(cpu, DataLoader(Records(40), batch_size=8, device="cuda"), strict=True):
        assert got["x"].is_cuda and got["pair"][1].is_cuda
        assert_same_batch(tree_map_tensors(got, lambda t: t.cpu()), ref)


class RecordingPinner:
    """Stands in for cudaHostRegister/Unregister: records which memory is page-locked."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.live: dict[int, torch.Tensor] = {}
        self.calls: list[tuple[str, int]] = []

    def register(self, tensor: torch.Tensor) -> bool:
        self.calls.append(("register", tensor.data_ptr()))
        if self.accept:
            self.live[tensor.data_ptr()] = tensor
        return self.accept

    def unregister(self, tensor: torch.Tensor) -> None:
        self.calls.append(("unregister", tensor.data_ptr()))
        del self.live[tensor.data_ptr()]


def test_worker_slots_are_pinned_once_per_generation_and_unpinned_on_close() -> None:
    flags = SlotFlags(1, 2)
    free = flags.free
    free[0, 0] = 0
    pinner = RecordingPinner()
    table = SlotTable(flags, pinner)
    first = torch.arange(16, dtype=torch.uint8)
    view = table.base(0, 0, 1, first)
    assert torch.equal(view, first) and list(pinner.live) == [first.data_ptr()]
    assert flags.held[0, 0] == 1 and free[0, 0] == 0, "held by the main process while its views live"
    del view
    gc.collect()
    assert free[0, 0] == 1 and flags.held[0, 0] == 0, "the slot is free once its batch views are gone"
    free[0, 0] = 0
    view = table.base(0, 0, 1, None)  # reused, same generation: nothing crosses, nothing pinned
    assert len(pinner.calls) == 1
    del view
    grown = torch.arange(64, dtype=torch.uint8)
    assert table.base(0, 0, 2, grown).numel() == 64
    assert pinner.calls == [
        ("register", first.data_ptr()),
        ("unregister", first.data_ptr()),
        ("register", grown.data_ptr()),
    ]
    with pytest.raises(RuntimeError, match="generation 1 unknown"):
        table.base(0, 0, 1, None)
    table.close()
    assert pinner.live == {}


def test_a_worker_never_waits_for_a_slot() -> None:
    """A worker takes a free slot, else makes a new one (up to the table's width), else answers
    None at once (the batch goes to a fresh region): a held batch costs memory, never a wait.
    A new epoch of a persistent pool takes back the slots that are neither free nor held (their
    batches were dropped unseen when the previous epoch ended early)."""
    from fastfeed.loader.slots import WorkerSlots

    flags = SlotFlags(1, 3)
    slots = WorkerSlots(flags, 0)
    assert [slots.claim() for _ in range(4)] == [0, 1, 2, None]
    assert len(slots.arenas) == 3 and flags.free[0].tolist() == [0, 0, 0]
    flags.free[0, 1] = 1  # the main process released slot 1
    assert slots.claim() == 1
    flags.held[0, 0] = 1  # slot 0's batch is alive in the main process; 1 and 2 were dropped
    assert slots.claim() is None, "same epoch: nothing is taken back"
    flags.new_epoch()
    assert slots.claim() == 1 and flags.free[0].tolist() == [0, 0, 1]
    assert slots.claim() == 2 and slots.claim() is None


def test_a_slot_that_cannot_be_pinned_still_works_and_is_not_unpinned() -> None:
    pinner = RecordingPinner(accept=False)
    table = SlotTable(SlotFlags(1, 1), pinner)
    assert table.base(0, 0, 1, torch.ones(8, dtype=torch.uint8)).sum() == 8
    table.close()
    assert pinner.calls == [("register", pinner.calls[0][1])]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streaming_batches_from_workers_are_bit_identical(shard_dir: Path) -> None:
    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))
    ref = list(DataLoader(StreamingDataset(urls, shuffle=True, seed=3), batch_size=16))
    loader = DataLoader(StreamingDataset(urls, shuffle=True, seed=3), batch_size=16, num_workers=2, device="cuda")
    got = list(loader)
    assert len(got) == len(ref)
    for r, g in zip(ref, got, strict=True):
        assert r.keys() == g.keys()
        for key in r:
            if isinstance(r[key], torch.Tensor):
                assert g[key].is_cuda and torch.equal(g[key].cpu(), r[key])
            elif hasattr(r[key], "tolist"):
                assert g[key].data.is_cuda and g[key].tolist() == r[key].tolist()
            else:
                assert g[key] == r[key]


# ------------------------------------------------------------------------------- stats


class Slow(Dataset[np.ndarray]):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> np.ndarray:
        time.sleep(0.02)
        return np.full(3, i)


def test_wait_time_is_measured() -> None:
    loader = DataLoader(Slow(), batch_size=4)
    batches = list(loader)
    assert len(batches) == 3
    s = loader.stats()
    assert s.wait_s >= 0.1, "the loop waited for ~0.24 s of slow samples"
    assert s.parse_s >= 0.2


def test_streaming_stats_report_fetch_and_bytes(s3_shards: Any, seaweed: Any) -> None:
    from fastfeed.config import S3Config

    bucket, prefix, _ = s3_shards
    s3 = S3Config(
        endpoint_url=seaweed.endpoint_url, access_key_id=seaweed.access_key, secret_access_key=seaweed.secret_key
    )
    ds = StreamingDataset(f"s3://{bucket}/{prefix}", s3=s3)
    loader = DataLoader(ds, batch_size=32)
    total = sum(len(b["__key__"]) for b in loader)
    s = loader.stats()
    assert s.samples == total == 200
    assert s.bytes >= 200 * 1024
    assert s.fetch_s > 0
    assert ds.io_stats()["bytes_fetched"] == sum(x.size for x in ds.shards)


# ------------------------------------------------------------------------------- shutdown


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("fastfeed-batch", "fastfeed-io")]


@pytest.mark.parametrize("workers", [0, 2])
def test_break_and_close_stop_everything(shard_dir: Path, workers: int) -> None:
    loader = DataLoader(StreamingDataset(str(shard_dir)), batch_size=4, num_workers=workers)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    start = time.monotonic()
    loader.close()
    assert time.monotonic() - start < 10
    assert not _loader_threads()


def test_exception_in_training_step_then_gc_stops_everything(shard_dir: Path) -> None:
    def train() -> None:
        loader = DataLoader(StreamingDataset(str(shard_dir)), batch_size=4)
        for _ in loader:
            raise RuntimeError("loss is nan")

    # Not pytest.raises: its ExceptionInfo would keep the traceback, hence the loader, alive.
    try:
        train()
    except RuntimeError as exc:
        assert "nan" in str(exc)
    gc.collect()
    deadline = time.monotonic() + 10
    while _loader_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _loader_threads()


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_error_reaches_the_loop_with_its_traceback(workers: int) -> None:
    loader = DataLoader(Records(40, fail_at=13), batch_size=4, num_workers=workers)
    with pytest.raises(ValueError, match="record 13 is broken") as info:
        list(loader)
    text = "".join(traceback.format_exception(info.value))
    assert "__getitem__" in text


@pytest.mark.parametrize(("workers", "mode"), [(0, "auto"), (2, "auto"), (2, "process")])
def test_corrupt_shard_in_worker_names_the_shard(tmp_path: Path, shard_dir: Path, workers: int, mode: str) -> None:
    good = sorted(shard_dir.glob("*.tar"))[0]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(good.read_bytes()[:5000])  # cut inside a member
    ds = StreamingDataset([str(good), str(bad)])
    loader = DataLoader(ds, batch_size=8, num_workers=workers, worker_mode=mode)
    with pytest.raises((CorruptShardError, TruncatedShardError)) as info:
        for _ in loader:  # not list(): its len() would scan the shards here, in this process
            pass
    assert "bad.tar" in str(info.value)
    # Its attributes cross from the worker, not only its text (torch's workers send text).
    assert info.value.url is not None and info.value.url.endswith("bad.tar")
    if mode == "process":
        where = str(info.value.__cause__)
        assert "in DataLoader worker process" in where and "Traceback" in where


def test_fast_path_batches_larger_than_the_budget_do_not_deadlock(tmp_path: Path) -> None:
    """A batch spanning more parts than half the byte budget: samples are copied out, no hang."""
    write_synthetic_shards(tmp_path, num_shards=2, samples_per_shard=60, sample_bytes=20_000)
    ds = StreamingDataset(str(tmp_path), part_size="64KiB", byte_budget="192KiB")
    expected = {s["__key__"]: s["bin"] for s in ds}
    loader = DataLoader(ds, batch_size=50)  # 50 x 20 KB = 1 MB per batch >> budget
    got = {}
    for batch in loader:
        for key, value in zip(batch["__key__"], batch["bin"], strict=True):
            got[key] = value
    assert got == expected


def test_fast_path_and_sample_path_agree(shard_dir: Path) -> None:
    """The stream path (batches never cross streams, streams interleaved) delivers exactly the
    samples, with exactly the bytes, that per-sample iteration gives."""
    ds = StreamingDataset(str(shard_dir))
    by_key = {s["__key__"]: s for s in ds}
    fast = list(DataLoader(ds, batch_size=7, num_streams=3))
    keys = [k for b in fast for k in b["__key__"]]
    assert sorted(keys) == sorted(by_key)
    for b in fast:
        assert len(b["__key__"]) <= 7
        for i, key in enumerate(b["__key__"]):
            assert b["bin"][i] == by_key[key]["bin"] and b["json"][i] == by_key[key]["json"]
    # 4 shards of 50 over 3 streams (round-robin: 2, 1, 1 shards): 15 + 8 + 8 batches of <= 7.
    assert len(fast) == 15 + 8 + 8


def test_worker_slots_are_reused_and_hoarding_never_hangs(shard_dir: Path) -> None:
    ds = StreamingDataset(str(shard_dir))
    expected = [s["__key__"] for s in ds]
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    keys = [k for batch in loader for k in batch["__key__"]]  # batches dropped as we go
    assert sorted(keys) == sorted(expected)
    held = list(DataLoader(ds, batch_size=4, num_workers=2))  # every batch kept alive
    assert sorted(k for b in held for k in b["__key__"]) == sorted(expected)
    by_key = {s["__key__"]: s["bin"] for s in ds}
    for b in held:  # nothing was overwritten under a held batch
        for key, value in zip(b["__key__"], b["bin"], strict=True):
            assert value == by_key[key]


def test_an_iterator_outlives_its_loader_object(shard_dir: Path) -> None:
    """`for b in DataLoader(ds)` keeps only the iterator: dropping the loader must not stop it."""
    it = iter(DataLoader(StreamingDataset(str(shard_dir)), batch_size=10))
    gc.collect()
    assert sum(len(b["__key__"]) for b in it) == 200


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_spanning_more_shards_than_are_in_flight(tmp_path: Path, shuffle: bool) -> None:
    """Tiny shards, big batches: a block spans more shards than the prefetcher keeps open, so the
    reader must let shards go (copying their samples) instead of waiting for a slot it holds."""
    for i in range(12):
        (p,) = write_synthetic_shards(tmp_path / f"s{i}", num_shards=1, samples_per_shard=2, sample_bytes=100, seed=i)
        p.rename(tmp_path / f"shard-{i:06d}.tar")
    ds = StreamingDataset(str(tmp_path), shuffle=shuffle, shuffle_buffer=40, shards_in_flight=2)
    expected = sorted(f"{s['__url__']}#{s['__key__']}" for s in ds)
    batches = list(DataLoader(ds, batch_size=10, num_streams=2))
    got = sorted(f"{u}#{k}" for b in batches for u, k in zip(b["__url__"], b["__key__"], strict=True))
    assert got == expected


class RegionOps(FakeOps):
    """A simulated device that also takes one-region copies (as CudaOps does)."""

    def __init__(self) -> None:
        super().__init__()
        self.regions: list[int] = []

    def copy_region(self, region: torch.Tensor, layout: Any) -> tuple[Any, Any]:
        from fastfeed.batch.assemble import from_layout

        self.events += 1
        self.regions.append(region.numel())
        return from_layout(layout, region.clone()), self.events


def test_collated_batches_cross_to_the_device_as_one_region() -> None:
    from fastfeed.batch.collate import collate_into
    from fastfeed.batch.device import region_layout

    ring = HostRing(1)
    slot = ring.acquire()
    samples = [Records()[i] for i in range(4)]
    host = collate_into(samples, slot.arena, slot.base)
    found = region_layout(host)
    assert found is not None
    region = found[0]
    assert 0 < region.numel() <= slot.arena.nbytes
    ops = RegionOps()
    device_batch, event = DeviceFeeder(ops).copy(host)
    assert ops.regions == [region.numel()] and event == 1
    assert_same_batch(device_batch, host)
    assert device_batch["x"].data_ptr() != host["x"].data_ptr(), "the device batch views the copied region"
    # Tensors of several storages (a user collate_fn's batch) go tensor by tensor.
    assert region_layout({"a": torch.ones(3), "b": torch.zeros(2)}) is None
    assert region_layout({"a": torch.ones(4, 4).t()}) is None, "non-contiguous"
    mixed = DeviceFeeder(ops).copy({"a": torch.ones(3), "b": torch.zeros(2)})[0]
    assert mixed == {"copied": {"a": mixed["copied"]["a"], "b": mixed["copied"]["b"]}}
    assert ops.regions == [region.numel()]


# ------------------------------------------------------------------ order: what an iteration draws


def _names(batches: Any) -> list[list[str]]:
    return [list(b["name"]) for b in batches]


def _shuffled(workers: int, seed: int = 7) -> DataLoader:
    return DataLoader(
        Records(40), batch_size=8, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffled_order_is_torchs_for_the_same_generator(workers: int) -> None:
    """The order of every epoch is the one torch's DataLoader gives for the same generator (which
    draws its base seed, then the sampler's permutation, when an epoch starts), whatever
    num_workers."""
    g = torch.Generator().manual_seed(7)
    torch_loader = torch.utils.data.DataLoader(
        Records(40), batch_size=8, shuffle=True, generator=g, collate_fn=lambda s: {"name": [x["name"] for x in s]}
    )
    expected = [_names(torch_loader) for _ in range(3)]
    assert expected[0] != expected[1]
    loader = _shuffled(workers)
    assert [_names(loader) for _ in range(3)] == expected


def _torch_shuffled(workers: int, seed: int = 7) -> torch.utils.data.DataLoader[Any]:
    return torch.utils.data.DataLoader(
        Records(40), batch_size=8, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_throwaway_iterator_moves_the_order_as_it_moves_torchs(workers: int) -> None:
    """iter() draws the workers' base seed when it is called, as torch's does: without workers,
    an iterator dropped at once moves the next epoch's order exactly as it moves torch's. With
    workers, iter() draws the sampler's whole epoch (documented: torch draws the first batches'
    indices then, the rest as batches arrive), as a torch iterator run to its end does."""
    ours, theirs = _shuffled(workers), _torch_shuffled(workers)
    iter(ours)
    if workers == 0:
        iter(theirs)
    else:
        list(iter(theirs))
    assert [_names(ours) for _ in range(2)] == [_names(theirs) for _ in range(2)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_loaded_state_survives_throwaway_iterators(workers: int) -> None:
    """A loaded state is used by the first iteration that yields a batch, not by iterators
    dropped before (nor does it draw from the generators: the resumed run sees the states the
    uninterrupted run saw)."""
    reference = _shuffled(workers)
    expected = [_names(reference) for _ in range(2)]
    partial = _shuffled(workers)
    it = iter(partial)
    head = [list(next(it)["name"]) for _ in range(2)]
    state = partial.state_dict()
    partial.close()
    assert head == expected[0][:2]
    for attempt in range(5 if workers == 0 else 2):
        resumed = _shuffled(workers)
        iter(resumed)
        resumed.load_state_dict(state)
        iter(resumed)  # dropped before its first batch
        live = iter(resumed)
        resumed.load_state_dict(state)  # a live, not yet started iteration
        assert _names(live) == [], "a state load ends the live iteration"
        assert _names(resumed) == expected[0][2:], f"attempt {attempt}"
        assert _names(resumed) == expected[1], f"attempt {attempt}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_state_load_during_an_iteration_stops_it_and_applies_to_the_next(workers: int) -> None:
    reference = _shuffled(workers)
    expected = [_names(reference) for _ in range(2)]
    for attempt in range(10 if workers == 0 else 2):
        loader = _shuffled(workers)
        it = iter(loader)
        head = [list(next(it)["name"]) for _ in range(3)]
        state = loader.state_dict()
        assert head == expected[0][:3]
        it2 = iter(loader)  # a second iteration, started; the first stays valid, as in torch
        theirs = _torch_shuffled(workers)
        their_it = iter(theirs)
        for _ in range(3):
            next(their_it)
        assert list(next(it2)["name"]) == list(next(iter(theirs))["name"]), "torch's order, draw for draw"
        loader.load_state_dict(state)  # while epoch 1's producer runs
        assert next(it2, None) is None, "the live iteration ended"
        assert _names(loader) == expected[0][3:], f"attempt {attempt}"
        assert _names(loader) == expected[1], f"attempt {attempt}"


def test_a_throwaway_iterator_does_not_use_up_a_loaded_state(shard_dir: Path) -> None:
    loader = _shuffled(0)
    expected = [_names(loader) for _ in range(2)]
    loader = _shuffled(0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    loader.close()
    fresh = _shuffled(0)
    fresh.load_state_dict(state)
    iter(fresh)
    assert _names(fresh) == expected[0][1:]
    assert _names(fresh) == expected[1]

    def streaming() -> DataLoader:
        return DataLoader(StreamingDataset(str(shard_dir), shuffle=True, shuffle_buffer=20), batch_size=8)

    full = [list(b["__key__"]) for b in streaming()]
    loader = streaming()
    it = iter(loader)
    head = [list(next(it)["__key__"]) for _ in range(4)]
    state = loader.state_dict()
    loader.close()
    assert head == full[:4]
    fresh = streaming()
    fresh.load_state_dict(state)
    iter(fresh).close()
    assert [list(b["__key__"]) for b in fresh] == full[4:]


class Endless:
    """A batch sampler without len(): pairs of indices, forever."""

    def __iter__(self) -> Iterator[list[int]]:
        for k in itertools.count():
            yield [2 * k % 50, (2 * k + 1) % 50]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_sampler_without_len_is_read_as_batches_are_made(workers: int) -> None:
    loader = DataLoader(Records(), batch_sampler=Endless(), num_workers=workers)
    got = _names(itertools.islice(loader, 40))
    assert got == [[f"rec{2 * k % 50}", f"rec{(2 * k + 1) % 50}"] for k in range(40)]
    loader.close()


# ------------------------------------------------------------------ StreamingDataset: epochs and len()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of different sizes: streams of different lengths, each ending in a partial batch."""
    root = tmp_path_factory.mktemp("uneven")
    for i, n in enumerate([23, 41, 9, 30, 17, 35, 12]):
        (p,) = write_synthetic_shards(root / f"t{i}", num_shards=1, samples_per_shard=n, sample_bytes=64, seed=i)
        p.rename(root / f"shard-{i:06d}.tar")
    return root


def test_len_is_the_number_of_batches_delivered(shard_dir: Path, uneven: Path) -> None:
    # The example of the report: 200 samples in 4 shards, 8 streams, batches of 8.
    loader = DataLoader(StreamingDataset(str(shard_dir)), batch_size=8, num_streams=8)
    assert len(loader) == len(list(loader)) == 28
    checked = 0
    for world, rank in [(1, 0), (2, 1), (3, 0), (3, 2)]:
        for remainder in ("drop", "pad") if world > 1 else ("drop",):
            ds = StreamingDataset(
                str(uneven), shuffle=True, seed=2, shuffle_buffer=20, rank=rank, world_size=world, remainder=remainder
            )
            for streams in (1, 3, 8):
                for batch_size in (4, 7, 16):
                    for drop_last in (False, True):
                        loader = DataLoader(ds, batch_size=batch_size, num_streams=streams, drop_last=drop_last)
                        for epoch in (0, 1):  # shards go to other streams in another epoch
                            ds.set_epoch(epoch)
                            batches = list(loader)
                            sizes = [len(b["__key__"]) for b in batches]
                            where = (world, rank, remainder, streams, batch_size, drop_last, epoch)
                            assert len(loader) == len(batches), where
                            assert sum(sizes) <= len(ds) and (drop_last or sum(sizes) == len(ds)), where
                            assert not drop_last or all(n == batch_size for n in sizes), where
                            checked += len(sizes) > -(-len(ds) // batch_size)
    assert checked > 50, "most cases have more batches than ceil(len(dataset) / batch_size)"
    ds = StreamingDataset(str(uneven), shuffle=True, seed=2, shuffle_buffer=20)
    loader = DataLoader(ds, batch_size=7, num_streams=3, num_workers=2)
    assert len(loader) == len(list(loader)) > -(-len(ds) // 7)


def _keys(batches: Any) -> list[list[str]]:
    return [[f"{u}#{k}" for u, k in zip(b["__url__"], b["__key__"], strict=True)] for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_set_epoch_applies_to_the_next_iteration_only(uneven: Path, workers: int) -> None:
    def make() -> DataLoader:
        ds = StreamingDataset(str(uneven), shuffle=True, seed=5, shuffle_buffer=8)
        return DataLoader(ds, batch_size=4, num_streams=3, num_workers=workers)

    loader = make()
    epochs = []
    for epoch in range(2):
        loader.dataset.set_epoch(epoch)
        epochs.append(_keys(loader))
    assert epochs[0] != epochs[1]
    for after in (0, 1, 5):  # set_epoch right after iter(), after the first batch, later
        loader = make()
        it = iter(loader)
        head = _keys(itertools.islice(it, after))
        loader.dataset.set_epoch(1)
        assert loader.state_dict()["epoch"] == 0
        assert head + _keys(it) == epochs[0], f"set_epoch after {after} batches"
        assert loader.state_dict()["epoch"] == 0
        assert _keys(loader) == epochs[1]


# ------------------------------------------------------------------------------- persistent workers


def _tagged(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A user collate_fn run in the workers: the keys, the worker's PID, and a draw from its RNGs."""
    import os
    import random

    return {
        "keys": [s["__key__"] for s in samples],
        "pid": os.getpid(),
        "draws": (random.random(), float(torch.rand(())), float(np.random.rand())),
    }


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _epochs(loader: DataLoader, ds: StreamingDataset, epochs: range) -> list[list[dict[str, Any]]]:
    out = []
    for epoch in epochs:
        ds.set_epoch(epoch)
        out.append(list(loader))
    return out


def test_persistent_workers_live_across_epochs_and_read_each_epochs_order(shard_dir: Path) -> None:
    def run(persistent: bool) -> list[list[dict[str, Any]]]:
        torch.manual_seed(11)  # the loader's worker seeds derive from it
        ds = StreamingDataset(str(shard_dir), shuffle=True, seed=5, shuffle_buffer=16)
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=_tagged, persistent_workers=persistent)
        try:
            return _epochs(loader, ds, range(3))
        finally:
            loader.close()

    fresh, kept = run(False), run(True)
    keys = [[b["keys"] for b in epoch] for epoch in fresh]
    assert [[b["keys"] for b in epoch] for epoch in kept] == keys, "the same batches, epoch after epoch"
    assert keys[0] != keys[1] != keys[2]
    # Each epoch's workers are seeded as fresh workers of that epoch are, so random transforms
    # (and exact resume, which starts fresh workers) see the same numbers.
    assert [[b["draws"] for b in epoch] for epoch in kept] == [[b["draws"] for b in epoch] for epoch in fresh]
    pids = [{b["pid"] for b in epoch} for epoch in kept]
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2], "the same two worker processes"
    fresh_pids = [{b["pid"] for b in epoch} for epoch in fresh]
    assert not fresh_pids[0] & fresh_pids[1], "without persistent_workers each epoch starts its own"
    assert not any(_alive(pid) for pid in pids[0]), "close() stopped the persistent workers"


def test_persistent_workers_after_a_break_and_a_resume_mid_epoch(shard_dir: Path) -> None:
    ds = StreamingDataset(str(shard_dir), shuffle=True, seed=2, shuffle_buffer=16)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=_tagged, persistent_workers=True)
    full = [b["keys"] for b in loader]
    first_pids = {b["pid"] for b in loader}
    # Stop after 3 batches: those workers are not reused (they may have sent more of that epoch).
    it = iter(loader)
    head = [next(it)["keys"] for _ in range(3)]
    state = loader.state_dict()
    again = list(loader)
    assert [b["keys"] for b in again] == full
    later_pids = {b["pid"] for b in again}
    assert not later_pids & first_pids
    loader.load_state_dict(state)
    assert head + [b["keys"] for b in loader] == full, "resumed exactly where the state was taken"
    loader.close()
    assert not any(_alive(pid) for pid in later_pids)


def test_a_collected_loader_stops_its_persistent_workers(shard_dir: Path) -> None:
    loader = DataLoader(StreamingDataset(str(shard_dir)), batch_size=4, num_workers=2, collate_fn=_tagged,
                        persistent_workers=True)  # fmt: skip
    pids = {b["pid"] for b in loader}
    assert pids and all(_alive(pid) for pid in pids), "kept between epochs"
    del loader
    gc.collect()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _failing_collate(samples: list[dict[str, Any]]) -> Any:
    import os

    raise ValueError(f"cannot collate (worker pid {os.getpid()})")


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_stop_at_once_when_a_worker_fails_while_the_error_is_held(shard_dir: Path, persistent: bool) -> None:
    import re

    loader = DataLoader(StreamingDataset(str(shard_dir)), batch_size=4, num_workers=2, collate_fn=_failing_collate,
                        persistent_workers=persistent)  # fmt: skip
    with pytest.raises(ValueError, match="cannot collate") as info:
        list(loader)
    pid = int(re.search(r"worker pid (\d+)", str(info.value)).group(1))  # type: ignore[union-attr]
    # The error (held here, as by a debugger or a logged traceback) references torch's iterator.
    deadline = time.monotonic() + 3
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the failed iteration's workers are stopped, not left to the garbage collector"
    loader.close()


def test_persistent_workers_started_by_spawn_read_each_epoch(shard_dir: Path) -> None:
    ds = StreamingDataset(str(shard_dir), shuffle=True, seed=4, shuffle_buffer=16)

    def epochs(**kw: Any) -> list[list[str]]:
        loader = DataLoader(ds, batch_size=8, num_workers=2, **kw)
        out = []
        try:
            for epoch in range(3):
                ds.set_epoch(epoch)
                out.append([k for b in loader for k in b["__key__"]])  # each batch freed at once
            return out
        finally:
            loader.close()

    kept = epochs(persistent_workers=True, multiprocessing_context="spawn")  # settings cross by pickle
    assert kept == epochs() and kept[0] != kept[1]
