"""What the loader's worker processes do first: ``gc.freeze()`` (so a full collection in a
forked worker neither copies nor walks what it inherited), then the user's ``worker_init_fn``
with the worker's id, after torch's seeding, as torch calls it. Checked from inside real worker
processes, for map-style datasets and a StreamingDataset read in workers, fresh and persistent."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import fastfeed
from fastfeed.testing.shards import write_synthetic_shards


class Probe(torch.utils.data.Dataset[Any]):
    """Sample i: the worker's pid, its freeze count, and what its worker_init_fn recorded."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"i": i, "pid": os.getpid(), "frozen": gc.get_freeze_count(), "init": _INIT.get("id", -1)}


_INIT: dict[str, int] = {}


def record_init(worker_id: int) -> None:
    _INIT["id"] = worker_id


def mark(sample: dict[str, Any]) -> dict[str, Any]:
    return {**sample, "frozen": str(gc.get_freeze_count()).encode(), "pid": str(os.getpid()).encode()}


@pytest.mark.parametrize("persistent", [False, True])
def test_map_style_workers_freeze_then_run_the_users_init(persistent: bool) -> None:
    loader = fastfeed.DataLoader(
        Probe(), batch_size=3, num_workers=2, worker_init_fn=record_init, persistent_workers=persistent
    )
    try:
        for _ in range(2):  # a persistent pool's second epoch runs in the same workers
            batches = list(loader)
            pids = {int(p) for b in batches for p in b["pid"]}
            assert os.getpid() not in pids and len(pids) == 2
            assert all(int(f) > 0 for b in batches for f in b["frozen"]), "objects the worker inherited are frozen"
            assert sorted(int(x) for b in batches for x in b["init"]) == [0] * 6 + [1] * 6
    finally:
        loader.close()
    assert gc.get_freeze_count() == 0, "the training process itself is left alone"


def test_streaming_workers_freeze_too(tmp_path: Path) -> None:
    paths = write_synthetic_shards(tmp_path, num_shards=2, samples_per_shard=6, sample_bytes=100)
    ds = fastfeed.StreamingDataset([str(p) for p in paths]).map(mark)
    loader = fastfeed.DataLoader(ds, batch_size=4, num_workers=2, worker_mode="process", collate_fn=list)
    try:
        samples = [s for b in loader for s in b]
    finally:
        loader.close()
    assert len(samples) == 12
    assert {int(s["pid"]) for s in samples} - {os.getpid()}, "read in worker processes"
    assert all(int(s["frozen"]) > 0 for s in samples)
