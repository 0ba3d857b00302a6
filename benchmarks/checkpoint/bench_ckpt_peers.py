#!/usr/bin/env python
"""Checkpoints to S3 against s3torchconnector's DCP storage, same run: the training loop's stall,
the client CPU per GiB of a save, and a fresh process's load.

State: ``--size`` bytes of float32 in 16 tensors. SeaweedFS on 127.0.0.1 (started and stopped
here), plain HTTP. Every measurement runs in a fresh child process (the contenders' imports,
clients and threads are their own), ``--repeats`` times, the order rotated each round:

* ``save``: each child saves twice and reports the second save (the first pays the client set-up
  and the probes, as a training job's first save does; fastfeed's writers are made once per
  run, s3torchconnector's once per checkpoint path, as each one's README shows): the stall (the call's time), the time
  until the upload committed, and the process's CPU seconds (all threads) from the call to the
  commit, per GiB of state;
* ``load``: a fresh process imports torch and the library, builds the reader, and loads the
  newest save (into tensors of the right shapes where the API takes a template, as DCP does).

Contenders: ``fastfeed`` (``Checkpointer.save`` / ``load``), ``fastfeed-dcp`` (``dcp.async_save``
/ ``dcp.load`` with :class:`~fastfeed.checkpoint.dcp.FastfeedStorageWriter` / ``Reader``) and
``s3torchconnector-dcp`` (``dcp.async_save`` / ``dcp.load`` with its ``S3StorageWriter`` /
``S3StorageReader``; it runs with ``--peer-python``, a Python that has s3torchconnector), and with
``--baseline-site``, fastfeed's two from another install (before/after a change, same run). Its DCP
classes take a region, not an endpoint: the bench gives their ``S3FileSystem`` an ``S3Client``
made with the endpoint and path-style addressing, the same client its own constructor makes.

    python benchmarks/checkpoint/bench_ckpt_peers.py --size 256MiB --repeats 3 \\
        --peer-python /work/peers-venv/bin/python --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from fastfeed.config import parse_size
from fastfeed.testing.servers import SeaweedServer

CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
args = json.loads(sys.argv[1])
import torch
import torch.distributed.checkpoint as dcp

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def make_state(fill):
    n = args["size"] // 4 // 16
    return {f"layer{i}.weight": torch.full((n,), float(fill + i)) for i in range(16)}

who, what, url = args["who"], args["what"], args["url"]
os.environ.update(AWS_ACCESS_KEY_ID=args["key"], AWS_SECRET_ACCESS_KEY=args["secret"], AWS_REGION="us-east-1")

if who.startswith("fastfeed"):
    from fastfeed.config import S3Config
    s3 = S3Config(endpoint_url=args["endpoint"], access_key_id=args["key"], secret_access_key=args["secret"])
    if who == "fastfeed":
        from fastfeed.checkpoint.checkpointer import Checkpointer
    else:
        from fastfeed.checkpoint.dcp import FastfeedStorageReader, FastfeedStorageWriter
else:
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp import S3StorageReader, S3StorageWriter
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    def with_endpoint(storage, **kw):
        client = S3Client("us-east-1", endpoint=args["endpoint"], s3client_config=S3ClientConfig(force_path_style=True))
        storage.fs = S3FileSystem("us-east-1", s3_client=client, **kw)
        storage.path = storage.fs.init_path(url)
        return storage
t_import = time.perf_counter() - t0

out = {"import_s": t_import}
if what == "save":
    stalls, commits, cpus = [], [], []
    if who == "fastfeed":
        ckpt = Checkpointer(url, s3=s3)
    elif who == "fastfeed-dcp":
        writer = FastfeedStorageWriter(url, s3=s3)  # one per run, a checkpoint_id per save (README)
    for step in (1, 2):
        state = make_state(step)
        c0, w0 = cpu(), time.perf_counter()
        if who == "fastfeed":
            handle = ckpt.save(state, step=step)
            w1 = time.perf_counter()
            handle.result()
        elif who == "fastfeed-dcp":
            pending = dcp.async_save(state, storage_writer=writer, checkpoint_id=f"step-{step}")
            w1 = time.perf_counter()
            getattr(pending, "upload_completion", pending).result()
        else:  # a writer per checkpoint path, as its README saves
            writer = with_endpoint(S3StorageWriter("us-east-1", url + f"step-{step}/"))
            pending = dcp.async_save(state, storage_writer=writer)
            w1 = time.perf_counter()
            getattr(pending, "upload_completion", pending).result()
        w2, c2 = time.perf_counter(), cpu()
        stalls.append(w1 - w0)
        commits.append(w2 - w0)
        cpus.append(c2 - c0)
    if who == "fastfeed":
        ckpt.close()
    elif who == "fastfeed-dcp":
        writer.close()
    out.update(stall_s=stalls[-1], commit_s=commits[-1], cpu_s=cpus[-1], first_commit_s=commits[0])
else:
    c0, w0 = cpu(), time.perf_counter()
    if who == "fastfeed":
        ckpt = Checkpointer(url, s3=s3)
        w1 = time.perf_counter()
        state = ckpt.load()
        ckpt.close()
    elif who == "fastfeed-dcp":
        state = make_state(0)
        reader = FastfeedStorageReader(url, s3=s3)
        w1 = time.perf_counter()
        dcp.load(state, storage_reader=reader, checkpoint_id="step-2")
        reader.close()
    else:
        state = make_state(0)
        reader = with_endpoint(S3StorageReader("us-east-1", url + "step-2/"), reader_constructor=None)
        w1 = time.perf_counter()
        dcp.load(state, storage_reader=reader)
    w2, c2 = time.perf_counter(), cpu()
    assert float(state["layer3.weight"][0]) == 5.0, "loaded the second save"
    out.update(construct_s=w1 - w0, load_s=w2 - w1, cpu_s=c2 - c0, total_s=time.perf_counter() - t0)
print(json.dumps(out))
"""

