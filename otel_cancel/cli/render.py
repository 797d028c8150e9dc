"""How the ``otel-cancel`` commands show times, ages, flags and receipts.

Every command renders through these few functions (tables come from ``_table``), so a flag or
a receipt reads the same in ``status``, ``cancel --wait``, ``list`` and ``ps``, in text and JSON.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: a plain cancel loads no receipt record
    from .._core.cancel_request import CancelRequest
    from .._core.records import Receipt


def iso(epoch_ns: int) -> str:
    """An epoch time in nanoseconds as UTC ISO 8601 with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_ns / 1e9)) + f".{epoch_ns % 10**9 // 10**6:03d}Z"


def format_age(nanoseconds: int) -> str:
    """A short age: ``850ms``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    seconds = max(0, nanoseconds) / 1e9
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def request_dict(request: CancelRequest) -> dict[str, Any]:
    """A flag as JSON output shows it."""
    return {
        "root": request.root,
        "reason": request.reason,
        "requested_at": request.requested_at,
        "requested_by": request.requested_by,
        "kind": request.kind,
    }


def receipt_row(receipt: Receipt, *, with_root: bool = False) -> dict[str, Any]:
    """A receipt as a table row or a JSON object (``with_root`` where rows of several roots mix)."""
    row: dict[str, Any] = {"root": receipt.root} if with_root else {}
    row.update(
        service=receipt.service,
        instance=receipt.instance,
        depth=receipt.depth,
        interrupted=",".join(receipt.interrupted) or "-",
        latency_ms=round(receipt.latency_ms, 2),
        tasks=receipt.tasks,
    )
    return row
