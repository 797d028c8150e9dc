"""Where cancel flags and receipts live.

:class:`CancelStore` is the interface; :class:`~otel_cancel.store.etcd.EtcdCancelStore`
is the one to run in production, :class:`~otel_cancel.store.memory.MemoryCancelStore`
serves unit tests and single-process use. Every backend passes the same conformance
suite (``tests/store/test_store_conformance.py``).

Layout (etcd keys, ``prefix`` defaults to ``/otel-cancel/``)::

    {prefix}flags/{root}                       one CancelRequest (JSON), on a TTL lease
    {prefix}acks/{root}/{service}/{instance}   one Receipt (JSON) per stopped process
    {prefix}tasks/{task_id}                    one TaskRecord (JSON) per running A2A task, on a TTL lease
    {prefix}flags/bulk/{id}                    one BulkCancel (JSON) per ``cancel --all``, on a TTL lease
    {prefix}live/{service}/{instance}          one LiveRecord (JSON) per process, on the process's own lease
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # at run time only annotations name them: importing the store stays light
    from .._core.bulk import BulkCancel
    from .._core.records import CancelRequest, LiveRecord, Receipt, TaskRecord
    from .events import FlagEvent as FlagEvent
    from .events import FlagListing as FlagListing
    from .events import FlagPage as FlagPage

DEFAULT_PREFIX = "/otel-cancel/"
DEFAULT_TTL_SECONDS = 3600


LIST_PAGE_SIZE = 2000
"""Flags per page of a listing: keys only, a page is about 150 KB, far below gRPC's 4 MiB."""


@runtime_checkable
class CancelStore(Protocol):
    """Stores cancel flags and receipts, and streams flag changes.

    Every method may raise :class:`~otel_cancel.exceptions.StoreError` (and only
    that); every call is bounded by the store's deadline except the watch stream.
    """

    prefix: str

    async def create_flag(self, request: CancelRequest, ttl_seconds: int) -> tuple[CancelRequest, bool]:
        """Write the flag for ``request.root`` unless one exists.

        The stored flag's ``requested_at`` is the time of the write itself.

        Returns:
            The flag now stored and whether this call created it. When a flag was
            already there, it is returned unchanged (the first cancel wins).
        """
        ...

    async def get_flag(self, root: str) -> CancelRequest | None:
        """The flag for ``root``, or ``None``; a value that does not decode still cancels ``root``
        (:meth:`CancelRequest.of_malformed_flag <otel_cancel._core.cancel_request.CancelRequest.of_malformed_flag>`)."""
        ...

    async def list_flags(self) -> FlagListing:
        """Every flag, with the revision the listing was taken at (all in memory: small sets only)."""
        ...

    def list_flag_pages(
        self, *, keys_only: bool = False, page_size: int = LIST_PAGE_SIZE, values_for_first: int | None = None
    ) -> AsyncIterator[FlagPage]:
        """Every flag, page by page in key order, all pages at the revision of the first.

        Memory stays bounded by one page whatever the number of flags: the watcher
        lists keys only past its first flags (a root is all enforcement needs), the
        CLI prints page by page.

        Args:
            keys_only: no values at all.
            page_size: flags per page.
            values_for_first: values for this many flags (in key order), keys only after.

        Raises:
            RevisionCompactedError: the listing's revision was compacted between two
                pages; list again.
        """
        ...

    def watch_flags(self, start_revision: int) -> AsyncIterator[FlagEvent]:
        """Flag changes from ``start_revision`` (inclusive), in revision order.

        Raises:
            RevisionCompactedError: ``start_revision`` is no longer available.
            StoreError: the stream broke; the caller resumes from its last revision.
        """
        ...

    async def put_receipt(self, receipt: Receipt, ttl_seconds: int) -> None:
        """Write ``receipt`` under the flag's lease (or a new one if the flag is gone)."""
        ...

    async def put_receipts(self, receipts: Sequence[Receipt], ttl_seconds: int) -> None:
        """Write several receipts as :meth:`put_receipt` would, in as few calls as the store allows.

        A process stopping work for many roots at once (a storm of cancels) writes the
        receipts that are due together.
        """
        ...

    async def list_receipts(self, root: str) -> list[Receipt]:
        """Every well-formed receipt for ``root`` (malformed ones are logged and skipped)."""
        ...

    async def put_task(self, record: TaskRecord, ttl_seconds: int) -> int:
        """Write ``record`` under ``{prefix}tasks/{task_id}`` on a TTL lease, replacing any earlier one.

        Returns:
            The revision of the write, to pass to :meth:`delete_task`.
        """
        ...

    async def get_task(self, task_id: str) -> TaskRecord | None:
        """The record of ``task_id``, or ``None`` (none, expired, or malformed: logged)."""
        ...

    async def delete_task(self, task_id: str, revision: int) -> bool:
        """Delete the record of ``task_id`` if it is still the one written at ``revision``.

        Returns:
            Whether it was deleted (``False`` when a later write replaced it, or it is gone).
        """
        ...

    async def create_bulk(self, bulk: BulkCancel, ttl_seconds: int) -> BulkCancel:
        """Write the bulk flag ``{prefix}flags/bulk/{bulk.id}`` on a TTL lease.

        Returns:
            The flag as stored: its ``requested_at`` (the cut-off) is the time of the write.
        """
        ...

    async def get_bulk(self, bulk_id: str) -> BulkCancel | None:
        """The bulk cancel ``bulk_id`` if it is in force, else ``None`` (a listing read its key only)."""
        ...

    async def grant_lease(self, ttl_seconds: int) -> int:
        """A new lease of ``ttl_seconds``; returns its id."""
        ...

    async def keep_lease_alive(self, lease_id: int) -> bool:
        """Renew a lease; ``False`` when it has expired (its keys are gone)."""
        ...

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease (its keys go); a lease already gone is not an error."""
        ...

    async def put_live(self, record: LiveRecord, lease_id: int) -> None:
        """Write ``record`` under ``{prefix}live/{service}/{instance}`` on ``lease_id``."""
        ...

    async def list_live(self) -> list[LiveRecord]:
        """Every well-formed live record (malformed ones are logged and skipped)."""
        ...

    async def ping(self) -> None:
        """Prove the store answers now (the watcher's watchdog)."""
        ...

    async def close(self) -> None:
        """Release connections. The store may be used again afterwards (it reconnects)."""
        ...


__all__ = (
    "DEFAULT_PREFIX",
    "DEFAULT_TTL_SECONDS",
    "LIST_PAGE_SIZE",
    "CancelStore",
    "FlagEvent",
    "FlagListing",
    "FlagPage",
)


_EVENTS = frozenset({"FlagEvent", "FlagListing", "FlagPage"})


def __getattr__(name: str) -> Any:
    # The event records load on first use: a plain ``otel-cancel cancel`` imports this
    # package (for its prefix and the gateway client) and never needs them, and every
    # dataclass defined at import costs start-up time.
    if name in _EVENTS:
        from . import events

        return getattr(events, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
