"""The context of an incoming request, for a service without OpenTelemetry's ASGI middleware.

``propagate.extract`` with the default propagators (``tracecontext,baggage``) spends most
of its time validating and unquoting each ``baggage`` entry with regular expressions, and
an internal hop pays it on every request. A plain header (short, only token characters,
no properties) is checked whole with one pattern instead and gives the same baggage,
entry for entry; anything else, and any other propagator set-up, goes through
OpenTelemetry's own propagators unchanged.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

from opentelemetry.context import Context, get_current
from opentelemetry.propagators.textmap import TextMapPropagator

from .._core.baggage_entries import entries_of, with_entries

_DEFAULT_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
"""What ``OTEL_PROPAGATORS=tracecontext,baggage`` (the default) reads: the only set-up taken on the fast path."""

# A subset of W3C baggage (and of what OpenTelemetry's propagator accepts): keys of token
# characters, values without spaces, commas, semicolons (properties) or quotes, no empty
# members. Unquoting is the identity unless a value holds '%' or '+'.
_KEY = r"[A-Za-z0-9_.\-*]+"
_VALUE = r"[A-Za-z0-9_.\-*%+:/@=]*"
_PLAIN_HEADER = re.compile(rf"{_KEY}={_VALUE}(?:,{_KEY}={_VALUE})*")
_MAX_PLAIN_LENGTH = 4096
"""Shorter than OpenTelemetry's limits per member (4,096) and per header (8,192): none can apply."""
_MAX_PLAIN_MEMBERS = 180
"""OpenTelemetry's limit on members: more go the long way, which drops the excess and logs."""


_checked: tuple[object, bool] = (None, False)


def _reads_the_default_fields(textmap: TextMapPropagator) -> bool:
    """Whether ``textmap`` reads exactly the default headers (cached per propagator)."""
    global _checked
    checked_for, default = _checked
    if checked_for is not textmap:
        default = set(textmap.fields) == _DEFAULT_FIELDS
        _checked = (textmap, default)
    return default


def extract_request_context(
    textmap: TextMapPropagator, carrier: dict[str, list[str]], current: Context | None = None
) -> Context:
    """What ``textmap.extract(carrier, current)`` returns, cheaper for a plain ``baggage`` header.

    Args:
        textmap: the global propagator (``propagate.get_global_textmap()``).
        carrier: the request's propagation headers, name (lowercase) -> values.
        current: the context to extract into, for a caller that has it at hand
            (default: the current context).
    """
    context, entries = extract_request_baggage(textmap, carrier, current)
    return context if entries is None else with_entries(entries, context, copy=False)


def extract_request_baggage(
    textmap: TextMapPropagator, carrier: dict[str, list[str]], current: Context | None = None
) -> tuple[Context, dict[str, object] | None]:
    """:func:`extract_request_context` in two parts, for a caller that replaces the baggage anyway.

    Returns:
        The extracted context and, when the header was read on the fast path, the
        baggage entries it gives (the context's own baggage first), not set on the
        context yet: setting them with :func:`~otel_cancel._core.baggage_entries.with_entries`
        gives what :func:`extract_request_context` returns. ``None`` when the
        propagators read the baggage themselves (the context carries it).
    """
    values = carrier.get("baggage")
    if not values or not _reads_the_default_fields(textmap):
        return textmap.extract(carrier, current), None
    header = values[0]  # one value: the middleware joins repeated baggage headers (the propagator reads the first)
    if (
        len(header) > _MAX_PLAIN_LENGTH
        or header.count(",") >= _MAX_PLAIN_MEMBERS
        or _PLAIN_HEADER.fullmatch(header) is None
    ):
        return textmap.extract(carrier, current), None
    if len(carrier) > 1:
        # The trace context: the propagators see every header but the baggage, which
        # the baggage propagator would have read and which is read here instead.
        context = textmap.extract({name: value for name, value in carrier.items() if name != "baggage"}, current)
    else:
        context = current if current is not None else get_current()
    entries: dict[str, object] = {}
    for member in header.split(","):
        name, value = member.split("=", 1)
        if "%" in value or "+" in value:
            value = unquote_plus(value).strip()
        entries[name] = value  # a repeated name keeps its place and takes the last value, as set_baggage does
    # The propagator sets each member on the baggage the context has already.
    existing = entries_of(context)
    return context, ({**existing, **entries} if existing else entries)
