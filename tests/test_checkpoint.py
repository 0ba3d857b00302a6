"""fastfeed.Checkpointer against the real S3 server (and a local directory)."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fastfeed.checkpoint.checkpointer import Checkpointer
from fastfeed.config import S3Config
from fastfeed.errors import AccessDeniedError, BucketNotFoundError, CheckpointError, CorruptCheckpointError


def s3_config(bucket: Any, endpoint: str | None = None) -> S3Config:
    return S3Config(
        endpoint_url=endpoint or bucket.server.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
    )


def training_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "step": 7,
        "loader": {"epoch": 1, "streams": {"0": {"block": 2}}},
        "extra": (np.arange(6, dtype=np.float64).reshape(2, 3), b"raw", None, float("inf")),
    }


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.fixture(params=["s3", "local"])
def target(request: Any, tmp_path: Path) -> tuple[str, S3Config | None]:
    if request.param == "local":
        return str(tmp_path / "ckpt"), None
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket.name}/runs/exp1/", s3_config(bucket)


def test_round_trip_is_bit_exact_and_the_loop_may_mutate_right_after(target: tuple[str, S3Config | None]) -> None:
    url, s3 = target
    state = training_state()
    reference = json.loads(json.dumps({"k": 1}))  # noqa: F841 - plain values are captured too
    expected = {k: v for k, v in training_state().items()}
    with Checkpointer(url, s3=s3) as ckpt:
        handle = ckpt.save(state, step=7, metadata={"lr": 1e-3})
        with torch.no_grad():  # the training loop goes on at once
            for tensor in state["model"].values():
                tensor.add_(1.0)
        info = handle.result(timeout=60)
        assert info is not None and info.step == 7 and info.metadata == {"lr": 1e-3}
        loaded = ckpt.load()
        assert ckpt.loaded == info
    assert same(loaded, expected)
    assert isinstance(loaded["model"], type(state["model"]))


def test_keep_last_deletes_older_checkpoints_after_the_newer_commit(target: tuple[str, S3Config | None]) -> None:
    url, s3 = target
    with Checkpointer(url, s3=s3, keep_last=2) as ckpt:
        for step in range(1, 6):
            ckpt.save({"w": torch.full((1000,), float(step))}, step=step).result(timeout=60)
        ckpt.wait()  # retention runs right after each commit
        assert [i.step for i in ckpt.list()] == [4, 5]
        assert torch.equal(ckpt.load()["w"], torch.full((1000,), 5.0))
        assert torch.equal(ckpt.load(step=4)["w"], torch.full((1000,), 4.0))
        with pytest.raises(Exception, match="step 3"):
            ckpt.load(step=3)


def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(bucket: Any, caplog: Any) -> None:
    url = f"s3://{bucket.name}/runs/c/"
    with Checkpointer(url, s3=s3_config(bucket)) as ckpt:
        ckpt.save({"w": torch.ones(100)}, step=1).result(timeout=60)
        ckpt.save({"w": torch.zeros(100)}, step=2).result(timeout=60)
        keys = [
            o["Key"]
            for o in bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="runs/c/step-000000000002/")["Contents"]
        ]
        (data_key,) = [k for k in keys if k.endswith(".bin")]
        body = bytearray(bucket.client.get_object(Bucket=bucket.name, Key=data_key)["Body"].read())
        body[10] ^= 0xFF  # one flipped bit
        bucket.client.put_object(Bucket=bucket.name, Key=data_key, Body=bytes(body))
        with caplog.at_level(logging.WARNING):
            state = ckpt.load()
        assert torch.equal(state["w"], torch.ones(100)) and ckpt.loaded is not None and ckpt.loaded.step == 1
        assert "step 2 is unusable" in caplog.text and "CRC32" in caplog.text
        with pytest.raises(CorruptCheckpointError, match="CRC32"):
            ckpt.load(step=2)
        bucket.client.delete_object(Bucket=bucket.name, Key=data_key)  # now it is missing
        assert torch.equal(ckpt.load()["w"], torch.ones(100))
        # Training resumed from step 1 reaches step 2 again: the new save replaces the bad one.
        with caplog.at_level(logging.WARNING):
            ckpt.save({"w": torch.full((100,), 2.0)}, step=2).result(timeout=60)
        assert "replacing the unusable checkpoint of step 2" in caplog.text
        assert torch.equal(ckpt.load()["w"], torch.full((100,), 2.0)) and ckpt.loaded.step == 2
        listed = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="runs/c/step-000000000002/")["Contents"]
        assert len(listed) == 2, "one manifest and one data object: nothing of the bad one is left"
    dup = Checkpointer(url, s3=s3_config(bucket))
    with pytest.raises(CheckpointError, match="already committed"):  # a good checkpoint is never replaced
        dup.save({"w": torch.ones(100)}, step=2).result(timeout=60)
    with pytest.raises(CheckpointError, match="earlier checkpoint save failed"):
        dup.close()


def test_bad_buckets_and_credentials_fail_at_construction(bucket: Any, seaweed: Any) -> None:
    start = time.monotonic()
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-ff"):
        Checkpointer("s3://no-such-bucket-ff/x/", s3=s3_config(bucket))
    wrong = S3Config(endpoint_url=seaweed.endpoint_url, access_key_id="nobody", secret_access_key="wrong")
    with pytest.raises(AccessDeniedError):
        Checkpointer(f"s3://{bucket.name}/x/", s3=wrong)
    assert time.monotonic() - start < 30


def test_saving_a_committed_step_again_is_an_error(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save({"a": torch.ones(3)}, step=1).result(timeout=30)
        handle = ckpt.save({"a": torch.zeros(3)}, step=1)
        with pytest.raises(CheckpointError, match="already committed"):
            handle.result(timeout=30)
        with pytest.raises(CheckpointError, match="earlier checkpoint save failed"):
            ckpt.save({"a": torch.zeros(3)}, step=2)
        assert torch.equal(ckpt.load()["a"], torch.ones(3)), "the committed step is intact"


@pytest.mark.parametrize("policy", ["skip", "replace", "wait"])
def test_saves_while_busy_follow_the_policy(bucket: Any, fault_proxy: Any, policy: str) -> None:
    fault_proxy.set_latency(300)  # every request waits: a save (list, PUT, PUT manifest, list) takes > 1 s
    url = f"s3://{bucket.name}/runs/{policy}/"
    with Checkpointer(url, s3=s3_config(bucket, fault_proxy.endpoint_url), on_busy=policy) as ckpt:
        handles = [ckpt.save({"w": torch.full((500_000,), 1.0)}, step=1)]
        time.sleep(0.3)  # step 1 is uploading now (a queued, unstarted save could be replaced too)
        handles += [ckpt.save({"w": torch.full((500_000,), float(i))}, step=i) for i in (2, 3)]
        ckpt.wait()
        results = [h.result() for h in handles]
        stats = ckpt.stats()
        steps = [i.step for i in ckpt.list()]
    if policy == "skip":
        assert results[0] is not None and results[1] is None and results[2] is None and steps == [1]
        assert stats.skipped == 2
    elif policy == "replace":
        assert results[1] is None and results[2] is not None and steps == [1, 3] and stats.replaced == 1
    else:
        assert steps == [1, 2, 3] and stats.wait_s > 0.5, stats


_SAVER = """
import sys, torch
from fastfeed.checkpoint.checkpointer import Checkpointer
from fastfeed.config import S3Config
url, endpoint, key, secret = sys.argv[1:5]
ckpt = Checkpointer(url, s3=S3Config(endpoint_url=endpoint, access_key_id=key, secret_access_key=secret),
                    keep_last=2, part_size="5MiB")
