"""Read and set a context's whole baggage in one step, for the request path.

OpenTelemetry's API sets baggage one entry at a time, and each ``set_baggage`` copies
the baggage and the context: a hop that starts a root (three entries) made four copies;
and each ``baggage.get_all`` is four Python calls, paid several times per request.
This module replaces the baggage with one ``context.set_value`` and reads it with one
lookup, under the API's own baggage key, the one name it borrows from OpenTelemetry;
without that name (a future API) it falls back to the public calls, and
``tests/core/test_baggage_entries.py`` fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.context import Context

_BAGGAGE_KEY: str | None = getattr(baggage, "_BAGGAGE_KEY", None)
"""The context key under which ``opentelemetry.baggage`` keeps its dict (checked in the tests)."""


_NO_ENTRIES: Mapping[str, object] = MappingProxyType({})


def entries_of(context: Context) -> Mapping[str, object]:
    """The baggage of ``context``, as ``baggage.get_all(context)`` gives it, read with one lookup.

    The mapping is the context's own (no read-only view is built around it): never change it.
    """
    if _BAGGAGE_KEY is None:  # pragma: no cover - an API without the key: the public way
        return baggage.get_all(context)
    entries = context.get(_BAGGAGE_KEY)
    return entries if isinstance(entries, dict) else _NO_ENTRIES


def with_entries(entries: Mapping[str, object], context: Context, *, copy: bool = True) -> Context:
    """``context`` whose baggage is exactly ``entries``, in order (as ``clear`` then ``set_baggage`` on each gives).

    ``copy=False`` hands over ``entries`` itself, for a caller that built a dict of its own
    for this call and never changes it afterwards (one copy less).
    """
    if _BAGGAGE_KEY is None:  # pragma: no cover - an API without the key: the public way
        context = baggage.clear(context)
        for key, value in entries.items():
            context = baggage.set_baggage(key, value, context)
        return context
    owned = entries if not copy and type(entries) is dict else dict(entries)
    return otel_context.set_value(_BAGGAGE_KEY, owned, context)
