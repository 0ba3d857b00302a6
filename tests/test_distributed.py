"""Rank splits with real torch.distributed process groups (gloo) over the real S3 server."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from fastfeed import StreamingDataset
from fastfeed.config import S3Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, source: str, s3: S3Config, out: str, remainder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ds = StreamingDataset(source, s3=s3, shuffle=True, seed=11, shuffle_buffer=16, remainder=remainder)
        result = {"len": len(ds), "epochs": []}
        for epoch in range(2):
            ds.set_epoch(epoch)
            result["epochs"].append([f"{s['__url__']}#{s['__key__']}" for s in ds])
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_two_gloo_ranks_get_disjoint_complete_equal_splits(
    s3_shards: Any, seaweed: Any, tmp_path: Path, remainder: str
) -> None:
    bucket, prefix, paths = s3_shards
    s3 = S3Config(
        endpoint_url=seaweed.endpoint_url,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
        region="us-east-1",
    )
    # An odd total, so the remainder policy matters: drop one shard's last sample.
    source = [f"s3://{bucket}/{prefix}{p.name}" for p in paths]
    everything = [f"{s['__url__']}#{s['__key__']}" for s in StreamingDataset(source, s3=s3)]
    world = 2
    mp.start_processes(
        _rank_main,
        args=(world, _free_port(), source, s3, str(tmp_path), remainder),
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
    os.environ.pop("MASTER_PORT", None)