step = 1 + max([i.step for i in ckpt.list()], default=0)
print("saving", step, flush=True)
ckpt.save({"w": torch.full((3_000_000,), float(step)), "step": step}, step=step).result()
print("committed", step, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_uploads_never_leaves_a_partial_checkpoint(bucket: Any, fault_proxy: Any) -> None:
    url = f"s3://{bucket.name}/runs/kill/"
    cfg = s3_config(bucket, fault_proxy.endpoint_url)
    args = [sys.executable, "-c", _SAVER, url, fault_proxy.endpoint_url, cfg.access_key_id, cfg.secret_access_key]
    subprocess.run(args, check=True, timeout=120, capture_output=True)  # step 1, committed
    fault_proxy.set_latency(200)  # a save is ~8 requests (~1.6 s): kill it at random points
    rng = random.Random(0)
    committed = {1}
    cut_short = 0
    for _ in range(6):
        job = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        try:
            assert job.stdout is not None
            started = job.stdout.readline()
            assert started.startswith("saving"), started
            time.sleep(rng.uniform(0.0, 1.8))  # somewhere in the upload, or just after it
            job.kill()
            out, _ = job.communicate(timeout=30)
        finally:
            job.kill()
        done = {int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")}
        cut_short += not done
        committed |= done
        with Checkpointer(url, s3=s3_config(bucket)) as ckpt:
            infos = ckpt.list()
            state = ckpt.load()
        newest = max(i.step for i in infos)
        assert newest >= max(committed), "a committed checkpoint never disappears"
        assert state["step"] == newest and torch.equal(state["w"], torch.full((3_000_000,), float(newest)))
        assert len(infos) <= 2 + 1, "retention holds (one more only while a save was cut short)"
    fault_proxy.set_latency(0)
    assert cut_short >= 2, "most kills should land inside an upload"


def test_a_failed_upload_keeps_the_older_checkpoints_and_leaves_nothing_committed(
    bucket: Any, fault_proxy: Any
) -> None:
    from fastfeed.config import RetryConfig

    url = f"s3://{bucket.name}/runs/fail/"
    cfg = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
        retry=RetryConfig(max_attempts=2, base_delay=0.01, max_delay=0.02),
    )
    with Checkpointer(url, s3=cfg, keep_last=1, part_size="5MiB") as ckpt:
        ckpt.save({"w": torch.ones(10)}, step=1).result(timeout=60)
        # Every part upload of the next (multipart) save fails: the store answers 500.
        fault_proxy.inject(
            status=500, code="InternalError", count=None, method="PUT", path_regex=r"step-000000000002/data-"
        )
        handle = ckpt.save({"w": torch.zeros(3_000_000)}, step=2)
        with pytest.raises(Exception, match=r"InternalError|500"):
            handle.result(timeout=60)
        fault_proxy.clear_faults()
        assert [i.step for i in ckpt.list()] == [1], "retention ran only after a commit: step 1 is kept"
        assert torch.equal(ckpt.load()["w"], torch.ones(10))
        keys = [
            o["Key"] for o in bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="runs/fail/").get("Contents", [])
        ]
        assert not any("step-000000000002" in k for k in keys), keys
        uploads = bucket.client.list_multipart_uploads(Bucket=bucket.name, Prefix="runs/fail/").get("Uploads", [])
        assert uploads == [], "the failed multipart upload was aborted"
        with pytest.raises(CheckpointError, match="earlier checkpoint save failed"):
            ckpt.wait()
        ckpt.save({"w": torch.full((10,), 3.0)}, step=3).result(timeout=60)  # and saving works again
        ckpt.wait()
        assert [i.step for i in ckpt.list()] == [3]


