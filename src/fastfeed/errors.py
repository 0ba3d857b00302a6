"""The fastfeed error tree.

Every error fastfeed raises is a :class:`FastfeedError`. Each names the object it concerns
(``url``) and says what to do about it (``hint``). SDK exceptions are mapped to the most
specific type with ``raise ... from exc``; nothing in fastfeed matches on ``str(exc)``::

    FastfeedError
    ├── ConfigError                 bad arguments, impossible budgets       (also a ValueError)
    │   └── InvalidURLError         malformed URL or brace pattern
    ├── StoreError                  object storage or the local file system
    │   ├── NotFoundError           missing bucket, key, file or an empty prefix
    │   │   ├── BucketNotFoundError
    │   │   └── EmptyDatasetError   the source matched no shards
    │   ├── AccessDeniedError       wrong credentials, forbidden bucket or key
    │   ├── EndpointError           unreachable endpoint, connection refused
    │   ├── StoreTimeoutError       no response within the deadline (after retries)
    │   ├── ThrottledError          503 SlowDown persisted past the retry budget
    │   ├── TransientStoreError     5xx / resets persisted past the retry budget
    │   ├── ConditionFailedError    a conditional request's condition did not hold (412):
    │   │                           the object exists already, or changed while read
    │   └── NotSupportedError       the store does not implement a request (501)
    ├── CacheError                  the node cache directory cannot be used (with
    │                               cache_on_error="raise"; else a warning, read the store)
    ├── ShardError                  the bytes of a shard are not a valid tar archive
    │   ├── CorruptShardError       bad header checksum, bad field, not a tar at all
    │   └── TruncatedShardError     the object ends inside a header or a member
    ├── DecodeError                 a sample's field does not decode (fastfeed.decode)
    ├── CheckpointError             a checkpoint cannot be saved or loaded
    │   └── CorruptCheckpointError  committed, but its data is missing or fails its checksum
    └── PipelineError               an error raised in a background stage, re-raised in the
                                    consumer with the stage name and shard URL

Retryable store errors (:class:`ThrottledError`, :class:`TransientStoreError`,
:class:`StoreTimeoutError`, :class:`EndpointError`) carry ``retryable = True``; the retry policy
uses that attribute, never the message.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "CacheError",
    "CheckpointError",
    "ConditionFailedError",
    "ConfigError",
    "CorruptCheckpointError",
    "CorruptShardError",
    "DecodeError",
    "EmptyDatasetError",
    "EndpointError",
    "FastfeedError",
    "InvalidURLError",
    "NotFoundError",
    "NotSupportedError",
    "PipelineError",
    "ShardError",
    "StoreError",
    "StoreTimeoutError",
    "ThrottledError",
    "TransientStoreError",
    "TruncatedShardError",
]


class FastfeedError(Exception):
    """Base class of every error fastfeed raises.

    Args:
        message: what went wrong.
        url: the URL, bucket or path the error concerns (``None`` if none applies).
        hint: what the user can do about it.
    """

    retryable: bool = False

    def __init__(self, message: str, *, url: str | None = None, hint: str | None = None) -> None:
        self.message = message
        self.url = url
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        text = self.message
        if self.url is not None and self.url not in text:
            text = f"{text} [{self.url}]"
        if self.hint:
            text = f"{text}. {self.hint}"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (DataLoader workers); keep keyword fields.
        return (_rebuild, (type(self), self.message, self.url, self.hint, self.__dict__))


def _rebuild(
    cls: type[FastfeedError], message: str, url: str | None, hint: str | None, state: dict[str, object]
) -> FastfeedError:
    err = cls.__new__(cls)
    FastfeedError.__init__(err, message, url=url, hint=hint)
    err.__dict__.update(state)
    return err


class ConfigError(FastfeedError, ValueError):
    """An argument or configuration that cannot work (raised at construction, never a hang)."""


class InvalidURLError(ConfigError):
    """A URL or brace pattern that cannot be parsed."""


class StoreError(FastfeedError):
    """An error talking to object storage or reading the local file system."""


class NotFoundError(StoreError):
    """A bucket, key or file that does not exist."""


class BucketNotFoundError(NotFoundError):
    """The bucket does not exist (or the endpoint hides it)."""


class EmptyDatasetError(NotFoundError):
    """The source matched no shards."""


class AccessDeniedError(StoreError):
    """The credentials were rejected or lack permission for the object."""


class EndpointError(StoreError):
    """The endpoint could not be reached (refused, DNS, TLS)."""

    retryable = True


class StoreTimeoutError(StoreError):
    """The store did not answer within the deadline."""

    retryable = True


class ThrottledError(StoreError):
    """The store kept throttling (503 SlowDown) past the retry budget."""

    retryable = True


class TransientStoreError(StoreError):
    """A 5xx response or a connection reset that persisted past the retry budget."""

    retryable = True


class ConditionFailedError(StoreError):
    """A conditional request whose condition did not hold (``412 PreconditionFailed``, or
    ``409 ConditionalRequestConflict`` while another conditional write to the key is in flight):
    a write with ``If-None-Match: *`` found the object already there (another writer got there
    first; nothing was replaced), or a read with ``If-Match`` found that the object changed."""


class NotSupportedError(StoreError):
    """The store does not implement a request or one of its headers (``501 NotImplemented``).
    Not retryable: asking again gives the same answer."""


class CacheError(FastfeedError):
    """The cache directory cannot be used (with ``on_error="raise"``)."""


class ShardError(FastfeedError):
    """The bytes of a shard are not a valid tar archive."""


class CorruptShardError(ShardError):
    """A header checksum, numeric field or member layout is invalid, or the object is not a tar."""


class TruncatedShardError(ShardError):
    """The object ends inside a tar header or inside a member's data."""


class DecodeError(FastfeedError):
    """A field of a sample whose bytes do not decode as its extension says (:mod:`fastfeed.decode`).

    ``key`` is the sample's ``__key__``, ``ext`` the field and ``url`` the shard.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        hint: str | None = None,
        key: str | None = None,
        ext: str | None = None,
    ) -> None:
        self.key = key
        self.ext = ext
        super().__init__(message, url=url, hint=hint)


class CheckpointError(FastfeedError):
    """A checkpoint cannot be saved or loaded (see :mod:`fastfeed.checkpoint.checkpointer`)."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint whose data is missing, truncated or fails its checksum."""


class PipelineError(FastfeedError):
    """An unexpected error in a background stage, re-raised in the consumer.

    ``stage`` names the stage (``"fetch"``, ``"parse"``, ...); the original exception is the
    ``__cause__``, and ``remote_traceback`` is its formatted traceback: given where the error
    crossed from another process, else formatted when first read, in the reading thread (never
    in the IO thread: CPython 3.11 before 3.11.8 can corrupt its AST state when two threads
    format tracebacks at once).
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        hint: str | None = None,
        stage: str = "unknown",
        remote_traceback: str = "",
    ) -> None:
        self.stage = stage
        self._remote_traceback = remote_traceback
        super().__init__(message, url=url, hint=hint)

    @property
    def remote_traceback(self) -> str:
        if not self._remote_traceback and self.__cause__ is not None:
            import traceback

            self._remote_traceback = "".join(traceback.format_exception(self.__cause__))
        return self._remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        self.remote_traceback  # noqa: B018 - the cause does not cross processes: its text does
        return super().__reduce__()