WHO = ("fastfeed", "fastfeed-dcp", "s3torchconnector-dcp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-python", default=None, help="a Python with s3torchconnector (skipped without)")
    ap.add_argument(
        "--baseline-site",
        default=None,
        help="a directory with another fastfeed installed (pip install --no-deps --target DIR): its "
        "Checkpointer and DCP storage run too, as fastfeed@base and fastfeed-dcp@base",
    )
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    size = parse_size(args.size, name="--size")
    who = [w for w in WHO if args.peer_python or not w.startswith("s3torch")]
    if args.baseline_site:
        who += ["fastfeed@base", "fastfeed-dcp@base"]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {w: {"save": [], "load": []} for w in who}
    with SeaweedServer() as server, tempfile.TemporaryDirectory() as tmp:
        bucket = server.create_bucket("ckpt-peers")
        for r in range(args.repeats):
            order = who[r % len(who) :] + who[: r % len(who)]
            for what in ("save", "load"):
                for w in order:
                    child_args = {
                        "who": w.removesuffix("@base"),
                        "what": what,
                        "url": f"s3://{bucket}/{w}/r{r}/",
                        "endpoint": server.endpoint_url,
                        "key": server.access_key,
                        "secret": server.secret_key,
                        "size": size,
                    }
                    python = args.peer_python if w.startswith("s3torch") else sys.executable
                    env = dict(os.environ, TMPDIR=tmp)
                    if w.endswith("@base"):
                        env["PYTHONPATH"] = args.baseline_site
                    done = subprocess.run(
                        [python, "-c", CHILD, json.dumps(child_args)],
                        capture_output=True, text=True, env=env, timeout=600,
                    )  # fmt: skip
                    if done.returncode != 0:
                        raise SystemExit(f"{w} {what} failed:\n{done.stderr[-3000:]}")
                    runs[w][what].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(w, what, runs[w][what][-1], flush=True)
    gib = size / 2**30
    summary: dict[str, dict[str, float]] = {}
    for w in who:
        saves, loads = runs[w]["save"], runs[w]["load"]

        def med(rows: list[dict[str, float]], key: str) -> float:
            return statistics.median(row[key] for row in rows)

        summary[w] = {
            "stall_s": med(saves, "stall_s"),
            "commit_s": med(saves, "commit_s"),
            "save_cpu_s_per_gib": med(saves, "cpu_s") / gib,
            "load_import_s": med(loads, "import_s"),
            "load_construct_s": med(loads, "construct_s"),
            "load_s": med(loads, "load_s"),
            "load_total_s": med(loads, "total_s"),
            "load_cpu_s_per_gib": med(loads, "cpu_s") / gib,
        }
    print(
        f"{'':22} {'stall':>8} {'commit':>8} {'save CPU/GiB':>13} {'import':>7} {'ctor+load':>10} {'load CPU/GiB':>13}"
    )
    for w, s in summary.items():
        print(
            f"{w:22} {s['stall_s'] * 1000:6.0f}ms {s['commit_s']:7.2f}s {s['save_cpu_s_per_gib']:12.2f}s "
            f"{s['load_import_s']:6.2f}s {s['load_construct_s'] + s['load_s']:9.2f}s {s['load_cpu_s_per_gib']:12.2f}s"
        )
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"size": size, "repeats": args.repeats, "summary": summary, "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()
