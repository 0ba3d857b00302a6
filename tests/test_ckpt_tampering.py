"""Manifests are not trusted (issue 13, part 3): a tampered or malformed manifest of
:class:`~fastfeed.Checkpointer` or of the DCP storage, on SeaweedFS and in a local directory,
raises :class:`~fastfeed.errors.CorruptCheckpointError` naming the object (``load()`` falls back
to the previous checkpoint), reads nothing outside the checkpoint's prefix (the fault proxy's
request log shows every request; names reaching out point at *valid* copies of the data, so a
load that followed them would succeed), never allocates the size a manifest merely claims and
never follows a symbolic link. Nothing is patched.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ckpt_targets import Target, make_target
from fastfeed.checkpoint.checkpointer import Checkpointer
from fastfeed.checkpoint.dcp import FastfeedStorageReader, FastfeedStorageWriter
from fastfeed.errors import CorruptCheckpointError, FastfeedError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

PREFIX = "runs/victim/"
STEP2 = PREFIX + "step-000000000002/"
MANIFEST = STEP2 + "MANIFEST.json"
OTHER_RUN = "other-run/step-000000000002/"
GOOD = {"w": torch.ones(1000), "step": 1}
VICTIM = {"w": torch.arange(1_500_000, dtype=torch.float32), "step": 2}  # 6 MB: two 5 MiB parts
DEEP = 100_000


@dataclass
class Victim:
    """A run with two committed checkpoints (steps 1 and 2) and a valid copy of step 2's data
    outside the run (``other-run/...``) and in step 1's directory, for names to point at."""

    target: Target
    manifest: dict[str, Any]
    raw: bytes
    data_name: str  # of step 2
    step1_data_name: str

    def s3(self, endpoint: str | None = None) -> Any:
        return self.target.s3(endpoint)


@pytest.fixture(scope="module", params=["seaweed", "local"])
def victim(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victim]:
    target = make_target(request.param, request, tmp_path_factory.mktemp("victim"))
    with Checkpointer(target.url(PREFIX), s3=target.s3(), part_size="5MiB") as ckpt:
        ckpt.save(GOOD, step=1).result(timeout=60)
        ckpt.save(VICTIM, step=2).result(timeout=60)
    raw = target.read(MANIFEST)
    manifest = json.loads(raw)
    name = manifest["blob"]["name"]
    (step1,) = [k for k in target.keys(PREFIX + "step-000000000001/") if k.endswith(".bin")]
    data = target.read(STEP2 + name)
    target.write(OTHER_RUN + name, data)  # valid bytes another run holds
    target.write(PREFIX + "step-000000000001/" + name, data)  # and a sibling step
    yield Victim(target, manifest, raw, name, step1.rsplit("/", 1)[1])


@pytest.fixture
def tampered(victim: Victim) -> Iterator[Callable[[Any], None]]:
    """Replace step 2's manifest (a JSON value, or raw bytes); the original comes back after."""

    def write(doc: Any) -> None:
        victim.target.write(MANIFEST, doc if isinstance(doc, bytes) else json.dumps(doc).encode())

    try:
        yield write
    finally:
        victim.target.write(MANIFEST, victim.raw)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def change(m: dict[str, Any]) -> Any:
        obj: Any = m
        *parents, last = path.split(".")
        for p in parents:
            obj = obj[int(p)] if isinstance(obj, list) else obj[p]
        obj[last] = value
        return m

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], Any]:
    def change(m: dict[str, Any]) -> Any:
        obj: Any = m
        *parents, last = path.split(".")
        for p in parents:
            obj = obj[p]
        del obj[last]
        return m

    return change


def _blob(**fields: Any) -> Callable[[dict[str, Any]], Any]:
    def change(m: dict[str, Any]) -> Any:
        m["blob"].update(fields)
        return m

    return change


def _deep(field: str) -> Callable[[dict[str, Any]], bytes]:
    def change(m: dict[str, Any]) -> bytes:
        m[field] = "@@"
        text = json.dumps(m)
        return text.replace('"@@"', "[" * DEEP + "]" * DEEP).encode()

    return change


