"""The vocabulary every peer module shares: the kinds of sample fields, the synthetic
datasets' fields (:data:`DEFAULT_FIELDS`), what an epoch must deliver (:class:`Expected`) and the
peers' errors (:class:`PeerError`, :class:`PeerUnavailable`)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_FIELDS", "DEFAULT_REGION", "FIELD_KINDS", "Expected", "PeerError", "PeerUnavailable"]

#: The kinds of sample fields: ``"bytes"`` (payload, counted) or ``"int"`` (an ASCII integer).
FIELD_KINDS = ("bytes", "int")
#: The signing region when neither the config nor the environment names one.
DEFAULT_REGION = "us-east-1"
#: The fields of :func:`fastfeed.testing.shards.write_synthetic_shards` samples that are read:
#: ``bin`` (the payload) and ``cls`` (an ASCII integer label).
DEFAULT_FIELDS: Mapping[str, str] = types.MappingProxyType({"bin": "bytes", "cls": "int"})


class PeerError(RuntimeError):
    """A peer failed, or did not deliver exactly the expected samples."""


class PeerUnavailable(PeerError):
    """A peer cannot run here (not installed, or cannot reach the store); ``reason`` says why."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason

    def __reduce__(self) -> tuple[type[PeerUnavailable], tuple[str, str]]:
        # Rebuilt from (peer, reason) when it comes back from a peer's process.
        return type(self), (self.peer, self.reason)


@dataclass(frozen=True)
class Expected:
    """What one epoch must deliver: every sample and the total length of its ``bytes`` fields."""

    samples: int
    payload_bytes: int
    #: Largest payload of one sample (sizes MDS shard files); 0 if unknown.
    max_sample_bytes: int = 0
