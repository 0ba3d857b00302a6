"""Shard URLs: parsing ``s3://`` / ``file://`` / plain paths, and brace expansion.

Brace patterns follow WebDataset's conventions: ``{000000..000099}`` is a zero-padded numeric
range (the width of the first bound), ``{a,b,c}`` an alternation; several groups expand as a
cartesian product, left to right.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fastfeed.errors import InvalidURLError

__all__ = ["Location", "expand_braces", "has_braces", "parse_url"]

_MAX_EXPANSION = 1_000_000
_BUCKET_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,254}$")


@dataclass(frozen=True)
class Location:
    """A parsed shard location.

    ``scheme`` is ``"s3"``, ``"http"``, ``"https"`` or ``"file"``; for ``s3`` ``bucket`` and
    ``key`` are set, for http(s) ``key`` is the URL's path, for ``file`` ``path`` is an absolute
    local path. ``url`` is the canonical URL that appears in samples' ``__url__`` and in every
    error message.
    """

    scheme: str
    url: str
    bucket: str = ""
    key: str = ""
    path: str = ""


def parse_url(url: str) -> Location:
    """Parse ``s3://bucket/key``, ``http(s)://host/path``, ``file:///abs/path`` or a plain
    (relative or absolute) path.

    Raises:
        InvalidURLError: for unsupported schemes, a missing bucket, or an empty URL.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidURLError(f"shard URL must be a non-empty string, got {url!r}")
    if "://" not in url:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) and not re.match(r"^[a-zA-Z]:[\\/]", url):
            raise InvalidURLError(
                f"malformed URL {url!r}", url=url, hint="use s3://bucket/key, file:///path or a local path"
            )
        path = os.path.abspath(os.path.expanduser(url))
        return Location("file", url=Path(path).as_uri(), path=path)
    scheme = url.split("://", 1)[0].lower()
    if scheme == "s3":
        # Split by hand: S3 keys may contain '?' and '#', which urlsplit would eat.
        bucket, _, key = url.split("://", 1)[1].partition("/")
        if not bucket or not _BUCKET_RE.match(bucket):
            raise InvalidURLError(
                f"malformed S3 URL {url!r}: missing or invalid bucket name",
                url=url,
                hint="write it as s3://bucket/prefix/ or s3://bucket/key.tar",
            )
        key = key.lstrip("/")
        return Location("s3", url=f"s3://{bucket}/{key}", bucket=bucket, key=key)
    parts = urlsplit(url)
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise InvalidURLError(f"malformed URL {url!r}: no host", url=url, hint="write it as https://host/path.tar")
        return Location(scheme, url=url, key=parts.path.lstrip("/"))
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidURLError(
                f"file URL {url!r} names a host", url=url, hint="use file:///absolute/path (three slashes)"
            )
        path = unquote(parts.path)
        if not path:
            raise InvalidURLError(f"file URL {url!r} has no path", url=url)
        return Location("file", url=Path(path).as_uri(), path=path)
    raise InvalidURLError(
        f"unsupported URL scheme {parts.scheme!r} in {url!r}",
        url=url,
        hint="fastfeed reads s3:// (any S3-compatible endpoint), http(s)://, file:// and local paths",
    )


def has_braces(pattern: str) -> bool:
    """True if ``pattern`` contains a brace group."""
    return "{" in pattern or "}" in pattern


def expand_braces(pattern: str) -> list[str]:
    """Expand brace groups as WebDataset does (with the ``braceexpand`` library it uses): ranges
    with optional steps and zero padding, alternatives, several groups and nested ones.

    >>> expand_braces("s3://b/shard-{00..02}.tar")
    ['s3://b/shard-00.tar', 's3://b/shard-01.tar', 's3://b/shard-02.tar']
    >>> expand_braces("{a,b}/x{1..2}")
    ['a/x1', 'a/x2', 'b/x1', 'b/x2']
    >>> expand_braces("x{000..010..5}-{a,b{1..2}}")
    ['x000-a', 'x000-b1', 'x000-b2', 'x005-a', 'x005-b1', 'x005-b2', 'x010-a', 'x010-b1', 'x010-b2']

    Raises:
        InvalidURLError: unbalanced braces, or an expansion of more than a million names.
    """
    from braceexpand import braceexpand

    try:
        names = list(itertools.islice(braceexpand(pattern), _MAX_EXPANSION + 1))
    except ValueError as err:  # braceexpand's UnbalancedBracesError (its only error)
        raise _brace_error(pattern, "unbalanced braces") from err
    if len(names) > _MAX_EXPANSION:
        raise _brace_error(pattern, f"expands to more than {_MAX_EXPANSION:,} names")
    return names


def _brace_error(pattern: str, reason: str) -> InvalidURLError:
    return InvalidURLError(
        f"malformed brace pattern {pattern!r}: {reason}",
        url=pattern,
        hint="use {000000..000099} for ranges ({000..100..2} with a step) or {a,b,c} for alternatives",
    )
