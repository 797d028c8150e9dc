"""An in-process cancel store, for unit tests and single-process use.

It keeps the etcd semantics that the watcher relies on (revisions, create-if-absent,
TTL expiry reported as deletes, compaction) so the same conformance suite passes on
both backends. It is never used as a fallback for an unreachable etcd: a process
that asked for etcd and cannot reach it fails open and says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence

from .._core.bulk import BulkCancel
from .._core.records import CancelRequest, LiveRecord, Receipt, TaskRecord
from ..exceptions import RevisionCompactedError, StoreError
from . import DEFAULT_PREFIX, LIST_PAGE_SIZE, FlagEvent, FlagListing, FlagPage
from ._keys import (
    acks_prefix,
    bulk_flag_key,
    flag_key,
    flags_prefix,
    live_key,
    live_prefix,
    receipt_key,
    task_key,
    validate_prefix,
)

_log = logging.getLogger("otel_cancel.store")


@dataclasses.dataclass
class _Entry:
    value: bytes
    expires_at: float
    revision: int = 0
    lease: int = 0
    """A lease of :meth:`MemoryCancelStore.grant_lease` the entry expires with (0: none)."""


class MemoryCancelStore:
    """A :class:`~otel_cancel.store.CancelStore` held in this process's memory.

    Safe to use from several threads and event loops at once.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = validate_prefix(prefix)
        self._lock = threading.Lock()
        self._data: dict[str, _Entry] = {}
        self._log: list[FlagEvent] = []
        self._revision = 1
        self._compacted = 0
        self._leases: dict[int, tuple[float, int]] = {}
        """Lease id -> (expires at, TTL seconds)."""
        self._next_lease = 1
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[FlagEvent]]] = []

    # -- helpers (called with the lock held) -------------------------------------

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for lease_id in [i for i, (expires_at, _) in self._leases.items() if expires_at <= now]:
            del self._leases[lease_id]
        for key in [
            k for k, e in self._data.items() if e.expires_at <= now or (e.lease and e.lease not in self._leases)
        ]:
            del self._data[key]
            if key.startswith(flags_prefix(self.prefix)):
                self._append_locked(FlagEvent("delete", key, b"", self._next_revision_locked()))

    def _next_revision_locked(self) -> int:
        self._revision += 1
        return self._revision

    def _append_locked(self, event: FlagEvent) -> None:
        self._log.append(event)
        for loop, queue in self._subscribers:
            loop.call_soon_threadsafe(queue.put_nowait, event)

    # -- CancelStore ---------------------------------------------------------------

    async def create_flag(self, request: CancelRequest, ttl_seconds: int) -> tuple[CancelRequest, bool]:
        key = flag_key(self.prefix, request.root)
        with self._lock:
            self._expire_locked()
            existing = self._data.get(key)
            if existing is not None:
                try:
                    return CancelRequest.from_json(existing.value, request.root), False
                except ValueError:
                    _log.warning("otel-cancel: flag %s holds a malformed value; keeping it", key)
                    return request, False
            stamped = dataclasses.replace(request, requested_at=time.time_ns())
            value = stamped.to_json()
            self._data[key] = _Entry(value, time.monotonic() + ttl_seconds)
            self._append_locked(FlagEvent("put", key, value, self._next_revision_locked()))
            return stamped, True

    async def get_flag(self, root: str) -> CancelRequest | None:
        key = flag_key(self.prefix, root)
        with self._lock:
            self._expire_locked()
            entry = self._data.get(key)
        return None if entry is None else CancelRequest.of_flag(root, entry.value)

    async def list_flags(self) -> FlagListing:
        head = flags_prefix(self.prefix)
        with self._lock:
            self._expire_locked()
            flags = tuple(
                FlagEvent("put", key, entry.value, self._revision)
                for key, entry in sorted(self._data.items())
                if key.startswith(head)
            )
            return FlagListing(flags, self._revision)

    async def list_flag_pages(
        self, *, keys_only: bool = False, page_size: int = LIST_PAGE_SIZE, values_for_first: int | None = None
    ) -> AsyncIterator[FlagPage]:
        # One snapshot taken under the lock (this store holds few flags), handed out in pages.
        listing = await self.list_flags()
        flags = listing.flags
        with_values = 0 if keys_only else len(flags) if values_for_first is None else values_for_first
        flags = tuple(f if i < with_values else dataclasses.replace(f, value=b"") for i, f in enumerate(flags))
        for start in range(0, max(len(flags), 1), page_size):
            yield FlagPage(flags[start : start + page_size], listing.revision)

    async def watch_flags(self, start_revision: int) -> AsyncIterator[FlagEvent]:
        queue: asyncio.Queue[FlagEvent] = asyncio.Queue()
        subscriber = (asyncio.get_running_loop(), queue)
        with self._lock:
            if start_revision <= self._compacted:
                raise RevisionCompactedError(self._compacted + 1)
            backlog = [e for e in self._log if e.revision >= start_revision]
            self._subscribers.append(subscriber)
        try:
            for event in backlog:
                yield event
            last = backlog[-1].revision if backlog else start_revision - 1
            while True:
                event = await queue.get()
                if event.revision > last:
                    last = event.revision
                    yield event
        finally:
            with self._lock:
                self._subscribers.remove(subscriber)

    async def put_receipt(self, receipt: Receipt, ttl_seconds: int) -> None:
        key = receipt_key(self.prefix, receipt.root, receipt.service, receipt.instance)
        with self._lock:
            flag = self._data.get(flag_key(self.prefix, receipt.root))
            expires_at = flag.expires_at if flag else time.monotonic() + ttl_seconds
            self._data[key] = _Entry(receipt.to_json(), expires_at)
            self._next_revision_locked()

    async def put_receipts(self, receipts: Sequence[Receipt], ttl_seconds: int) -> None:
        for receipt in receipts:
            await self.put_receipt(receipt, ttl_seconds)

    async def list_receipts(self, root: str) -> list[Receipt]:
        head = acks_prefix(self.prefix, root)
        with self._lock:
            self._expire_locked()
            values = [(k, e.value) for k, e in sorted(self._data.items()) if k.startswith(head)]
        receipts = []
        for key, value in values:
            try:
                receipts.append(Receipt.from_json(value))
            except ValueError as error:
                _log.warning("otel-cancel: ignoring malformed receipt %s: %s", key, error)
        return receipts

    async def put_task(self, record: TaskRecord, ttl_seconds: int) -> int:
        key = task_key(self.prefix, record.task_id)
        with self._lock:
            revision = self._next_revision_locked()
            self._data[key] = _Entry(record.to_json(), time.monotonic() + ttl_seconds, revision)
            return revision

    async def get_task(self, task_id: str) -> TaskRecord | None:
        key = task_key(self.prefix, task_id)
        with self._lock:
            self._expire_locked()
            entry = self._data.get(key)
        if entry is None:
            return None
        try:
            return TaskRecord.from_json(entry.value, task_id)
        except ValueError as error:
            _log.warning("otel-cancel: ignoring malformed task record %s: %s", key, error)
            return None

    async def delete_task(self, task_id: str, revision: int) -> bool:
        key = task_key(self.prefix, task_id)
        with self._lock:
            entry = self._data.get(key)
            if entry is None or entry.revision != revision:
                return False
            del self._data[key]
            self._next_revision_locked()
            return True

    async def create_bulk(self, bulk: BulkCancel, ttl_seconds: int) -> BulkCancel:
        key = bulk_flag_key(self.prefix, bulk.id)
        with self._lock:
            stamped = dataclasses.replace(bulk, requested_at=time.time_ns())
            value = stamped.to_json()
            self._data[key] = _Entry(value, time.monotonic() + ttl_seconds)
            self._append_locked(FlagEvent("put", key, value, self._next_revision_locked()))
            return stamped

    async def get_bulk(self, bulk_id: str) -> BulkCancel | None:
        key = bulk_flag_key(self.prefix, bulk_id)
        with self._lock:
            self._expire_locked()
            entry = self._data.get(key)
        return None if entry is None else BulkCancel.from_json(entry.value, bulk_id)

    async def grant_lease(self, ttl_seconds: int) -> int:
        with self._lock:
            lease_id = self._next_lease
            self._next_lease += 1
            self._leases[lease_id] = (time.monotonic() + ttl_seconds, ttl_seconds)
            return lease_id

    async def keep_lease_alive(self, lease_id: int) -> bool:
        with self._lock:
            self._expire_locked()
            lease = self._leases.get(lease_id)
            if lease is None:
                return False
            self._leases[lease_id] = (time.monotonic() + lease[1], lease[1])
            return True

    async def revoke_lease(self, lease_id: int) -> None:
        with self._lock:
            self._leases.pop(lease_id, None)
            self._expire_locked()

    async def put_live(self, record: LiveRecord, lease_id: int) -> None:
        key = live_key(self.prefix, record.service, record.instance)
        with self._lock:
            self._expire_locked()
            if lease_id not in self._leases:
                raise StoreError(f"lease {lease_id} not found")
            self._data[key] = _Entry(record.to_json(), float("inf"), self._next_revision_locked(), lease_id)

    async def list_live(self) -> list[LiveRecord]:
        head = live_prefix(self.prefix)
        with self._lock:
            self._expire_locked()
            values = [(k, e.value) for k, e in sorted(self._data.items()) if k.startswith(head)]
        records = []
        for key, value in values:
            try:
                records.append(LiveRecord.from_json(value))
            except ValueError as error:
                _log.warning("otel-cancel: ignoring malformed live record %s: %s", key, error)
        return records

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # -- test helpers --------------------------------------------------------------

    def put_raw(self, key: str, value: bytes) -> None:
        """Write any value under any key, as a foreign writer could (tests)."""
        with self._lock:
            self._data[key] = _Entry(value, float("inf"))
            if key.startswith(flags_prefix(self.prefix)):
                self._append_locked(FlagEvent("put", key, value, self._next_revision_locked()))

    def compact(self) -> int:
        """Drop the event history up to the current revision; return that revision."""
        with self._lock:
            self._compacted = self._revision
            self._log.clear()
            return self._compacted

    def expire_all(self) -> None:
        """Expire every key now, as if every lease ran out (tests)."""
        with self._lock:
            for entry in self._data.values():
                entry.expires_at = 0
            self._expire_locked()
