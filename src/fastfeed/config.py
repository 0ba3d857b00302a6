"""Configuration: a few frozen dataclasses, one per subsystem, and human-readable sizes.

The process environment (``AWS_*``) is read in exactly one place, :meth:`S3Config.resolve`, at
construction time in the process that builds the dataset, never at import and never deep in the
I/O code. Credentials themselves are left to botocore's standard chain (environment, shared
config and credentials files, profiles, SSO, instance metadata), so everything that works with
the AWS CLI works here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from fastfeed.errors import ConfigError

__all__ = ["PrefetchConfig", "RetryConfig", "S3Config", "format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, *, name: str = "size") -> int:
    """Parse a byte count: an int, or a string like ``"512MiB"``, ``"8 MB"``, ``"1.5GiB"``.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, ...) powers of 1024.

    Raises:
        ConfigError: for negative numbers or strings that are not sizes.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a byte count, got {value!r}")
    if isinstance(value, int | float):
        if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{name} must be a non-negative byte count, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be an int or a string like '512MiB', got {type(value).__name__}")
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{name}={value!r} is not a size", hint="use a byte count or a string like '8MiB' or '500GB'")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(num_bytes: float) -> str:
    """Format a byte count with binary units, e.g. ``8.0 MiB``."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RetryConfig:
    """Retry policy for store requests: exponential backoff with full jitter.

    Retried: throttling (503 SlowDown), other 5xx, timeouts, connection resets and refused
    connections. Not retried: missing objects, denied access, corrupt data.
    """

    #: Attempts per request, the first included.
    max_attempts: int = 8
    #: Backoff before retry ``n`` is uniform in ``[0, min(max_delay, base_delay * 2**n)]`` seconds.
    base_delay: float = 0.1
    max_delay: float = 4.0
    #: A request is not retried once this many seconds have passed since its first attempt, so a
    #: dead store becomes an error within bounded time instead of a hang.
    deadline: float = 60.0
    #: Attempts for a refused/unreachable endpoint, which rarely heals within a request's lifetime.
    max_connect_attempts: int = 3

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_connect_attempts < 1:
            raise ConfigError("RetryConfig.max_attempts and max_connect_attempts must be >= 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.deadline <= 0:
            raise ConfigError("RetryConfig delays must be >= 0 and deadline > 0")


#: Fields of :class:`S3Config` that are secrets: never shown by ``repr``/``str`` (logs, errors,
#: benchmark reports), only whether they are set.
_SECRET_FIELDS = ("secret_access_key", "session_token")


@dataclass(frozen=True, repr=False)
class S3Config:
    """How to reach an S3-compatible endpoint.

    ``None`` fields fall back to botocore's standard configuration chain (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/config``, ...).
    Its ``repr`` shows the secret key and session token only as ``'<set>'``.
    """

    #: e.g. ``http://127.0.0.1:9000`` for MinIO; ``None`` means AWS_ENDPOINT_URL or AWS itself.
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    #: ``"path"``, ``"virtual"`` or ``"auto"``; ``None`` (default): path-style with a custom
    #: ``endpoint_url`` (what MinIO, SeaweedFS and Ceph need), else what botocore resolves (the
    #: profile's ``s3.addressing_style``, or its own default: virtual-hosted where the bucket
    #: name allows, as AWS wants).
    addressing_style: str | None = None
    #: Send unsigned requests (public buckets).
    anonymous: bool = False
    #: Seconds to establish a connection / between bytes of a response.
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    #: HTTP connection pool size per process.
    max_pool_connections: int = 64
    retry: RetryConfig = dataclasses.field(default_factory=RetryConfig)
    #: The data-plane engine for ranged GETs: ``"aiobotocore"`` or ``"obstore"`` (Rust
    #: object_store; ``pip install 'fastfeed[obstore]'``; about half the client CPU per small GET
    #: and a fifth per client created, see benchmarks/streaming/bench_engines.py). Listing and
    #: HEAD at dataset construction always use aiobotocore, so fork-started DataLoader workers
    #: stay safe (obstore is not fork-safe once used in a process).
    engine: str = "aiobotocore"

    def __repr__(self) -> str:
        fields = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            shown = "'<set>'" if f.name in _SECRET_FIELDS and value is not None else repr(value)
            fields.append(f"{f.name}={shown}")
        return f"{type(self).__name__}({', '.join(fields)})"

    def __post_init__(self) -> None:
        if self.engine not in ("aiobotocore", "obstore"):
            raise ConfigError(f"engine={self.engine!r} is invalid", hint="use 'aiobotocore' or 'obstore'")
        if self.addressing_style not in (None, "path", "virtual", "auto"):
            raise ConfigError(
                f"addressing_style={self.addressing_style!r} is invalid",
                hint="use 'path', 'virtual' or 'auto' (or leave it unset)",
            )
        if self.endpoint_url is not None and not re.match(r"^https?://[^/\s]+", self.endpoint_url):
            raise ConfigError(
                f"endpoint_url={self.endpoint_url!r} is not an http(s) URL",
                hint="pass something like 'http://127.0.0.1:9000'",
            )

    @property
    def path_style(self) -> bool | None:
        """Whether requests use path-style addressing: ``True``/``False`` when decided here (set
        explicitly, or path for a custom endpoint), ``None`` when botocore decides (AWS, from the
        profile or its default)."""
        if self.addressing_style == "path":
            return True
        if self.addressing_style == "virtual":
            return False
        if self.addressing_style is None and self.endpoint_url is not None:
            return True
        return None

    @classmethod
    def resolve(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> S3Config:
        """Build a config from explicit ``overrides`` on top of the environment.

        This is the one place fastfeed reads ``AWS_*`` variables itself: the endpoint
        (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``) and region are captured here so that a
        dataset pickled into a spawned DataLoader worker talks to the same endpoint as its parent.
        Credentials stay with botocore's chain unless given explicitly.
        """
        env = os.environ if environ is None else environ
        values = {k: v for k, v in overrides.items() if v is not None}
        if "endpoint_url" not in values:
            endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
            if endpoint:
                values["endpoint_url"] = endpoint
        if "region" not in values:
            region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            if region:
                values["region"] = region
        if "profile" not in values and env.get("AWS_PROFILE"):
            values["profile"] = env["AWS_PROFILE"]
        try:
            return cls(**values)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigError(f"unknown S3 option: {exc}") from exc


@dataclass(frozen=True)
class PrefetchConfig:
    """Bounded resources of the prefetcher; back-pressure comes only from these.

    Memory held by fetched-but-not-yet-parsed bytes never exceeds ``byte_budget``, plus the
    reader's copy of the one sample that straddles parts: a sample larger than the whole budget
    is read like any other (see :mod:`fastfeed.read.prefetch`).
    """

    #: Size of one ranged GET. 8-16 MiB balances per-request overhead against parallelism.
    part_size: int = 8 * 1024**2
    #: Concurrent GET requests per process.
    max_requests: int = 16
    #: Shards fetched ahead of (and including) the one being parsed.
    shards_in_flight: int = 4
    #: Upper bound on bytes fetched (or being fetched) but not yet consumed by the parser,
    #: apart from the copy of a sample that straddles parts.
    byte_budget: int = 256 * 1024**2

    def __post_init__(self) -> None:
        if self.part_size < 64 * 1024:
            raise ConfigError(f"part_size={self.part_size} is too small", hint="use at least 64KiB, e.g. '8MiB'")
        if self.max_requests < 1 or self.shards_in_flight < 1:
            raise ConfigError("max_requests and shards_in_flight must be >= 1")
        if self.byte_budget < self.part_size:
            raise ConfigError(
                f"byte_budget ({format_size(self.byte_budget)}) is smaller than one part "
                f"({format_size(self.part_size)}): nothing could ever be fetched",
                hint="raise byte_budget or lower part_size",
            )

    @classmethod
    def from_args(
        cls,
        *,
        part_size: int | str | None = None,
        max_requests: int | None = None,
        shards_in_flight: int | None = None,
        byte_budget: int | str | None = None,
    ) -> PrefetchConfig:
        """Build from user arguments, accepting human-readable sizes; ``None`` keeps the default."""
        values: dict[str, int] = {}
        if part_size is not None:
            values["part_size"] = parse_size(part_size, name="part_size")
        if byte_budget is not None:
            values["byte_budget"] = parse_size(byte_budget, name="byte_budget")
        if max_requests is not None:
            values["max_requests"] = int(max_requests)
        if shards_in_flight is not None:
            values["shards_in_flight"] = int(shards_in_flight)
        return cls(**values)
