"""Where the checkpoint safety tests write: a SeaweedFS bucket, a moto bucket or a local directory,
with plain access (boto3 or the file system, never through fastfeed) to inspect and tamper."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastfeed.config import RetryConfig, S3Config


@dataclass
class Target:
    """A checkpoint root: ``url(prefix)`` for fastfeed, ``keys`` / ``read`` / ``write`` for the test."""

    kind: str  # "seaweed", "moto" or "local"
    root: str  # s3://bucket/ or a directory path with a trailing /
    server: Any = None
    client: Any = None

    @property
    def bucket(self) -> str:
        return self.root.removeprefix("s3://").split("/", 1)[0]

    def url(self, prefix: str) -> str:
        return self.root + prefix

    def s3(self, endpoint: str | None = None, **retry: Any) -> S3Config | None:
        if self.server is None:
            return None
        return S3Config(
            endpoint_url=endpoint or self.server.endpoint_url,
            access_key_id=self.server.access_key,
            secret_access_key=self.server.secret_key,
            retry=RetryConfig(**retry) if retry else RetryConfig(),
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object (file) under ``prefix``, as keys relative to the root, sorted."""
        if self.server is None:
            base = Path(self.root)
            return sorted(
                p.relative_to(base).as_posix()
                for p in (base / prefix).rglob("*")
                if p.is_file() and not p.is_symlink() and p.relative_to(base).as_posix().startswith(prefix)
            )
        out: list[str] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self.client.list_objects_v2(**kwargs)
            out += [o["Key"] for o in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return sorted(out)
            token = resp["NextContinuationToken"]

    def read(self, key: str) -> bytes:
        if self.server is None:
            return (Path(self.root) / key).read_bytes()
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body

    def write(self, key: str, data: bytes) -> None:
        if self.server is None:
            path = Path(self.root) / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            path.write_bytes(data)
        else:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def uploads(self, prefix: str = "") -> list[dict[str, Any]]:
        """Incomplete multipart uploads under ``prefix`` (none for a directory)."""
        if self.server is None:
            return []
        found: list[dict[str, Any]] = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get(
            "Uploads", []
        )
        return found


def make_target(kind: str, request: Any, tmp_path: Path) -> Target:
    if kind == "local":
        root = tmp_path / "ckpt-root"
        root.mkdir()
        return Target(kind, str(root) + "/")
    server = request.getfixturevalue("seaweed" if kind == "seaweed" else "moto_server")
    name = server.create_bucket(f"ffc-{uuid.uuid4().hex[:16]}")
    return Target(kind, f"s3://{name}/", server, server.client())