def _name(value: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda m: _blob(name=value(m) if callable(value) else value)(m)


#: id -> change of the manifest (returns the new document, or raw bytes).
SCHEMA_CASES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "a list": lambda m: [m],
    "a string": lambda m: "MANIFEST",
    "null": lambda m: None,
    "not JSON": lambda m: b'{"format": "fastfeed-checkpoint/1", ',
    "not UTF-8": lambda m: b"\xff\xfe\x00{",
    "deep tree": _deep("tree"),
    "deep metadata": _deep("metadata"),
    "another format": _set("format", "fastfeed-checkpoint/2"),
    **{f"no {f}": _drop(f) for f in ("format", "step", "time", "metadata", "tree", "leaves", "blob")},
    **{f"no blob {f}": _drop(f"blob.{f}") for f in ("name", "size", "part_size", "crc32c")},
    "an extra field": _set("evil", 1),
    "an extra blob field": _blob(evil=1),
    "an extra leaf field": _set("leaves.0.evil", 1),
    "step a string": _set("step", "2"),
    "step a float": _set("step", 2.0),
    "step a bool": _set("step", True),
    "step negative": _set("step", -2),
    "step of another directory": _set("step", 1),
    "time a string": _set("time", "now"),
    "time NaN": _set("time", float("nan")),
    "metadata a list": _set("metadata", []),
    "tree a list": _set("tree", []),
    "leaves a dict": _set("leaves", {}),
    "blob a list": _set("blob", []),
    "size a float 1e15": _blob(size=1e15),
    "size -5": _blob(size=-5),
    "size a string": _blob(size="64"),
    "size a bool": _blob(size=True),
    "part_size 0": _blob(part_size=0),
    "part_size -1": _blob(part_size=-1),
    "CRC list emptied": _blob(crc32c=[]),
    "CRC list shortened": lambda m: _blob(crc32c=m["blob"]["crc32c"][:-1])(m),
    "CRC list extended": lambda m: _blob(crc32c=[*m["blob"]["crc32c"], 0])(m),
    "CRC a string": lambda m: _blob(crc32c=["x"] * len(m["blob"]["crc32c"]))(m),
    "CRC >= 2**32": lambda m: _blob(crc32c=[2**32] * len(m["blob"]["crc32c"]))(m),
    "CRC negative": lambda m: _blob(crc32c=[-1] * len(m["blob"]["crc32c"]))(m),
    "two CRC kinds": lambda m: _blob(crc32=m["blob"]["crc32c"])(m),
    "leaf offset past the end": lambda m: _set("leaves.0.offset", m["blob"]["size"])(m),
    "leaf offset negative": _set("leaves.0.offset", -64),
    "leaf nbytes wrong": _set("leaves.0.spec.nbytes", 8),
    "leaf shape 2**64": _set("leaves.0.spec.shape", [2**64]),
    # Names: never a path, so nothing outside the checkpoint (each target holds valid bytes).
    "name ../../etc/passwd": _name("../../etc/passwd"),
    "name /etc/passwd": _name("/etc/passwd"),
    "name ..": _name(".."),
    "name .": _name("."),
    "name empty": _name(""),
    "name a number": _name(5),
    "name with a slash": _name(lambda m: "sub/" + m["blob"]["name"]),
    "name with backslashes": _name("..\\..\\etc\\passwd"),
    "name with NUL": _name("data-00\x00.bin"),
    "name of a sibling step": _name(lambda m: "../step-000000000001/" + m["blob"]["name"]),
    "name in another run": _name(lambda m: "../../../" + OTHER_RUN + m["blob"]["name"]),
    "name through ..": _name(lambda m: "data-x/../" + m["blob"]["name"]),
}

#: Changes that pass the schema and are caught when the data is read.
DATA_CASES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "size 10**15 (one part)": _blob(size=10**15, part_size=10**15, crc32c=[0]),
    "size 64 bytes short": lambda m: _blob(size=m["blob"]["size"] - 64)(m),
    "a wrong CRC": lambda m: _blob(crc32c=[m["blob"]["crc32c"][0] ^ 1, *m["blob"]["crc32c"][1:]])(m),
    "a data object that does not exist": _name("data-" + "f" * 32 + ".bin"),
    "a tree with an unknown tag": _set("tree.root", {"t": "pickle", "v": "x"}),
    "a tree naming a leaf that does not exist": _set("tree.root", {"t": "leaf", "i": 99}),
}


