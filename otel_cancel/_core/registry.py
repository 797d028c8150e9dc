"""Root id -> the live scopes of this process, and the roots known to be cancelled.

The registry is the meeting point of two threads: request code enters and leaves
scopes on its own event loop (or thread), and the watcher thread applies flags.
One lock guards both maps, so "register, then check the cancelled set" (scope
entry) and "mark cancelled, then collect the live scopes" (flag applied) cannot
interleave: whichever runs second sees the other's effect, and no flag slips
between a scope's registration and its check.

Entering a scope is a dict insert under that lock; it never touches the store. A flag
for a root that nothing here works for is kept as the bytes that came (most processes
hold nothing for most flags): it is decoded when a refusal first needs its reason.
The registry also keeps the bulk cancels (``cancel --all``) in force, so that a
scope entered for a selected run is refused like a late hop, and a counter of
changes that the live-work publisher (:mod:`otel_cancel._core.live`) polls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .bulk import BulkCancel
from .outcome import Outcome
from .records import CancelRequest, LiveEntry

# asyncio loads its C accelerator itself. Importing ``_asyncio`` before asyncio would leave
# asyncio half pure Python: C tasks that its ``current_task()`` cannot see (``wait_for`` and
# ``asyncio.timeout`` then fail in every task of the process from Python 3.12 on).
current_task: Callable[[], asyncio.Task[Any] | None] = getattr(
    sys.modules.get("_asyncio"), "current_task", asyncio.current_task
)
"""The C function where there is one (``asyncio.current_task`` is Python code before 3.12): every scope asks."""

_NO_LABELS: Mapping[str, str] = MappingProxyType({})
# Read on every scope's entry and exit: module globals are read faster than an enum's
# members (an attribute of the enum class) or a module's functions.
_STOPPED = Outcome.STOPPED
_STOPPED_EARLY = Outcome.STOPPED_EARLY
_time_ns = time.time_ns
_get_ident = threading.get_ident


@dataclasses.dataclass(eq=False, slots=True)
class Registration:
    """One task (or thread) working for one root, possibly through nested scopes.

    Each field has one writer: the registry, under its lock (``count``, ``names``,
    ``cancel_requested``, ``interrupted``, ``stopped_early``, ``labels``); :func:`deliver`, on
    the task's own loop (``delivered``); the task's scopes, on that loop too (``consumed``,
    ``deadline_ms``, ``deadline_fired``, ``deadline_consumed``). The rest is set once, at entry.
    """

    root: str
    depth: int
    task: asyncio.Task[object] | None
    loop: asyncio.AbstractEventLoop | None
    thread_id: int
    names: list[str]
    count: int = 0
    cancel_requested: CancelRequest | None = None
    """Set (under the lock) when a flag for the root was applied while this registration was live."""
    delivered: bool = False
    """Set on the task's own loop when the tagged ``task.cancel()`` was really delivered."""
    consumed: bool = False
    """Set when a scope turned the delivered cancellation into ``Cancelled``."""
    interrupted: bool = False
    """Set when a scope of this registration exited :attr:`~otel_cancel._core.outcome.Outcome.STOPPED`."""
    stopped_early: tuple[tuple[str, Callable[[CancelRequest], None] | None], ...] = ()
    """This registration's scopes that exited stopped before any flag for the root arrived: their
    names, and what each records once a flag claims the stop (its span). A tuple, so a
    registration that never stops early (nearly all) allocates nothing for it."""
    deadline_ms: int | None = None
    """The earliest deadline a scope of this registration has a timer for."""
    deadline_fired: bool = False
    """Set when that timer cancelled the task: every scope of the task sees the deadline's stop,
    not only the one that owns the timer."""
    deadline_consumed: bool = False
    """Set when a scope turned the deadline's cancellation into ``Cancelled``."""
    entered_at: int = 0
    """When this registration's first scope was entered, epoch nanoseconds."""
    run_started_ms: int = 0
    """When the run began at its root (``otel_cancel.started``), epoch milliseconds."""
    labels: Mapping[str, str] = dataclasses.field(default_factory=lambda: _NO_LABELS)
    """The run's labels as this registration knows them (replaced, never mutated)."""


@dataclasses.dataclass
class StopReport:
    """What the registry knows when the last work for a cancelled root has stopped."""

    request: CancelRequest
    seen_at: int
    stopped_at: int
    depth: int
    interrupted: tuple[str, ...]
    tasks: int


