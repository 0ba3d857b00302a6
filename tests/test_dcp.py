"""torch.distributed.checkpoint through FastfeedStorageWriter / FastfeedStorageReader, against the
real S3 server (SeaweedFS) and a local directory, in one process and in two gloo ranks."""

from __future__ import annotations

import copy
import io
import json
import pickle
import re
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.api import CheckpointException

import fastfeed
from fastfeed.checkpoint.dcp import MANIFEST, FastfeedStorageReader, FastfeedStorageWriter
from fastfeed.checkpoint.dcp import checkpoint_dir as _checkpoint_dir
from fastfeed.config import RetryConfig, S3Config
from fastfeed.errors import CheckpointError, ConfigError, CorruptCheckpointError
from fastfeed.store.upload import checksum
from fastfeed.testing.servers import free_port

# dcp.save / dcp.load without a process group say so with a UserWarning (pytest makes it an error).
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def s3_config(bucket: Any, endpoint: str | None = None, **kwargs: Any) -> S3Config:
    return S3Config(
        endpoint_url=endpoint or bucket.server.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
        **kwargs,
    )


@pytest.fixture(params=["s3", "local"])
def target(request: Any, tmp_path: Path) -> tuple[str, S3Config | None]:
    if request.param == "local":
        return str(tmp_path / "ckpt"), None
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket.name}/runs/dcp/", s3_config(bucket)


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model.register_buffer("counts", torch.arange(6, dtype=torch.int64) * (seed + 1))
    model.register_buffer("bf16", torch.randn(3, 5).to(torch.bfloat16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 * (seed + 1))
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    return model, opt


def training_state(seed: int, *, arrays: bool = True) -> dict[str, Any]:
    model, opt = model_and_optimizer(seed)
    extra: dict[str, Any] = {
        "name": f"run-{seed}",
        "lrs": [0.1 * seed, float("inf")],
        "pair": (seed, b"raw\x80bytes", None),
        "flags": {"ema": seed == 0},
    }
    if arrays:
        extra["hist"] = np.arange(5, dtype=np.float64) * (seed + 1)
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "step": 7 + seed,
        "extra": extra,
        "view": torch.arange(12.0).reshape(3, 4).t() * (seed + 1),  # not contiguous
        "scalar": torch.tensor(2.5 * (seed + 1), dtype=torch.float64),  # 0-d
        "empty": torch.zeros(0, 3),  # no bytes: shares its offset with the next item
        "mask": torch.tensor([True, False, seed == 0]),
        "z": torch.complex(torch.ones(2), torch.full((2,), float(seed))).conj(),  # a lazy conjugate
    }


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def stored(url: str, s3: S3Config | None, bucket: Any | None = None) -> dict[str, bytes]:
    """Every object under ``url`` (keys relative to it)."""
    if s3 is None:
        root = Path(url)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert bucket is not None
    name, _, prefix = url.removeprefix("s3://").partition("/")
    out = {}
    for obj in bucket.client.list_objects_v2(Bucket=name, Prefix=prefix).get("Contents", []):
        out[obj["Key"][len(prefix) :]] = bucket.client.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
    return out


def rank_object(keys: Any, directory: str, rank: int = 0) -> str:
    """The one key of rank ``rank``'s data object in ``directory`` (``rank-00000-<hex>.data``)."""
    pattern = re.compile(re.escape(directory) + rf"rank-{rank:05d}-[0-9a-f]{{32}}\.data")
    (key,) = [k for k in keys if pattern.fullmatch(k)]
    return key


def failures(exc: BaseException) -> list[BaseException]:
    assert isinstance(exc, CheckpointException), repr(exc)
    return [e for e, _ in exc.failures.values()]


# ---------------------------------------------------------------------------------------------
# One process


