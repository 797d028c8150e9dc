"""Hand the stops of applied flags from the watcher's thread to each task's own loop, in batches.

A task can only be cancelled on its own event loop, and waking another thread's loop
(``call_soon_threadsafe``) costs a self-pipe write and a hand-over of the GIL. So the
stops bound for one loop wait in that loop's mailbox, and only the first stop that
finds the mailbox empty wakes the loop: the stops of one flag (every task of the root
there), and of every flag that arrives while the loop has not yet drained its mailbox,
take one wake-up.

On the IO loop (the watcher applies flags there) the wake-ups wait for the end of the
loop's current turn: every event of one watch response is applied first, then each
loop is woken once, and the woken loop rarely finds the IO loop's thread still holding
the GIL it needs. The IO loop also wakes one loop at most once every
:data:`STOP_WAKE_INTERVAL_SECONDS`: a flag after a quiet spell is delivered at once,
while under a flag storm the stops due meanwhile go together, so a loop is woken a few
hundred times a second at most, however many flags arrive.
"""

from __future__ import annotations

import asyncio
import threading
import weakref

from .io_loop import io_loop
from .registry import Registration, deliver

STOP_WAKE_INTERVAL_SECONDS = 0.002
"""Least time between two wake-ups of one loop by the IO loop. Each wake-up is a self-pipe
write, a thread switch and a hand-over of the GIL in each direction, which cost more than
the stop itself; pacing them bounds what a flag storm adds to a stop's latency to this."""


class _Mailbox:
    """The stops waiting for one loop."""

    __slots__ = ("lock", "pending", "woken_at")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: list[Registration] = []
        self.woken_at = float("-inf")
        """When the IO loop last woke this mailbox's loop (the IO loop's clock; only its thread writes it)."""

    def post(self, registration: Registration) -> bool:
        """Add a stop; whether the loop must be woken (the mailbox was empty)."""
        with self.lock:
            self.pending.append(registration)
            return len(self.pending) == 1

    def drain(self) -> None:
        """On the mailbox's loop: cancel every waiting task (each still in its scope)."""
        with self.lock:
            batch, self.pending = self.pending, []
        for registration in batch:
            deliver(registration)

    def forget(self) -> None:
        """The loop is closed: its stops have nobody left to stop."""
        with self.lock:
            self.pending = []


class StopDelivery:
    """Delivers the stops of applied flags to their tasks' loops (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Weak: a loop that is gone takes its mailbox with it.
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
        # Mailboxes whose loops the IO loop wakes at the end of its turn (only its thread touches it).
        self._waking: list[tuple[asyncio.AbstractEventLoop, _Mailbox]] = []

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            with self._lock:
                mailbox = self._mailboxes.get(loop)
                if mailbox is None:
                    mailbox = self._mailboxes[loop] = _Mailbox()
        return mailbox

    def post(self, registrations: list[Registration]) -> None:
        """Cancel each registration's task on its own loop, if it is still in its scope then."""
        # Every stop is in its mailbox before any loop is woken: a woken loop that drains
        # at once still finds all of them, so one flag takes one wake-up per loop.
        to_wake: list[tuple[asyncio.AbstractEventLoop, _Mailbox]] = []
        self._forget_closed_loops()
        for registration in registrations:
            loop = registration.loop
            if loop is None or loop.is_closed():
                continue
            mailbox = self._mailbox(loop)
            if mailbox.post(registration):  # else already due to be woken
                to_wake.append((loop, mailbox))
        if not to_wake:
            return
        if io_loop().is_current():
            io = asyncio.get_running_loop()
            now = io.time()
            for loop, mailbox in to_wake:
                rest = mailbox.woken_at + STOP_WAKE_INTERVAL_SECONDS - now
                if rest > 0:
                    # Woken moments ago: the stops due until then wait in the mailbox and go together.
                    io.call_later(rest, self._wake_paced, loop, mailbox)
                    continue
                if not self._waking:
                    io.call_soon(self._wake_waiting)
                self._waking.append((loop, mailbox))
        else:
            for loop, mailbox in to_wake:
                _wake(loop, mailbox)

    def _forget_closed_loops(self) -> None:
        # A loop closed after it was woken never drains its mailbox, whose stops hold their
        # tasks, which hold the loop: its weak key would never go. Such mailboxes are dropped
        # when the next stops are posted (loops are few: this is a short walk).
        with self._lock:
            closed = [loop for loop in self._mailboxes if loop.is_closed()]
            for loop in closed:
                self._mailboxes.pop(loop).forget()

    def _wake_waiting(self) -> None:
        waking, self._waking = self._waking, []
        now = asyncio.get_running_loop().time()
        for loop, mailbox in waking:
            mailbox.woken_at = now
            _wake(loop, mailbox)

    def _wake_paced(self, loop: asyncio.AbstractEventLoop, mailbox: _Mailbox) -> None:
        mailbox.woken_at = asyncio.get_running_loop().time()
        _wake(loop, mailbox)


def _wake(loop: asyncio.AbstractEventLoop, mailbox: _Mailbox) -> None:
    try:
        loop.call_soon_threadsafe(mailbox.drain)
    except RuntimeError:  # the loop closed since
        mailbox.forget()
