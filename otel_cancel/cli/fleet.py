"""``otel-cancel ps`` and ``otel-cancel cancel``: the fleet at a glance, and cancelling many at once.

``ps`` reads every process's published live work (:mod:`otel_cancel._core.live`) and
prints one row per root and process. ``cancel`` takes roots, or ``--all`` with a
selector (``--service``, ``--label``; none at all needs ``--yes``), through
:func:`otel_cancel._core.cancel_many.cancel_many_in_store`. With ``--wait`` it knows whom
to expect (the processes that held work for the cancelled roots) and returns as
soon as each has written its receipt or no longer holds the root, naming those that
did not answer in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._core.cancel_request import CancelRequest
from ..exceptions import StoreError
from ..store._keys import bulk_id_of_flag_key
from .arguments import count_argument, label_argument, root_argument, seconds_argument
from .options import requester
from .render import format_age, iso, receipt_row, request_dict
from .table import StreamingTable, format_table

if TYPE_CHECKING:  # the CLI imports this module for every command: what only cancel runs is imported there
    from .._core.bulk import BulkCancel
    from .._core.cancel_many import BulkCancelResult
    from .._core.records import LiveRecord, Receipt
    from .._core.settings import Settings
    from ..store import CancelStore, FlagEvent

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNCONFIRMED = 3
"""The flag is written, but whether work stopped could not be confirmed (receipts unreadable)."""
POLL_SECONDS = 0.05
FINISHED_GRACE_SECONDS = 0.5
"""A process that dropped a root from its live work without a receipt is taken as finished
after this long (its receipt, if its work was stopped, is written before then)."""

_PS_COLUMNS = ("root", "service", "instance", "depth", "age", "scopes", "labels")
_RECEIPT_COLUMNS = ("service", "instance", "depth", "interrupted", "latency_ms")
# Receipts stream in during --wait: columns wide enough for usual names (and roots), so rows line up.
_RECEIPT_MIN_WIDTHS = {"root": 32, "service": 20, "instance": 28, "depth": 5, "interrupted": 16, "latency_ms": 10}


def add_cancel_arguments(cancel: argparse.ArgumentParser) -> None:
    """The arguments of ``otel-cancel cancel``."""
    cancel.add_argument(
        "roots",
        type=root_argument,
        nargs="*",
        metavar="ROOT",
        help="roots to cancel: trace ids, 32 lowercase hex digits (the otel-cancel-root response header)",
    )
    cancel.add_argument(
        "--all",
        action="store_true",
        dest="all_runs",
        help="cancel every run selected by --service/--label (every run at all with --yes) begun before now",
    )
    cancel.add_argument("--service", metavar="NAME", help="with --all: runs with work in this service")
    cancel.add_argument(
        "--label",
        type=label_argument,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --all: runs with this label",
    )
    cancel.add_argument("--yes", action="store_true", help="confirm --all without a selector (every running run)")
    cancel.add_argument("--reason", default="cancelled by operator", help="why (shown in receipts and spans)")
    cancel.add_argument(
        "--wait",
        type=seconds_argument,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS for a receipt from every process that held work for the cancelled roots",
    )
    cancel.add_argument(
        "--expect", type=count_argument, default=0, metavar="N", help="with --wait: return after N receipts"
    )
    cancel.add_argument("--json", action="store_true", help="print JSON (one object per line) instead of text")
    # Not an option: the flags the gateway path tried for the roots it hands over (see gateway_cancel).
    cancel.set_defaults(gateway_attempted=())


def add_ps_arguments(ps: argparse.ArgumentParser) -> None:
    """The arguments of ``otel-cancel ps``."""
    ps.add_argument("--service", metavar="NAME", help="only work in this service")
    ps.add_argument(
        "--label",
        type=label_argument,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only runs with this label (repeatable)",
    )
    ps.add_argument("--json", action="store_true", help="a JSON list of objects")


def _usage_error(message: str) -> int:
    print(f"otel-cancel: {message}", file=sys.stderr)
    return EXIT_USAGE


# -- rendering --------------------------------------------------------------------------


# -- ps -----------------------------------------------------------------------------------


def ps_rows(
    records: Sequence[LiveRecord], service: str | None, labels: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    """One row per root and process, oldest work first, filtered by service and labels."""
    rows = [
        {
            "root": entry.root,
            "service": record.service,
            "instance": record.instance,
            "depth": entry.depth,
            "started_at": entry.started_at,
            "scopes": list(entry.scopes),
            "labels": dict(entry.labels),
        }
        for record in records
        if service is None or record.service == service
        for entry in record.roots
        if all(entry.labels.get(key) == value for key, value in labels)
    ]
    return sorted(rows, key=lambda row: (row["started_at"], row["root"], row["service"], row["instance"]))


async def ps_command(store: CancelStore, settings: Settings, args: argparse.Namespace) -> int:
    """``otel-cancel ps``."""
    records = await store.list_live()
    rows = ps_rows(records, args.service, args.label)
    if args.json:
        print(json.dumps(rows))
        return EXIT_OK
    if not rows:
        print("no live work" + (" matches" if args.service or args.label else ""))
        return EXIT_OK
    now = time.time_ns()
    shown = [
        {
            **row,
            "age": format_age(now - row["started_at"]),
            "scopes": ",".join(row["scopes"]) or "-",
            "labels": ",".join(f"{key}={value}" for key, value in row["labels"].items()) or "-",
        }
        for row in rows
    ]
    print(format_table(shown, _PS_COLUMNS))
    roots = len({row["root"] for row in rows})
    processes = len({(row["service"], row["instance"]) for row in rows})
    services = len({row["service"] for row in rows})
    truncated = sum(record.truncated for record in records)
    summary = f"{roots} root(s) live in {processes} process(es) of {services} service(s)"
    if truncated:
        summary += f"; {truncated} more root(s) not published (processes with very many)"
    print(summary)
    return EXIT_OK


# -- cancel -------------------------------------------------------------------------------


def print_flag(request: CancelRequest, created: bool, as_json: bool) -> None:
    """One flag a cancel wrote or found, as ``cancel`` prints it (both of its paths)."""
    if as_json:
        print(json.dumps({"created": created, "flag": request_dict(request)}), flush=True)
    elif created:
        print(f"cancelled {request.root} (reason: {request.reason})", flush=True)
    else:
        # A flag whose value did not decode tells neither when nor by whom.
        when = f" at {iso(request.requested_at)} by {request.requested_by}" if request.requested_at else ""
        print(f"{request.root} was already cancelled{when} (reason: {request.reason})", flush=True)


async def cancel_command(store: CancelStore, settings: Settings, args: argparse.Namespace) -> int:
    """``otel-cancel cancel``."""
    labels = dict(args.label)
    if args.all_runs and args.roots:
        return _usage_error("give roots or --all, not both")
    if not args.all_runs and (args.service is not None or labels):
        return _usage_error("--service and --label select runs for --all; add --all")
    if not args.all_runs and not args.roots:
        return _usage_error("give the ROOT(s) to cancel, or --all with --service/--label")
    if args.all_runs and args.service is None and not labels and not args.yes:
        return _usage_error("--all without --service or --label stops every running run; add --yes to confirm")
    from .._core import telemetry
    from .._core.cancel_many import cancel_many_in_store
    from .._core.scope import parent_in_root_trace

    requested_by = requester()
    # One span per root, as one flag per root: a root given twice is cancelled once.
    roots = list(dict.fromkeys(args.roots))
    spans = [telemetry.start_request_span(root, args.reason, parent_in_root_trace(root)) for root in roots]
    flagged: dict[str, tuple[CancelRequest, bool]] = {}
    try:
        result = await cancel_many_in_store(
            store,
            roots=roots,
            service=args.service,
            labels=labels,
            everything=args.all_runs and args.service is None and not labels,
            reason=args.reason,
            requested_by=requested_by,
            ttl_seconds=settings.ttl_seconds,
            read_live=bool(args.wait),
            on_flag=lambda request, created: flagged.setdefault(request.root, (request, created)),
            attempted=args.gateway_attempted,
        )
    except StoreError:
        # A root whose flag could not be written fails the command (the error is its
        # last line), but the flags written for the others are cancels done: say so.
        # Listed roots in the order given, as on success (a selector's in the order written).
        for request, created in [flagged[root] for root in roots if root in flagged] or flagged.values():
            telemetry.cancel_requested(request.root, request.reason, created)
            print_flag(request, created, args.json)
        raise
    finally:
        for span in spans:
            span.end()
    for request, created in result.flags:
        telemetry.cancel_requested(request.root, request.reason, created)
    if result.bulk is not None or len(result.flags) > 1:
        telemetry.bulk_cancel_requested("selector" if result.bulk is not None else "roots")
    _print_result(result, args.json)
    if args.wait:
        try:
            await _wait_for_receipts(store, result, args)
        except StoreError as error:
            roots = [request.root for request, _ in result.flags]
            if len(roots) == 1:
                written = f"the flag for {roots[0]} is written"
            elif roots:
                written = f"the flags for {', '.join(roots)} are written"
            else:
                written = "the bulk cancel is written"
            detail = " ".join(str(error).split())
            print(f"otel-cancel: {written}; its receipts could not be read: {detail}", file=sys.stderr, flush=True)
            return EXIT_UNCONFIRMED
    return EXIT_OK


def bulk_dict(bulk: BulkCancel) -> dict[str, Any]:
    """A bulk cancel as JSON output shows it (``cutoff``: epoch ns)."""
    return {
        "id": bulk.id,
        "service": bulk.service,
        "labels": dict(bulk.labels),
        "reason": bulk.reason,
        "cutoff": bulk.requested_at,
        "requested_by": bulk.requested_by,
    }


def bulk_flags(prefix: str, events: Sequence[FlagEvent]) -> list[BulkCancel]:
    """The well-formed bulk cancels among listed flags (``otel-cancel list``)."""
    from .._core.bulk import BulkCancel

    found = []
    for event in events:
        bulk_id = bulk_id_of_flag_key(prefix, event.key)
        if bulk_id is not None:
            with contextlib.suppress(ValueError):
                found.append(BulkCancel.from_json(event.value, bulk_id))
    return found


def bulk_lines(bulks: Sequence[BulkCancel]) -> str:
    """Bulk cancels in force, as a table with a title line."""
    rows = [
        {
            "bulk": b.id,
            "selects": b.describe(),
            "cutoff": iso(b.requested_at),
            "by": b.requested_by,
            "reason": b.reason,
        }
        for b in bulks
    ]
    return f"{len(rows)} bulk cancel(s) in force (runs begun before the cut-off are refused):\n" + format_table(
        rows, ("bulk", "selects", "cutoff", "by", "reason")
    )


def _print_result(result: BulkCancelResult, as_json: bool) -> None:
    bulk = result.bulk
    if bulk is not None:
        if as_json:
            print(json.dumps({"bulk": bulk_dict(bulk)}), flush=True)
        else:
            print(
                f"bulk cancel {bulk.id} ({bulk.describe()}): every such run begun before "
                f"{iso(bulk.requested_at)} stops, in every process; {len(result.flags)} live root(s) found",
                flush=True,
            )
    for request, created in result.flags:
        print_flag(request, created, as_json)


class _Expected:
    """The processes a waiting cancel expects a receipt from, and what became of each."""

    def __init__(self, holders: dict[str, tuple[tuple[str, str], ...]]) -> None:
        self.pending = {(root, service, instance) for root, who in holders.items() for service, instance in who}
        self.total = len(self.pending)
        self.finished: set[tuple[str, str, str]] = set()
        self._dropped_since: dict[tuple[str, str, str], float] = {}

    def receipt(self, root: str, service: str, instance: str) -> None:
        self.pending.discard((root, service, instance))

    def live(self, records: Sequence[LiveRecord]) -> None:
        """Take as finished a process that no longer holds the root (after the grace)."""
        holding = {(e.root, r.service, r.instance) for r in records for e in r.roots}
        present = {(r.service, r.instance) for r in records}
        now = time.monotonic()
        for key in list(self.pending):
            if key in holding or (key[1], key[2]) not in present:
                # Still at work, or gone (a process that died): it stays expected, and is named.
                self._dropped_since.pop(key, None)
                continue
            since = self._dropped_since.setdefault(key, now)
            if now - since >= FINISHED_GRACE_SECONDS:
                self.pending.discard(key)
                self.finished.add(key)

    def missing(self, records: Sequence[LiveRecord]) -> list[dict[str, str]]:
        present = {(r.service, r.instance) for r in records}
        return [
            {
                "root": root,
                "service": service,
                "instance": instance,
                "state": "still holds work" if (service, instance) in present else "gone (its live work expired)",
            }
            for root, service, instance in sorted(self.pending)
        ]


async def _wait_for_receipts(store: CancelStore, result: BulkCancelResult, args: argparse.Namespace) -> None:
    """Print receipts as they arrive; return when every expected process answered or the time is up."""
    import asyncio  # here: a plain cancel (the gateway path) loads no asyncio

    deadline = time.monotonic() + args.wait
    expected = _Expected(dict(result.holders))
    roots = result.roots
    seen: set[tuple[str, str, str]] = set()
    columns = (("root",) if len(roots) > 1 else ()) + _RECEIPT_COLUMNS
    table = StreamingTable(columns, _RECEIPT_MIN_WIDTHS)
    header_printed = False
    records: list[LiveRecord] = []
    started = time.monotonic()
    while True:
        for root in roots:
            for receipt in await store.list_receipts(root):
                key = (root, receipt.service, receipt.instance)
                if key in seen:
                    continue
                seen.add(key)
                expected.receipt(*key)
                row = receipt_row(receipt, with_root=True)
                if args.json:
                    print(json.dumps({"receipt": row}), flush=True)
                else:
                    if not header_printed:
                        print(table.header(), flush=True)
                        header_printed = True
                    print(table.row(row), flush=True)
        if args.expect:
            if len(seen) >= args.expect:
                break
        elif expected.total and not expected.pending:
            break
        if time.monotonic() >= deadline:
            break
        if expected.pending:
            records = await store.list_live()
            expected.live(records)
        await asyncio.sleep(POLL_SECONDS)
    missing = expected.missing(records) if expected.pending else []
    if args.json:
        print(
            json.dumps(
                {
                    "waited": {
                        "receipts": len(seen),
                        "expected": expected.total,
                        "finished_without_stopping": len(expected.finished),
                        "missing": missing,
                        "seconds": round(time.monotonic() - started, 3),
                    }
                }
            ),
            flush=True,
        )
        return
    line = f"{len(seen)} process(es) reported stopped work"
    if expected.total:
        line += f" ({expected.total} expected"
        if expected.finished:
            line += f", {len(expected.finished)} finished before the cancel reached them"
        line += ")"
    print(line, flush=True)
    for item in missing:
        who = f"{item['service']}/{item['instance']}"
        print(f"no receipt from {who} for {item['root']} within {args.wait:g}s: {item['state']}", flush=True)


def receipts_summary(receipts: Sequence[Receipt]) -> str:
    """One line under a receipts table: how many processes stopped, how many tasks, the slowest."""
    slowest = max(receipts, key=lambda r: r.latency_ms)
    tasks = sum(r.tasks for r in receipts)
    services = len({r.service for r in receipts})
    return (
        f"{len(receipts)} process(es) of {services} service(s) stopped {tasks} task(s); "
        f"slowest {slowest.latency_ms:.1f} ms after the flag ({slowest.service}/{slowest.instance})"
    )
