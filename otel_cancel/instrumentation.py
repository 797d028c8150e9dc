"""``OtelCancelInstrumentor``: turn otel-cancel on without code changes.

The public import path; the implementation lives in :mod:`otel_cancel.integrations.instrumentation`.
"""

from .integrations.instrumentation import (
    OtelCancelInstrumentor,
)

__all__ = ("OtelCancelInstrumentor",)
