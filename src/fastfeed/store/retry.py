"""Retry with exponential backoff and full jitter, driven by error types, never by messages."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastfeed.config import RetryConfig
from fastfeed.errors import EndpointError, FastfeedError

__all__ = ["RetryState", "retry_async"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryState:
    """Tracks the attempts of one logical request (which may span several HTTP requests).

    Call :meth:`backoff` after a failure: it sleeps and returns, or re-raises the error when the
    error is not retryable or the attempts / deadline are exhausted.
    """

    def __init__(self, policy: RetryConfig, what: str, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.what = what
        self.attempt = 0
        self.started = time.monotonic()
        self._rng = rng or random.Random()

    async def backoff(self, err: FastfeedError) -> None:
        """Sleep before the next attempt, or raise ``err`` if it must not be retried."""
        self.attempt += 1
        limit = self.policy.max_connect_attempts if isinstance(err, EndpointError) else self.policy.max_attempts
        elapsed = time.monotonic() - self.started
        if not err.retryable or self.attempt >= limit or elapsed >= self.policy.deadline:
            if err.retryable:
                log.warning("giving up on %s after %d attempts in %.1fs: %s", self.what, self.attempt, elapsed, err)
            raise err
        cap = min(self.policy.max_delay, self.policy.base_delay * (2 ** (self.attempt - 1)))
        delay = min(self._rng.uniform(0, cap), max(0.0, self.policy.deadline - elapsed))
        log.info("retrying %s in %.2fs (attempt %d/%d): %s", self.what, delay, self.attempt + 1, limit, err)
        await asyncio.sleep(delay)

    async def after_failure(self, err: FastfeedError, cause: BaseException, *, progressed: bool = False) -> None:
        """After a failed attempt of a resumable read: sleep before the next, or raise ``err``
        (from ``cause``, the SDK's own exception, unless it is ``err`` itself). An attempt that
        received bytes (``progressed``) does not count: a reset mid-body is not a reason to give
        up sooner, the next attempt resumes where it stopped."""
        if progressed:
            self.attempt = max(0, self.attempt - 1)
        try:
            await self.backoff(err)
        except FastfeedError as final:
            if final is cause:
                raise
            raise final from cause


async def retry_async(
    op: Callable[[], Awaitable[T]],
    policy: RetryConfig,
    what: str,
    map_error: Callable[[BaseException], FastfeedError],
) -> T:
    """Run ``op`` until it succeeds, retrying retryable errors per ``policy``.

    ``map_error`` turns SDK / OS exceptions into fastfeed errors (whose ``retryable`` decides).
    The final error is raised from the original exception.
    """
    state = RetryState(policy, what)
    while True:
        try:
            return await op()
        except FastfeedError as known:
            await state.backoff(known)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            mapped = map_error(exc)
            try:
                await state.backoff(mapped)
            except FastfeedError as final:
                raise final from exc
