"""Rank splits with real torch.distributed process groups (gloo) over the real S3 server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastfeed import StreamingDataset
from fastfeed.config import S3Config
from fastfeed.testing.servers import free_port
from fastfeed.testing.shards import write_synthetic_shards


def _batch_len(batch: list[Any]) -> int:
    return len(batch)


def _rank_main(rank: int, world: int, port: int, source: str, s3: S3Config, out: str, remainder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ds = StreamingDataset(source, s3=s3, shuffle=True, seed=11, shuffle_buffer=16, remainder=remainder)
        result = {"len": len(ds), "epochs": []}
        for epoch in range(2):
            ds.set_epoch(epoch)
            result["epochs"].append([f"{s['__url__']}#{s['__key__']}" for s in ds])
        # torch's DataLoader yields a partial batch per worker: the per-worker split must give
        # every rank the same number of batches, or DDP would hang on the last step.
        loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=2, collate_fn=_batch_len)
        result["batches"] = list(loader)
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_two_gloo_ranks_get_disjoint_complete_equal_splits(
    bucket: Any, seaweed: Any, tmp_path: Path, remainder: str
) -> None:
    # Uneven shards, 125 samples (odd: the remainder policy matters). With this seed and epoch,
    # giving workers whole pieces round-robin would give the ranks 9 and 10 batches of 7.
    paths = []
    for i, n in enumerate([29, 31, 7, 21, 37]):
        (p,) = write_synthetic_shards(tmp_path / f"s{i}", num_shards=1, samples_per_shard=n, sample_bytes=300, seed=i)
        paths.append(p.rename(tmp_path / f"shard-{i:06d}.tar"))
    for p in paths:
        bucket.client.upload_file(str(p), bucket.name, f"u/{p.name}")
    prefix = "u/"
    s3 = S3Config(
        endpoint_url=seaweed.endpoint_url,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
        region="us-east-1",
    )
    source = [f"s3://{bucket.name}/{prefix}{p.name}" for p in paths]
    everything = [f"{s['__url__']}#{s['__key__']}" for s in StreamingDataset(source, s3=s3)]
    world = 2
    mp.start_processes(
        _rank_main,
        args=(world, free_port(), source, s3, str(tmp_path), remainder),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    total = len(everything)
    for epoch in range(2):
        splits = [r["epochs"][epoch] for r in results]
        assert len(splits[0]) == len(splits[1]) == results[0]["len"], "ranks must yield equal counts"
        if remainder == "drop":
            assert len(splits[0]) == total // world
            assert not set(splits[0]) & set(splits[1]), "rank splits must be disjoint"
            assert len(set(splits[0]) | set(splits[1])) == total - total % world
        else:
            assert len(splits[0]) == -(-total // world)
            assert set(splits[0]) | set(splits[1]) == set(everything), "pad covers every sample"
    assert results[0]["epochs"][0] != results[0]["epochs"][1], "set_epoch changes the order"
    assert sorted(results[0]["batches"]) == sorted(results[1]["batches"]), "equal batch counts per rank"
    assert sum(results[0]["batches"]) == results[0]["len"]
    os.environ.pop("MASTER_PORT", None)
