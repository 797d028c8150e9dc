"""Where cancel flags and receipts live.

:class:`CancelStore` is the interface; :class:`~otel_cancel.store.etcd.EtcdCancelStore`
is the one to run in production, :class:`~otel_cancel.store.memory.MemoryCancelStore`
serves unit tests and single-process use. Every backend passes the same conformance
suite (``tests/test_store_conformance.py``).

Layout (etcd keys, ``prefix`` defaults to ``/otel-cancel/``)::

    {prefix}flags/{root}                       one CancelRequest (JSON), on a TTL lease
    {prefix}acks/{root}/{service}/{instance}   one Receipt (JSON) per stopped process
    {prefix}tasks/{task_id}                    one TaskRecord (JSON) per running A2A task, on a TTL lease
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # at run time only annotations name them: importing the store stays light
    from .._request import CancelRequest, Receipt, TaskRecord

DEFAULT_PREFIX = "/otel-cancel/"
DEFAULT_TTL_SECONDS = 3600


@dataclasses.dataclass(frozen=True)
class FlagEvent:
    """A change under ``{prefix}flags/``, as the store saw it.

    Attributes:
        kind: ``put`` (a flag was written) or ``delete`` (it expired or was removed).
        key: the full key.
        value: the raw value (empty for deletes); the watcher parses it.
        revision: the store revision of the change.
    """

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


@dataclasses.dataclass(frozen=True)
class FlagListing:
    """Every flag present at ``revision``."""

    flags: tuple[FlagEvent, ...]
    revision: int


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
        """The flag for ``root``, or ``None``."""
        ...

    async def list_flags(self) -> FlagListing:
        """Every flag, with the revision the listing was taken at."""
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

    async def ping(self) -> None:
        """Prove the store answers now (the watcher's watchdog)."""
        ...

    async def close(self) -> None:
        """Release connections. The store may be used again afterwards (it reconnects)."""
        ...


__all__ = ("DEFAULT_PREFIX", "DEFAULT_TTL_SECONDS", "CancelStore", "FlagEvent", "FlagListing")