def _check_refused(err: BaseException) -> None:
    assert isinstance(err, CorruptCheckpointError) and isinstance(err, FastfeedError), repr(err)
    assert "step-000000000002" in str(err), f"the error names the object: {err}"


def _load_both_ways(victim: Victim, endpoint: str | None, caplog: Any) -> None:
    with Checkpointer(victim.target.url(PREFIX), s3=victim.s3(endpoint), part_size="5MiB") as ckpt:
        with caplog.at_level(logging.WARNING, logger="fastfeed"):
            state = ckpt.load()
        assert ckpt.loaded is not None and ckpt.loaded.step == 1, "fell back to the previous checkpoint"
        assert torch.equal(state["w"], GOOD["w"])
        assert "step-000000000002" in caplog.text or "step 2" in caplog.text
        with pytest.raises(CorruptCheckpointError) as info:
            ckpt.load(step=2)
        _check_refused(info.value)


def _requests_stay_inside(proxy: Any, bucket_name: str, inside: str) -> None:
    bucket = "/" + bucket_name
    assert proxy.requests()
    for r in proxy.requests():
        assert r.path == bucket or r.path.startswith(f"{bucket}/{inside}"), f"read outside the prefix: {r.path}"
        assert "other-run" not in r.path and "etc" not in r.path


@pytest.mark.parametrize("case", list(SCHEMA_CASES) + list(DATA_CASES))
def test_a_tampered_manifest_is_refused_and_load_falls_back(
    case: str, victim: Victim, tampered: Callable[[Any], None], caplog: Any, request: Any
) -> None:
    change = SCHEMA_CASES.get(case) or DATA_CASES[case]
    tampered(change(copy.deepcopy(victim.manifest)))
    proxy = request.getfixturevalue("fault_proxy") if victim.target.kind == "seaweed" else None
    _load_both_ways(victim, proxy.endpoint_url if proxy else None, caplog)
    if proxy is not None:
        _requests_stay_inside(proxy, victim.target.bucket, PREFIX)


def test_a_claimed_size_is_never_allocated(victim: Victim, tampered: Callable[[Any], None]) -> None:
    """512 MiB claimed, with a CRC for every claimed part: the real size (6 MB) is checked first."""
    part = 32 << 20
    tampered(_blob(size=512 << 20, part_size=part, crc32c=[0] * 16)(copy.deepcopy(victim.manifest)))
    with Checkpointer(victim.target.url(PREFIX), s3=victim.s3()) as ckpt:
        tracemalloc.start()
        try:
            with pytest.raises(CorruptCheckpointError, match="its manifest says 536870912"):
                ckpt.load(step=2)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 64 << 20, f"{peak} bytes allocated while refusing"


def test_listing_ignores_a_tampered_manifest_with_a_warning(
    victim: Victim, tampered: Callable[[Any], None], caplog: Any
) -> None:
    tampered(_name("../../etc/passwd")(copy.deepcopy(victim.manifest)))
    with (
        Checkpointer(victim.target.url(PREFIX), s3=victim.s3()) as ckpt,
        caplog.at_level(logging.WARNING, logger="fastfeed"),
    ):
        assert [i.step for i in ckpt.list()] == [1]
    assert "step-000000000002/MANIFEST.json" in caplog.text and "etc/passwd" in caplog.text


