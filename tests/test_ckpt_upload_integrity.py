"""Checkpoint parts carry their CRC32C to the store, and a store that checks it lets the parts go
without a SHA256 of each body (the signature's payload hash over plain HTTP).

What is observed is what went over the wire, recorded by the :class:`FaultProxy` in front of a
real server: SeaweedFS checks ``x-amz-checksum-crc32c`` (a wrong one is refused with
BadDigest), moto does not. The proxy also damages a part on its way (one flipped bit, the
signature untouched): the store refuses it, fastfeed sends it again, and the checkpoint loads
bit for bit. Nothing patched.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from fastfeed.checkpoint.checkpointer import Checkpointer
from fastfeed.config import S3Config
from fastfeed.store.upload import checksum
from fastfeed.testing import FaultProxy, ProxyRequest

PART = 5 * 1024 * 1024


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"w": torch.rand(3_000_000, generator=gen), "b": torch.arange(1000, dtype=torch.int64)}


def _config(proxy: FaultProxy, server: Any) -> S3Config:
    return S3Config(
        endpoint_url=proxy.endpoint_url, access_key_id=server.access_key, secret_access_key=server.secret_key
    )


def _parts(proxy: FaultProxy) -> list[ProxyRequest]:
    """The UploadPart requests the proxy saw, in order."""
    return [r for r in proxy.requests() if r.method == "PUT" and re.search(r"(^|&)partNumber=", r.query)]


def _save_and_load(url: str, s3: S3Config) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = _state()
    with Checkpointer(url, s3=s3, part_size="5MiB") as ckpt:
        ckpt.save(state, step=1).result(timeout=120)
    with Checkpointer(url, s3=s3) as ckpt:
        return state, ckpt.load()


def _assert_same(state: dict[str, torch.Tensor], loaded: dict[str, Any]) -> None:
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_parts_carry_their_crc32c_and_go_unsigned_where_the_store_checks_it(bucket: Any, fault_proxy: Any) -> None:
    url = bucket.url("runs/checked/")
    state, loaded = _save_and_load(url, _config(fault_proxy, bucket.server))
    _assert_same(state, loaded)
    parts = _parts(fault_proxy)
    assert len(parts) >= 2, "the state is larger than a part: a multipart upload"
    for part in parts:
        assert part.header("x-amz-content-sha256") == "UNSIGNED-PAYLOAD", part
        value = part.header("x-amz-checksum-crc32c")
        assert value is not None and len(base64.b64decode(value)) == 4, part
    puts = [r for r in fault_proxy.requests() if r.method == "PUT"]
    assert len(puts) > len(parts), "the manifest and the probes are single PUTs"
    assert all(r.header("x-amz-checksum-crc32c") for r in puts), "every object and part carries its CRC32C"
    # The headers are the CRC32C of each part's bytes: the store checked them against what it
    # received, and the data object is the parts in order.
    stored = [k for k in _keys(bucket, "runs/checked/") if "/data-" in "/" + k]
    assert len(stored) == 1
    body = bucket.client.get_object(Bucket=bucket.name, Key=stored[0])["Body"].read()
    sent = sorted(parts, key=lambda r: int(re.search(r"partNumber=(\d+)", r.query).group(1)))  # type: ignore[union-attr]
    for i, part in enumerate(sent):
        piece = body[i * PART : (i + 1) * PART]
        assert part.header("x-amz-checksum-crc32c") == base64.b64encode(checksum(piece).to_bytes(4, "big")).decode()


def test_a_part_damaged_on_the_way_is_refused_by_the_store_and_sent_again(bucket: Any, fault_proxy: Any) -> None:
    url = bucket.url("runs/damaged/")
    # One bit of the first part's body flipped after the client signed and checksummed it.
    rule = fault_proxy.inject_corruption(at=12345, count=1, method="PUT", path_regex=r"/data-")
    state, loaded = _save_and_load(url, _config(fault_proxy, bucket.server))
    assert rule.remaining == 0, "the part was damaged on its way"
    damaged = [r for r in fault_proxy.requests() if r.fault == "corrupt"]
    assert len(damaged) == 1
    number = re.search(r"partNumber=(\d+)", damaged[0].query).group(1)  # type: ignore[union-attr]
    again = [r for r in _parts(fault_proxy) if re.search(rf"(^|&)partNumber={number}(&|$)", r.query)]
    assert len(again) == 2, "the refused part was sent once more"
    _assert_same(state, loaded)


def test_a_store_that_does_not_check_checksums_keeps_signed_payloads(moto_server: Any) -> None:
    name = moto_server.create_bucket("ff-unchecked-crc")
    with FaultProxy(moto_server.endpoint_url) as proxy:
        state, loaded = _save_and_load(f"s3://{name}/run/", _config(proxy, moto_server))
        parts = _parts(proxy)
    _assert_same(state, loaded)
    assert len(parts) >= 2
    for part in parts:
        digest = part.header("x-amz-content-sha256")
        assert digest is not None and re.fullmatch(r"[0-9a-f]{64}", digest), part


def test_a_profile_that_asks_for_signed_payloads_keeps_them(
    bucket: Any, fault_proxy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config"
    config.write_text("[default]\ns3 =\n    payload_signing_enabled = true\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    state, loaded = _save_and_load(bucket.url("runs/signed/"), _config(fault_proxy, bucket.server))
    _assert_same(state, loaded)
    parts = _parts(fault_proxy)
    assert parts
    for part in parts:
        digest = part.header("x-amz-content-sha256")
        assert digest is not None and re.fullmatch(r"[0-9a-f]{64}", digest), part
        assert part.header("x-amz-checksum-crc32c") is not None, "the checksum still goes with it"


def _keys(bucket: Any, prefix: str) -> list[str]:
    resp = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=prefix)
    return [item["Key"] for item in resp.get("Contents", [])]
