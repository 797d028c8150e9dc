"""otel-cancel: cancel once, stop everywhere.

The root run's trace id travels as OpenTelemetry baggage through every HTTP hop;
cancelling writes one flag to etcd; every process watches etcd once and stops its
own work for that root, writes a receipt and records a span.

Usage::

    import otel_cancel

    async def handler():
        async with otel_cancel.scope():      # bound to the request's root
            await do_work()                   # cancelled when the root is

    await otel_cancel.cancel(root, reason="user clicked cancel")

With ``opentelemetry-instrument`` the instrumentor wires scopes into ASGI apps,
httpx and LangGraph, so application code needs no change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._cancel_many import BulkCancelResult as BulkCancelResult
    from ._cancel_many import cancel_many as cancel_many
    from ._context_blocks import deadline as deadline
    from ._context_blocks import labelled as labelled
    from ._deadline import time_left as time_left
    from ._labels import current_labels as current_labels
    from ._root import current_depth as current_depth
    from ._root import current_root as current_root
    from ._root_id import validate_root as validate_root
    from ._runtime import configure as configure
    from ._scope import CancelResult as CancelResult
    from ._scope import CancelScope as CancelScope
    from ._scope import cancel as cancel
    from ._scope import cancel_current as cancel_current
    from ._scope import check as check
    from ._scope import is_cancelled as is_cancelled
    from ._scope import scope as scope
    from ._settings import Settings as Settings
    from .exceptions import Cancelled as Cancelled
    from .exceptions import OtelCancelError as OtelCancelError

# Public names are loaded on first use (PEP 562): a process that imports one corner of
# the package, such as the ``otel-cancel cancel`` command, does not pay for the rest
# (the runtime, asyncio, OpenTelemetry, the gRPC etcd client).
_PUBLIC = {
    "BulkCancelResult": "._cancel_many",
    "CancelResult": "._scope",
    "CancelScope": "._scope",
    "Cancelled": ".exceptions",
    "OtelCancelError": ".exceptions",
    "Settings": "._settings",
    "cancel": "._scope",
    "cancel_current": "._scope",
    "cancel_many": "._cancel_many",
    "check": "._scope",
    "configure": "._runtime",
    "current_depth": "._root",
    "current_labels": "._labels",
    "current_root": "._root",
    "deadline": "._context_blocks",
    "is_cancelled": "._scope",
    "labelled": "._context_blocks",
    "scope": "._scope",
    "time_left": "._deadline",
    "validate_root": "._root_id",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'otel_cancel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__version__ = "0.1.0"

__all__ = (
    "BulkCancelResult",
    "CancelResult",
    "CancelScope",
    "Cancelled",
    "OtelCancelError",
    "Settings",
    "cancel",
    "cancel_current",
    "cancel_many",
    "check",
    "configure",
    "current_depth",
    "current_labels",
    "current_root",
    "deadline",
    "is_cancelled",
    "labelled",
    "scope",
    "time_left",
    "validate_root",
)
