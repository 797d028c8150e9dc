"""Live work, published off the request path: which roots this process holds work for.

Each process owns one key, ``{prefix}live/{service}/{instance}``, on a lease of its
own (``OTEL_CANCEL_LIVE_TTL_SECONDS``) that it keeps alive. A publisher task on the
process's IO loop wakes every ``OTEL_CANCEL_LIVE_INTERVAL_MS``, and only when the
registry's change counter moved since the last write does it rewrite the key with
a snapshot of the live roots (service, instance, depth, scope names, when the
work began here, labels): the oldest ones, as many as fit in a record, and a count
of the rest, so a process with thousands of live roots reads only a few hundred of
them under the registry's lock. So the request path never waits on etcd (entering a
scope bumps an integer under the registry's lock it already holds), a process
makes at most ``1000 / interval_ms`` writes a second whatever its request rate
(plus one keep-alive every third of the lease), an idle process writes nothing,
and the key of a process that dies disappears with its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..exceptions import StoreError, StorePermissionError, StoreUnavailableError
from ..store import CancelStore
from .records import MAX_LIVE_SCOPES as _MAX_SCOPES
from .records import LiveEntry, LiveRecord
from .registry import CancelRegistry

_log = logging.getLogger("otel_cancel.live")

DEFAULT_INTERVAL_MS = 250
DEFAULT_LIVE_TTL_SECONDS = 10
MAX_PUBLISHED_BYTES = 60_000
"""A live record stays below this (the reader's bound is 64 KiB): the oldest roots are kept."""
PERMISSION_RETRY_SECONDS = 60.0
_MAX_SCOPE_NAME = 80
_SMALLEST_ENTRY_BYTES = len(LiveEntry("0" * 32, 0, 0, 0, (), {}).encoded) + 1
MAX_PUBLISHED_ROOTS = MAX_PUBLISHED_BYTES // _SMALLEST_ENTRY_BYTES
"""More roots than this never fit in a record: the publisher reads no more from the registry."""


def build_record(service: str, instance: str, live: list[LiveEntry], total: int | None = None) -> LiveRecord:
    """The record to publish for ``live``, bounded to :data:`MAX_PUBLISHED_BYTES` (oldest work kept).

    One pass: each entry's encoded size is added up until the next would not fit (the
    publisher runs every interval while scopes change, so this is on the IO loop's budget).
    ``total`` is how many roots are live when ``live`` holds only the oldest of them.
    """
    published_at = time.time_ns()
    total = len(live) if total is None else total
    # The record's own fields, with room for the digits of the truncated count.
    size = len(LiveRecord(service, instance, published_at, (), total).to_json())
    kept: list[LiveEntry] = []
    for item in sorted(live, key=lambda item: item.started_at):
        entry = item
        if len(item.scopes) > _MAX_SCOPES or any(len(name) > _MAX_SCOPE_NAME for name in item.scopes):
            entry = dataclasses.replace(item, scopes=tuple(n[:_MAX_SCOPE_NAME] for n in item.scopes[:_MAX_SCOPES]))
        # Encoded once: the record's JSON is built from the same text (LiveEntry.encoded).
        size += len(entry.encoded) + 1  # and its comma
        if size > MAX_PUBLISHED_BYTES:
            break
        kept.append(entry)
    return LiveRecord(service, instance, published_at, tuple(kept), total - len(kept))


class LivePublisher:
    """Publishes this process's live work (see the module docstring).

    Args:
        registry: the process registry (its ``changes`` counter and ``oldest_live_work()``).
        store: returns the store, awaited on the IO loop.
        service: this process's service.
        instance: this process's instance.
        interval_ms: least time between two writes.
        ttl_seconds: the lease of the process's key.
    """

    def __init__(
        self,
        registry: CancelRegistry,
        store: Callable[[], Any],
        *,
        service: str,
        instance: str,
        interval_ms: float = DEFAULT_INTERVAL_MS,
        ttl_seconds: int = DEFAULT_LIVE_TTL_SECONDS,
    ) -> None:
        self._registry = registry
        self._store = store
        self.service = service
        self.instance = instance
        self.interval_seconds = interval_ms / 1000
        self.ttl_seconds = ttl_seconds
        self.writes = 0
        """Records written (benchmarks compare it with the request count)."""
        self.keepalives = 0
        self._lease: int | None = None
        self._published: dict[str, LiveEntry] = {}
        """The entries of the last record, by root: an unchanged entry is not encoded again."""
        self._running = False
        self._state = threading.Condition()

    async def run(self) -> None:
        """Publish until cancelled; then revoke the lease, so the record goes at once."""
        self._set_running(True)
        published_changes = 0  # an idle process (no scope ever) writes nothing
        renewed_at = 0.0
        warned = False
        try:
            while True:
                await asyncio.sleep(self.interval_seconds)
                changes = self._registry.changes
                now = time.monotonic()
                renew = self._lease is not None and now - renewed_at >= self.ttl_seconds / 3
                if changes == published_changes and not renew:
                    continue
                store: CancelStore = await self._store()
                try:
                    if self._lease is None or (renew and not await store.keep_lease_alive(self._lease)):
                        # No lease yet, or it expired (etcd was out of reach longer than the TTL):
                        # a new one, and the record written again on it.
                        self._lease = await store.grant_lease(self.ttl_seconds)
                        published_changes = -1
                        renewed_at = now
                    elif renew:
                        self.keepalives += 1
                        renewed_at = now
                    if changes != published_changes:
                        oldest, total = self._registry.oldest_live_work(MAX_PUBLISHED_ROOTS)
                        record = build_record(self.service, self.instance, self._reuse(oldest), total)
                        self._published = {entry.root: entry for entry in record.roots}
                        await store.put_live(record, self._lease)
                        self.writes += 1
                        published_changes = changes
                    warned = False
                except StorePermissionError as error:
                    # Will not change soon: say what to grant, and try again only now and then.
                    if not warned:
                        _log.warning(
                            "otel-cancel: not allowed to publish live work (grant this role write on "
                            "%slive/ to show it in otel-cancel ps): %s",
                            store.prefix,
                            error,
                        )
                        warned = True
                    await asyncio.sleep(PERMISSION_RETRY_SECONDS)
                except StoreError as error:
                    # Start again from a new lease on the next tick (the old one may be gone with an
                    # etcd that restarted); the record is rewritten on it. An outage is the
                    # watcher's to warn about, once: here it is only an echo.
                    self._lease = None
                    if not warned:
                        echo = isinstance(error, StoreUnavailableError) or "lease not found" in str(error)
                        _log.log(
                            logging.INFO if echo else logging.WARNING,
                            "otel-cancel: could not publish live work (will retry): %s",
                            error,
                        )
                        warned = True
        finally:
            lease, self._lease = self._lease, None
            try:
                if lease is not None:
                    with contextlib.suppress(Exception):
                        store = await self._store()
                        await asyncio.wait_for(store.revoke_lease(lease), 1.0)
            finally:
                self._set_running(False)

    def _reuse(self, entries: list[LiveEntry]) -> list[LiveEntry]:
        """``entries``, each replaced by the equal entry of the last record (its JSON text already made)."""
        published = self._published
        return [
            previous if (previous := published.get(entry.root)) is not None and previous == entry else entry
            for entry in entries
        ]

    def _set_running(self, running: bool) -> None:
        with self._state:
            self._running = running
            self._state.notify_all()

    def wait_finished(self, timeout: float) -> None:
        """After cancelling :meth:`run` from another thread: wait until it has revoked its lease."""
        with self._state:
            self._state.wait_for(lambda: not self._running, timeout)
