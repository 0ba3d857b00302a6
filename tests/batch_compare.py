"""Strict comparison of two batch trees (a test helper, not a test module).

``assert_same_batch(got, want)`` fails unless both trees have the same container types at every
node (``list`` is not ``tuple``, a namedtuple is not a tuple), the same keys in the same order,
and tensors with the same dtype, shape, device, layout, ``requires_grad`` and bytes (NaNs and
signed zeros included: the bytes are compared, not the values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu()
    if t.is_sparse:
        t = t.to_dense()
    t = t.resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same_batch(got: Any, want: Any, path: str = "batch") -> None:
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        for attr in ("dtype", "shape", "device", "layout", "requires_grad"):
            assert getattr(got, attr) == getattr(want, attr), (
                f"{path}.{attr}: {getattr(got, attr)} != {getattr(want, attr)}"
            )
        assert _bytes(got) == _bytes(want), f"{path}: values differ: {got} != {want}"
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{path}: {got.dtype}{got.shape}"
        assert got.tobytes() == want.tobytes(), f"{path}: values differ"
    elif isinstance(want, dict) or (hasattr(want, "keys") and hasattr(want, "items")):
        assert list(got.keys()) == list(want.keys()), f"{path}: keys {list(got.keys())} != {list(want.keys())}"
        for key in want:
            assert_same_batch(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, Sequence) and not isinstance(want, str | bytes):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_batch(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"
