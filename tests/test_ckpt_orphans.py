"""What dead or failed writers leave behind is cleaned up, and only that (issue 13, part 5):
incomplete multipart uploads (a writer killed with -9 mid-upload, an abort that failed) and data
objects no manifest names, removed once older than ``orphan_age`` by the next writer of the
prefix (Checkpointer, ShardWriter, the DCP writer) and by ``close()`` after a failure.

Real SeaweedFS (moto reports every upload as initiated in 2010, so age tests use SeaweedFS),
real subprocesses killed with SIGKILL, the FaultProxy to hold or fail requests. Nothing patched.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckpt_targets import Target, make_target
from fastfeed.checkpoint.checkpointer import Checkpointer
from fastfeed.checkpoint.dcp import FastfeedStorageReader, FastfeedStorageWriter
from fastfeed.config import RetryConfig, S3Config
from fastfeed.errors import CheckpointError
from fastfeed.shards import write_shards

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

# orphan_age of the cleaning writer, seconds: its own saves must finish within half of it (or
# they do not commit), and what a test plants "young" must stay younger than it while that
# writer saves; 4 s leaves room on a loaded 2-core machine (1 s did not).
AGE = 4.0
PAST_AGE = 5.5  # how long a test waits so that what it planted is older than AGE (clocks in 1 s steps)


def seaweed_target(bucket: Any) -> Target:
    return Target("seaweed", f"s3://{bucket.name}/", bucket.server, bucket.client)


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


_SAVER = """
import sys, torch
from fastfeed.checkpoint.checkpointer import Checkpointer
from fastfeed.config import S3Config
url, endpoint, key, secret = sys.argv[1:5]
s3 = S3Config(endpoint_url=endpoint, access_key_id=key, secret_access_key=secret)
ckpt = Checkpointer(url, s3=s3, part_size="5MiB")
print("saving", flush=True)
ckpt.save({"w": torch.ones(3_000_000)}, step=7).result()
print("committed", flush=True)
"""


@pytest.mark.slow
def test_kill_9_mid_multipart_upload_then_the_next_checkpointer_aborts_it(
    bucket: Any, fault_proxy: Any, caplog: Any
) -> None:
    target = seaweed_target(bucket)
    prefix = "runs/killed/"
    proxied = target.s3(fault_proxy.endpoint_url)
    assert proxied is not None
    # Every part reaches the store, but no answer comes back: the writer is mid-upload for a minute.
    fault_proxy.inject_stall(60.0, count=None, method="PUT", path_regex=r"step-000000000007/data-")
    args = [sys.executable, "-c", _SAVER, target.url(prefix), fault_proxy.endpoint_url]
    job = subprocess.Popen(
        [*args, proxied.access_key_id or "", proxied.secret_access_key or ""], stdout=subprocess.PIPE
    )
    try:
        wait_for(lambda: fault_proxy.count("PUT", r"step-000000000007/data-") >= 2, "two parts in flight")
        time.sleep(0.5)
    finally:
        job.kill()  # SIGKILL: no atexit, no abort
        job.communicate(timeout=30)
    fault_proxy.clear_faults()
    (orphan,) = target.uploads(prefix)
    assert orphan["Key"].startswith(prefix + "step-000000000007/data-")
    assert not target.keys(prefix + "step-000000000007/"), "nothing committed, no object"

    # A new writer with the default orphan_age: the upload is young (its writer might be alive).
    with Checkpointer(target.url(prefix), s3=target.s3()):
        pass
    assert len(target.uploads(prefix)) == 1, "a young upload is never aborted"

    time.sleep(PAST_AGE)
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="fastfeed"),
        Checkpointer(target.url(prefix), s3=target.s3(), orphan_age=AGE, part_size="5MiB") as ckpt,
    ):
        assert len(target.uploads(prefix)) == 1, "a Checkpointer writes nothing before it saves"
        ckpt.save({"w": torch.full((3_000_000,), 7.0)}, step=7).result(timeout=120)
        assert torch.equal(ckpt.load()["w"], torch.full((3_000_000,), 7.0))
    assert time.monotonic() - started < 120
    assert "aborting the multipart upload" in caplog.text and "step-000000000007" in caplog.text  # at the save
    assert target.uploads(prefix) == []


def test_close_after_a_failed_save_leaves_no_incomplete_upload(bucket: Any, fault_proxy: Any) -> None:
    target = seaweed_target(bucket)
    prefix = "runs/failed/"
    s3 = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
        retry=RetryConfig(max_attempts=2, base_delay=0.01, max_delay=0.02),
    )
    ckpt = Checkpointer(target.url(prefix), s3=s3, part_size="5MiB")
    try:
        # The parts are refused, and so is the abort that follows (the store is in trouble).
        fault_proxy.inject(status=403, code="AccessDenied", count=None, method="PUT", path_regex=r"/data-")
        fault_proxy.inject(status=503, code="SlowDown", count=None, method="DELETE", path_regex=r"/data-")
        handle = ckpt.save({"w": torch.ones(3_000_000)}, step=1)
        with pytest.raises(Exception, match=r"AccessDenied|access denied"):
            handle.result(timeout=60)
        assert len(target.uploads(prefix)) == 1, "the abort failed: the upload is still there"
        fault_proxy.clear_faults()  # the store recovers
    finally:
        started = time.monotonic()
        with pytest.raises(CheckpointError, match="earlier checkpoint save failed"):
            ckpt.close()
        assert time.monotonic() - started < 60, "close() is bounded"
    assert target.uploads(prefix) == [], "close() aborted the upload its save failed to abort"
    assert not [k for k in target.keys(prefix) if "MANIFEST" in k]


@pytest.mark.parametrize("kind", ["seaweed", "moto", "local"])
def test_unreferenced_data_is_removed_once_old_and_referenced_data_never(
    kind: str, request: Any, tmp_path: Path
) -> None:
    target = make_target(kind, request, tmp_path)
    prefix = "runs/leftovers/"
    stale = f"{prefix}step-000000000003/data-{secrets.token_hex(16)}.bin"  # a save died after its upload
    target.write(stale, b"x" * 1000)
    with Checkpointer(target.url(prefix), s3=target.s3(), orphan_age=AGE) as ckpt:
        ckpt.save({"w": torch.ones(10)}, step=4).result(timeout=60)
        time.sleep(PAST_AGE)
        fresh = f"{prefix}step-000000000006/data-{secrets.token_hex(16)}.bin"  # "in flight" elsewhere
        target.write(fresh, b"y" * 1000)
        ckpt.save({"w": torch.ones(10) * 5}, step=5).result(timeout=60)
        ckpt.wait()
        keys = target.keys(prefix)
        assert stale not in keys, "old unreferenced data is removed"
        assert fresh in keys, "young unreferenced data (maybe another writer's) stays"
        # Step 4's data is as old as the stale object but its manifest names it: kept.
        assert torch.equal(ckpt.load(step=4)["w"], torch.ones(10))
        assert torch.equal(ckpt.load(step=5)["w"], torch.ones(10) * 5)


def test_a_local_writers_stale_temporary_file_is_removed(tmp_path: Path) -> None:
    """A local save killed mid-write leaves ``.fastfeed-tmp-*`` (planted here with an old mtime:
    the same file a killed writer leaves)."""
    root = tmp_path / "run"
    (root / "step-000000000002").mkdir(parents=True)
    old = root / "step-000000000002" / ".fastfeed-tmp-0123456789abcdef"
    old.write_bytes(b"partial")
    two_days = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days, two_days))
    young = root / "step-000000000002" / ".fastfeed-tmp-fedcba9876543210"
    young.write_bytes(b"in progress")
    with Checkpointer(root) as ckpt:
        assert old.exists(), "a Checkpointer writes (and removes) nothing before it saves"
        assert ckpt.list() == []
        ckpt.save({"w": torch.ones(3)}, step=3).result(timeout=30)
        assert not old.exists() and young.exists()


def test_an_upload_slower_than_half_the_orphan_age_is_not_committed(bucket: Any, fault_proxy: Any) -> None:
    target = seaweed_target(bucket)
    prefix = "runs/slow/"
    fault_proxy.inject_stall(1.5, count=1, method="PUT", path_regex=r"step-000000000001/data-")
    with Checkpointer(target.url(prefix), s3=target.s3(fault_proxy.endpoint_url), orphan_age=2.0) as ckpt:
        with pytest.raises(CheckpointError, match="more than half of orphan_age"):
            ckpt.save({"w": torch.ones(10)}, step=1).result(timeout=60)
        with pytest.raises(CheckpointError):
            ckpt.wait()
    assert target.keys(prefix) == [], "no manifest, and its own data removed"


def test_a_new_shard_writer_aborts_orphaned_shard_uploads_only(bucket: Any) -> None:
    target = seaweed_target(bucket)
    shard = bucket.client.create_multipart_upload(Bucket=bucket.name, Key="ds/shard-000000.tar")
    other = bucket.client.create_multipart_upload(Bucket=bucket.name, Key="ds/notes.bin")
    time.sleep(PAST_AGE)
    samples = [{"__key__": f"{i:04d}", "txt": f"sample {i}"} for i in range(10)]
    write_shards(samples, target.url("ds/"), s3=target.s3(), index=False, orphan_age=AGE)
    left = {u["UploadId"] for u in target.uploads("ds/")}
    assert shard["UploadId"] not in left, "the orphaned shard upload was aborted"
    assert other["UploadId"] in left, "an upload that is not a shard is not ours to abort"
    bucket.client.abort_multipart_upload(Bucket=bucket.name, Key="ds/notes.bin", UploadId=other["UploadId"])


def test_a_dcp_writer_aborts_orphans_and_removes_an_uncommitted_attempts_data(bucket: Any) -> None:
    target = seaweed_target(bucket)
    token = secrets.token_hex(16)
    orphan = bucket.client.create_multipart_upload(Bucket=bucket.name, Key=f"dcp/a/rank-00000-{token}.data")
    stale = f"dcp/d/rank-00000-{token}.data"  # a failed attempt at "d": data, no manifest
    target.write(stale, b"z" * 100)
    time.sleep(PAST_AGE)
    state = {"w": torch.arange(10.0), "step": 3}
    with FastfeedStorageWriter(target.url("dcp/"), s3=target.s3(), orphan_age=AGE) as writer:
        dcp.save(state, storage_writer=writer, checkpoint_id="d")
    assert orphan["UploadId"] not in {u["UploadId"] for u in target.uploads("dcp/")}
    keys = target.keys("dcp/d/")
    assert stale not in keys and "dcp/d/MANIFEST.json" in keys and len(keys) == 2, keys
    out = {"w": torch.zeros(10), "step": 0}
    with FastfeedStorageReader(target.url("dcp/"), s3=target.s3()) as reader:
        dcp.load(out, storage_reader=reader, checkpoint_id="d")
    assert torch.equal(out["w"], torch.arange(10.0)) and out["step"] == 3