def test_a_symlink_in_a_local_checkpoint_is_never_followed(tmp_path: Path, caplog: Any) -> None:
    root = tmp_path / "run"
    with Checkpointer(root) as ckpt:
        ckpt.save(GOOD, step=1).result(timeout=30)
        ckpt.save({"w": torch.full((100,), 2.0)}, step=2).result(timeout=30)
    outside = tmp_path / "outside"
    outside.mkdir()
    (data,) = (root / "step-000000000002").glob("data-*.bin")
    (outside / data.name).write_bytes(data.read_bytes())  # valid bytes: following the link would load
    data.unlink()
    data.symlink_to(outside / data.name)
    with Checkpointer(root) as ckpt:
        with caplog.at_level(logging.WARNING, logger="fastfeed"):
            assert torch.equal(ckpt.load()["w"], GOOD["w"]) and ckpt.loaded is not None and ckpt.loaded.step == 1
        with pytest.raises(CorruptCheckpointError, match="symbolic link") as info:
            ckpt.load(step=2)
        assert "step-000000000002" in str(info.value)
    # A step directory that is a link (to a whole valid checkpoint elsewhere) is not listed at all.
    (outside / "step-000000000003").mkdir()
    for f in (root / "step-000000000001").iterdir():
        (outside / "step-000000000003" / f.name).write_bytes(f.read_bytes())
    os.symlink(outside / "step-000000000003", root / "step-000000000004")
    with Checkpointer(root) as ckpt:
        assert [i.step for i in ckpt.list()] == [1, 2]


# ---------------------------------------------------------------------------------------------
# The DCP reader

DCP_ROOT = "dcp-victim/"
DCP_STATE = {"w": torch.arange(64, dtype=torch.float32), "step": 5}


@dataclass
class DcpVictim:
    target: Target
    manifest: dict[str, Any]
    raw: bytes
    data_name: str


@pytest.fixture(scope="module", params=["seaweed", "local"])
def dcp_victim(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DcpVictim]:
    target = make_target(request.param, request, tmp_path_factory.mktemp("dcp"))
    with FastfeedStorageWriter(target.url(DCP_ROOT), s3=target.s3()) as writer:
        dcp.save(DCP_STATE, storage_writer=writer, checkpoint_id="c")
    raw = target.read(DCP_ROOT + "c/MANIFEST.json")
    manifest = json.loads(raw)
    (name,) = manifest["objects"]
    target.write("other-run/c/" + name, target.read(DCP_ROOT + "c/" + name))
    yield DcpVictim(target, manifest, raw, name)


@pytest.fixture
def dcp_tampered(dcp_victim: DcpVictim) -> Iterator[Callable[[Any], None]]:
    def write(doc: Any) -> None:
        dcp_victim.target.write(
            DCP_ROOT + "c/MANIFEST.json", doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        )

    try:
        yield write
    finally:
        dcp_victim.target.write(DCP_ROOT + "c/MANIFEST.json", dcp_victim.raw)


def _rename_object(new: str) -> Callable[[dict[str, Any]], Any]:
    def change(m: dict[str, Any]) -> Any:
        (old,) = m["objects"]
        m["objects"] = {new: m["objects"][old]}
        for item in m["items"]:
            item["object"] = new
        return m

    return change


def _objects(**fields: Any) -> Callable[[dict[str, Any]], Any]:
    def change(m: dict[str, Any]) -> Any:
        for o in m["objects"].values():
            o.update(fields)
        return m

    return change


def _item(fqn: str, **fields: Any) -> Callable[[dict[str, Any]], Any]:
    def change(m: dict[str, Any]) -> Any:
        for item in m["items"]:
            if item["fqn"] == fqn:
                item.update(fields)
        return m

    return change


def _deep_dcp(m: dict[str, Any]) -> bytes:
    m["planner_data"] = "@@"
    return json.dumps(m).replace('"@@"', "[" * DEEP + "]" * DEEP).encode()


DCP_METADATA_CASES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "a list": lambda m: [m],
    "null": lambda m: None,
    "not JSON": lambda m: b"{",
    "deep nesting": _deep_dcp,
    **{
        f"no {f}": _drop(f)
        for f in ("time", "checkpoint_id", "dcp_version", "storage_meta", "objects", "items", "state_dict_metadata")
    },
    "an extra field": _set("evil", 1),
    "an extra item field": lambda m: _item("w", evil=1)(m),
    "an extra object field": _objects(evil=1),
    "an extra tensor metadata field": _set("state_dict_metadata.w.evil", 1),
    "object ../../etc/passwd": _rename_object("../../etc/passwd"),
    "object /etc/passwd": _rename_object("/etc/passwd"),
    "object ..": _rename_object(".."),
    "object in another run": lambda m: _rename_object("../../other-run/c/" + next(iter(m["objects"])))(m),
    "object with a slash": lambda m: _rename_object("x/" + next(iter(m["objects"])))(m),
    "object size -5": _objects(size=-5),
    "object size a float 1e15": _objects(size=1e15),
    "object part_size 0": _objects(part_size=0),
    "object CRC list emptied": _objects(crc32c=[]),
    "object CRC list extended": lambda m: _objects(crc32c=[*next(iter(m["objects"].values()))["crc32c"], 0])(m),
    "item CRC >= 2**32": lambda m: _item("w", crc32c=2**32)(m),
    "item start negative": lambda m: _item("w", start=-1)(m),
    "item past its object": lambda m: _item("w", length=10**15)(m),
    "item kind pickle": lambda m: _item("step", kind="pickle")(m),
    "item dtype unknown": lambda m: _item("w", dtype="object")(m),
    "tensor size 2**64": _set("state_dict_metadata.w.size", [2**64]),
}

