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

from .._request import CancelRequest, Receipt, TaskRecord
from ..exceptions import RevisionCompactedError
from . import DEFAULT_PREFIX, FlagEvent, FlagListing
from ._keys import acks_prefix, flag_key, flags_prefix, receipt_key, task_key, validate_prefix

_log = logging.getLogger("otel_cancel.store")


@dataclasses.dataclass
class _Entry:
    value: bytes
    expires_at: float
    revision: int = 0


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
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[FlagEvent]]] = []

    # -- helpers (called with the lock held) -------------------------------------

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for key in [k for k, e in self._data.items() if e.expires_at <= now]:
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
        return None if entry is None else CancelRequest.from_json(entry.value, root)

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
