"""One retry policy for every loop that retries: capped exponential backoff with full jitter.

Each wait is drawn at random between zero and a window that doubles after every failure up to a
cap, so processes that failed together (every replica, when etcd restarts) come back spread out
instead of in lockstep. :func:`retry_async` and :func:`retry_sync` run an operation under a
:class:`Backoff` on tenacity; the watcher's reconnects, the receipts and the embedded etcd's start
use them, with the backoffs defined here.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import tenacity

T = TypeVar("T")

RetryOn = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]
"""The errors worth another attempt: exception types, or a predicate on the error."""

OnRetry = Callable[[Exception, float], object]
"""Called before each wait with the error that ended the attempt and the wait, in seconds."""


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter.

    After the n-th failure in a row the wait is drawn uniformly from
    ``[0, min(first_window * 2 ** (n - 1), max_window)]``.

    Attributes:
        first_window: the longest wait after the first failure, in seconds.
        max_window: the cap on the window, in seconds.
    """

    first_window: float
    max_window: float

    def wait(self) -> Callable[[tenacity.RetryCallState], float]:
        """This backoff as a tenacity wait strategy."""
        import tenacity

        window = tenacity.wait_exponential(multiplier=self.first_window, max=self.max_window)

        def full_jitter(state: tenacity.RetryCallState) -> float:
            return _jitter.uniform(0, window(state))

        return full_jitter


_jitter = random.Random()
"""The jitter's own generator (tenacity's jittered waits draw from the global one): retries neither
consume nor disturb the numbers an application, or a test framework, drew from a seeded ``random``."""

WATCH_RECONNECT = Backoff(first_window=0.05, max_window=2.0)
"""The watcher's reconnects: quick after a blip, at most 2 s apart through a long outage."""

RECEIPT_WRITE = Backoff(first_window=0.1, max_window=5.0)
"""Receipts waiting for etcd to come back (they give up when the flag would have expired)."""

EMBEDDED_ETCD_START = Backoff(first_window=0.05, max_window=0.2)
"""An embedded etcd that lost a port it chose: servers that collided on a port re-pick apart."""


async def _async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def retry_async(
    operation: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    retry_on: RetryOn,
    give_up_after: float | None = None,
    max_attempts: int | None = None,
    on_retry: OnRetry | None = None,
    failed_with: Exception | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> T:
    """Await ``operation()`` until it succeeds, waiting by ``backoff`` between attempts.

    Args:
        operation: makes one attempt; called afresh for each.
        backoff: the waits between attempts.
        retry_on: the errors worth another attempt. Any other error is raised at once, and so is
            every ``BaseException`` that is not an ``Exception`` (a cancellation is never retried).
        give_up_after: seconds from the start after which no attempt is made: when the next wait
            would end past it, the last error is raised instead.
        max_attempts: attempts at most (``failed_with`` counts as one); the last error is raised then.
        on_retry: called before each wait with the error and the wait.
        failed_with: the error that a first attempt, made by the caller, ended with. The schedule
            goes on from there: ``operation`` is first called after one wait.
        sleep: awaits each wait; :func:`asyncio.sleep` by default (tests record the waits).

    Returns:
        What ``operation`` returned.

    Raises:
        Exception: the error of the last attempt, when it is not retried or retrying gave up.
    """
    started = time.monotonic()
    if failed_with is None:
        # Most calls succeed at once: they pay neither tenacity's import nor its tens of
        # microseconds per call (the receipts of a cancel storm come this way).
        try:
            return await operation()
        except Exception as error:
            if not _is_retried(retry_on, error):
                raise
            failed_with = error
    import tenacity

    pending = [failed_with]

    async def attempt() -> T:
        if pending:
            # The first attempt is the one already made: tenacity decides whether and how long to wait.
            raise pending.pop()
        return await operation()

    retrying = tenacity.AsyncRetrying(
        sleep=sleep or _async_sleep,
        **_policy(backoff, retry_on, started, give_up_after, max_attempts, on_retry),
    )
    return await retrying(attempt)


def retry_sync(
    operation: Callable[[], T],
    backoff: Backoff,
    *,
    retry_on: RetryOn,
    give_up_after: float | None = None,
    max_attempts: int | None = None,
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call ``operation()`` until it succeeds, sleeping by ``backoff`` between attempts.

    The blocking twin of :func:`retry_async` (same arguments, no ``failed_with``); ``sleep``
    defaults to :func:`time.sleep`.
    """
    started = time.monotonic()
    try:
        return operation()
    except Exception as error:
        if not _is_retried(retry_on, error):
            raise
        failed_with = error
    import tenacity

    pending = [failed_with]

    def attempt() -> T:
        if pending:
            raise pending.pop()  # the first attempt, made above
        return operation()

    retrying = tenacity.Retrying(
        sleep=sleep or time.sleep,
        **_policy(backoff, retry_on, started, give_up_after, max_attempts, on_retry),
    )
    return retrying(attempt)


def _is_retried(retry_on: RetryOn, error: BaseException) -> bool:
    if not isinstance(error, Exception):
        return False
    if isinstance(retry_on, type | tuple):
        return isinstance(error, retry_on)
    return retry_on(error)


def _policy(
    backoff: Backoff,
    retry_on: RetryOn,
    started: float,
    give_up_after: float | None,
    max_attempts: int | None,
    on_retry: OnRetry | None,
) -> dict[str, Any]:
    """The keyword arguments of tenacity's ``Retrying`` / ``AsyncRetrying`` for this policy."""
    import tenacity

    stop: tenacity.stop.stop_base = tenacity.stop_never
    if give_up_after is not None:
        # Counted from before a first attempt made outside tenacity; stop_before_delay also
        # counts the coming wait, so no wait ends past the limit.
        stop = tenacity.stop_before_delay(max(0.0, give_up_after - (time.monotonic() - started)))
    if max_attempts is not None:
        stop = stop | tenacity.stop_after_attempt(max_attempts)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            error = state.outcome.exception()
            assert isinstance(error, Exception)  # only an Exception is retried
            on_retry(error, state.next_action.sleep)

    return {
        "wait": backoff.wait(),
        "retry": tenacity.retry_if_exception(lambda error: _is_retried(retry_on, error)),
        "stop": stop,
        "before_sleep": before_sleep,
        # The caller sees the error itself, not tenacity's RetryError.
        "reraise": True,
    }
