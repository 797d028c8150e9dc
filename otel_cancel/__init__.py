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
    from ._core.cancel_many import BulkCancelResult as BulkCancelResult
    from ._core.cancel_many import cancel_many as cancel_many
    from ._core.context_blocks import deadline as deadline
    from ._core.context_blocks import labelled as labelled
    from ._core.deadline import time_left as time_left
    from ._core.labels import current_labels as current_labels
    from ._core.process_state import configure as configure
    from ._core.root import current_depth as current_depth
    from ._core.root import current_root as current_root
    from ._core.root_id import validate_root as validate_root
    from ._core.scope import CancelResult as CancelResult
    from ._core.scope import CancelScope as CancelScope
    from ._core.scope import cancel as cancel
    from ._core.scope import cancel_current as cancel_current
    from ._core.scope import check as check
    from ._core.scope import is_cancelled as is_cancelled
    from ._core.scope import scope as scope
    from ._core.settings import Settings as Settings
    from .exceptions import Cancelled as Cancelled
    from .exceptions import OtelCancelError as OtelCancelError

# Public names are loaded on first use (PEP 562): a process that imports one corner of
# the package, such as the ``otel-cancel cancel`` command, does not pay for the rest
# (the runtime, asyncio, OpenTelemetry, the gRPC etcd client).
_PUBLIC = {
    "BulkCancelResult": "._core.cancel_many",
    "CancelResult": "._core.scope",
    "CancelScope": "._core.scope",
    "Cancelled": ".exceptions",
    "OtelCancelError": ".exceptions",
    "Settings": "._core.settings",
    "cancel": "._core.scope",
    "cancel_current": "._core.scope",
    "cancel_many": "._core.cancel_many",
    "check": "._core.scope",
    "configure": "._core.process_state",
    "current_depth": "._core.root",
    "current_labels": "._core.labels",
    "current_root": "._core.root",
    "deadline": "._core.context_blocks",
    "is_cancelled": "._core.scope",
    "labelled": "._core.context_blocks",
    "scope": "._core.scope",
    "time_left": "._core.deadline",
    "validate_root": "._core.root_id",
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