def test_round_trip_of_model_optimizer_and_values_is_bit_exact(
    target: tuple[str, S3Config | None], request: Any
) -> None:
    url, s3 = target
    state = training_state(0)
    expected = training_state(0)
    with FastfeedStorageWriter(url, s3=s3) as writer:
        metadata = dcp.save(state, storage_writer=writer, checkpoint_id="step-7")
        assert writer.checkpoint_id.endswith("/step-7/")
    assert "model.0.weight" in metadata.state_dict_metadata

    bucket = request.getfixturevalue("bucket") if s3 is not None else None
    objects = stored(url, s3, bucket)
    data_key = rank_object(objects, "step-7/")
    assert sorted(objects) == ["step-7/MANIFEST.json", data_key]
    manifest = json.loads(objects["step-7/MANIFEST.json"])
    assert manifest["format"] == "fastfeed-dcp/1"
    assert manifest["state_dict_metadata"]["model.bf16"]["dtype"] == "bfloat16"
    assert manifest["objects"][data_key.removeprefix("step-7/")]["size"] == len(objects[data_key])

    dest = training_state(1)  # another seed: every value differs before the load
    assert not same(dest, expected)
    with FastfeedStorageReader(url, s3=s3) as reader:
        dcp.load(dest, storage_reader=reader, checkpoint_id="step-7")
    assert same(dest, expected)
    assert dest["optim"]["param_groups"][0]["lr"] == 1e-3  # a value inside a list of dicts


def test_checkpoint_ids_are_directories_under_the_url(tmp_path: Path) -> None:
    root = "file://" + str(tmp_path) + "/"
    assert _checkpoint_dir(root, None) == ""
    assert _checkpoint_dir(root, "step-3") == "step-3/"
    assert _checkpoint_dir(root, "a/./b/") == "a/b/"
    assert _checkpoint_dir(root, str(tmp_path / "x" / "y")) == "x/y/"
    assert _checkpoint_dir(root, root + "z") == "z/"
    assert _checkpoint_dir("s3://bkt/runs/", "s3://bkt/runs/s1") == "s1/"
    with pytest.raises(ConfigError, match="not under"):
        _checkpoint_dir("s3://bkt/runs/", "s3://bkt/other/s1")
    with pytest.raises(ConfigError, match=r"\.\."):
        _checkpoint_dir(root, "a/../../etc")
    # The constructor's checkpoint_id is used when dcp.save gets none, and dcp's wins over it.
    with FastfeedStorageWriter(tmp_path, checkpoint_id="default") as writer:
        dcp.save({"a": torch.ones(2)}, storage_writer=writer)
        dcp.save({"a": torch.zeros(2)}, storage_writer=writer, checkpoint_id="other")
    assert (tmp_path / "default" / MANIFEST).is_file() and (tmp_path / "other" / MANIFEST).is_file()
    out = {"a": torch.empty(2)}
    with FastfeedStorageReader(tmp_path, checkpoint_id="default") as reader:
        dcp.load(out, storage_reader=reader)
    assert torch.equal(out["a"], torch.ones(2))


def test_saving_a_committed_checkpoint_id_again_fails_and_keeps_it(tmp_path: Path) -> None:
    with FastfeedStorageWriter(tmp_path) as writer:
        dcp.save({"w": torch.ones(4), "step": 1}, storage_writer=writer, checkpoint_id="c")
        before = {p: p.read_bytes() for p in (tmp_path / "c").iterdir()}
        with pytest.raises(CheckpointException) as info:
            dcp.save({"w": torch.zeros(4), "step": 2}, storage_writer=writer, checkpoint_id="c")
    (err,) = failures(info.value)
    assert isinstance(err, CheckpointError) and "already committed" in str(err) and "/c/" in str(err)
    assert {p: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before, "nothing was overwritten"
    out = {"w": torch.empty(4), "step": 0}
    with FastfeedStorageReader(tmp_path) as reader:
        dcp.load(out, storage_reader=reader, checkpoint_id="c")
    assert torch.equal(out["w"], torch.ones(4)) and out["step"] == 1


def test_async_save_uploads_a_snapshot_in_the_background(bucket: Any) -> None:
    url = f"s3://{bucket.name}/runs/async/"
    model, opt = model_and_optimizer(0)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 3}
    expected = copy.deepcopy(model.state_dict())
    with FastfeedStorageWriter(url, s3=s3_config(bucket)) as writer:
        pending = dcp.async_save(state, storage_writer=writer, checkpoint_id="a1")
        with torch.no_grad():  # the loop goes on: the save must hold the values of the call
            for p in model.parameters():
                p.add_(1.0)
        future = getattr(pending, "upload_completion", pending)
        future.result(timeout=120)
    keys = [o["Key"] for o in bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="runs/async/a1/")["Contents"]]
    assert sorted(keys) == ["runs/async/a1/MANIFEST.json", rank_object(keys, "runs/async/a1/")]
    model2, opt2 = model_and_optimizer(1)
    dest = {"model": model2.state_dict(), "optim": opt2.state_dict(), "step": 0}
    with FastfeedStorageReader(url, s3=s3_config(bucket)) as reader:
        dcp.load(dest, storage_reader=reader, checkpoint_id="a1")
    assert same(dest["model"], expected) and dest["step"] == 3