def test_a_checkpointer_that_only_loads_writes_nothing(bucket: Any, fault_proxy: Any) -> None:
    """Construction sends one listing (a missing bucket or wrong credentials still fail there);
    the write probe and the clean-up of abandoned uploads wait for the first save, so a process
    that only loads sends no PUT, POST or DELETE (and pays none of their round trips)."""
    url = f"s3://{bucket.name}/runs/load-only/"
    with Checkpointer(url, s3=s3_config(bucket)) as writer:
        writer.save({"w": torch.arange(10.0)}, step=5).result(timeout=60)
    fault_proxy.reset_counters()
    with Checkpointer(url, s3=s3_config(bucket, fault_proxy.endpoint_url)) as reader:
        assert fault_proxy.count() == 1 and fault_proxy.count("GET") == 1, [r.path for r in fault_proxy.requests()]
        assert torch.equal(reader.load()["w"], torch.arange(10.0)) and reader.loaded.step == 5
    writes = [r for r in fault_proxy.requests() if r.method in ("PUT", "POST", "DELETE")]
    assert writes == [], [(r.method, r.path) for r in writes]
    # The first save probes, then writes; the probe's object is gone again.
    with Checkpointer(url, s3=s3_config(bucket, fault_proxy.endpoint_url)) as again:
        again.save({"w": torch.ones(3)}, step=6).result(timeout=60)
        assert again.conditional_writes
    keys = [o["Key"] for o in bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="runs/load-only/")["Contents"]]
    assert all("step-" in k for k in keys), keys
