"""The one watch per process: list the flags, watch from there, resume, re-list.

The watcher runs on the process's IO loop (:mod:`otel_cancel._io_loop`), a daemon
thread of its own. That keeps every etcd call off the request path (the
application's loop never awaits etcd), lets sync code and threads share it, and
gives the process exactly one etcd connection and one watch stream, whatever the
number of loops or requests.

Loop, in order:

1. list ``{prefix}flags/`` and apply every flag; remember the listing revision;
2. watch from that revision + 1, applying puts and forgetting deletes, and
   remember the revision of every event;
3. on any store error, reconnect with capped exponential backoff and jitter and
   resume the watch from the last revision seen (nothing written meanwhile is
   lost: etcd replays it); when that revision was compacted, go back to 1.

A watchdog pings the store every ``watchdog_seconds``; a ping that fails (a frozen
etcd keeps the TCP stream open but answers nothing) tears the watch down so the
loop reconnects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from . import telemetry
from ._bulk import BulkCancel
from ._io_loop import io_loop
from ._registry import CancelRegistry, Holder, deliver
from ._request import CancelRequest
from .exceptions import RevisionCompactedError, StoreError, StoreUnavailableError
from .store import CancelStore, FlagEvent
from .store._keys import bulk_id_of_flag_key, root_of_flag_key

_log = logging.getLogger("otel_cancel.watcher")

T = TypeVar("T")

BACKOFF_INITIAL_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 2.0


class CancelWatcher:
    """Applies cancel flags from the store to this process's registry.

    Args:
        store_factory: builds the store; called on the watcher's own loop, because
            an etcd client belongs to the loop that created it.
        registry: the process registry.
        watchdog_seconds: interval of the liveness probe.
    """

    def __init__(
        self,
        store_factory: Callable[[], CancelStore],
        registry: CancelRegistry,
        *,
        watchdog_seconds: float = 5.0,
    ) -> None:
        self._store_factory = store_factory
        self._registry = registry
        self._watchdog_seconds = watchdog_seconds
        self._start_lock = threading.Lock()
        self._future: concurrent.futures.Future[None] | None = None
        self._stopped = threading.Event()
        self._store: CancelStore | None = None
        self.listed = threading.Event()
        """Set once the first listing has been applied."""
        self.connected = False
        """Whether the watch stream is up (exported as ``otel_cancel.watch.connected``)."""
        self.last_revision = 0
        """The last store revision this watcher has seen."""
        self.reconnects = 0
        self.listings = 0
        self.flags_applied = 0
        self.on_bulk_selected: Callable[[list[CancelRequest]], object] | None = None
        """Called with the roots a bulk cancel stopped here, so their ordinary flags get written."""
        self._listed_future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._state = threading.Condition()

    # -- lifecycle -----------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has been called (and :meth:`stop` not since)."""
        return self._future is not None

    def start(self) -> None:
        """Start watching on the process's IO loop. Idempotent and cheap when already started."""
        if self._future is not None:
            return
        with self._start_lock:
            if self._future is None:
                self._stopped.clear()
                self._future = io_loop().submit(self._run())

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching and close the store."""
        with self._start_lock:
            future, self._future = self._future, None
            if future is None:
                return
            future.cancel()  # cancels the task on the IO loop
            self._stopped.wait(timeout)
            self._set_connected(False)

    async def _run(self) -> None:
        try:
            await self._main()
        finally:
            if self._store is not None:
                with contextlib.suppress(Exception):
                    await self._store.close()
            self._stopped.set()

    # -- running work on the IO loop ------------------------------------------------------

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coroutine`` on the IO loop (where the store lives)."""
        return io_loop().submit(coroutine)

    async def store(self) -> CancelStore:
        """The store; only to be awaited on the IO loop."""
        if self._store is None:
            self._store = self._store_factory()
        return self._store

    async def wait_listed(self, timeout: float) -> bool:
        """Wait (on any loop) until the first listing was applied, at most ``timeout`` seconds."""
        if self.listed.is_set():
            return True
        waiter = asyncio.wrap_future(self._listed_future)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return False
        return True

    # -- applying flags --------------------------------------------------------------

    def apply(self, request: CancelRequest) -> None:
        """Mark ``request.root`` cancelled here and cancel its live tasks."""
        is_new, holders = self._registry.apply(request)
        if not is_new:
            return
        self.flags_applied += 1
        self.deliver(holders)

    def deliver(self, holders: list[Holder]) -> None:
        """Cancel each holder's task on its own loop (holders whose root was just cancelled)."""
        for holder in holders:
            if holder.loop is not None and not holder.loop.is_closed():
                # RuntimeError: the loop closed between the check and the call.
                with contextlib.suppress(RuntimeError):
                    holder.loop.call_soon_threadsafe(deliver, holder)

    def apply_bulk(self, bulk: BulkCancel) -> list[CancelRequest]:
        """Keep ``bulk`` in force here and stop every live root it selects; return their requests."""
        selected = self._registry.apply_bulk(bulk)
        for _, holders in selected:
            self.flags_applied += 1
            self.deliver(holders)
        requests = [request for request, _ in selected]
        if requests and self.on_bulk_selected is not None:
            self.on_bulk_selected(requests)
        return requests

    def _apply_bulk_event(self, event: FlagEvent, bulk_id: str) -> None:
        if event.kind == "delete":
            self._registry.forget_bulk(bulk_id)
            return
        try:
            bulk = BulkCancel.from_json(event.value, bulk_id)
        except ValueError as error:
            _log.warning("otel-cancel: ignoring malformed bulk cancel %s: %s", bulk_id, error)
            return
        self.apply_bulk(bulk)

    def _apply_event(self, event: FlagEvent, prefix: str) -> None:
        bulk_id = bulk_id_of_flag_key(prefix, event.key)
        if bulk_id is not None:
            self._apply_bulk_event(event, bulk_id)
            return
        root = root_of_flag_key(prefix, event.key)
        if root is None:
            _log.warning("otel-cancel: ignoring key %r under the flags prefix: not a valid root", event.key[:200])
            return
        if event.kind == "delete":
            self._registry.forget(root)
            return
        try:
            request = CancelRequest.from_json(event.value, root)
        except ValueError as error:
            _log.warning("otel-cancel: ignoring malformed flag for %s: %s", root, error)
            # The key still says this root was cancelled; honour it with an unknown reason.
            request = CancelRequest(root, "unknown (malformed flag)", 0, "")
        self.apply(request)

    # -- the loop ----------------------------------------------------------------------

    async def _main(self) -> None:
        backoff = BACKOFF_INITIAL_SECONDS
        must_list = True
        warned = False
        while True:
            store = await self.store()
            try:
                if must_list:
                    listing = await store.list_flags()
                    self.listings += 1
                    roots: set[str] = set()
                    bulk_ids: set[str] = set()
                    for event in listing.flags:
                        self._apply_event(event, store.prefix)
                        root = root_of_flag_key(store.prefix, event.key)
                        if root is not None:
                            roots.add(root)
                        bulk_id = bulk_id_of_flag_key(store.prefix, event.key)
                        if bulk_id is not None:
                            bulk_ids.add(bulk_id)
                    self._registry.retain_only(roots)
                    self._registry.retain_only_bulk(bulk_ids)
                    self.last_revision = listing.revision
                    must_list = False
                    if not self.listed.is_set():
                        self.listed.set()
                        self._listed_future.set_result(None)
                else:
                    # Prove etcd answers before calling the watcher connected again.
                    await store.ping()
                self._set_connected(True)
                if warned:
                    # Info, not a warning: an outage logs exactly one warning (when it starts).
                    _log.info("otel-cancel: reconnected to the cancel store at revision %d", self.last_revision)
                    warned = False
                backoff = BACKOFF_INITIAL_SECONDS
                await self._watch_until_error(store)
            except RevisionCompactedError:
                _log.info("otel-cancel: revision %d was compacted; listing again", self.last_revision + 1)
                must_list = True
                self._set_connected(False)
                continue
            except StoreError as error:
                self._set_connected(False)
                if not warned:
                    _log.warning(
                        "otel-cancel: cancel store unavailable (%s); serving on, cancels will apply on reconnect",
                        error,
                    )
                    warned = True
                self.reconnects += 1
                telemetry.watch_reconnected()
                await store.close()
                # Full jitter: spread the reconnects of many replicas after an etcd restart.
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    async def _watch_until_error(self, store: CancelStore) -> None:
        watch_task = asyncio.ensure_future(self._consume_watch(store))
        watchdog_task = asyncio.ensure_future(self._watchdog(store))
        try:
            done, _ = await asyncio.wait({watch_task, watchdog_task}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():
                    # Nobody here cancelled it (that happens below): a gRPC call of it was
                    # cancelled under it, with the connection it shared. Letting the
                    # CancelledError out would end the watcher for good, silently.
                    raise StoreUnavailableError("the watch lost its etcd connection")
                task.result()  # raises the StoreError that ended it
        finally:
            for task in (watch_task, watchdog_task):
                task.cancel()
            await asyncio.gather(watch_task, watchdog_task, return_exceptions=True)

    async def _consume_watch(self, store: CancelStore) -> None:
        async for event in store.watch_flags(self.last_revision + 1):
            self._apply_event(event, store.prefix)
            self.last_revision = max(self.last_revision, event.revision)

    async def _watchdog(self, store: CancelStore) -> None:
        while True:
            await asyncio.sleep(self._watchdog_seconds)
            await store.ping()

    def _set_connected(self, connected: bool) -> None:
        with self._state:
            self.connected = connected
            self._state.notify_all()

    def wait_connected(self, connected: bool = True, timeout: float = 10.0) -> bool:
        """Block until :attr:`connected` equals ``connected``; False on timeout (tests, doctor)."""
        with self._state:
            return self._state.wait_for(lambda: self.connected is connected, timeout)
