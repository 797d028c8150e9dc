"""``CancelMiddleware``: every HTTP request runs in a scope for its root.

The public import path; the implementation lives in :mod:`otel_cancel.integrations.asgi`.
"""

from .integrations.asgi import (
    CancelMiddleware,
    warn_if_propagators_drop_baggage,
)

__all__ = (
    "CancelMiddleware",
    "warn_if_propagators_drop_baggage",
)
