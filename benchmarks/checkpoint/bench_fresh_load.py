#!/usr/bin/env python
"""A fresh process that only loads a checkpoint: time to ``Checkpointer()`` and to ``load()``.

SeaweedFS on 127.0.0.1 behind a delaying proxy (``--latency-ms`` before every response's first
byte). One checkpoint of ``--size`` bytes is saved first; then, ``--repeats`` times, alternating,
a new Python process imports torch and fastfeed and:

* ``load-only``: ``Checkpointer(url)`` then ``load()`` (construction lists the prefix once; the
  write probe waits for a first save that never comes);
* ``probe-first``: the same, but asks ``ckpt.conditional_writes`` right after construction, which
  runs the write probe (list, conditional PUTs, DELETE) there, as every construction did before.

Reports the medians of the child's own timings (imports, construction, load) and of the
requests the proxy saw per process.

    python benchmarks/checkpoint/bench_fresh_load.py --size 256MiB --latency-ms 20 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from fastfeed.checkpoint.checkpointer import Checkpointer
from fastfeed.config import S3Config, parse_size
from fastfeed.testing.proxy import FaultProxy
from fastfeed.testing.servers import SeaweedServer

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from fastfeed.checkpoint.checkpointer import Checkpointer
t1 = time.perf_counter()
ckpt = Checkpointer(sys.argv[1])
if sys.argv[2] == "probe-first":
    ckpt.conditional_writes
t2 = time.perf_counter()
state = ckpt.load()
t3 = time.perf_counter()
ckpt.close()
print(json.dumps({"import_s": t1 - t0, "construct_s": t2 - t1, "load_s": t3 - t2,
                  "bytes": sum(v.numel() * v.element_size() for v in state.values())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    size = parse_size(args.size, name="--size")
    with SeaweedServer() as server, FaultProxy(server.endpoint_url) as proxy:
        bucket = server.create_bucket("ckpt-fresh-load")
        url = f"s3://{bucket}/run/"
        direct = S3Config(endpoint_url=server.endpoint_url, access_key_id=server.access_key,
                          secret_access_key=server.secret_key)  # fmt: skip
        with Checkpointer(url, s3=direct) as ckpt:
            ckpt.save({f"w{i}": torch.rand(size // 4 // 8) for i in range(8)}, step=1).result()
        proxy.set_latency(args.latency_ms)
        env = dict(
            os.environ,
            AWS_ENDPOINT_URL=proxy.endpoint_url,
            AWS_ACCESS_KEY_ID=server.access_key,
            AWS_SECRET_ACCESS_KEY=server.secret_key,
            AWS_REGION="us-east-1",
        )
        runs: dict[str, list[dict[str, float]]] = {"load-only": [], "probe-first": []}
        for _ in range(args.repeats):
            for mode in runs:
                proxy.reset_counters()
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, url, mode], env=env, check=True, capture_output=True, text=True
                )
                result = json.loads(out.stdout.strip().splitlines()[-1])
                result["requests"] = proxy.count()
                result["writes"] = sum(r.method in ("PUT", "POST", "DELETE") for r in proxy.requests())
                runs[mode].append(result)
    print(f"{args.size} checkpoint, {args.latency_ms:g} ms before each response, {args.repeats} fresh processes each")
    for mode, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(
            f"{mode:12s} imports {med['import_s']:.3f} s  Checkpointer() {med['construct_s']:.3f} s  "
            f"load() {med['load_s']:.3f} s  requests {med['requests']:.0f} (writes {med['writes']:.0f})"
        )


if __name__ == "__main__":
    main()
