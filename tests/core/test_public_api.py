"""The public API is what DESIGN.md promises, and nothing slips into it by accident."""

from __future__ import annotations

import otel_cancel


def test_all_is_pinned():
    """otel_cancel.__all__ lists exactly the public names."""
    assert otel_cancel.__all__ == (
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
    for name in otel_cancel.__all__:
        assert getattr(otel_cancel, name) is not None


def test_integrations_are_importable_by_their_documented_paths():
    """CancelMiddleware and OtelCancelInstrumentor live where DESIGN.md says."""
    from otel_cancel.asgi import CancelMiddleware
    from otel_cancel.instrumentation import OtelCancelInstrumentor

    assert callable(CancelMiddleware) and callable(OtelCancelInstrumentor)


def test_cancelled_carries_root_and_reason_and_pickles():
    """Cancelled exposes root and reason and survives pickling (it crosses process pools)."""
    import pickle

    error = otel_cancel.Cancelled("a" * 32, "why")
    again = pickle.loads(pickle.dumps(error))
    assert (again.root, again.reason) == ("a" * 32, "why")
