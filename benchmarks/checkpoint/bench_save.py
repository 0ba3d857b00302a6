#!/usr/bin/env python
"""Checkpoint stall and upload throughput: fastfeed.Checkpointer vs the alternatives, same run.

State: ``--size`` bytes of float32 tensors in ``--tensors`` tensors (a model-like dict). For each
repeat (order rotated), measures:

* ``clone``: a plain in-memory copy of every tensor (``t.clone()``): the floor for a snapshot;
* ``fastfeed``: the training-loop stall of ``Checkpointer.save()`` (snapshot into the reused
  staging buffer), and, separately, the background time until the commit (sha256, multipart
  upload, manifest), as upload MB/s;
* ``sync``: the synchronous baseline: ``torch.save`` to a buffer, then an upload with boto3's
  managed multipart transfer (same part size and concurrency); the loop stalls for all of it;
* ``raw-put``: the upload alone of the same number of bytes with boto3's managed multipart
  transfer (same part size and concurrency): the throughput ceiling for the fastfeed upload;
* ``dcp-async``: ``torch.distributed.checkpoint.async_save`` to a local directory (a
  one-process gloo group): its stall, and its time until the save completed.

SeaweedFS runs on 127.0.0.1 (started and stopped here). Reports medians and ratios.

    python benchmarks/checkpoint/bench_save.py --size 256MiB --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fastfeed
from fastfeed.config import S3Config, parse_size
from fastfeed.testing.servers import SeaweedServer, free_port


def make_state(size: int, tensors: int) -> dict[str, torch.Tensor]:
    per = size // 4 // tensors
    torch.manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per) for i in range(tensors)}


def bench_clone(state: dict[str, torch.Tensor]) -> dict[str, float]:
    start = time.perf_counter()
    copies = {k: v.clone() for k, v in state.items()}
    stall = time.perf_counter() - start
    del copies
    return {"stall_s": stall}


def bench_fastfeed(ckpt: fastfeed.Checkpointer, state: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    start = time.perf_counter()
    handle = ckpt.save({"model": state}, step=step)
    stall = time.perf_counter() - start
    handle.result()
    total = time.perf_counter() - start
    return {"stall_s": stall, "commit_s": total - stall, "total_s": total}


def bench_sync(client: Any, bucket: str, state: dict[str, torch.Tensor], step: int, transfer: Any) -> dict[str, float]:
    start = time.perf_counter()
    buf = io.BytesIO()
    torch.save(state, buf)
    serialized = time.perf_counter() - start
    buf.seek(0)
    client.upload_fileobj(buf, bucket, f"sync/step-{step}.pt", Config=transfer)
    total = time.perf_counter() - start
    return {"stall_s": total, "serialize_s": serialized}


def bench_raw_put(client: Any, bucket: str, nbytes: int, step: int, transfer: Any) -> dict[str, float]:
    data = io.BytesIO(bytes(nbytes))
    start = time.perf_counter()
    client.upload_fileobj(data, bucket, f"raw/step-{step}.bin", Config=transfer)
    return {"upload_s": time.perf_counter() - start}


def bench_dcp(state: dict[str, torch.Tensor], out: Path, step: int) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    start = time.perf_counter()
    future = dcp.async_save({"model": state}, checkpoint_id=str(out / f"step-{step}"))
    stall = time.perf_counter() - start
    future.result()
    return {"stall_s": stall, "total_s": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB", help="bytes of tensors in the state")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part-size", default="32MiB")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-dcp", action="store_true")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    size, part = parse_size(args.size), parse_size(args.part_size)
    state = make_state(size, args.tensors)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    runs: dict[str, list[dict[str, float]]] = {}
    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=args.concurrency)
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer() as server:
        bucket = server.create_bucket("ckptbench")
        client = server.client()
        s3 = S3Config(
            endpoint_url=server.endpoint_url, access_key_id=server.access_key, secret_access_key=server.secret_key
        )
        ckpt = fastfeed.Checkpointer(
            f"s3://{bucket}/ff/", s3=s3, keep_last=2, part_size=part, max_concurrency=args.concurrency
        )
        dcp_ready = False
        if not args.no_dcp:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
            dcp_ready = True
        try:
            bench_fastfeed(ckpt, state, 0)  # warm-up: staging buffer, connections
            kinds = ["clone", "fastfeed", "sync", "raw-put"] + (["dcp-async"] if dcp_ready else [])
            for repeat in range(args.repeats):
                order = kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]
                for kind in order:
                    step = repeat + 1
                    if kind == "clone":
                        r = bench_clone(state)
                    elif kind == "fastfeed":
                        r = bench_fastfeed(ckpt, state, step)
                    elif kind == "sync":
                        r = bench_sync(client, bucket, state, step, transfer)
                    elif kind == "raw-put":
                        r = bench_raw_put(client, bucket, nbytes, step, transfer)
                    else:
                        r = bench_dcp(state, Path(tmp), step)
                    runs.setdefault(kind, []).append(r)
                    print(f"  repeat {repeat} {kind:10s} " + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
        finally:
            ckpt.close()
            if dcp_ready:
                import torch.distributed as dist

                dist.destroy_process_group()

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    mb = nbytes / 1e6
    summary = {
        "clone_stall_s": med("clone", "stall_s"),
        "fastfeed_stall_s": med("fastfeed", "stall_s"),
        "fastfeed_commit_s": med("fastfeed", "commit_s"),
        "sync_stall_s": med("sync", "stall_s"),
        "raw_put_s": med("raw-put", "upload_s"),
    }
    summary["stall_vs_clone"] = summary["fastfeed_stall_s"] / summary["clone_stall_s"]
    summary["sync_over_fastfeed_stall"] = summary["sync_stall_s"] / summary["fastfeed_stall_s"]
    summary["fastfeed_upload_MBps"] = mb / summary["fastfeed_commit_s"]
    summary["raw_put_MBps"] = mb / summary["raw_put_s"]
    summary["upload_vs_raw"] = summary["fastfeed_upload_MBps"] / summary["raw_put_MBps"]
    if "dcp-async" in runs:
        summary["dcp_stall_s"] = med("dcp-async", "stall_s")
        summary["dcp_total_s"] = med("dcp-async", "total_s")
    print(f"\nstate: {mb:.0f} MB in {args.tensors} tensors; medians of {args.repeats}")
    for key, value in summary.items():
        print(f"  {key:28s} {value:10.3f}")
    if args.json_path:
        result = {
            "command": " ".join(["benchmarks/checkpoint/bench_save.py", *sys.argv[1:]]),
            "machine": {"platform": platform.platform(), "torch": torch.__version__},
            "config": vars(args),
            "bytes": nbytes,
            "median": summary,
            "runs": runs,
        }
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
