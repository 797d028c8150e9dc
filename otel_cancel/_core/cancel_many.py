"""Cancelling many roots at once: listed roots, or every run a selector picks.

:func:`cancel_many_in_store` is the one implementation, shared by
:func:`otel_cancel.cancel_many` and ``otel-cancel cancel``. Listed roots get their
ordinary flags. A selector (a service, labels, or everything) writes one bulk flag
that every process evaluates locally (see :mod:`otel_cancel._core.bulk`), and this call
also writes the ordinary flag of every selected root it finds in the published
live work, so those stop at once and ``status ROOT`` tells why. Either way the
result says which processes held work for each root when the call was made:
``cancel --wait`` waits for exactly those.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Collection, Iterable, Mapping

from ..exceptions import StoreError, StorePermissionError
from ..store import CancelStore
from . import telemetry
from .bulk import BulkCancel
from .labels import validate_labels
from .process_state import get_process_state
from .records import CancelRequest, LiveRecord
from .root import validate_root

_CONCURRENT_WRITES = 16
_log = logging.getLogger("otel_cancel")


@dataclasses.dataclass(frozen=True)
class BulkCancelResult:
    """What :func:`cancel_many` did.

    Attributes:
        flags: each root flagged by this call, with whether this call created its flag
            (``False``: it was already cancelled; the first flag is kept).
        bulk: the bulk flag written for a selector, ``None`` for listed roots. Its
            ``requested_at`` is the cut-off: runs begun later are untouched.
        holders: for each flagged root, the ``(service, instance)`` of every process
            that had published live work for it when the call was made.
    """

    flags: tuple[tuple[CancelRequest, bool], ...]
    bulk: BulkCancel | None
    holders: Mapping[str, tuple[tuple[str, str], ...]]

    @property
    def roots(self) -> tuple[str, ...]:
        """The roots flagged by this call."""
        return tuple(request.root for request, _ in self.flags)


def check_selection(
    roots: Iterable[str], *, service: str | None, labels: Mapping[str, str] | None, everything: bool
) -> tuple[list[str], dict[str, str]]:
    """Validate what :func:`cancel_many` was asked to select.

    Raises:
        InvalidRootError: a root is not valid.
        InvalidLabelError: a label selector is not valid.
        ValueError: nothing is selected, or listed roots are combined with a selector.
    """
    listed = list(dict.fromkeys(validate_root(root) for root in roots))
    checked = validate_labels(labels or {})
    has_selector = service is not None or bool(checked)
    if service is not None and not service:
        raise ValueError("service must be a non-empty service name")
    if listed and (has_selector or everything):
        raise ValueError("give either roots or a selector (service, labels, everything), not both")
    if everything and has_selector:
        raise ValueError("everything=True selects every run; do not combine it with service or labels")
    if not listed and not has_selector and not everything:
        raise ValueError("nothing to cancel: give roots, a service, labels, or everything=True")
    return listed, checked


async def cancel_many_in_store(
    store: CancelStore,
    *,
    roots: Iterable[str] = (),
    service: str | None = None,
    labels: Mapping[str, str] | None = None,
    everything: bool = False,
    reason: str,
    requested_by: str,
    ttl_seconds: int,
    read_live: bool = True,
    on_flag: Callable[[CancelRequest, bool], object] | None = None,
    attempted: Collection[CancelRequest] = (),
) -> BulkCancelResult:
    """Cancel listed roots, or every run a selector picks, through ``store`` (see :func:`cancel_many`).

    Every root's flag is tried, also when another's cannot be written; the first
    failure (in the roots' order) is raised once all are done.

    Args:
        read_live: with ``False`` listed roots are flagged without reading live work
            first (``holders`` is then empty): one etcd call less for a caller that
            will not wait.
        on_flag: called with each flag as it is written (and whether this call
            created it), so a caller can report those written when another fails.
        attempted: flags an earlier try of this same cancel may have stored without
            learning it (the CLI's gateway, whose answer was lost): found in the
            store, they count as created by this call.
    """
    listed, checked = check_selection(roots, service=service, labels=labels, everything=everything)
    # Who holds what, read before any flag: the processes a waiting caller expects to hear from.
    try:
        live = await store.list_live() if read_live or not listed else []
    except StorePermissionError as error:
        # A role that may cancel but not read live work: cancel all the same (a selector
        # still reaches every process through its bulk flag), without knowing who held what.
        _log.warning("otel-cancel: cannot read live work, so not waiting for its holders: %s", error)
        live = []
    bulk: BulkCancel | None = None
    if listed:
        picked = listed
    else:
        bulk = await store.create_bulk(
            BulkCancel.new(service=service, labels=checked, reason=reason, requested_by=requested_by), ttl_seconds
        )
        picked = _selected_roots(bulk, live)
    limit = asyncio.Semaphore(_CONCURRENT_WRITES)

    async def flag(root: str) -> tuple[CancelRequest, bool]:
        async with limit:
            request = bulk.request_for(root) if bulk is not None else CancelRequest.new(root, reason, requested_by)
            stored, created = await store.create_flag(request, ttl_seconds)
            # A process the bulk flag reached may have written this root's flag first, for
            # this same bulk cancel: that is this call's flag too, not an earlier cancel.
            ours = created or stored in attempted or (bulk is not None and stored.requested_by == request.requested_by)
            if on_flag is not None:
                on_flag(stored, ours)
            return stored, ours

    # Not the first failure at once: the other writes still run, and each flag they
    # write is a cancel done that the caller must hear of (through on_flag).
    outcomes = await asyncio.gather(*(flag(root) for root in picked), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    flags = tuple(outcome for outcome in outcomes if not isinstance(outcome, BaseException))
    holders = {
        root: tuple(
            dict.fromkeys(
                (record.service, record.instance) for record in live for entry in record.roots if entry.root == root
            )
        )
        for root in picked
    }
    return BulkCancelResult(flags, bulk, holders)


def _selected_roots(bulk: BulkCancel, live: list[LiveRecord]) -> list[str]:
    """Roots with published live work that ``bulk`` selects (in any one process that holds them)."""
    return list(
        dict.fromkeys(
            entry.root
            for record in live
            for entry in record.roots
            if bulk.selects(record.service, entry.labels, entry.run_started_ms)
        )
    )


async def cancel_many(
    roots: Iterable[str] = (),
    *,
    service: str | None = None,
    labels: Mapping[str, str] | None = None,
    everything: bool = False,
    reason: str = "cancelled",
) -> BulkCancelResult:
    """Cancel many runs at once, in every process: listed roots, or every run a selector picks.

    ``cancel_many([root_a, root_b])`` cancels those roots, as :func:`cancel` would.
    ``cancel_many(service="billing")``, ``cancel_many(labels={"tenant": "acme"})`` and
    ``cancel_many(everything=True)`` (the kill switch) stop every run that matches
    and had begun before the call, in every process, including work begun a moment
    before the call and not yet published, and refuse later hops of such runs. A run
    begun after the call is untouched. ``service`` selects runs with work in that
    service (they are stopped everywhere); ``labels`` selects runs carrying all of them.

    Args:
        roots: roots to cancel.
        service: select runs with work in this service.
        labels: select runs carrying all of these labels.
        everything: select every run (needed when there is no other selector).
        reason: why (shown in receipts and spans).

    Returns:
        The roots flagged, the bulk flag (for a selector) and who held work for each root.

    Raises:
        InvalidRootError: a root is not valid.
        InvalidLabelError: a label selector is not valid.
        ValueError: nothing is selected, or roots are combined with a selector.
        StoreError: the store could not be written (work in this process is still stopped);
            with several roots, the first root's failure, once every root's flag was tried.
    """
    roots = list(roots)
    listed, checked = check_selection(roots, service=service, labels=labels, everything=everything)
    runtime = get_process_state()
    runtime.start()

    async def on_io_loop() -> BulkCancelResult:
        store = await runtime.watcher.store()
        try:
            return await cancel_many_in_store(
                store,
                roots=listed,
                service=service,
                labels=checked,
                everything=everything,
                reason=reason,
                requested_by=runtime.requester,
                ttl_seconds=runtime.settings.ttl_seconds,
            )
        except StoreError:
            # Never lose the cancel here: stop this process's work at once, and report the failure.
            for root in listed:
                runtime.watcher.apply(CancelRequest.new(root, reason, runtime.requester))
            if not listed:
                runtime.watcher.apply_bulk(
                    BulkCancel.new(service=service, labels=checked, reason=reason, requested_by=runtime.requester)
                )
            raise

    # Shielded like cancel(): the flags are written even when they cancel the caller's own scope.
    result = await asyncio.shield(asyncio.wrap_future(runtime.watcher.submit(on_io_loop())))
    # Apply here without waiting for the watch round trip (a repeat is a no-op).
    if result.bulk is not None:
        runtime.watcher.apply_bulk(result.bulk)
    for request, created in result.flags:
        runtime.watcher.apply(request)
        telemetry.cancel_requested(request.root, request.reason, created)
    telemetry.bulk_cancel_requested("selector" if result.bulk is not None else "roots")
    return result
