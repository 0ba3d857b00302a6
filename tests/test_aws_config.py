"""AWS configuration as botocore resolves it: region and addressing style from the environment and
the profile (against botocore's own client on the same files), path-style for custom endpoints,
and profiles whose credentials come from a file or a ``credential_process``, read against the
local S3 server. Every test writes its own ``~/.aws`` files in a temporary directory."""

from __future__ import annotations

import asyncio
import sys
import tarfile
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from fastfeed import AccessDeniedError, StreamingDataset
from fastfeed.config import S3Config
from fastfeed.store.obstore import _profile_region, _profile_settings
from fastfeed.store.s3 import S3Store


def _aws_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, credentials: str = "") -> None:
    (tmp_path / "config").write_text(config)
    (tmp_path / "credentials").write_text(credentials)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    _profile_settings.cache_clear()


def _ours(config: S3Config) -> Any:
    """The botocore client fastfeed's data plane makes for ``config`` (its ``meta``)."""

    async def make() -> Any:
        store = await S3Store.create(config)
        try:
            return store._client.meta
        finally:
            await store.aclose()

    return asyncio.run(make())


def _botocores(profile: str | None, **kwargs: Any) -> Any:
    return botocore.session.Session(profile=profile).create_client("s3", **kwargs).meta


PROFILES = """
[default]
region = ap-south-1

[profile eu]
region = eu-west-3
s3 =
    addressing_style = virtual

[profile bare]
"""

CREDS = """
[eu]
aws_access_key_id = AKIDEU
aws_secret_access_key = secret-eu

[bare]
aws_access_key_id = AKIDBARE
aws_secret_access_key = secret-bare

[default]
aws_access_key_id = AKIDDEFAULT
aws_secret_access_key = secret-default
"""


@pytest.mark.parametrize("profile", [None, "eu", "bare"])
def test_region_and_addressing_are_botocores_for_aws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profile: str | None
) -> None:
    _aws_files(tmp_path, monkeypatch, PROFILES, CREDS)
    ours, theirs = _ours(S3Config.resolve(profile=profile)), _botocores(profile)
    assert ours.region_name == theirs.region_name  # the profile's, not a hard-coded us-east-1
    assert ours.endpoint_url == theirs.endpoint_url
    assert (ours.config.s3 or {}).get("addressing_style") == (theirs.config.s3 or {}).get("addressing_style")
    assert ours.region_name == {None: "ap-south-1", "eu": "eu-west-3", "bare": "us-east-1"}[profile]
    assert _profile_region(profile) == ours.region_name  # the obstore engine resolves it alike


def test_the_environment_beats_the_profile_as_in_botocore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _aws_files(tmp_path, monkeypatch, PROFILES, CREDS)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "sa-east-1")
    assert _ours(S3Config.resolve(profile="eu")).region_name == _botocores("eu").region_name == "sa-east-1"
    monkeypatch.setenv("AWS_REGION", "ca-central-1")
    assert _ours(S3Config.resolve(profile="eu")).region_name == "ca-central-1"
    assert _ours(S3Config.resolve(profile="eu", region="us-west-2")).region_name == "us-west-2"  # explicit wins


def test_a_custom_endpoint_is_path_style_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _aws_files(tmp_path, monkeypatch, PROFILES, CREDS)
    local = S3Config(endpoint_url="http://127.0.0.1:9", profile="eu")
    meta = _ours(local)
    assert meta.config.s3["addressing_style"] == "path" and meta.region_name == "eu-west-3"
    assert local.path_style is True
    assert _ours(S3Config(endpoint_url="http://127.0.0.1:9", addressing_style="virtual")).config.s3 == {
        "addressing_style": "virtual"
    }
    assert S3Config().path_style is None and S3Config(addressing_style="virtual").path_style is False


def _keys_of(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}


def _seaweed_profiles(tmp_path: Path, seaweed: Any) -> tuple[str, str]:
    helper = tmp_path / "creds.py"
    helper.write_text(
        "import json\n"
        f"print(json.dumps({{'Version': 1, 'AccessKeyId': {seaweed.access_key!r}, "
        f"'SecretAccessKey': {seaweed.secret_key!r}}}))\n"
    )
    config = (
        f"[profile files]\nregion = {seaweed.region}\n\n"
        f"[profile process]\nregion = {seaweed.region}\n"
        f"credential_process = {sys.executable} {helper}\n"
    )
    creds = f"[files]\naws_access_key_id = {seaweed.access_key}\naws_secret_access_key = {seaweed.secret_key}\n"
    return config, creds


@pytest.mark.parametrize("profile", ["files", "process"])
def test_profiles_read_the_local_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seaweed: Any, s3_shards: Any, profile: str
) -> None:
    # Credentials from the shared credentials file, or from a credential_process: botocore's
    # chain, used unchanged by both the listing and the data plane.
    _aws_files(tmp_path, monkeypatch, *_seaweed_profiles(tmp_path, seaweed))
    name, prefix, paths = s3_shards
    s3 = S3Config.resolve(endpoint_url=seaweed.endpoint_url, profile=profile)
    ds = StreamingDataset(f"s3://{name}/{prefix}", s3=s3)
    got = sorted((s["__url__"].rsplit("/", 1)[-1], s["__key__"]) for s in ds)
    assert len(ds.shards) == len(paths)
    assert got == sorted((p.name, key) for p in paths for key in _keys_of(p))


def test_a_profile_without_credentials_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seaweed: Any, s3_shards: Any
) -> None:
    _aws_files(tmp_path, monkeypatch, "[profile empty]\nregion = us-east-1\n")
    name, prefix, _ = s3_shards
    with pytest.raises(AccessDeniedError) as info:
        StreamingDataset(f"s3://{name}/{prefix}", s3=S3Config(endpoint_url=seaweed.endpoint_url, profile="empty"))
    assert "credential" in str(info.value).lower()
