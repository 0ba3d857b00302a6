"""Where a StreamingDataset's streams are read: ``DataLoader(worker_mode=...)``.

``"auto"`` reads in this process's threads when no Python code must run in workers, and in
``num_workers`` processes otherwise; the batches are the same in every mode (they depend on
``num_streams`` only). Checked against the processes that actually exist during an iteration.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import default_collate

from fastfeed import ConfigError, DataLoader, RaggedBytes, StreamingDataset
from fastfeed.config import RetryConfig, S3Config
from fastfeed.testing.shards import upload_dir, write_synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wm-shards")
    write_synthetic_shards(out, num_shards=5, samples_per_shard=13, sample_bytes=3000, seed=7)
    return out


def _epoch(loader: DataLoader) -> tuple[list[Any], int]:
    """The loader's batches and the most worker processes alive while they were read."""
    batches, most = [], 0
    for batch in loader:
        most = max(most, len(multiprocessing.active_children()))
        batches.append(batch)
    return batches, most


def plain(value: Any) -> Any:
    """A batch as Python values (bytes per sample for RaggedBytes), for ``==``."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, RaggedBytes):
        return [bytes(value[i]) for i in range(len(value))]
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.tolist())
    return value


def assert_same_batches(got: list[Any], want: list[Any], where: str) -> None:
    assert len(got) == len(want) > 0, where
    assert [plain(b) for b in got] == [plain(b) for b in want], where


def _by_collate(samples: Any) -> Any:
    return default_collate(samples)


def _init(worker_id: int) -> None:
    torch.manual_seed(worker_id)


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_mode_gives_the_same_batches(shards: Path, shuffle: bool) -> None:
    """auto and thread read in this process (no worker process exists while they run),
    process in num_workers processes, and all three give num_workers=0's batches."""
    ds = StreamingDataset(str(shards), shuffle=shuffle, seed=11, shuffle_buffer=20)
    reference, _ = _epoch(DataLoader(ds, batch_size=6, num_streams=3))
    for mode, processes in [("auto", False), ("thread", False), ("process", True)]:
        batches, most = _epoch(DataLoader(ds, batch_size=6, num_streams=3, num_workers=2, worker_mode=mode))
        assert (most > 0) is processes, f"{mode}: {most} worker processes during the epoch"
        assert_same_batches(batches, reference, mode)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"collate_fn": _by_collate}, "a collate_fn runs Python per batch"),
        ({"worker_init_fn": _init}, "a worker_init_fn runs in the workers"),
        ({"multiprocessing_context": "fork"}, "a multiprocessing context asks for processes"),
        ({"batch_size": None}, "unbatched samples are converted one by one"),
    ],
)
def test_auto_starts_processes_when_python_code_runs_in_workers(shards: Path, kwargs: dict[str, Any], why: str) -> None:
    ds = StreamingDataset(str(shards))
    options: dict[str, Any] = {"batch_size": 5, "num_streams": 2, "num_workers": 2, **kwargs}
    batches, most = _epoch(DataLoader(ds, **options))
    assert most > 0, why
    reference, _ = _epoch(DataLoader(ds, **{**options, "worker_mode": "process"}))
    assert_same_batches(batches, reference, why)


def test_thread_mode_runs_a_collate_fn_in_this_process(shards: Path) -> None:
    pids: set[int] = set()

    def collate(samples: Any) -> Any:
        pids.add(os.getpid())
        return default_collate(samples)

    ds = StreamingDataset(str(shards))
    batches, most = _epoch(DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate, worker_mode="thread"))
    assert most == 0 and pids == {os.getpid()} and batches


def test_bad_worker_modes_are_refused_at_construction(shards: Path) -> None:
    ds = StreamingDataset(str(shards))
    with pytest.raises(ConfigError, match="worker_mode must be one of"):
        DataLoader(ds, num_workers=2, worker_mode="threads")
    with pytest.raises(ConfigError, match="worker_init_fn runs in worker processes") as info:
        DataLoader(ds, num_workers=2, worker_init_fn=_init, worker_mode="thread")
    assert info.value.hint and "process" in info.value.hint


def test_a_stalled_store_hits_the_timeout_in_thread_mode_as_with_processes(
    bucket: Any, fault_proxy: Any, tmp_path: Path
) -> None:
    """torch's ``timeout``: a batch that does not come within it raises RuntimeError, also
    when the streams are read in threads (the workers' own timeout does not apply there)."""
    write_synthetic_shards(tmp_path, num_shards=2, samples_per_shard=4, sample_bytes=2000)
    upload_dir(bucket.client, bucket.name, tmp_path, prefix="stall/")
    s3 = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
        retry=RetryConfig(max_attempts=2, base_delay=0.01, max_delay=0.05),
    )
    ds = StreamingDataset(f"s3://{bucket.name}/stall/", s3=s3)
    fault_proxy.inject_stall(6.0, count=None, method="GET")
    for mode in ("thread", "process"):
        loader = DataLoader(ds, batch_size=2, num_workers=2, timeout=1.0, worker_mode=mode)
        start = time.monotonic()
        it = iter(loader)
        with pytest.raises(RuntimeError, match=r"DataLoader timed out after 1\.0 seconds"):
            next(it)
        if mode == "thread":  # (process mode waits for its stalled worker to stop: about the stall)
            assert time.monotonic() - start < 5.0
        del it
