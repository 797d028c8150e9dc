"""The start-up wait: the first scopes of a process wait, once, for the first listing of the flags.

A process that has never listed the flags cannot tell a late hop of a cancelled run from new
work, so the scopes entered before the first listing wait for it, up to ``startup_wait_seconds``
counted from the first of them. The wait is spent once per process state: once it ran out with
nothing listed, later scopes do not wait again (each would add the whole wait to its request for
as long as etcd stays unreachable); they run at once, or are refused at once with
``OTEL_CANCEL_UNLISTED=refuse``, until a listing completes. One line is logged when it runs out.
"""

from __future__ import annotations

import logging
import threading
import time

from .process_state import ProcessState

_log = logging.getLogger("otel_cancel")
_lock = threading.Lock()


def _seconds_left(runtime: ProcessState) -> float:
    """What is left of ``runtime``'s start-up wait; the first caller starts it."""
    now = time.monotonic()
    with _lock:
        if runtime.startup_wait_ends_at is None:
            runtime.startup_wait_ends_at = now + runtime.settings.startup_wait_seconds
        return runtime.startup_wait_ends_at - now


def _ran_out(runtime: ProcessState) -> None:
    """The start-up wait ran out with nothing listed: say so, once per process state."""
    with _lock:
        if runtime.startup_wait_logged:
            return
        runtime.startup_wait_logged = True
    _log.warning(
        "otel-cancel: the cancel store was not listed within %.1fs; %s",
        runtime.settings.startup_wait_seconds,
        "refusing work until it is (OTEL_CANCEL_UNLISTED=refuse)"
        if runtime.settings.unlisted == "refuse"
        else "running work without it (fail open)",
    )


async def wait_for_listing(runtime: ProcessState) -> None:
    """Start the watcher and wait for its first listing, for what is left of the start-up wait.

    Returns at once when the flags were listed, or when the wait ran out already.
    """
    runtime.start()
    if runtime.watcher.listed.is_set():
        return
    left = _seconds_left(runtime)
    if left > 0 and await runtime.watcher.wait_listed(left):
        return
    _ran_out(runtime)


def wait_for_listing_blocking(runtime: ProcessState) -> None:
    """:func:`wait_for_listing` for sync code and threads: blocks the calling thread."""
    runtime.start()
    if runtime.watcher.listed.is_set():
        return
    left = _seconds_left(runtime)
    if left > 0 and runtime.watcher.listed.wait(left):
        return
    _ran_out(runtime)