def test_a_pickled_writer_reopens_its_store(tmp_path: Path) -> None:
    with FastfeedStorageWriter(tmp_path, part_size="6MiB") as writer:
        clone = pickle.loads(pickle.dumps(writer))
    try:
        assert clone.part_size == 6 << 20 and clone.url == writer.url
        dcp.save({"w": torch.arange(3)}, storage_writer=clone, checkpoint_id="p")
    finally:
        clone.close()
    out = {"w": torch.zeros(3, dtype=torch.int64)}
    with FastfeedStorageReader(tmp_path) as reader:
        dcp.load(out, storage_reader=reader, checkpoint_id="p")
    assert torch.equal(out["w"], torch.arange(3))


# ---------------------------------------------------------------------------------------------
# No pickle


def test_nothing_read_from_the_store_is_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FastfeedStorageWriter(tmp_path) as writer:
        dcp.save(training_state(0, arrays=False), storage_writer=writer, checkpoint_id="s")
    objects = stored(str(tmp_path), None)
    manifest = json.loads(objects["s/MANIFEST.json"])
    data = objects[rank_object(objects, "s/")]
    values = [i for i in manifest["items"] if i["kind"] == "value"]
    assert {i["fqn"] for i in values} >= {"step", "extra.name", "extra.pair", "optim.param_groups.0.betas"}
    for item in values:  # every value is a JSON header (fastfeed-tree) + raw leaves: no pickle
        header = json.loads(data[item["start"] : item["start"] + item["header"]])
        assert header["tree"]["format"] == "fastfeed-tree/1"

    # DCP's default load planner calls torch.load(weights_only=False) on what the reader hands
    # it: those streams must be made locally, from values that also load with weights_only=True.
    streams: list[bytes] = []
    real_load = torch.load

    def spy(f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, io.BytesIO):
            streams.append(f.getvalue())
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    dest = training_state(1, arrays=False)
    with FastfeedStorageReader(tmp_path) as reader:
        dcp.load(dest, storage_reader=reader, checkpoint_id="s")
    monkeypatch.undo()
    assert same(dest, training_state(0, arrays=False))
    assert len(streams) == len(values)
    for stream in streams:
        assert stream not in data, "a stream from the store reached torch.load"
        torch.load(io.BytesIO(stream), weights_only=True)  # plain values only


class _Touch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (Path.touch, (self.path,))


def test_a_tampered_value_with_valid_checksums_is_refused_without_running_it(tmp_path: Path) -> None:
    with FastfeedStorageWriter(tmp_path) as writer:
        dcp.save({"w": torch.ones(2), "step": 5}, storage_writer=writer, checkpoint_id="t")
    marker = tmp_path / "pwned"
    manifest_path = tmp_path / "t" / MANIFEST
    data_name = rank_object(stored(str(tmp_path), None), "t/").removeprefix("t/")
    data_path = tmp_path / "t" / data_name
    for payload in (pickle.dumps(_Touch(marker)), _torch_save(_Touch(marker))):
        # An attacker who can write the bucket rewrites the value and fixes every checksum.
        manifest = json.loads(manifest_path.read_text())
        data = data_path.read_bytes()
        (item,) = [i for i in manifest["items"] if i["fqn"] == "step"]
        item.update(start=len(data), length=len(payload), header=len(payload), crc32c=checksum(payload))
        data += payload
        manifest["objects"][data_name]["size"] = len(data)
        manifest["objects"][data_name]["crc32c"] = [checksum(data)]
        manifest["objects"][data_name]["part_size"] = len(data)
        data_path.write_bytes(data)
        manifest_path.unlink()
        manifest_path.write_text(json.dumps(manifest))
        out = {"w": torch.zeros(2), "step": 0}
        with FastfeedStorageReader(tmp_path) as reader, pytest.raises(CheckpointException) as info:
            dcp.load(out, storage_reader=reader, checkpoint_id="t")
        (err,) = failures(info.value)
        assert isinstance(err, CorruptCheckpointError) and "'step'" in str(err) and "cannot be decoded" in str(err)
        assert not marker.exists(), "the tampered pickle was executed"


