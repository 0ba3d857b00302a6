"""WebDataset tar shards as the peers read them: :func:`iter_tar_samples` groups members into
samples (WebDataset's key rule), :func:`shard_stats` counts samples and payload bytes from the
headers alone, :func:`sample_fields` finds the fields a dataset has.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

from fastfeed.bench.peers.common import DEFAULT_FIELDS, PeerError

__all__ = ["MEMBER_RE", "TarSamples", "iter_tar_samples", "sample_fields", "shard_stats"]

#: WebDataset's rule for a member's sample key and field: everything before the first "." of
#: the file name (directories included in the key).
MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _decode(kind: str, data: bytes) -> bytes | int:
    return int(data) if kind == "int" else data


def iter_tar_samples(
    source: str | os.PathLike[str] | IO[bytes], fields: Mapping[str, str] = DEFAULT_FIELDS
) -> Iterator[dict[str, Any]]:
    """The samples of one WebDataset shard (a path, or a readable binary stream read
    sequentially) as ``{field: bytes | int}`` with exactly ``fields``.

    Members are grouped into samples as WebDataset does (key = name up to the first ``.`` of
    the file name). Raises :class:`PeerError` if a sample lacks one of ``fields``."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as stream:
            yield from iter_tar_samples(stream, fields)
        return
    sample: dict[str, Any] = {}
    key: str | None = None

    def done() -> dict[str, Any]:
        missing = [f for f in fields if f not in sample]
        if missing:
            raise PeerError(f"sample {key!r} has no field(s) {missing}")
        return sample

    with tarfile.open(fileobj=source, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            m = MEMBER_RE.match(member.name)
            if not m:
                continue
            stem, ext = m.group(1), m.group(2)
            if stem != key:
                if key is not None:
                    yield done()
                sample, key = {}, stem
            kind = fields.get(ext)
            if kind is not None:
                fh = tar.extractfile(member)
                assert fh is not None
                sample[ext] = _decode(kind, fh.read())
    if key is not None:
        yield done()


def sample_fields(path: str | os.PathLike[str]) -> dict[str, str]:
    """The fields peers read from a dataset whose first local shard is ``path``: the synthetic
    datasets' :data:`DEFAULT_FIELDS` when its first sample has them, else every field of its
    first sample as payload (``"bytes"``), as fastfeed's loader delivers them all. From the tar
    headers alone."""
    first: str | None = None
    exts: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            m = MEMBER_RE.match(member.name) if member.isfile() else None
            if m is None:
                continue
            if first is None:
                first = m.group(1)
            elif m.group(1) != first:
                break
            exts.append(m.group(2))
    if not exts:
        raise PeerError(f"{path}: no samples in the first shard")
    if all(f in exts for f in DEFAULT_FIELDS):
        return dict(DEFAULT_FIELDS)
    return {ext: "bytes" for ext in exts}


def shard_stats(paths: Sequence[str | os.PathLike[str]], fields: Mapping[str, str]) -> list[tuple[int, int, int]]:
    """``(samples, payload bytes, largest sample payload)`` of each local shard, from its tar
    headers alone (member data is skipped, not read). Payload: the ``bytes`` fields."""
    out = []
    for path in paths:
        sizes: dict[str, dict[str, int]] = {}
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                m = MEMBER_RE.match(member.name) if member.isfile() else None
                if m:
                    sizes.setdefault(m.group(1), {})[m.group(2)] = member.size
        payload = largest = 0
        for key, members in sizes.items():
            missing = [f for f in fields if f not in members]
            if missing:
                raise PeerError(f"{path}: sample {key!r} has no field(s) {missing}")
            n = sum(members[f] for f, kind in fields.items() if kind == "bytes")
            payload += n
            largest = max(largest, n)
        out.append((len(sizes), payload, largest))
    return out


class TarSamples:
    """``litdata.optimize``'s per-input function: a local shard path -> its samples (a
    picklable callable, so its worker processes can run it)."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self.fields = dict(fields)

    def __call__(self, path: str) -> Iterator[dict[str, Any]]:
        yield from iter_tar_samples(path, self.fields)