@dataclasses.dataclass
class _CancelState:
    request: CancelRequest
    seen_at: int
    interrupted: list[str] = dataclasses.field(default_factory=list)
    tasks: int = 0
    depth: int | None = None
    waiting: int = 0
    """Registrations that were live when the flag arrived and have not exited yet."""


@dataclasses.dataclass
class _EarlyStop:
    """Work that a cancellation from elsewhere stopped before this root's flag arrived here."""

    stopped_at: int
    stopped_monotonic: float
    depth: int
    names: list[str]
    tasks: int
    on_claimed: list[Callable[[CancelRequest], None]] = dataclasses.field(default_factory=list)


EARLY_STOP_MEMORY_SECONDS = 30.0
"""How long work stopped by a caller's disconnect waits for its root's flag to claim it."""
_EARLY_STOP_LIMIT = 4096
_BULK_LIMIT = 256
"""Bulk cancels kept in force at once (the oldest are dropped beyond it)."""


LISTED_REASON = "cancelled before this process listed its flags"
"""The reason a refusal gives while only the flag's key is known here (its value is being fetched)."""


class CancelRegistry:
    """Live scopes and cancelled roots of one process.

    Args:
        on_stopped: called (outside the lock, on the thread where the last scope
            exited) when every scope that was live for a cancelled root has exited.
    """

    def __init__(self, on_stopped: Callable[[StopReport], None] | None = None, service: str = "") -> None:
        self._lock = threading.Lock()
        self.service = service
        self.changes = 0
        """Bumped on every scope entry and exit: the publisher rewrites live work when it moved."""
        self.applied = 0
        """Roots newly marked cancelled here (by a flag or a bulk cancel), each once: the
        running count behind the ``otel_cancel.flags.applied`` metric."""
        self._bulk: OrderedDict[str, BulkCancel] = OrderedDict()
        self.on_bulk_refusal: Callable[[CancelRequest, list[Registration]], None] | None = None
        """Called (outside the lock) when a bulk cancel selects a run on a scope's entry: with the
        root's cancel request and its other registrations here, which the caller must stop."""
        self._live: dict[str, dict[object, Registration]] = {}
        self._cancelled: dict[str, _CancelState] = {}
        # The cascade can beat the watch: a caller cancelled by the flag drops its HTTP
        # call, and this process stops that work (a foreign cancellation) before its own
        # watcher sees the flag. Remember such stops briefly, so the flag still yields a
        # receipt for the work it stopped.
        self._early_stops: OrderedDict[str, _EarlyStop] = OrderedDict()
        # Roots known cancelled from a keys-only listing: a set of strings, so that a
        # process listing 100,000 flags holds 100,000 roots and nothing else. The flag's
        # value (reason, requester) is fetched when a refusal first needs it.
        self._listed: set[str] = set()
        # Roots cancelled by a flag that arrived while nothing here worked for them: the
        # flag's bytes, decoded (``decode_flag``) when a refusal first needs the reason.
        # Bytes are no garbage-collector work, and most flags are never read again.
        self._unread: dict[str, bytes] = {}
        self.decode_flag: Callable[[str, bytes], CancelRequest] = CancelRequest.of_flag
        """Decodes a flag kept unread (the watcher's: it logs a malformed one, rate-limited)."""
        self.on_stopped = on_stopped
        self.on_details_wanted: Callable[[str], None] | None = None
        """Called (outside the lock) when a scope is refused for a root known only by its key."""

    # -- request side --------------------------------------------------------------

    def enter(
        self,
        root: str,
        depth: int,
        name: str | None,
        *,
        task_mode: bool = True,
        run_started_ms: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[Registration, CancelRequest | None]:
        """Register the current task (or, with ``task_mode=False``, thread) under ``root``.

        Args:
            root: the root.
            depth: hops from the root.
            name: the scope's name.
            task_mode: register the current task (else the current thread).
            run_started_ms: when the run began at its root (epoch ms); now when unknown.
            labels: the run's labels.

        Returns:
            The registration, and the cancel request when ``root`` is already cancelled
            (the caller must then :meth:`exit` and refuse to run its body).
        """
        task: asyncio.Task[object] | None = None
        if task_mode:
            try:
                task = current_task()
            except RuntimeError:
                task = None
        loop = task.get_loop() if task is not None else None
        thread_id = _get_ident()
        key: object = task if task is not None else thread_id
        refused: CancelRequest | None = None
        others: list[Registration] = []
        early_claim: tuple[StopReport | None, _EarlyStop] | None = None
        # acquire/release: cheaper than a with block, and run on every scope entry and exit
        self._lock.acquire()
        try:
            self.changes += 1
            registrations = self._live.get(root)
            if registrations is None:
                registrations = self._live[root] = {}
            registration = registrations.get(key)
            if registration is None:
                # The common case: the task's first scope for this root.
                entered_at = _time_ns()
                registration = registrations[key] = Registration(
                    root,
                    depth,
                    task,
                    loop,
                    thread_id,
                    [name or ""],
                    1,
                    entered_at=entered_at,
                    run_started_ms=run_started_ms or entered_at // 1_000_000,
                    labels=labels or _NO_LABELS,
                )
            else:
                if labels and labels is not registration.labels:
                    # Shared read-only mappings: a registration's labels are replaced, never mutated.
                    registration.labels = {**registration.labels, **labels} if registration.labels else labels
                registration.count += 1
                registration.names.append(name or "")
            state = self._cancelled.get(root)
            if state is None and self._unread:
                state = self._read_locked(root)
            if state is None and self._bulk:
                bulk = self._selecting_bulk(registration)
                if bulk is not None:
                    # A hop of a run that a bulk cancel selected, arriving after it: the
                    # root is cancelled here now (any other work of it here stops too) and
                    # this scope is refused like a late hop.
                    refused = bulk.request_for(root)
                    registrations_now, early_claim = self._apply_locked(refused)
                    others = [h for h in registrations_now if h is not registration]
                    state = self._cancelled[root]
            request = state.request if state is not None else None
            listed = request is None and root in self._listed
        finally:
            self._lock.release()
        if refused is not None:
            self._claim_early_stop(refused, early_claim)
            if self.on_bulk_refusal is not None:
                self.on_bulk_refusal(refused, others)
        if listed:
            # Known cancelled from a keys-only listing: refuse now, fetch the reason once.
            self._want_details(root)
            return registration, CancelRequest(root, LISTED_REASON, 0, "")
        return registration, request

    def _want_details(self, root: str) -> None:
        if self.on_details_wanted is not None:
            self.on_details_wanted(root)

    def _selecting_bulk(self, registration: Registration) -> BulkCancel | None:
        for bulk in self._bulk.values():
            if bulk.selects(self.service, registration.labels, registration.run_started_ms):
                return bulk
        return None

    def add_labels(self, root: str, labels: Mapping[str, str]) -> None:
        """Add ``labels`` to the current task's (or thread's) live work for ``root``, if any."""
        try:
            task: object = asyncio.current_task()
        except RuntimeError:
            task = None
        key = task if task is not None else threading.get_ident()
        with self._lock:
            registration = self._live.get(root, {}).get(key)
            if registration is not None:
                registration.labels = {**registration.labels, **labels}
                self.changes += 1

    def exit(
        self,
        registration: Registration,
        outcome: Outcome | Callable[[CancelRequest | None], Outcome] = Outcome.COMPLETED,
        early_record: Callable[[], Callable[[CancelRequest], None]] | None = None,
    ) -> tuple[Outcome, CancelRequest | None]:
        """Unregister one scope of ``registration`` and book how it ended; report a cancelled root's stop.

        The registry does not decide how the scope ended: the scope does (see
        :class:`~otel_cancel._core.outcome.Outcome`). ``outcome`` may be a function of the root's
        cancel request as applied to ``registration``; it is called under the lock, so a flag
        applied while the scope was leaving is seen by exactly one of the two.

        Args:
            registration: the registration of the exiting scope.
            outcome: how the scope ended, or the scope's function deciding it.
            early_record: with :attr:`Outcome.STOPPED_EARLY`, builds what to record (on the
                watcher's thread) if the root's flag arrives while the stop is remembered.

        Returns:
            The outcome, and the cancel request applied to ``registration`` (``None`` if none was).
        """
        report: StopReport | None = None
        # acquire/release: cheaper than a with block, and run on every scope entry and exit
        self._lock.acquire()
        try:
            self.changes += 1
            request = registration.cancel_requested
            ended = outcome(request) if callable(outcome) else outcome
            name = registration.names.pop() if registration.names else ""
            registration.count -= 1
            if ended is _STOPPED:
                registration.interrupted = True
            state = self._cancelled.get(registration.root)
            if state is not None and request is not None and registration.interrupted and name:
                state.interrupted.append(name)
            early = state is None and ended is _STOPPED_EARLY
            if early:
                # Kept per scope: nested scopes share the registration, and only the last
                # one out decides whether the stop is remembered.
                registration.stopped_early += ((name, early_record() if early_record is not None else None),)
            if registration.count > 0:
                return ended, request
            registrations = self._live.get(registration.root)
            if registrations is not None:
                registrations.pop(registration.task if registration.task is not None else registration.thread_id, None)
                if not registrations:
                    del self._live[registration.root]
            if early:
                self._remember_early_stop(registration)
            if state is None or request is None:
                return ended, request
            state.waiting -= 1
            if registration.interrupted:
                state.tasks += 1
                state.depth = registration.depth if state.depth is None else min(state.depth, registration.depth)
            if state.waiting == 0 and state.tasks > 0:
                report = StopReport(
                    request=state.request,
                    seen_at=state.seen_at,
                    stopped_at=time.time_ns(),
                    depth=state.depth or 0,
                    interrupted=tuple(dict.fromkeys(n for n in state.interrupted if n)),
                    tasks=state.tasks,
                )
        finally:
            self._lock.release()
        if report is not None and self.on_stopped is not None:
            self.on_stopped(report)
        return ended, request

    def _remember_early_stop(self, registration: Registration) -> None:
        early = self._early_stops.get(registration.root)
        if early is None:
            early = self._early_stops[registration.root] = _EarlyStop(0, 0.0, registration.depth, [], 0)
            if len(self._early_stops) > _EARLY_STOP_LIMIT:
                self._early_stops.popitem(last=False)
        early.stopped_at = time.time_ns()
        early.stopped_monotonic = time.monotonic()
        early.depth = min(early.depth, registration.depth)
        early.names.extend(name for name, _ in reversed(registration.stopped_early) if name)
        early.on_claimed.extend(record for _, record in registration.stopped_early if record is not None)
        early.tasks += 1

    def is_cancelled(self, root: str) -> CancelRequest | None:
        """The cancel request of ``root`` if it is cancelled here, else ``None``."""
        state = self._cancelled.get(root)
        if state is not None:
            return state.request
        # Read without the lock, so in the order a root moves (listed, then unread, then
        # cancelled: each writer puts it in its next place before taking it from the last):
        # a root that moved while it was read is found where it went.
        listed = root in self._listed
        unread = root in self._unread
        state = self._cancelled.get(root)
        if state is None and unread:
            with self._lock:
                state = self._cancelled.get(root) or self._read_locked(root)
        if state is not None:
            return state.request
        if listed:
            self._want_details(root)
            return CancelRequest(root, LISTED_REASON, 0, "")
        return None

    def _read_locked(self, root: str) -> _CancelState | None:
        """Decode the unread flag of ``root``, if there is one, into its cancel state (under the lock)."""
        raw = self._unread.get(root)
        if raw is None:
            return None
        # Decoded before the bytes are dropped: a decoder that raised must not lose the cancel.
        # Marked cancelled before the bytes go: is_cancelled() reads without the lock.
        state = self._cancelled[root] = _CancelState(self.decode_flag(root, raw), time.time_ns())
        del self._unread[root]
        return state

    # -- watcher side --------------------------------------------------------------

    def apply_unread(self, root: str, raw: bytes) -> bool:
        """Mark ``root`` cancelled by the flag ``raw``, kept unread, if nothing here needs it now.

        Returns:
            ``True`` when done: the root was already cancelled here, or nothing here works
            (or stopped early) for it, so its flag's bytes are kept until a refusal reads
            them. ``False`` when work for ``root`` is live here: the caller must decode the
            flag and :meth:`apply` it, which stops that work and yields its receipt.
        """
        with self._lock:
            if root in self._cancelled or root in self._unread:
                return True
            if root in self._live or root in self._early_stops:
                return False
            # Kept before the root leaves the listed set: is_cancelled() reads without the lock.
            self._unread[root] = raw
            if root in self._listed:
                # Known from a keys-only listing (its scopes refused from then on): now with its value.
                self._listed.discard(root)
            else:
                self.applied += 1
            return True

    def apply_listed(self, root: str) -> bool:
        """Mark ``root`` cancelled from a keys-only listing (from now on its scopes are refused).

        Returns:
            Whether work for ``root`` is live here (or stopped early, waiting for its
            flag): the caller must then fetch the flag and :meth:`apply` it, which
            stops that work and yields its receipt.
        """
        with self._lock:
            if root in self._cancelled or root in self._listed or root in self._unread:
                return False
            self._listed.add(root)
            return bool(self._live.get(root)) or root in self._early_stops

    def apply(self, request: CancelRequest) -> tuple[bool, list[Registration]]:
        """Mark ``request.root`` cancelled; return whether it is new here and the registrations to stop.

        Applying the same root again is a no-op (``(False, [])``): a flag seen twice
        (listing and watch, or a re-list after compaction) stops work once.
        """
        with self._lock:
            if request.root in self._cancelled or request.root in self._unread:
                return False, []
            # The root is marked cancelled before it leaves the listed set: is_cancelled()
            # reads without the lock.
            listed = request.root in self._listed
            if listed and not self._live.get(request.root) and request.root not in self._early_stops:
                # Only the reason was missing: scopes were refused from the listing on.
                self._cancelled[request.root] = _CancelState(request, time.time_ns())
                self._listed.discard(request.root)
                return False, []
            registrations, early_claim = self._apply_locked(request)
            self._listed.discard(request.root)
        self._claim_early_stop(request, early_claim)
        return True, registrations

    def _apply_locked(
        self, request: CancelRequest
    ) -> tuple[list[Registration], tuple[StopReport | None, _EarlyStop] | None]:
        self.applied += 1
        state = self._cancelled[request.root] = _CancelState(request, time.time_ns())
        live = self._live.get(request.root)
        registrations: list[Registration] = []
        if live:
            for key, registration in list(live.items()):
                if registration.loop is not None and registration.loop.is_closed():
                    # Its loop was closed with the scope open: the task never runs again, so
                    # it would neither stop nor exit, and the root's receipt would wait for it
                    # forever (and the registry keep its loop).
                    del live[key]
                    continue
                registration.cancel_requested = request
                registrations.append(registration)
            if not live:
                del self._live[request.root]
        state.waiting = len(registrations)
        early = self._early_stops.pop(request.root, None)
        if early is None or time.monotonic() - early.stopped_monotonic >= EARLY_STOP_MEMORY_SECONDS:
            return registrations, None
        # The flag claims the early stop whether or not other work for the root is still
        # live here: that work's receipt (written when the last of it exits) counts it too.
        state.interrupted.extend(early.names)
        state.tasks += early.tasks
        state.depth = early.depth if state.depth is None else min(state.depth, early.depth)
        if registrations:
            return registrations, (None, early)
        report = StopReport(
            request=request,
            seen_at=state.seen_at,
            stopped_at=early.stopped_at,
            depth=early.depth,
            interrupted=tuple(dict.fromkeys(early.names)),
            tasks=early.tasks,
        )
        return registrations, (report, early)

    def _claim_early_stop(self, request: CancelRequest, claim: tuple[StopReport | None, _EarlyStop] | None) -> None:
        """Record the claimed early stop's spans; report it now when nothing else was left to wait for."""
        if claim is None:
            return
        report, early = claim
        for claimed in early.on_claimed:
            claimed(request)
        if report is not None and self.on_stopped is not None:
            self.on_stopped(report)

    def apply_bulk(self, bulk: BulkCancel) -> list[tuple[CancelRequest, list[Registration]]]:
        """Keep ``bulk`` in force and cancel every live root here that it selects.

        Selection and cancellation happen under one lock hold, so a scope entered
        meanwhile either is stopped here or is refused by the bulk cancel on entry.

        Returns:
            For each root cancelled here: its request and the registrations to stop.
            Empty when ``bulk`` was already applied.
        """
        selected: list[tuple[CancelRequest, list[Registration], tuple[StopReport | None, _EarlyStop] | None]] = []
        with self._lock:
            if bulk.id in self._bulk:
                return []
            self._bulk[bulk.id] = bulk
            if len(self._bulk) > _BULK_LIMIT:
                self._bulk.popitem(last=False)
            for root, registrations in list(self._live.items()):
                if root in self._cancelled or root in self._unread or not registrations:
                    continue
                run_started_ms = min(h.run_started_ms for h in registrations.values())
                labels: dict[str, str] = {}
                for registration in registrations.values():
                    labels.update(registration.labels)
                if bulk.selects(self.service, labels, run_started_ms):
                    request = bulk.request_for(root)
                    stopped, early_claim = self._apply_locked(request)
                    selected.append((request, stopped, early_claim))
        for request, _, early_claim in selected:
            self._claim_early_stop(request, early_claim)
        return [(request, registrations) for request, registrations, _ in selected]

    def forget_bulk(self, bulk_id: str) -> None:
        """Drop a bulk cancel (its flag expired): runs it selected may start hops again."""
        with self._lock:
            self._bulk.pop(bulk_id, None)

    def retain_only_bulk(self, bulk_ids: set[str]) -> None:
        """Forget every bulk cancel not in ``bulk_ids`` (after a fresh listing)."""
        with self._lock:
            for bulk_id in [b for b in self._bulk if b not in bulk_ids]:
                del self._bulk[bulk_id]

    def forget(self, root: str) -> None:
        """Drop a cancelled root (its flag expired); new work for it may run again."""
        with self._lock:
            self._cancelled.pop(root, None)
            self._unread.pop(root, None)
            self._listed.discard(root)

    def retain_only(self, roots: set[str]) -> None:
        """Forget every cancelled root not in ``roots`` (after a fresh listing)."""
        with self._lock:
            for root in [r for r in self._cancelled if r not in roots]:
                del self._cancelled[root]
            for root in [r for r in self._unread if r not in roots]:
                del self._unread[root]
            self._listed &= roots

    # -- introspection -------------------------------------------------------------

    def live_roots(self) -> int:
        """How many roots have live scopes in this process."""
        with self._lock:
            return len(self._live)

    def live_scopes(self) -> int:
        """How many scopes are live in this process."""
        with self._lock:
            return sum(h.count for registrations in self._live.values() for h in registrations.values())

    def live_work(self) -> list[LiveEntry]:
        """This process's live work, one entry per root, unbounded (the live-work publisher bounds it)."""
        with self._lock:
            return [_live_entry(root, registrations) for root, registrations in self._live.items() if registrations]

    def oldest_live_work(self, limit: int) -> tuple[list[LiveEntry], int]:
        """The live work of at most ``limit`` roots, those whose work here began first, and how many roots are live.

        What the live-work publisher reads: its record holds only the oldest few hundred
        roots, so it never pays (under this lock) for the thousands after them. Roots are
        kept in the order their work here began, so the walk stops after ``limit``.
        """
        with self._lock:
            entries: list[LiveEntry] = []
            for root, registrations in self._live.items():
                if len(entries) >= limit:
                    break
                if registrations:
                    entries.append(_live_entry(root, registrations))
            return entries, len(self._live)

    def cancelled_roots(self) -> int:
        """How many cancelled roots this process remembers."""
        with self._lock:
            return len(self._cancelled) + len(self._listed) + len(self._unread)


def _live_entry(root: str, registrations: dict[object, Registration]) -> LiveEntry:
    if len(registrations) == 1:
        # Nearly every root: one task works for it here.
        (only,) = registrations.values()
        scopes = tuple(dict.fromkeys(name for name in only.names if name))
        return LiveEntry(root, only.depth, only.entered_at, only.run_started_ms, scopes, only.labels)
    labels: dict[str, str] = {}
    names: dict[str, None] = {}
    for registration in registrations.values():
        labels.update(registration.labels)
        names.update((name, None) for name in registration.names if name)
    return LiveEntry(
        root=root,
        depth=min(h.depth for h in registrations.values()),
        started_at=min(h.entered_at for h in registrations.values()),
        run_started_ms=min(h.run_started_ms for h in registrations.values()),
        scopes=tuple(names),
        labels=labels,
    )


def deliver(registration: Registration) -> None:
    """Cancel ``registration``'s task, on the task's own loop, if it is still in its scope.

    Runs through ``loop.call_soon_threadsafe``. Checking ``count`` here, on the
    task's loop, closes the race with a scope that exits between the watcher's
    decision and this call: that scope has already left, so its task must not be
    cancelled.
    """
    request = registration.cancel_requested
    task = registration.task
    if request is None or task is None or registration.count <= 0 or registration.delivered or task.done():
        return
    registration.delivered = True
    task.cancel(request.tag())
