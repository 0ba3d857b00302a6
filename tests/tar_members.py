"""Shards and their members for the tests of http(s) shards and manifests: a directory served
as a web site (``train-000000.tar``, ...), every member of some shards as Python's ``tarfile``
reads them, and the members of samples a loader yielded, keyed alike for comparison."""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastfeed.testing.shards import write_synthetic_shards


def write_site(root: Path, num_shards: int, samples_per_shard: int, sample_bytes: int) -> Path:
    """``root`` holding ``train-000000.tar``, ``train-000001.tar``, ... (synthetic shards)."""
    paths = write_synthetic_shards(
        root / "tmp", num_shards=num_shards, samples_per_shard=samples_per_shard, sample_bytes=sample_bytes
    )
    for i, p in enumerate(paths):
        p.rename(root / f"train-{i:06d}.tar")
    return root


def tar_members(paths: Iterable[Path]) -> dict[str, bytes]:
    """Every member of every shard, as tarfile reads it: ``{"<shard>#<member>": bytes}``."""
    out = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                f = tar.extractfile(m)
                assert f is not None
                out[f"{path.name}#{m.name}"] = f.read()
    return out


def sample_members(samples: Iterable[Any]) -> dict[str, bytes]:
    """The members of the samples, keyed as :func:`tar_members` keys them."""
    out = {}
    for s in samples:
        shard = s["__url__"].rsplit("/", 1)[-1]
        for ext, value in s.items():
            if not ext.startswith("__"):
                out[f"{shard}#{s['__key__']}.{ext}"] = bytes(value)
    return out
