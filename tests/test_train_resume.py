"""A training run killed mid-epoch (SIGKILL) and resumed from the bucket ends with exactly the
parameters of an uninterrupted run: shuffled data, dropout on, 2 DataLoader workers, SGD with
momentum and a LR schedule, asynchronous checkpoints every 5 steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fastfeed.testing.shards import write_synthetic_shards

_TRAIN = r"""
import hashlib, json, os, signal, sys
import torch
import fastfeed
from fastfeed.config import S3Config

cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(1)
ds = fastfeed.StreamingDataset(cfg["shards"], shuffle=True, seed=3, shuffle_buffer=40)
loader = fastfeed.DataLoader(ds, batch_size=8, num_workers=2, num_streams=4)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
ckpt = fastfeed.Checkpointer(cfg["url"], s3=S3Config(**cfg["s3"]), keep_last=2)
cb = fastfeed.CheckpointCallback(ckpt, model=model, optimizer=opt, scheduler=sched, loader=loader, every_n_steps=5)
progress = cb.resume() if cfg["resume"] else None
step = progress["step"] if progress else 0
first_epoch = progress["epoch"] if progress else 0
for epoch in range(first_epoch, 2):
    ds.set_epoch(epoch)
    for batch in loader:
        x = batch["bin"].data.view(-1, 1000)[:, :16].float() / 255.0
        y = batch["cls"].to_ints() % 4
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        cb.step_end(step=step, epoch=epoch)
        if step == cfg["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
    cb.epoch_end(step=step, epoch=epoch + 1)
ckpt.close()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({"digest": digest, "steps": step, "resumed_from": progress}))
"""


@pytest.mark.slow
def test_killed_and_resumed_training_ends_with_identical_parameters(bucket: Any, tmp_path: Path) -> None:
    shards = write_synthetic_shards(tmp_path / "data", num_shards=6, samples_per_shard=30, sample_bytes=1000)
    s3 = {
        "endpoint_url": bucket.server.endpoint_url,
        "access_key_id": bucket.server.access_key,
        "secret_access_key": bucket.server.secret_key,
    }

    def run(url: str, resume: bool, kill_at: int) -> subprocess.CompletedProcess[str]:
        cfg = {"shards": [str(p) for p in shards], "url": url, "s3": s3, "resume": resume, "kill_at": kill_at}
        return subprocess.run(
            [sys.executable, "-c", _TRAIN, json.dumps(cfg)], capture_output=True, text=True, timeout=300
        )

    clean = run(f"s3://{bucket.name}/clean/", resume=False, kill_at=-1)
    assert clean.returncode == 0, clean.stderr
    reference = json.loads(clean.stdout)
    assert reference["steps"] == 2 * 4 * 6  # two epochs of 4 streams x 6 batches (45 samples each)

    url = f"s3://{bucket.name}/crash/"
    crashed = run(url, resume=True, kill_at=29)  # mid-epoch 0 (22 or so batches per epoch), or in epoch 1
    assert crashed.returncode == -9, crashed.stderr
    resumed = run(url, resume=True, kill_at=-1)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["resumed_from"] is not None and 0 < result["resumed_from"]["step"] <= 29
    assert result["steps"] == reference["steps"]
    assert result["digest"] == reference["digest"], "the resumed run must end bit-identical"
