"""URL parsing, brace expansion and configuration parsing."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fastfeed.config import PrefetchConfig, S3Config, format_size, parse_size
from fastfeed.errors import ConfigError, InvalidURLError
from fastfeed.urls import expand_braces, parse_url


def test_parse_s3_url_keeps_special_characters_in_key() -> None:
    loc = parse_url("s3://my-bucket/a/b?c#d.tar")
    assert (loc.scheme, loc.bucket, loc.key) == ("s3", "my-bucket", "a/b?c#d.tar")
    assert loc.url == "s3://my-bucket/a/b?c#d.tar"


def test_parse_file_url_and_plain_path(tmp_path) -> None:
    p = tmp_path / "x y.tar"
    assert parse_url(str(p)).path == str(p)
    assert parse_url(p.as_uri()).path == str(p)
    assert parse_url(str(p)).url == p.as_uri()


def test_http_urls_keep_their_path_and_query() -> None:
    loc = parse_url("https://huggingface.co/datasets/x/resolve/main/train-{0}.tar?download=true")
    assert loc.scheme == "https" and loc.url.endswith("?download=true")
    assert loc.key == "datasets/x/resolve/main/train-{0}.tar"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "s3://",
        "s3:///key",
        "gs://bucket/key",
        "http:///x.tar",
        "https://:8080/x.tar",
        "file://otherhost/x",
        "s3://a/x",
    ],
)
def test_bad_urls_raise_invalid_url_error(url: str) -> None:
    with pytest.raises(InvalidURLError) as info:
        parse_url(url)
    assert "s3://" in str(info.value) or "URL" in str(info.value)


def test_brace_ranges_keep_zero_padding_and_product_order() -> None:
    assert expand_braces("s/shard-{000008..000011}.tar") == [
        "s/shard-000008.tar",
        "s/shard-000009.tar",
        "s/shard-000010.tar",
        "s/shard-000011.tar",
    ]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("no-braces") == ["no-braces"]


@pytest.mark.parametrize("pattern", ["x{1..", "x}1", "x{1..2", "{a,{b}", "x{0..2000000}"])
def test_malformed_or_hostile_brace_patterns(pattern: str) -> None:
    with pytest.raises(InvalidURLError) as info:
        expand_braces(pattern)
    assert pattern in str(info.value)


@pytest.mark.parametrize(
    "pattern",
    [
        "s3://b/shard-{000000..000012..3}.tar",
        "{a,b}-{0..9}",
        "x{5..1}y",
        "pre{a,b{1..3},c}post",
        "{00..10..4}{x,y}",
        "lit{}eral{one}",
        "{a..e..2}",
        "https://host/d/{train,val}-{000..002}.tar",
    ],
)
def test_brace_expansion_is_webdatasets(pattern: str) -> None:
    shardlists = pytest.importorskip("webdataset.shardlists")
    assert expand_braces(pattern) == shardlists.expand_urls(pattern)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8MiB", 8 * 2**20), ("8 MB", 8_000_000), ("1.5GiB", int(1.5 * 2**30)), (1234, 1234), ("17", 17)],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["-1", "8XB", "lots", -5, True, None])
def test_parse_size_rejects_garbage(text: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)  # type: ignore[arg-type]


def test_format_size() -> None:
    assert format_size(8 * 2**20) == "8.0 MiB"
    assert format_size(10) == "10 B"


def test_impossible_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="byte_budget"):
        PrefetchConfig.from_args(part_size="16MiB", byte_budget="8MiB")
    with pytest.raises(ConfigError):
        PrefetchConfig.from_args(max_requests=0)


def test_s3_config_reads_endpoint_and_region_from_environment_only_in_resolve() -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "eu-west-1", "AWS_PROFILE": "p"}
    cfg = S3Config.resolve(env)
    assert (cfg.endpoint_url, cfg.region, cfg.profile) == ("http://127.0.0.1:9", "eu-west-1", "p")
    cfg = S3Config.resolve({"AWS_ENDPOINT_URL_S3": "http://a:1", "AWS_ENDPOINT_URL": "http://b:2"})
    assert cfg.endpoint_url == "http://a:1"
    assert S3Config.resolve(env, endpoint_url="http://c:3").endpoint_url == "http://c:3"
    with pytest.raises(ConfigError):
        S3Config(endpoint_url="127.0.0.1:9000")
    with pytest.raises(ConfigError):
        S3Config(addressing_style="weird")


def test_s3_config_never_shows_its_secrets() -> None:
    cfg = S3Config(
        endpoint_url="http://127.0.0.1:9",
        access_key_id="AKIDEXAMPLE",
        secret_access_key="s3cr3t-VALUE",
        session_token="t0ken-VALUE",
    )
    for text in (repr(cfg), str(cfg), f"{cfg!r}", repr([cfg]), repr({"s3": cfg})):
        assert "s3cr3t-VALUE" not in text and "t0ken-VALUE" not in text
        assert "secret_access_key='<set>'" in text and "session_token='<set>'" in text
    assert "secret_access_key=None" in repr(S3Config())
    assert "AKIDEXAMPLE" in repr(cfg), "the key id is not a secret: it names the credentials in use"
    assert cfg.secret_access_key == "s3cr3t-VALUE", "only the repr hides it"


def test_a_rejected_secret_appears_in_no_error_or_log(seaweed: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Wrong credentials against the real server: the error and every log line (DEBUG, every
    logger, botocore's included) name the endpoint and key id, never the secret."""
    from fastfeed import AccessDeniedError, StreamingDataset

    secret = "wrong-s3cr3t-" + "Z" * 20
    cfg = S3Config(endpoint_url=seaweed.endpoint_url, access_key_id=seaweed.access_key, secret_access_key=secret)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AccessDeniedError) as info:
        StreamingDataset("s3://any-bucket/train/", s3=cfg)
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert caplog.records, "botocore logs at DEBUG"
    assert all(secret not in r.getMessage() for r in caplog.records)
