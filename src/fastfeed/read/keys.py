"""How tar member names group into samples, as WebDataset groups them: a sample's members share
a key (the name up to the first dot of its last path component), and the rest of the name,
lowercased, is the field (``"dir/abc.seg.JPG"`` -> key ``"dir/abc"``, field ``"seg.jpg"``).
Used by the sample reader (:mod:`~fastfeed.read.reader`), the columnar scan
(:mod:`~fastfeed.read.columnar`) and the shard writer (:mod:`fastfeed.shards`)."""

from __future__ import annotations

import re

__all__ = ["split_key"]

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_SKIP_META_RE = re.compile(r"__[^/]*__($|/)")


def split_key(name: str) -> tuple[str, str] | None:
    """``"dir/abc.seg.JPG"`` -> ``("dir/abc", "seg.jpg")``; ``None`` for names WebDataset skips."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _SKIP_META_RE.match(name):
        return None
    match = _KEY_RE.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()
