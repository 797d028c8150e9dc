"""The one-step baggage setter gives what OpenTelemetry's own calls give, through OpenTelemetry's own key."""

from __future__ import annotations

from opentelemetry import baggage
from opentelemetry import context as otel_context

from otel_cancel._core import baggage_entries


def test_opentelemetry_still_keeps_baggage_under_the_key_we_set():
    """The borrowed name exists and is where set_baggage stores the dict (fails when OpenTelemetry moves it)."""
    assert baggage_entries._BAGGAGE_KEY is not None
    context = baggage.set_baggage("a", "1", otel_context.Context())
    assert otel_context.get_value(baggage_entries._BAGGAGE_KEY, context) == {"a": "1"}


def test_setting_all_entries_at_once_equals_clearing_and_setting_each():
    """Same entries, same order, other context values kept; the caller's mapping is copied, not shared."""
    start = otel_context.set_value("other", "kept", baggage.set_baggage("old", "x", otel_context.Context()))
    wanted = {"otel_cancel.root": "ab" * 16, "otel_cancel.depth": "0", "tenant": "acme"}
    expected = baggage.clear(start)
    for key, value in wanted.items():
        expected = baggage.set_baggage(key, value, expected)
    got = baggage_entries.with_entries(wanted, start)
    assert list(baggage.get_all(got).items()) == list(baggage.get_all(expected).items())
    assert otel_context.get_value("other", got) == "kept"
    wanted["tenant"] = "changed"
    assert baggage.get_baggage("tenant", got) == "acme"
    assert baggage.get_all(start) == {"old": "x"}


def test_reading_all_entries_at_once_equals_get_all():
    """entries_of gives what baggage.get_all gives (in order, or nothing); copy=False hands the dict over."""
    assert dict(baggage_entries.entries_of(otel_context.Context())) == {}
    context = baggage.set_baggage("b", "2", baggage.set_baggage("a", "1", otel_context.Context()))
    assert list(baggage_entries.entries_of(context).items()) == list(baggage.get_all(context).items())
    owned = {"c": "3"}
    assert baggage_entries.entries_of(baggage_entries.with_entries(owned, context, copy=False)) is owned
