"""A2A agents (``a2a-sdk``): every task in a scope, cancel-task as a distributed cancel.

The public import path; the implementation lives in :mod:`otel_cancel.integrations.a2a`.
"""

from .integrations.a2a import (
    DEFAULT_REASON,
    CancellableAgentExecutor,
    CancellableRequestHandler,
    is_a2a_app,
    warn_if_not_cancellable,
)

__all__ = (
    "DEFAULT_REASON",
    "CancellableAgentExecutor",
    "CancellableRequestHandler",
    "is_a2a_app",
    "warn_if_not_cancellable",
)
