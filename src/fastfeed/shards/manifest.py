"""The record of a written dataset: :class:`ShardInfo` per shard and the :class:`DatasetManifest`
of all of them, with its JSON (:meth:`DatasetManifest.to_json` / :meth:`~DatasetManifest.from_json`).
Reading and writing manifests in a store is :mod:`fastfeed.shards.manifest_io`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from fastfeed.errors import (
    ConfigError,
)

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "DatasetManifest", "ShardInfo"]

#: Identifies the JSON written by :meth:`DatasetManifest.to_json`.
MANIFEST_FORMAT = "fastfeed.dataset-manifest/1"
#: File name of the manifest written next to the shards.
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a dataset: its URL, size in bytes, ETag and number of samples.

    ``etag`` is ``None`` for local files; ``samples`` is ``None`` when it was not counted.
    """

    url: str
    size: int
    etag: str | None = None
    samples: int | None = None

    def __post_init__(self) -> None:
        if not self.url:
            raise ConfigError("a shard's URL is empty")
        if self.size < 0:
            raise ConfigError(f"{self.url}: size {self.size} is negative")
        if self.samples is not None and self.samples < 0:
            raise ConfigError(f"{self.url}: sample count {self.samples} is negative")


@dataclass(frozen=True)
class DatasetManifest:
    """What a dataset consists of: the shards under ``url``, in order, with sizes and ETags.

    Record it with a training run (``manifest.to_json()``) to know exactly which bytes it read;
    ``StreamingDataset(manifest.urls)`` reads exactly these shards.
    """

    #: The dataset's prefix (``s3://bucket/train/`` or ``file:///data/train/``).
    url: str
    shards: tuple[ShardInfo, ...]
    #: When the manifest was made (ISO 8601, UTC).
    created: str = ""

    @property
    def urls(self) -> list[str]:
        """The shard URLs, in order."""
        return [s.url for s in self.shards]

    @property
    def total_bytes(self) -> int:
        """Bytes of all shards."""
        return sum(s.size for s in self.shards)

    @property
    def total_samples(self) -> int | None:
        """Samples in all shards, or ``None`` if any shard's count is unknown."""
        counts = [s.samples for s in self.shards]
        if any(c is None for c in counts):
            return None
        return sum(c for c in counts if c is not None)

    def to_json(self, *, indent: int | None = 2) -> str:
        """The manifest as JSON (totals included, for people reading it)."""
        doc = {
            "format": MANIFEST_FORMAT,
            "url": self.url,
            "created": self.created,
            "num_shards": len(self.shards),
            "total_bytes": self.total_bytes,
            "total_samples": self.total_samples,
            "shards": [dataclasses.asdict(s) for s in self.shards],
        }
        return json.dumps(doc, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetManifest:
        """Parse :meth:`to_json`'s output.

        Raises:
            ConfigError: the text is not a fastfeed dataset manifest.
        """
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"'format' is not {MANIFEST_FORMAT!r}")
            shards = tuple(
                ShardInfo(
                    url=str(s["url"]),
                    size=int(s["size"]),
                    etag=None if s.get("etag") is None else str(s["etag"]),
                    samples=None if s.get("samples") is None else int(s["samples"]),
                )
                for s in doc["shards"]
            )
            return cls(url=str(doc["url"]), shards=shards, created=str(doc.get("created", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"not a fastfeed dataset manifest: {exc}",
                hint="pass the manifest.json that fastfeed shards write (or DatasetManifest.to_json) wrote",
            ) from exc