def _torch_save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_values_that_need_pickle_are_refused_at_save_time(tmp_path: Path) -> None:
    with FastfeedStorageWriter(tmp_path) as writer, pytest.raises(CheckpointException) as info:
        dcp.save({"w": torch.ones(2), "obj": _Touch(tmp_path / "x")}, storage_writer=writer, checkpoint_id="r")
    (err,) = failures(info.value)
    assert isinstance(err, CheckpointError) and "'obj'" in str(err) and "without pickle" in str(err)
    assert not (tmp_path / "r" / MANIFEST).exists()


# ---------------------------------------------------------------------------------------------
# Missing and corrupt checkpoints, failed saves


def test_no_manifest_is_a_clear_error_naming_the_url(target: tuple[str, S3Config | None]) -> None:
    url, s3 = target
    with FastfeedStorageReader(url, s3=s3) as reader:
        reader.reset("never-saved")
        with pytest.raises(CheckpointError, match="no committed checkpoint") as info:
            reader.read_metadata()
        assert "never-saved/" in str(info.value) and reader.url in str(info.value)
        with pytest.raises(CheckpointException, match="no committed checkpoint"):
            dcp.load({"w": torch.zeros(2)}, storage_reader=reader, checkpoint_id="never-saved")


def test_corrupt_or_missing_data_raises_corrupt_checkpoint_error(bucket: Any) -> None:
    url = f"s3://{bucket.name}/runs/corrupt/"
    s3 = s3_config(bucket)
    state = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10), "step": 4}
    with FastfeedStorageWriter(url, s3=s3) as writer:
        dcp.save(state, storage_writer=writer, checkpoint_id="c")
    key = rank_object(
        [o["Key"] for o in bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="runs/corrupt/c/")["Contents"]],
        "runs/corrupt/c/",
    )
    manifest = json.loads(
        bucket.client.get_object(Bucket=bucket.name, Key="runs/corrupt/c/MANIFEST.json")["Body"].read()
    )
    (item_a,) = [i for i in manifest["items"] if i["fqn"] == "a"]
    good = bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
    body = bytearray(good)
    body[item_a["start"] + 123] ^= 0x01  # one flipped bit inside "a"
    bucket.client.put_object(Bucket=bucket.name, Key=key, Body=bytes(body))

    def load(keys: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {k: torch.zeros_like(state[k]) if k != "step" else 0 for k in keys}
        with FastfeedStorageReader(url, s3=s3) as reader:
            dcp.load(out, storage_reader=reader, checkpoint_id="c", planner=None)
        return out

    with pytest.raises(CheckpointException) as info:
        load(("a", "b", "step"))
    (err,) = failures(info.value)
    assert isinstance(err, CorruptCheckpointError) and "CRC32C" in str(err) and f"s3://{bucket.name}/{key}" in str(err)
    # Only the items a load needs are read and checked: "b" alone still loads.
    assert torch.equal(load(("b",))["b"], torch.ones(10))
    bucket.client.delete_object(Bucket=bucket.name, Key=key)
    with pytest.raises(CheckpointException) as info:
        load(("b",))
    (err,) = failures(info.value)
    assert isinstance(err, CorruptCheckpointError) and "missing" in str(err)
    bucket.client.put_object(Bucket=bucket.name, Key=key, Body=good[:-10])
    with pytest.raises(CheckpointException) as info:
        load(("b",))
    (err,) = failures(info.value)
    assert isinstance(err, CorruptCheckpointError) and "the manifest says" in str(err)


def test_a_failed_upload_leaves_no_manifest_and_the_id_can_be_saved_again(bucket: Any, fault_proxy: Any) -> None:
    url = f"s3://{bucket.name}/runs/fail/"
    retry = RetryConfig(max_attempts=2, base_delay=0.01, max_delay=0.02)
    s3 = s3_config(bucket, fault_proxy.endpoint_url, retry=retry)
    state = {"w": torch.full((3_000_000,), 2.0), "step": 9}  # 12 MB: a multipart upload of 5 MiB parts
    with FastfeedStorageWriter(url, s3=s3, part_size="5MiB") as writer:
        fault_proxy.inject(status=500, code="InternalError", count=None, method="PUT", path_regex=r"f1/rank-00000")
        with pytest.raises(CheckpointException, match=r"InternalError|500"):
            dcp.save(state, storage_writer=writer, checkpoint_id="f1")
        fault_proxy.clear_faults()
        listed = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="runs/fail/").get("Contents", [])
        assert not [o["Key"] for o in listed if o["Key"].endswith(MANIFEST)]
        uploads = bucket.client.list_multipart_uploads(Bucket=bucket.name, Prefix="runs/fail/").get("Uploads", [])
        assert uploads == [], "the failed multipart upload was aborted"
        with FastfeedStorageReader(url, s3=s3) as reader, pytest.raises(CheckpointError, match="no committed"):
            reader.reset("f1")
            reader.read_metadata()
        dcp.save(state, storage_writer=writer, checkpoint_id="f1")  # a retry of the same id works
    out = {"w": torch.zeros(3_000_000), "step": 0}
    with FastfeedStorageReader(url, s3=s3_config(bucket), part_size="5MiB") as reader:
        dcp.load(out, storage_reader=reader, checkpoint_id="f1")
    assert torch.equal(out["w"], state["w"]) and out["step"] == 9


# ---------------------------------------------------------------------------------------------
# Two gloo ranks


def _full_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "w": torch.arange(16 * 6, dtype=torch.float32).reshape(16, 6) * 0.5,
        "emb": torch.randn(4, 7, generator=gen).to(torch.bfloat16),  # 7 columns: an uneven split
        "big": torch.randn(2, 1_600_000, generator=gen),  # 6.4 MB a rank: multipart with 5 MiB parts
    }


def _rank_main(rank: int, world: int, port: int, url: str, s3: S3Config, proxied: S3Config, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    result: dict[str, Any] = {}
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = _full_tensors()
        layout = {"w": Shard(0), "emb": Shard(1), "big": Shard(0)}
        state = {
            "model": {k: distribute_tensor(full[k], mesh, [layout[k]]) for k in full},
            "bias": torch.arange(5.0),  # replicated: written once
            f"rank{rank}": {"name": f"r{rank}", "vals": [rank, 0.5]},  # this rank's own value
            "step": 11,
        }
        # 1. Rank 1's upload fails (the proxy answers 500): nothing may be committed.
        with FastfeedStorageWriter(url, s3=proxied, part_size="5MiB") as writer:
            try:
                dcp.save(state, storage_writer=writer, checkpoint_id="bad")
                result["bad"] = "saved"
            except CheckpointException as exc:
                result["bad"] = str(exc)
        dist.barrier()
        # 2. A good save, loaded back by both ranks with another sharding of "w".
        with FastfeedStorageWriter(url, s3=s3, part_size="5MiB") as writer:
            dcp.save(state, storage_writer=writer, checkpoint_id="good")
        dist.barrier()
        relayout = {"w": Shard(1), "emb": Shard(1), "big": Shard(0)}
        dest = {
            "model": {k: distribute_tensor(torch.zeros_like(full[k]), mesh, [relayout[k]]) for k in full},
            "bias": torch.zeros(5),
            f"rank{rank}": {"name": "", "vals": []},
            "step": 0,
        }
        with FastfeedStorageReader(url, s3=s3, part_size="5MiB") as reader:
            dcp.load(dest, storage_reader=reader, checkpoint_id="good")
        result["tensors_equal"] = {
            k: bool(
                torch.equal(dest["model"][k].to_local(), distribute_tensor(full[k], mesh, [relayout[k]]).to_local())
            )
            for k in full
        }
        result["local_shapes"] = {k: list(dest["model"][k].to_local().shape) for k in full}
        result["bias"] = bool(torch.equal(dest["bias"], torch.arange(5.0)))
        result["own"] = dest[f"rank{rank}"]
        result["step"] = dest["step"]
        dist.barrier()
    except BaseException:
        result["error"] = traceback.format_exc()
        raise
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def _run_ranks(world: int, args: tuple[Any, ...], timeout: float) -> None:
    context = mp.start_processes(_rank_main, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the ranks did not finish in time"
    finally:
        for proc in context.processes:
            if proc.is_alive():
                proc.kill()
            proc.join(10)


@pytest.mark.slow
def test_two_gloo_ranks_save_their_shards_and_load_them_back(bucket: Any, fault_proxy: Any, tmp_path: Path) -> None:
    url = f"s3://{bucket.name}/dcp/"
    s3 = s3_config(bucket, region="us-east-1")
    proxied = s3_config(
        bucket, fault_proxy.endpoint_url, region="us-east-1", retry=RetryConfig(max_attempts=2, base_delay=0.01)
    )
    fault_proxy.inject(status=500, code="InternalError", count=None, method="PUT", path_regex=r"bad/rank-00001")
    _run_ranks(2, (free_port(), url, s3, proxied, str(tmp_path)), timeout=240)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert "error" not in result, result.get("error")
        assert "InternalError" in result["bad"] or "500" in result["bad"], result["bad"]
        assert result["tensors_equal"] == {"w": True, "emb": True, "big": True}
        assert result["bias"] and result["step"] == 11 and result["own"] == {"name": f"r{rank}", "vals": [rank, 0.5]}
    assert results[0]["local_shapes"] == {"w": [16, 3], "emb": [4, 4], "big": [1, 1_600_000]}
    assert results[1]["local_shapes"] == {"w": [16, 3], "emb": [4, 3], "big": [1, 1_600_000]}

    keys = {o["Key"]: o["Size"] for o in bucket.client.list_objects_v2(Bucket=bucket.name, Prefix="dcp/")["Contents"]}
    good = [rank_object(keys, "dcp/good/", rank) for rank in (0, 1)]
    assert sorted(k for k in keys if k.startswith("dcp/good/")) == ["dcp/good/MANIFEST.json", *good]
    assert good[0].split("-")[-1] == good[1].split("-")[-1], "one save: one name token for every rank"
    assert keys[good[0]] > 6_400_000 and keys[good[1]] > 6_400_000
    # The failed save: rank 0's data may be there, but no manifest, so no checkpoint.
    assert "dcp/bad/MANIFEST.json" not in keys and not [k for k in keys if k.startswith("dcp/bad/rank-00001")]
    assert bucket.client.list_multipart_uploads(Bucket=bucket.name, Prefix="dcp/").get("Uploads", []) == []
    with FastfeedStorageReader(url, s3=s3) as reader:
        reader.reset("bad")
        with pytest.raises(CheckpointError, match="no committed checkpoint"):
            reader.read_metadata()

    # The sharded checkpoint loads into plain full tensors in one process.
    full = _full_tensors()
    dest: dict[str, Any] = {
        "model": {k: torch.zeros_like(v) for k, v in full.items()},
        "bias": torch.zeros(5),
        "rank0": {"name": "", "vals": []},
        "rank1": {"name": "", "vals": []},
        "step": 0,
    }
    with FastfeedStorageReader(url, s3=s3) as reader:
        dcp.load(dest, storage_reader=reader, checkpoint_id="good")
    assert all(torch.equal(dest["model"][k], full[k]) for k in full)
    assert dest["rank0"] == {"name": "r0", "vals": [0, 0.5]} and dest["rank1"] == {"name": "r1", "vals": [1, 0.5]}
    assert dest["step"] == 11 and torch.equal(dest["bias"], torch.arange(5.0))


def test_the_classes_are_exported() -> None:
    assert fastfeed.FastfeedStorageWriter is FastfeedStorageWriter
    assert fastfeed.FastfeedStorageReader is FastfeedStorageReader
    assert {"FastfeedStorageReader", "FastfeedStorageWriter"} <= set(fastfeed.__all__)
