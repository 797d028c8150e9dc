"""Set a context's whole baggage in one step, for the request path.

OpenTelemetry's API sets baggage one entry at a time, and each ``set_baggage`` copies
the baggage and the context: a hop that starts a root (three entries) made four copies.
This module replaces the baggage with one ``context.set_value`` under the API's own
baggage key, the one name it borrows from OpenTelemetry; without that name (a future
API) it falls back to the public calls, and ``tests/core/test_baggage_entries.py`` fails.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.context import Context

_BAGGAGE_KEY: str | None = getattr(baggage, "_BAGGAGE_KEY", None)
"""The context key under which ``opentelemetry.baggage`` keeps its dict (checked in the tests)."""


def with_entries(entries: Mapping[str, object], context: Context) -> Context:
    """``context`` whose baggage is exactly ``entries``, in order (as ``clear`` then ``set_baggage`` on each gives)."""
    if _BAGGAGE_KEY is None:  # pragma: no cover - an API without the key: the public way
        context = baggage.clear(context)
        for key, value in entries.items():
            context = baggage.set_baggage(key, value, context)
        return context
    return otel_context.set_value(_BAGGAGE_KEY, dict(entries), context)
