"""The process state: one object holding everything otel-cancel keeps per process.

Settings, the store, the registry, the watcher, the live-work publisher, the receipts
being written, the A2A task table and the hooks run when serving starts all hang off one
:class:`ProcessState`; :func:`configure` and :func:`reset` replace it whole. Integrations
reach it from the top with :func:`get_process_state`; nothing below the scope does. The
IO loop is the one exception: gRPC binds to the first loop for the life of the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..exceptions import StoreError, StorePermissionError, StoreUnavailableError
from ..store import CancelStore
from . import telemetry
from .identity import default_instance, forked_instance
from .io_loop import io_loop
from .live import LivePublisher
from .rate_limited_log import RateLimitedLogger
from .records import CancelRequest, Receipt
from .registry import CancelRegistry, Registration, StopReport
from .retry import RECEIPT_WRITE, retry_async
from .settings import Settings
from .watcher import CancelWatcher

_log = logging.getLogger("otel_cancel")
_bulk_log = RateLimitedLogger(_log)

RECEIPT_GATHER_SECONDS = 0.002
"""How long after the watcher stopped work here its receipt writer starts, already armed (see
:meth:`ProcessState._expect_receipts`)."""

RECEIPT_WRITE_INTERVAL_SECONDS = 0.01
"""Least time between two receipt writes of a process: under a flag storm the receipts due
meanwhile go together (at most 100 etcd calls a second, whatever the rate of flags); a
receipt due after a quiet spell is written at once."""

_RECEIPTS_REMEMBERED = 1024
"""Roots whose receipt :meth:`ProcessState.wait_receipt` can still report as written (the latest)."""

UNLISTED_REASON = "the cancel store could not be listed"
"""Why work is refused when the first listing did not complete and ``OTEL_CANCEL_UNLISTED=refuse``."""


class ProcessState:
    """Everything otel-cancel keeps per process (see the module docstring)."""

    def __init__(self, settings: Settings, store: CancelStore | None = None) -> None:
        self.settings = settings
        self.instance_is_default = settings.instance == default_instance(os.environ)
        """Whether the instance name is the default one (else configured): a forked child replaces only a default."""
        self.registry = CancelRegistry(on_stopped=self._on_stopped, service=settings.service)
        self._given_store = store
        self.watcher = CancelWatcher(self._create_store, self.registry, watchdog_seconds=settings.watchdog_seconds)
        self.registry.on_bulk_refusal = self._on_bulk_refusal
        self.watcher.on_bulk_selected = self._write_selected_flags
        self.watcher.on_stops_delivered = self._expect_receipts
        self.publisher = LivePublisher(
            self.registry,
            self.watcher.store,
            service=settings.service,
            instance=settings.instance,
            interval_ms=settings.live_interval_ms,
            ttl_seconds=settings.live_ttl_seconds,
        )
        self._publisher_future: concurrent.futures.Future[None] | None = None
        self._publisher_lock = threading.Lock()
        # Receipts written lately (bounded, oldest forgotten first), and the events of those
        # someone waits for: a receipt nobody waits for costs a dict entry, not an Event.
        self._receipts_written: OrderedDict[str, None] = OrderedDict()
        self._receipt_waiters: dict[str, threading.Event] = {}
        self._receipt_lock = threading.Lock()
        self._pending_receipts: list[Receipt] = []
        self._writing_receipts = False
        # The start-up wait (_core/startup_wait.py): per state, so configure() and a forked
        # child start it afresh.
        self.startup_wait_ends_at: float | None = None
        """When scopes entered before the first listing stop waiting for it (monotonic); set by the first."""
        self.startup_wait_logged = False
        self.serving = False
        """Whether the process started serving (an ASGI lifespan or its first request) under this state."""
        self.start_hooks: list[Callable[[], None]] = []
        """What to run once the process starts serving (the instrumentor switches httpx on then)."""
        self.running_tasks: dict[str, Any] = {}
        """Protocol tasks (A2A) executing here, by task id: kept by the integration that runs them."""
        telemetry.observe_watch_connected(lambda: self.watcher.connected)
        telemetry.observe_live_roots(self.registry.live_roots)
        telemetry.observe_flags_applied(lambda: self.registry.applied)
        telemetry.observe_live_scopes(self.registry.live_scopes)

    def _create_store(self) -> CancelStore:
        return self._given_store if self._given_store is not None else self.settings.create_store()

    @property
    def requester(self) -> str:
        """How this process signs the flags it writes."""
        return f"{self.settings.service}/{self.settings.instance}"

    def start(self) -> None:
        """Start the watcher (idempotent)."""
        if not self.watcher.started:
            telemetry.initialise_counters()
        self.watcher.start()
        if self._publisher_future is None:
            with self._publisher_lock:
                if self._publisher_future is None:
                    self._publisher_future = io_loop().submit(self.publisher.run())

    def start_serving(self) -> None:
        """The process starts serving: start the watcher and run the start hooks (once)."""
        if self.serving:
            return
        self.serving = True
        self.start()
        while self.start_hooks:
            self.start_hooks.pop(0)()

    def unlisted_refusal(self, root: str) -> CancelRequest | None:
        """The refusal of work for ``root`` when nothing was listed yet and the settings say refuse."""
        if self.settings.unlisted != "refuse" or self.watcher.listed.is_set():
            return None
        return CancelRequest(root, UNLISTED_REASON, 0, "")

    def _on_bulk_refusal(self, request: CancelRequest, others: list[Registration]) -> None:
        # A late hop of a run a bulk cancel selected: stop any other work of it here,
        # and write the root's own flag so every process refuses it from now on.
        self.watcher.deliver(others)
        self._write_selected_flags([request])

    def _write_selected_flags(self, requests: list[CancelRequest]) -> concurrent.futures.Future[None]:
        """Write the ordinary flag of each root a bulk cancel stopped here (create-if-absent)."""
        return self.watcher.submit(self._write_flags(requests))

    async def _write_flags(self, requests: list[CancelRequest]) -> None:
        store = await self.watcher.store()
        for request in requests:
            try:
                await store.create_flag(request, self.settings.ttl_seconds)
            except StoreError as error:
                # The bulk flag still stops the run in every process where it is selected.
                # One line a minute at most, however many roots a kill switch selects here.
                _bulk_log.warning(
                    "bulk-flag",
                    "otel-cancel: could not write the flag of %s selected by a bulk cancel "
                    "(its hops elsewhere stop when their caller stops): %s",
                    request.root,
                    error,
                )
                if isinstance(error, StorePermissionError):
                    return  # the role may not write flags: the other roots would be refused too

    def _on_stopped(self, report: StopReport) -> None:
        receipt = Receipt(
            root=report.request.root,
            service=self.settings.service,
            instance=self.settings.instance,
            depth=report.depth,
            seen_at=report.seen_at,
            stopped_at=report.stopped_at,
            requested_at=report.request.requested_at,
            interrupted=report.interrupted,
            tasks=report.tasks,
            reason=report.request.reason,
        )
        # Receipts due while others are being written (or within the pacing interval after
        # a write) wait and then go together: one hand-over to the IO loop and, under a
        # storm, one etcd call for many.
        with self._receipt_lock:
            self._pending_receipts.append(receipt)
            if self._writing_receipts:
                return
            self._writing_receipts = True
        self.watcher.submit(self._write_pending_receipts())

    def _expect_receipts(self) -> None:
        # On the IO loop, right after the watcher handed stops to their loops: arm the
        # receipt writer here and start it shortly after. The stopped tasks then find a
        # writer on its way and only add their receipts; waking the IO loop from the
        # app's thread in the middle of a stop would hand the GIL to the receipt write
        # while the stop still runs. A writer that finds nothing yet ends, and a receipt
        # due after it starts one as usual.
        if not io_loop().is_current():
            return
        with self._receipt_lock:
            if self._writing_receipts:
                return
            self._writing_receipts = True
        asyncio.get_running_loop().call_later(RECEIPT_GATHER_SECONDS, self._start_receipt_writer)

    def _start_receipt_writer(self) -> None:
        self.watcher.submit(self._write_pending_receipts())

    async def _write_pending_receipts(self) -> None:
        finished = False
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._receipt_lock:
                    batch, self._pending_receipts = self._pending_receipts, []
                    if not batch:
                        # Under the lock: a receipt added after this starts a new writer.
                        self._writing_receipts = False
                        finished = True
                        return
                began = loop.time()
                try:
                    await self._write_receipts(batch)
                except Exception:  # a bug, not the store: say so, and keep writing the next ones
                    _log.exception("otel-cancel: failed to write %d receipt(s)", len(batch))
                # Paced: receipts that fall due meanwhile join the next batch (one etcd call,
                # and no hand-over to this loop for each of them).
                rest = began + RECEIPT_WRITE_INTERVAL_SECONDS - loop.time()
                if rest > 0:
                    await asyncio.sleep(rest)
        finally:
            if not finished:  # stopped (the watcher shut down): the next receipt starts a writer
                with self._receipt_lock:
                    self._writing_receipts = False

    async def _write_receipts(self, receipts: list[Receipt]) -> None:
        store = await self.watcher.store()
        roots = ", ".join(r.root for r in receipts[:3]) + (" ..." if len(receipts) > 3 else "")
        try:
            # Retry through an outage until the flag itself would have expired, with jitter, so
            # replicas that lost etcd together do not retry in lockstep; a refusal (permissions)
            # will not change, so give up on it at once.
            await retry_async(
                lambda: store.put_receipts(receipts, self.settings.ttl_seconds),
                RECEIPT_WRITE,
                retry_on=StoreUnavailableError,
                give_up_after=self.settings.ttl_seconds,
            )
        except StoreUnavailableError as error:
            _log.warning("otel-cancel: gave up writing the receipt for %s: %s", roots, error)
            return
        except StoreError as error:
            _log.warning("otel-cancel: could not write the receipt for %s: %s", roots, error)
            return
        telemetry.receipts_written(len(receipts))
        with self._receipt_lock:
            written = self._receipts_written
            for receipt in receipts:
                written[receipt.root] = None
                written.move_to_end(receipt.root)
                waiter = self._receipt_waiters.pop(receipt.root, None)
                if waiter is not None:
                    waiter.set()
            while len(written) > _RECEIPTS_REMEMBERED:
                written.popitem(last=False)

    async def wait_receipt(self, root: str, timeout: float) -> bool:
        """Wait until this process has written its receipt for ``root`` (tests, demo)."""
        with self._receipt_lock:
            if root in self._receipts_written:
                return True
            event = self._receipt_waiters.get(root)
            if event is None:
                if len(self._receipt_waiters) >= _RECEIPTS_REMEMBERED:
                    # Bounded: the oldest wait is dropped (it times out).
                    self._receipt_waiters.pop(next(iter(self._receipt_waiters)))
                event = self._receipt_waiters[root] = threading.Event()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, event.wait, timeout)

    def shutdown(self) -> None:
        future, self._publisher_future = self._publisher_future, None
        if future is not None:
            # First, while the store is open: the publisher revokes its lease, so this
            # process leaves `otel-cancel ps` at once.
            future.cancel()
            self.publisher.wait_finished(2.0)
        self.watcher.stop()


_lock = threading.Lock()
_runtime: ProcessState | None = None


def configure(settings: Settings | None = None, *, store: CancelStore | None = None, **overrides: Any) -> ProcessState:
    """Configure otel-cancel for this process, replacing any earlier configuration.

    Args:
        settings: complete settings; by default read from the environment.
        store: a store instance to use instead of the one the settings describe
            (for example a shared :class:`~otel_cancel.store.memory.MemoryCancelStore`).
        **overrides: fields of :class:`Settings` that override the environment.

    Returns:
        The runtime. Its watcher is not started yet; scopes start it.

    Raises:
        ConfigurationError: a setting is invalid.
    """
    global _runtime, _forked_from
    new = ProcessState(settings or Settings.from_environment(**overrides), store)
    with _lock:
        old, _runtime = _runtime, new
        parent, _forked_from = _forked_from, None
    # Hooks the instrumentor deferred to the start of serving belong to the process's
    # instrumentation, not to a configuration: an application that configures
    # otel-cancel after `opentelemetry-instrument` loaded it (in this process or in the
    # parent it was forked from) must still get them.
    previous = old or parent
    if previous is not None and not previous.serving:
        new.start_hooks.extend(previous.start_hooks)
    if old is not None:
        old.shutdown()
    return new


def _after_fork_in_child() -> None:
    # A forked child (a gunicorn --preload worker) must not use its parent's state: the
    # parent's watcher and publisher do not run here, its locks may have been held by
    # threads the fork did not copy, and its instance name is every sibling's too. The
    # child's state is built at its first use (after any post-fork set-up) from the parent's.
    global _lock, _runtime, _forked_from
    _lock = threading.Lock()
    if _runtime is not None:
        _forked_from, _runtime = _runtime, None


def _state_of_a_forked_child(parent: ProcessState) -> ProcessState:
    """The parent's configuration, with an instance name of the child's own unless one was configured."""
    if parent.watcher.started:
        _log.warning(
            "otel-cancel: this process was forked while its parent's cancel watch ran; gRPC cannot serve a "
            "child forked during its calls, so cancels may not reach it: fork before otel-cancel starts "
            "(pre-fork servers do) or start processes with 'spawn'"
        )
    settings = parent.settings
    if parent.instance_is_default:
        settings = dataclasses.replace(settings, instance=forked_instance(os.environ, settings.instance))
    child = ProcessState(settings, parent._given_store)
    child.instance_is_default = parent.instance_is_default
    if not parent.serving:
        child.start_hooks.extend(parent.start_hooks)
    return child


_forked_from: ProcessState | None = None
"""In a forked child until its first use of otel-cancel: the state it inherited from its parent."""
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def configured_process_state() -> ProcessState | None:
    """The process runtime if one is configured, without creating one."""
    return _runtime


def get_process_state() -> ProcessState:
    """The process runtime, configured from the environment on first use."""
    runtime = _runtime
    if runtime is not None:
        return runtime
    global _forked_from
    with _lock:
        if _runtime is None:
            parent, _forked_from = _forked_from, None
            new = ProcessState(Settings.from_environment()) if parent is None else _state_of_a_forked_child(parent)
            globals()["_runtime"] = new
        assert _runtime is not None
        return _runtime


def reset() -> None:
    """Stop the watcher and forget the configuration (tests)."""
    global _runtime, _forked_from
    with _lock:
        old, _runtime = _runtime, None
        _forked_from = None
    if old is not None:
        old.shutdown()


__all__ = ("ProcessState", "configure", "configured_process_state", "get_process_state", "reset")
