"""The rest of botocore's chain, used unchanged: an HTTPS endpoint signed by a private CA
(``AWS_CA_BUNDLE``, a profile's ``ca_bundle``), and credentials from web identity (EKS's IRSA:
``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``, or a profile) and from IAM Identity Center
(SSO, a cached token).

The S3 side is the real local SeaweedFS server, which checks every signature: a read succeeds
only with its credentials. Those credentials reach fastfeed only through the identity service,
which is a small HTTP server here (there is no STS or SSO portal to run locally; moto's STS
returns made-up keys no S3 server would accept). It answers ``AssumeRoleWithWebIdentity`` and
``GetRoleCredentials`` with SeaweedFS's keys, in the formats of AWS's API references, only for
the right token, and records each call; botocore finds it through ``AWS_ENDPOINT_URL_STS`` /
``AWS_ENDPOINT_URL_SSO``. The HTTPS endpoint is :class:`~fastfeed.testing.proxy.FaultProxy`
serving TLS with a certificate from a CA made by ``trustme`` for the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from fastfeed import Checkpointer, DataLoader, FastfeedError, StreamingDataset
from fastfeed.config import S3Config
from fastfeed.store.obstore import _profile_settings
from fastfeed.testing.proxy import FaultProxy

trustme = pytest.importorskip("trustme")

TOKEN = "eyJhbGciOiJSUzI1NiJ9.web-identity-token-of-the-pod"
ROLE = "arn:aws:iam::123456789012:role/reader"
SSO_TOKEN = "sso-access-token-from-the-cache"
SSO_START = "https://example.awsapps.com/start"


def _expected(path: Path) -> list[tuple[str, str]]:
    with tarfile.open(path) as tar:
        keys = {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
    return [(path.name, k) for k in keys]


def _read_all(url: str, s3: S3Config, num_workers: int = 0) -> list[tuple[str, str]]:
    loader = DataLoader(StreamingDataset(url, s3=s3), batch_size=4, num_workers=num_workers)
    try:
        pairs = (pair for b in loader for pair in zip(b["__url__"], b["__key__"], strict=True))
        return sorted((url.rsplit("/", 1)[-1], key) for url, key in pairs)
    finally:
        loader.close()


# -- an HTTPS endpoint with a private CA ------------------------------------------------------


@pytest.fixture
def tls_endpoint(seaweed: Any, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """SeaweedFS behind TLS (a certificate for 127.0.0.1 from a fresh CA): ``(url, ca.pem)``."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_pem = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    with FaultProxy(seaweed.endpoint_url, ssl=context) as proxy:
        yield proxy.endpoint_url, ca_pem


@pytest.mark.parametrize("engine", ["aiobotocore", "obstore"])
def test_https_with_a_private_ca_is_refused_clearly_without_its_bundle(
    tls_endpoint: tuple[str, Path], s3_shards: Any, seaweed: Any, engine: str
) -> None:
    url, _ = tls_endpoint
    name, prefix, _ = s3_shards
    s3 = S3Config(
        endpoint_url=url, access_key_id=seaweed.access_key, secret_access_key=seaweed.secret_key, engine=engine
    )
    start = time.monotonic()
    with pytest.raises(FastfeedError) as info:  # the listing (botocore) refuses first
        StreamingDataset(f"s3://{name}/{prefix}", s3=s3)
    assert time.monotonic() - start < 60
    text = str(info.value)
    assert "certificate" in text.lower() and "127.0.0.1" in text, text


@pytest.mark.parametrize(("where", "engine"), [("AWS_CA_BUNDLE", "aiobotocore"), ("profile", "aiobotocore"),
                                                ("AWS_CA_BUNDLE", "obstore")])  # fmt: skip
def test_https_with_a_private_ca_reads_and_checkpoints_with_its_bundle(
    tls_endpoint: tuple[str, Path],
    s3_shards: Any,
    seaweed: Any,
    bucket: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    engine: str,
) -> None:
    # The bundle as botocore takes it, from the environment or the profile's ca_bundle: the
    # listing, the loader's workers' data plane and the checkpoint uploader all verify with it;
    # the obstore engine takes the same bundle (added to the system's roots there).
    url, ca_pem = tls_endpoint
    creds = f"[default]\naws_access_key_id = {seaweed.access_key}\naws_secret_access_key = {seaweed.secret_key}\n"
    config = f"[default]\nregion = {seaweed.region}\n"
    if where == "profile":
        config += f"ca_bundle = {ca_pem}\n"
    else:
        monkeypatch.setenv("AWS_CA_BUNDLE", str(ca_pem))
    (tmp_path / "config").write_text(config)
    (tmp_path / "credentials").write_text(creds)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    name, prefix, paths = s3_shards
    _profile_settings.cache_clear()
    s3 = S3Config(endpoint_url=url, engine=engine)
    assert _read_all(f"s3://{name}/{prefix}", s3, num_workers=2) == sorted(x for p in paths for x in _expected(p))

    state = {"w": torch.arange(3_000_000, dtype=torch.float32), "step": 3}
    with Checkpointer(f"s3://{bucket.name}/ckpt", s3=s3, part_size="5MiB") as ckpt:
        ckpt.save(state, step=3).result()
        loaded = ckpt.load()
    assert loaded["step"] == 3 and torch.equal(loaded["w"], state["w"])


# -- credentials from an identity service -----------------------------------------------------


