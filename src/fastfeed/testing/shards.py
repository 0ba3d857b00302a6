"""Synthetic WebDataset shards for tests, benchmarks and the demo.

:func:`write_synthetic_shards` writes ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ...
with Python's :mod:`tarfile` (no WebDataset needed). Sample ``i`` of shard ``s`` has the key
``f"{s:06d}_{i:08d}"`` and, depending on ``extensions``, these members:

* ``<key>.bin``: ``sample_bytes`` pseudo-random bytes, deterministic in ``(seed, s, i)``;
* ``<key>.cls``: the label, an ASCII integer in ``[0, 10)``: ``(s * samples_per_shard + i) % 10``;
* ``<key>.json``: ``{"key", "shard", "index", "label", "bin_bytes", "bin_crc32"}`` (plus
  ``"jpg_bytes"``, ``"jpg_crc32"`` with ``.jpg``), so a reader can check each sample's payload
  end to end without the generator;
* ``<key>.jpg``: a random-noise RGB JPEG (quality 90) of about ``sample_bytes`` bytes,
  deterministic in ``(seed, s, i)``; needs Pillow.

The archives are byte-for-byte reproducible: fixed member order, mtime 0, uid/gid 0, mode 0644.
:func:`upload_dir` puts a directory of files into a bucket.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["sample_key", "upload_dir", "write_synthetic_shards"]

_KNOWN_EXTENSIONS = frozenset({"bin", "cls", "jpg", "json"})
_NUM_LABELS = 10
_RNG_BATCH_BYTES = 16 * 1024 * 1024  # random bytes drawn per numpy call
_ZEROS = bytes(tarfile.RECORDSIZE + 2 * tarfile.BLOCKSIZE)
# Random noise at JPEG quality 90 (4:2:0) takes about this many bytes per pixel, plus headers.
_JPEG_QUALITY = 90
_JPEG_BYTES_PER_PIXEL = 0.9
_JPEG_HEADER_BYTES = 620
_JPEG_MIN_PIXELS = 8 * 8


def sample_key(shard: int, index: int) -> str:
    """The ``__key__`` of sample ``index`` in shard ``shard``."""
    return f"{shard:06d}_{index:08d}"


def write_synthetic_shards(
    out_dir: str | os.PathLike[str],
    *,
    num_shards: int,
    samples_per_shard: int,
    sample_bytes: int,
    seed: int = 0,
    prefix: str = "shard",
    extensions: Sequence[str] = ("bin", "cls", "json"),
) -> list[Path]:
    """Write WebDataset-style tar shards of synthetic samples; return their paths in order.

    Args:
        out_dir: directory to write into (created if missing). Existing shards of the same
            names are replaced atomically (written to a temporary name, then renamed).
        num_shards: number of ``.tar`` files.
        samples_per_shard: samples per shard.
        sample_bytes: size of each ``.bin`` member, and about that of each ``.jpg``.
        seed: the random bytes and images are a pure function of ``(seed, shard, index)``.
        prefix: file name prefix (``<prefix>-000000.tar``).
        extensions: which members each sample has, in this order; a subset of
            ``("bin", "cls", "jpg", "json")``.

    Raises:
        ValueError: a negative count or size, or an unknown extension.
        fastfeed.errors.ConfigError: ``"jpg"`` and Pillow is not installed.
    """
    if num_shards < 0 or samples_per_shard < 0 or sample_bytes < 0:
        raise ValueError("num_shards, samples_per_shard and sample_bytes must be >= 0")
    unknown = [ext for ext in extensions if ext not in _KNOWN_EXTENSIONS]
    if unknown or not extensions or len(set(extensions)) != len(extensions):
        raise ValueError(f"extensions must be distinct names from {sorted(_KNOWN_EXTENSIONS)}, got {list(extensions)}")
    if "jpg" in extensions:
        _pil_image()  # fail before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = out / f"{prefix}-{shard:06d}.tar"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with tmp.open("wb") as fh:
                _write_shard(fh, shard, samples_per_shard, sample_bytes, seed, tuple(extensions))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
    return paths


def _write_shard(
    fh: io.BufferedWriter, shard: int, samples: int, sample_bytes: int, seed: int, extensions: tuple[str, ...]
) -> None:
    # One generator per shard, so any shard can be regenerated alone. numpy's bytes() is far
    # faster than os.urandom or random.randbytes; it is called once per batch of samples (the
    # batch size depends only on sample_bytes, so the output does not depend on anything else).
    rng = np.random.Generator(np.random.PCG64([seed, shard]))
    batch = max(1, _RNG_BATCH_BYTES // max(sample_bytes, 1)) if "bin" in extensions else 0
    block = b""
    written = 0
    for index in range(samples):
        key = sample_key(shard, index)
        payload = b""
        if batch:
            offset = (index % batch) * sample_bytes
            if offset == 0:
                block = rng.bytes(min(batch, samples - index) * sample_bytes)
            payload = block[offset : offset + sample_bytes]
        label = (shard * samples + index) % _NUM_LABELS
        jpeg = _noise_jpeg(sample_bytes, seed, shard, index) if "jpg" in extensions else b""
        for ext in extensions:
            if ext == "bin":
                data = payload
            elif ext == "cls":
                data = str(label).encode("ascii")
            elif ext == "jpg":
                data = jpeg
            else:
                meta: dict[str, Any] = {
                    "key": key,
                    "shard": shard,
                    "index": index,
                    "label": label,
                    "bin_bytes": len(payload),
                    "bin_crc32": zlib.crc32(payload),
                }
                if "jpg" in extensions:
                    meta.update(jpg_bytes=len(jpeg), jpg_crc32=zlib.crc32(jpeg))
                data = json.dumps(meta, sort_keys=True).encode("ascii")
            # tarfile builds each header; the members are written directly because
            # TarFile.addfile's per-member copying dominates for small samples.
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            pad = -len(data) % tarfile.BLOCKSIZE
            fh.write(header)
            fh.write(data)
            fh.write(_ZEROS[:pad])
            written += len(header) + len(data) + pad
    # End of archive as tarfile writes it: two zero blocks, then zeros up to a whole record.
    written += 2 * tarfile.BLOCKSIZE
    fh.write(_ZEROS[: 2 * tarfile.BLOCKSIZE + (-written % tarfile.RECORDSIZE)])


def _pil_image() -> Any:
    try:
        from PIL import Image
    except ImportError as err:
        from fastfeed.errors import ConfigError

        raise ConfigError("synthetic .jpg samples need Pillow", hint="pip install pillow") from err
    return Image


def _encode_noise(pixels: float, seed: int, shard: int, index: int) -> bytes:
    """A 4:3 RGB noise image of about ``pixels`` pixels as a JPEG; the noise is drawn from a
    generator seeded with ``(seed, shard, index)`` (the same for every size tried)."""
    pixels = max(float(_JPEG_MIN_PIXELS), pixels)
    width = max(8, round((pixels * 4 / 3) ** 0.5))
    height = max(8, round(pixels / width))
    rng = np.random.Generator(np.random.PCG64([seed, shard, index]))
    noise = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    _pil_image().fromarray(noise).save(out, format="JPEG", quality=_JPEG_QUALITY)
    return out.getvalue()


def _noise_jpeg(sample_bytes: int, seed: int, shard: int, index: int) -> bytes:
    """A noise JPEG of about ``sample_bytes`` bytes: sized from the typical bytes per pixel of
    noise, then, if that misses by more than 5%, once more from the size it gave."""
    target = max(0, sample_bytes - _JPEG_HEADER_BYTES)
    pixels = target / _JPEG_BYTES_PER_PIXEL
    data = _encode_noise(pixels, seed, shard, index)
    got = len(data) - _JPEG_HEADER_BYTES
    if target > 0 and got > 0 and abs(len(data) - sample_bytes) > 0.05 * sample_bytes:
        data = _encode_noise(pixels * target / got, seed, shard, index)
    return data


def upload_dir(client: Any, bucket: str, src_dir: str | os.PathLike[str], prefix: str = "") -> list[str]:
    """Upload every regular file under ``src_dir`` (recursively) to ``bucket``.

    Keys are ``prefix`` joined with ``/`` to each file's path relative to ``src_dir``
    (``prefix="train"`` and ``shard-000000.tar`` give ``train/shard-000000.tar``). Files are
    uploaded in sorted order with boto3's managed transfer (multipart for large files).

    Args:
        client: a boto3 S3 client.
        bucket: destination bucket (must exist).
        src_dir: directory to upload.
        prefix: key prefix; a trailing ``/`` is optional.

    Returns:
        The keys written, sorted.
    """
    root = Path(src_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    base = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    keys = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = base + path.relative_to(root).as_posix()
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys
