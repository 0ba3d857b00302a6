"""The tar encoding of WebDataset shards: sample values to member bytes, member names checked
as readers split them, reproducible member headers (mtime 0, uid/gid 0, mode 0644, pax only for
long or non-ASCII names), the padded size of a finished shard and shard names.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fastfeed.errors import (
    ConfigError,
    StoreError,
)
from fastfeed.read.keys import split_key

__all__ = [
    "BLOCK",
    "ZEROS",
    "FileData",
    "MemberData",
    "check_ext",
    "check_key",
    "copy_file",
    "encode_value",
    "final_size",
    "shard_name",
    "tar_header",
]

#: A tar block; members and headers are padded to whole blocks.
BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240
ZEROS = bytes(_RECORD + 2 * BLOCK)
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileData:
    """A member whose bytes are streamed from a file (directory mode)."""

    path: str
    size: int


MemberData = memoryview | FileData


def encode_value(key: Any, ext: str, value: Any) -> memoryview:
    """The bytes of the member ``<key>.<ext>`` for a sample value (see :mod:`fastfeed.shards`)."""
    import numpy as np

    if isinstance(value, bytes | bytearray | memoryview):
        view = memoryview(value)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    if isinstance(value, str):
        return memoryview(value.encode("utf-8"))
    if isinstance(value, bool | np.bool_):
        raise ConfigError(
            f"sample {key!r}, field {ext!r}: bool values are ambiguous",
            hint="convert it yourself, e.g. int(value) or 'true'/'false'",
        )
    if isinstance(value, int | np.integer):
        return memoryview(str(int(value)).encode("ascii"))
    if isinstance(value, float | np.floating):
        return memoryview(repr(float(value)).encode("ascii"))
    if isinstance(value, dict | list):
        try:
            text = json.dumps(value, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"sample {key!r}, field {ext!r}: cannot encode as JSON: {exc}") from exc
        return memoryview(text.encode("utf-8"))
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        try:
            np.save(buf, value, allow_pickle=False)
        except ValueError as exc:
            raise ConfigError(f"sample {key!r}, field {ext!r}: cannot save the array as .npy: {exc}") from exc
        return buf.getbuffer()
    raise ConfigError(
        f"sample {key!r}, field {ext!r}: cannot write a {type(value).__name__}",
        hint="use bytes, str, int, float, dict/list (JSON) or a numpy array; encode other values yourself",
    )


def check_key(key: Any) -> None:
    """Refuse a sample key readers would not read back as one key (ConfigError)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"'__key__' must be a non-empty string, got {key!r}")
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise ConfigError(
            f"'__key__' {key!r} is not a safe relative path",
            hint="use keys like '000001' or 'train/000001' (no leading '/', no empty, '.' or '..' parts)",
        )
    if "." in parts[-1]:
        raise ConfigError(
            f"'__key__' {key!r} contains a '.' in its last part",
            hint="readers split member names at the first dot of the file name; replace the dot (e.g. with '_')",
        )


def check_ext(key: str, ext: str) -> None:
    """Refuse an extension readers would not read back as ``ext`` of ``key`` (ConfigError)."""
    if not ext or "/" in ext or "\0" in ext or split_key(f"{key}.{ext}") != (key, ext.lower()):
        raise ConfigError(
            f"sample {key!r}: {ext!r} is not a valid extension",
            hint="extensions are non-empty names without '/', like 'jpg', 'cls' or 'seg.png'",
        )


def tar_header(name: str, size: int) -> bytes:
    """The reproducible tar header(s) of a member ``name`` of ``size`` bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def final_size(members_bytes: int) -> int:
    """Size of a tar holding ``members_bytes`` of members: two zero blocks, then zeros to a
    whole record, as tarfile and GNU tar write it."""
    end = members_bytes + 2 * BLOCK
    return end + (-end % _RECORD)


def copy_file(data: FileData, fh: IO[bytes]) -> None:
    """Append the file behind ``data`` to the shard ``fh`` (it must still have its size)."""
    with open(data.path, "rb") as src:
        left = data.size
        while left:
            chunk = src.read(min(_COPY_CHUNK, left))
            if not chunk:
                break
            fh.write(chunk)
            left -= len(chunk)
        if left or src.read(1):
            raise StoreError(
                f"{data.path} changed size while it was being packed (expected {data.size} bytes)",
                url=Path(data.path).as_uri(),
                hint="do not modify the source directory while writing shards",
            )


def shard_name(template: str, number: int) -> str:
    """The name of shard ``number`` from ``template`` (a ``str.format`` pattern)."""
    try:
        name = template.format(number)
        other = template.format(number + 1)
    except (IndexError, KeyError, ValueError) as exc:
        raise ConfigError(
            f"name={template!r} cannot be formatted with a shard number: {exc}", hint="use e.g. 'shard-{:06d}.tar'"
        ) from exc
    if name == other or not name.endswith(".tar") or name.startswith("/") or ".." in name.split("/"):
        raise ConfigError(
            f"name={template!r} must give distinct relative names ending in .tar",
            hint="use e.g. 'shard-{:06d}.tar' (fastfeed reads every *.tar under a prefix)",
        )
    return name