class _Identity(BaseHTTPRequestHandler):
    """STS's AssumeRoleWithWebIdentity (form POST, XML answer) and the SSO portal's
    GetRoleCredentials (GET with a bearer header, JSON answer), per AWS's API references."""

    server: _IdentityServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        call = {k: v[0] for k, v in form.items()}
        self.server.calls.append(call)
        if call.get("Action") != "AssumeRoleWithWebIdentity" or call.get("WebIdentityToken") != TOKEN:
            error = (
                b"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code>"
                b"<Message>no</Message></Error></ErrorResponse>"
            )
            return self._answer(400, error, "text/xml")
        s = self.server.seaweed
        xml = (
            '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleWithWebIdentityResult><Credentials>"
            f"<AccessKeyId>{s.access_key}</AccessKeyId><SecretAccessKey>{s.secret_key}</SecretAccessKey>"
            "<SessionToken></SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration>"
            f"</Credentials><AssumedRoleUser><Arn>{ROLE}/s</Arn><AssumedRoleId>AROA:s</AssumedRoleId></AssumedRoleUser>"
            "</AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
        )
        self._answer(200, xml.encode(), "text/xml")

    def do_GET(self) -> None:
        query = {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).items()}
        token = self.headers.get("x-amz-sso_bearer_token")
        call = {"path": urllib.parse.urlsplit(self.path).path, **query, "token": token}
        self.server.calls.append(call)
        if call["path"] != "/federation/credentials" or call["token"] != SSO_TOKEN:
            return self._answer(401, b'{"message": "Session token not found or invalid"}', "application/json")
        s = self.server.seaweed
        body = {"roleCredentials": {"accessKeyId": s.access_key, "secretAccessKey": s.secret_key,
                                    "sessionToken": "", "expiration": 4_070_908_800_000}}  # fmt: skip
        self._answer(200, json.dumps(body).encode(), "application/json")


class _IdentityServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, seaweed: Any) -> None:
        super().__init__(("127.0.0.1", 0), _Identity)
        self.seaweed = seaweed
        self.calls: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def identity(seaweed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_IdentityServer]:
    server = _IdentityServer(seaweed)
    thread = threading.Thread(target=server.serve_forever, name="identity", daemon=True)
    thread.start()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.aws/sso/cache, ~/.aws/cli/cache
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", server.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSO", server.url)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    (tmp_path / "config").write_text(text)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))


@pytest.mark.parametrize("via", ["environment", "profile"])
def test_web_identity_credentials_read_the_local_server(
    identity: _IdentityServer, seaweed: Any, s3_shards: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    if via == "environment":  # as EKS sets it for a pod with a service account role
        monkeypatch.setenv("AWS_ROLE_ARN", ROLE)
        monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
        _profiles(tmp_path, monkeypatch, f"[default]\nregion = {seaweed.region}\n")
        profile = None
    else:
        _profiles(
            tmp_path,
            monkeypatch,
            f"[profile irsa]\nregion = {seaweed.region}\nrole_arn = {ROLE}\nweb_identity_token_file = {token_file}\n",
        )
        profile = "irsa"
    name, prefix, paths = s3_shards
    s3 = S3Config(endpoint_url=seaweed.endpoint_url, profile=profile)
    assert _read_all(f"s3://{name}/{prefix}", s3, num_workers=2) == sorted(x for p in paths for x in _expected(p))
    assert identity.calls and all(
        c["Action"] == "AssumeRoleWithWebIdentity" and c["RoleArn"] == ROLE and c["WebIdentityToken"] == TOKEN
        for c in identity.calls
    )

    token_file.write_text("a token the identity service refuses")
    identity.calls.clear()
    with pytest.raises(FastfeedError) as info:
        StreamingDataset(f"s3://{name}/{prefix}", s3=s3)
    assert identity.calls, "the refused token was never presented"
    assert "InvalidIdentityToken" in str(info.value) or "credential" in str(info.value).lower(), str(info.value)


def test_sso_credentials_from_the_token_cache_read_the_local_server(
    identity: _IdentityServer, seaweed: Any, s3_shards: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `aws sso login` leaves the token in ~/.aws/sso/cache/<sha1 of the start URL>.json.
    cache = tmp_path / "home" / ".aws" / "sso" / "cache"
    cache.mkdir(parents=True)
    cached = {"startUrl": SSO_START, "region": "us-east-1", "accessToken": SSO_TOKEN,
              "expiresAt": "2099-01-01T00:00:00Z"}  # fmt: skip
    (cache / f"{hashlib.sha1(SSO_START.encode()).hexdigest()}.json").write_text(json.dumps(cached))
    _profiles(
        tmp_path,
        monkeypatch,
        f"[profile sso]\nregion = {seaweed.region}\nsso_start_url = {SSO_START}\nsso_region = us-east-1\n"
        "sso_account_id = 123456789012\nsso_role_name = Reader\n",
    )
    # botocore fixes the token cache's directory from HOME when it is imported: read in a fresh
    # process started with this HOME, as a user's training process would be.
    name, prefix, paths = s3_shards
    script = (
        "import json, sys\n"
        "from fastfeed import StreamingDataset\n"
        "from fastfeed.config import S3Config\n"
        f"s3 = S3Config(endpoint_url={seaweed.endpoint_url!r}, profile='sso')\n"
        f"ds = StreamingDataset('s3://{name}/{prefix}', s3=s3)\n"
        "print(json.dumps(sorted([s['__url__'].rsplit('/', 1)[-1], s['__key__']] for s in ds)))\n"
    )
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = [tuple(x) for x in json.loads(done.stdout)]
    assert got == sorted(x for p in paths for x in _expected(p))
    assert identity.calls and all(
        c["path"] == "/federation/credentials"
        and c["role_name"] == "Reader"
        and c["account_id"] == "123456789012"
        and c["token"] == SSO_TOKEN
        for c in identity.calls
    )
