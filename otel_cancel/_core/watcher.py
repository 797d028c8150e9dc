"""The one watch per process: list the flags, watch from there, resume, re-list.

The watcher runs on the process's IO loop (:mod:`otel_cancel._core.io_loop`), a daemon
thread of its own. That keeps every etcd call off the request path (the
application's loop never awaits etcd), lets sync code and threads share it, and
gives the process exactly one etcd connection and one watch stream, whatever the
number of loops or requests.

Loop, in order:

1. list ``{prefix}flags/`` page by page, with values for the first
   :data:`LISTED_WITH_VALUES` flags and keys only after (a root is all
   enforcement needs; such a flag's reason is fetched when a refusal first shows
   it), and mark every root cancelled; remember the listing revision. A re-list keeps enforcing
   what was known until it has completed;
2. watch from that revision + 1, applying puts and forgetting deletes, and
   remember the revision of every event;
3. on any store error, reconnect with capped exponential backoff and jitter and
   resume the watch from the last revision seen (nothing written meanwhile is
   lost: etcd replays it); when that revision was compacted, go back to 1. Any
   other error (a bug) is logged, rate-limited, and handled the same way: the
   watcher never ends while the process serves.

A watchdog pings the store every ``watchdog_seconds``; a ping that fails (a frozen
etcd keeps the TCP stream open but answers nothing; a member cut off from its
peers answers but has no leader) tears the watch down so the loop reconnects,
through another endpoint.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..exceptions import RevisionCompactedError, StoreError, StoreUnavailableError
from ..store import CancelStore, FlagEvent
from ..store._keys import parse_flag_key
from . import telemetry
from .bulk import BulkCancel
from .cancel_request import CancelRequest
from .delivery import StopDelivery
from .io_loop import io_loop
from .rate_limited_log import RateLimitedLogger
from .registry import LISTED_REASON, CancelRegistry, Registration
from .retry import WATCH_RECONNECT, retry_async

_log = logging.getLogger("otel_cancel.watcher")

T = TypeVar("T")

_DETAIL_FETCHES_MAX = 256
"""Flag values fetched at once for refusals (each root once; more wait for the next refusal)."""

LISTED_WITH_VALUES = 2000
"""Flags a listing reads with their values (reason, requester): a small set is held whole,
as the watch holds what it applies. Past them the listing reads keys only and holds one
string per root, so 100,000 flags cost megabytes, not hundreds of them."""

FlagListener = Callable[[FlagEvent, bool], None]
"""Told of every flag event the watcher sees, and whether it is replayed by a listing."""


class CancelWatcher:
    """Applies cancel flags from the store to this process's registry.

    Args:
        store_factory: builds the store; called on the watcher's own loop, because
            an etcd client belongs to the loop that created it.
        registry: the process registry.
        watchdog_seconds: interval of the liveness probe.
        listener: told of every flag event (``otel-cancel watch`` prints them).
        keys_only: past the first :data:`LISTED_WITH_VALUES` flags, list keys only (services); a
            listener that shows reasons lists every value.
        fail_before_listing: end (raising the ``StoreError``) when no endpoint can be
            listed at the start, instead of retrying: a command fails with one line
            where a service serves on.
    """

    def __init__(
        self,
        store_factory: Callable[[], CancelStore],
        registry: CancelRegistry,
        *,
        watchdog_seconds: float = 5.0,
        listener: FlagListener | None = None,
        keys_only: bool = True,
        fail_before_listing: bool = False,
    ) -> None:
        self._store_factory = store_factory
        self._registry = registry
        self._watchdog_seconds = watchdog_seconds
        self._listener = listener
        self._keys_only = keys_only
        self._fail_before_listing = fail_before_listing
        self._bad_input = RateLimitedLogger(_log)
        self._fetching: set[str] = set()
        self._fetching_lock = threading.Lock()
        registry.on_details_wanted = self._details_wanted
        registry.decode_flag = self._decode_unread
        self._delivery = StopDelivery()
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
        self.on_stops_delivered: Callable[[], None] | None = None
        """Called after stops were handed to their loops (on the thread that handed them over)."""
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

    @property
    def done(self) -> bool:
        """Whether the watcher has ended (stopped or failed)."""
        return self._future is None or self._future.done()

    def join(self) -> None:
        """Block until the watcher ends: stopped, or failed (its error is raised here)."""
        future = self._future
        if future is not None:
            with contextlib.suppress(concurrent.futures.CancelledError):
                future.result()

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
        is_new, registrations = self._registry.apply(request)
        if not is_new:
            return
        self.deliver(registrations)

    def deliver(self, registrations: list[Registration]) -> None:
        """Cancel each registration's task on its own loop (registrations whose root was just cancelled).

        One wake-up per loop for all the stops that reach it together (see
        :class:`~otel_cancel._core.delivery.StopDelivery`).
        """
        if registrations:
            self._delivery.post(registrations)
            if self.on_stops_delivered is not None:
                self.on_stops_delivered()

    def apply_bulk(self, bulk: BulkCancel) -> list[CancelRequest]:
        """Keep ``bulk`` in force here and stop every live root it selects; return their requests."""
        selected = self._registry.apply_bulk(bulk)
        for _, registrations in selected:
            self.deliver(registrations)
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

    # A listing logs bad keys and values rate-limited (it may meet thousands at once); the
    # watch logs each one, as it arrives.

    def _target_of(self, event: FlagEvent, prefix: str, *, limited: bool = False) -> tuple[str, str] | None:
        """What the event's key names (``("root", root)`` or ``("bulk", id)``); a bad key is logged."""
        target = parse_flag_key(prefix, event.key)
        if target is None:
            message = "otel-cancel: ignoring key %r under the flags prefix: not a valid root"
            if limited:
                self._bad_input.warning("key", message, event.key[:200])
            else:
                _log.warning(message, event.key[:200])
        return target

    def _parse(self, root: str, value: bytes, *, limited: bool = False) -> CancelRequest:
        try:
            return CancelRequest.from_json(value, root)
        except ValueError as error:
            message = "otel-cancel: malformed flag for %s (cancelling its root anyway): %s"
            if limited:
                self._bad_input.warning("value", message, root, error)
            else:
                _log.warning(message, root, error)
            # The key still says this root was cancelled; honour it with an unknown reason.
            return CancelRequest.of_malformed_flag(root)

    def _decode_unread(self, root: str, value: bytes) -> CancelRequest:
        # Called by the registry when a flag it kept unread is first needed (a refusal).
        return self._parse(root, value, limited=True)

    def _apply_flag(self, root: str, value: bytes, *, limited: bool = False) -> None:
        """Apply the flag of ``root`` whose value is ``value``; decode it only if work here needs it."""
        # Every process applies every flag, and most hold nothing for its root (a
        # bystander): when the value starts the way a flag of this root does, the
        # registry keeps the bytes and decodes them when a refusal first shows the
        # reason (a malformed one is logged then). Anything else is decoded now, and a
        # malformed one logged now; either way its key alone still cancels the root.
        if CancelRequest.starts_as_flag_of(value, root) and self._registry.apply_unread(root, value):
            return
        self.apply(self._parse(root, value, limited=limited))

    def _apply_event(self, event: FlagEvent, prefix: str) -> None:
        target = self._target_of(event, prefix)
        if target is None:
            return
        kind, name = target
        if kind == "bulk":
            self._apply_bulk_event(event, name)
        elif event.kind == "delete":
            self._registry.forget(name)
        else:
            self._apply_flag(name, event.value)

    # -- fetching what only a message needs --------------------------------------------

    def _details_wanted(self, root: str) -> None:
        # Any thread (a refusal): fetch the flag once on the IO loop, so later refusals
        # carry its reason. The refusal itself never waits for etcd.
        with self._fetching_lock:
            if root in self._fetching or len(self._fetching) >= _DETAIL_FETCHES_MAX or self._future is None:
                return
            self._fetching.add(root)
        self.submit(self._fetch_details(root))

    async def _fetch_details(self, root: str) -> None:
        try:
            store = await self.store()
            request = await store.get_flag(root)
            if request is not None:
                self.apply(request)
        except StoreError as error:
            _log.debug("otel-cancel: could not fetch the flag of %s: %s", root, error)
        finally:
            with self._fetching_lock:
                self._fetching.discard(root)

    async def _apply_listed(self, store: CancelStore, root: str, value: bytes) -> None:
        if value or not self._keys_only:
            self._apply_flag(root, value, limited=True)
            return
        if not self._registry.apply_listed(root):
            return
        # Work for this root is live here: stopping it (and its receipt) needs the flag itself.
        request = await store.get_flag(root)
        self.apply(request or CancelRequest(root, LISTED_REASON, 0, ""))

    async def _list(self, store: CancelStore) -> None:
        """List every flag, page by page, and mark each root cancelled; forget roots no longer listed."""
        # A re-list (after a compaction) keeps enforcing what was known until it has
        # completed, then forgets only the roots whose flags are gone. The first listing
        # has nothing to forget, and keeps no second copy of the roots.
        seen: set[str] | None = set() if self.listings else None
        bulk_ids: set[str] = set()
        self.listings += 1
        revision = 0
        values_for_first = LISTED_WITH_VALUES if self._keys_only else None
        async for page in store.list_flag_pages(values_for_first=values_for_first):
            revision = page.revision
            for event in page.flags:
                target = self._target_of(event, store.prefix, limited=True)
                if target is None:
                    continue
                kind, root = target
                if kind == "bulk":
                    # Bulk flags are few (bounded in force): fetch one listed keys-only.
                    bulk_ids.add(root)
                    await self._apply_listed_bulk(store, event, root)
                    continue
                if seen is not None:
                    seen.add(root)
                if self._listener is not None:
                    self._listener(event, True)
                await self._apply_listed(store, root, event.value)
        if seen is not None:
            self._registry.retain_only(seen)
        self._registry.retain_only_bulk(bulk_ids)
        self.last_revision = revision

    async def _apply_listed_bulk(self, store: CancelStore, event: FlagEvent, bulk_id: str) -> None:
        if not event.value:
            try:
                bulk = await store.get_bulk(bulk_id)
            except ValueError as error:
                self._bad_input.warning("bulk", "otel-cancel: ignoring malformed bulk cancel %s: %s", bulk_id, error)
                return
            if bulk is not None:
                self.apply_bulk(bulk)
            return
        self._apply_bulk_event(event, bulk_id)

    # -- the loop ----------------------------------------------------------------------

    async def _main(self) -> None:
        must_list = True
        outage_logged = False
        dropped: Exception | None = None  # what ended the last watch: the first failure of an outage

        async def connect() -> CancelStore:
            nonlocal must_list
            store = await self.store()
            try:
                if must_list:
                    await self._list(store)
                    must_list = False
                    if not self.listed.is_set():
                        self.listed.set()
                        self._listed_future.set_result(None)
                else:
                    # Prove etcd answers before calling the watcher connected again.
                    await store.ping()
            except Exception as error:
                if not isinstance(error, RevisionCompactedError):
                    await store.close()
                raise
            return store

        def is_outage(error: Exception) -> bool:
            # Any other error is a bug or input no check foresaw; it is retried like an outage
            # too: a watcher that ended would leave the process serving on, enforcing nothing.
            if isinstance(error, RevisionCompactedError):
                return False
            # A command that could never list ends with the error (one line); a service serves on.
            return not (self._fail_before_listing and not self.listed.is_set())

        def on_retry(error: Exception, delay: float) -> None:
            nonlocal outage_logged
            self._set_connected(False)
            if not isinstance(error, StoreError):
                # Rate-limited: an error that recurs on every attempt must not flood the log.
                self._bad_input.warning(
                    "unexpected",
                    "otel-cancel: unexpected error in the cancel watch (%r); reconnecting, cancels will apply then",
                    error,
                    exc_info=error,
                )
            elif not outage_logged:
                _log.warning(
                    "otel-cancel: cancel store unavailable (%s); serving on, cancels will apply on reconnect",
                    error,
                )
                outage_logged = True
            self.reconnects += 1
            telemetry.watch_reconnected()

        while True:
            failed_with, dropped = dropped, None
            store: CancelStore | None = None
            try:
                # Through an outage the shared backoff (full jitter spreads the reconnects of
                # many replicas after an etcd restart); each connection starts it afresh.
                store = await retry_async(
                    connect, WATCH_RECONNECT, retry_on=is_outage, on_retry=on_retry, failed_with=failed_with
                )
                self._set_connected(True)
                if outage_logged:
                    # Info, not a warning: an outage logs exactly one warning (when it starts).
                    _log.info("otel-cancel: reconnected to the cancel store at revision %d", self.last_revision)
                    outage_logged = False
                await self._watch_until_error(store)
            except RevisionCompactedError:
                _log.info("otel-cancel: revision %d was compacted; listing again", self.last_revision + 1)
                must_list = True
                self._set_connected(False)
            except Exception as error:
                # A store error, or an unexpected one (logged when retried): either way the
                # watch resumes from the last revision applied, so nothing written is lost.
                if store is None:
                    raise  # not retried: the first listing failed in a command
                self._set_connected(False)
                await store.close()
                dropped = error

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
            if self._listener is not None:
                self._listener(event, False)
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
