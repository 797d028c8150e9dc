"""The ``list`` and ``watch`` commands: every flag, at any number of flags.

``list`` prints each page of the listing as it arrives, so its memory does not grow
with the number of flags. ``watch`` runs the services' own :class:`CancelWatcher`
(fail-over across endpoints, reconnects, the watchdog for a frozen or leaderless
member, a re-list after compaction) and prints every flag event with the time it saw
it; flags replayed by a listing are marked ``replayed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from typing import Any

from .._core.cancel_request import CancelRequest
from .._core.registry import CancelRegistry, Registration
from .._core.settings import Settings
from .._core.watcher import CancelWatcher
from ..store import CancelStore, FlagEvent
from ..store._keys import root_of_flag_key
from .render import iso, request_dict
from .table import format_table


async def list_command(store: CancelStore, settings: Settings, args: argparse.Namespace) -> int:
    """``otel-cancel list``: print every flag, one page at a time."""
    from .fleet import bulk_dict, bulk_flags, bulk_lines

    as_json: bool = args.json
    printed = 0
    header_printed = False
    bulks = []  # bulk cancels in force: few (a process keeps at most a few hundred)
    async for page in store.list_flag_pages():
        flags = []
        bulks.extend(bulk_flags(store.prefix, page.flags))
        for event in page.flags:
            root = root_of_flag_key(store.prefix, event.key)
            if root is not None:
                flags.append(CancelRequest.of_flag(root, event.value))
        if as_json:
            # One JSON document, {"revision": R, "flags": [...]}, written as it is read.
            if not header_printed:
                sys.stdout.write(f'{{"revision": {page.revision}, "flags": [')
                header_printed = True
            for flag in flags:
                sys.stdout.write((", " if printed else "") + json.dumps(request_dict(flag)))
                printed += 1
            continue
        if not flags:
            continue
        rows = [
            {
                "root": f.root,
                "requested_at": iso(f.requested_at) if f.requested_at else "-",
                "by": f.requested_by,
                "reason": f.reason,
            }
            for f in flags
        ]
        lines = format_table(rows, ("root", "requested_at", "by", "reason")).splitlines()
        print("\n".join(lines if not header_printed else lines[1:]))
        header_printed = True
        printed += len(flags)
    if as_json:
        bulk_json = json.dumps([bulk_dict(bulk) for bulk in bulks])
        print(f'], "bulk": {bulk_json}}}' if header_printed else f'{{"revision": 0, "flags": [], "bulk": {bulk_json}}}')
        return 0
    if not printed:
        print("no cancelled roots")
    if bulks:
        print(bulk_lines(bulks))
    return 0


class _PrintOnlyRegistry(CancelRegistry):
    """A registry that enforces and remembers nothing: ``watch`` only prints what it sees."""

    def apply(self, request: CancelRequest) -> tuple[bool, list[Registration]]:
        return False, []

    def apply_listed(self, root: str) -> bool:
        return False

    def forget(self, root: str) -> None:
        pass

    def retain_only(self, roots: set[str]) -> None:
        pass


def _now() -> str:
    return iso(time.time_ns())


class _EventPrinter:
    """Prints each flag event as one line (text or JSON), with the time it was seen."""

    def __init__(self, prefix: str, as_json: bool) -> None:
        self._prefix = prefix
        self._as_json = as_json
        self._lock = threading.Lock()

    def __call__(self, event: FlagEvent, replayed: bool) -> None:
        root = root_of_flag_key(self._prefix, event.key)
        if root is None:
            return
        seen_at = _now()
        record: dict[str, Any]
        if event.kind == "put":
            flag = CancelRequest.of_flag(root, event.value)
            record = {"event": "cancelled", "root": root, "reason": flag.reason}
            written = iso(flag.requested_at) if flag.requested_at else "-"
            record.update(time=seen_at, replayed=replayed, requested_at=flag.requested_at)
            text = f"{seen_at} {'replayed ' if replayed else 'cancelled'} {root} {flag.reason}"
            if replayed:
                text += f" (flag written {written})"
        else:
            record = {"event": "expired", "root": root, "reason": "", "time": seen_at, "replayed": False}
            text = f"{seen_at} expired   {root}"
        with self._lock:
            print(json.dumps(record) if self._as_json else text.rstrip(), flush=True)


class _TimedFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{iso(int(record.created * 1e9))} {record.getMessage()}"


def watch_command(settings: Settings, *, as_json: bool) -> int:
    """``otel-cancel watch``: print flag events until interrupted.

    Raises:
        StoreError: no endpoint could be listed at the start (later outages are
            survived: one line on stderr when the store goes away, one when it is back).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TimedFormatter())
    handler.setLevel(logging.INFO)
    watcher_log = logging.getLogger("otel_cancel.watcher")
    watcher_log.addHandler(handler)
    previous_level = watcher_log.level
    watcher_log.setLevel(logging.INFO)
    watcher = CancelWatcher(
        settings.create_store,
        _PrintOnlyRegistry(),
        watchdog_seconds=settings.watchdog_seconds,
        listener=_EventPrinter(settings.prefix, as_json),
        keys_only=False,
        fail_before_listing=True,
    )
    watcher.start()
    try:
        # Say on stderr when the replay is over and live events follow (scripts wait for it).
        while not watcher.listed.wait(0.1):
            if watcher.done:
                break
        if watcher.listed.is_set():
            print(
                f"{_now()} otel-cancel: watching {settings.prefix}flags/ from revision {watcher.last_revision}",
                file=sys.stderr,
                flush=True,
            )
        watcher.join()
    finally:
        watcher.stop()
        watcher_log.removeHandler(handler)
        watcher_log.setLevel(previous_level)
    return 0