DCP_DATA_CASES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "object size 10**15": _objects(size=10**15, part_size=10**15, crc32c=[0]),
    "item CRC wrong": lambda m: _item("w", crc32c=next(i["crc32c"] for i in m["items"] if i["fqn"] == "w") ^ 1)(m),
}


@pytest.mark.parametrize("case", list(DCP_METADATA_CASES))
def test_the_dcp_reader_refuses_a_malformed_manifest(
    case: str, dcp_victim: DcpVictim, dcp_tampered: Callable[[Any], None], request: Any
) -> None:
    dcp_tampered(DCP_METADATA_CASES[case](copy.deepcopy(dcp_victim.manifest)))
    proxy = request.getfixturevalue("fault_proxy") if dcp_victim.target.kind == "seaweed" else None
    s3 = dcp_victim.target.s3(proxy.endpoint_url if proxy else None)
    with (
        FastfeedStorageReader(dcp_victim.target.url(DCP_ROOT), s3=s3, checkpoint_id="c") as reader,
        pytest.raises(CorruptCheckpointError) as info,
    ):
        reader.read_metadata()
    assert f"{DCP_ROOT}c/MANIFEST.json" in str(info.value), "names the manifest"
    if proxy is not None:
        _requests_stay_inside(proxy, dcp_victim.target.bucket, DCP_ROOT + "c/")


@pytest.mark.parametrize("case", list(DCP_DATA_CASES))
def test_the_dcp_reader_checks_sizes_and_checksums_before_using_data(
    case: str, dcp_victim: DcpVictim, dcp_tampered: Callable[[Any], None]
) -> None:
    dcp_tampered(DCP_DATA_CASES[case](copy.deepcopy(dcp_victim.manifest)))
    out = {"w": torch.zeros(64), "step": 0}
    with (
        FastfeedStorageReader(dcp_victim.target.url(DCP_ROOT), s3=dcp_victim.target.s3()) as reader,
        pytest.raises(CheckpointException) as info,
    ):
        dcp.load(out, storage_reader=reader, checkpoint_id="c")
    errors = [e for e, _ in info.value.failures.values()]
    assert errors and all(isinstance(e, CorruptCheckpointError) for e in errors), errors
    assert all(dcp_victim.data_name in str(e) for e in errors), "names the data object"
    assert torch.equal(out["w"], torch.zeros(64)), "nothing was loaded"


def test_the_dcp_reader_never_follows_a_symlink(tmp_path: Path) -> None:
    with FastfeedStorageWriter(tmp_path / "root") as writer:
        dcp.save(DCP_STATE, storage_writer=writer, checkpoint_id="c")
    (data,) = (tmp_path / "root" / "c").glob("rank-*.data")
    copy_ = tmp_path / "elsewhere.data"
    copy_.write_bytes(data.read_bytes())  # valid bytes
    data.unlink()
    data.symlink_to(copy_)
    out = {"w": torch.zeros(64), "step": 0}
    with FastfeedStorageReader(tmp_path / "root") as reader, pytest.raises(CheckpointException) as info:
        dcp.load(out, storage_reader=reader, checkpoint_id="c")
    (err,) = [e for e, _ in info.value.failures.values()]
    assert isinstance(err, CorruptCheckpointError) and "symbolic link" in str(err), err
    assert torch.equal(out["w"], torch.zeros(64))
