"""The request context read on the fast path is the one OpenTelemetry's propagators would read."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otel_cancel.integrations.incoming import establish_root
from otel_cancel.integrations.request_context import extract_request_baggage, extract_request_context

DEFAULT = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

# Characters that make a member plain, that make it need unquoting, and that make it not plain.
_member_chars = st.sampled_from("abcXYZ019_.-*%+:/@=;, \t\"'!#~é")
_headers = st.lists(st.text(_member_chars, max_size=12), max_size=6).map(",".join)
_plain = st.text(st.sampled_from("aZ09_.-*%+:/@"), min_size=1, max_size=6)
_plain_headers = st.lists(st.tuples(_plain, _plain), min_size=1, max_size=6).map(
    lambda pairs: ",".join(f"{key}={value}" for key, value in pairs)
)


def _same(carrier: dict[str, list[str]], textmap: object = DEFAULT) -> None:
    expected = textmap.extract(carrier)  # type: ignore[attr-defined]
    got = extract_request_context(textmap, carrier)  # type: ignore[arg-type]
    assert list(baggage.get_all(got).items()) == list(baggage.get_all(expected).items())
    assert trace.get_current_span(got).get_span_context() == trace.get_current_span(expected).get_span_context()


@settings(max_examples=400, deadline=None)
@given(header=_headers | _plain_headers, with_trace=st.booleans())
def test_any_header_gives_the_baggage_and_trace_opentelemetry_gives(header, with_trace):
    """Whatever the baggage header (plain, quoted, properties, junk), the entries, their order and the parent match."""
    carrier = {"baggage": [header]}
    if with_trace:
        carrier["traceparent"] = [TRACEPARENT]
    logging.disable(logging.WARNING)  # OpenTelemetry's own warnings about the junk
    try:
        _same(carrier)
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize(
    "header",
    [
        "otel_cancel.root=4bf92f3577b34da6a3ce929d0e0e4736,otel_cancel.depth=1,otel_cancel.started=1764990000000",
        "otel_cancel.labels=tenant%3Dacme%3Buser%3Du-1,tenant=acme+corp,k=",
        "a=1,a=2,b=3",
        ",".join(f"k{i}=v" for i in range(200)),  # over the member limit: the long way drops the excess
        "k=" + "v" * 5000,  # over the member length: dropped the long way
    ],
    ids=["ours", "quoted", "repeated-key", "too-many", "too-long"],
)
def test_typical_and_limit_headers_match(header):
    """The headers an otel-cancel hop sends, repeated keys and OpenTelemetry's limits give the same baggage."""
    _same({"baggage": [header], "traceparent": [TRACEPARENT]})


def test_only_the_first_baggage_header_counts_as_for_opentelemetry():
    """Two baggage headers: only the first is read, as OpenTelemetry's propagator does."""
    _same({"baggage": ["a=1", "b=2"]})


def test_other_propagators_take_the_long_way():
    """A set-up that reads other headers (here baggage alone) gets OpenTelemetry's own extract."""
    only_baggage = W3CBaggagePropagator()
    _same({"baggage": ["a=1,b=2"]}, only_baggage)
    assert baggage.get_all(extract_request_context(only_baggage, {"baggage": ["a=1"]})) == {"a": "1"}


def test_the_global_default_propagators_take_the_fast_path(monkeypatch):
    """With the default propagators, a plain header is read without OpenTelemetry's baggage propagator."""
    calls = []
    original = W3CBaggagePropagator.extract

    def counting(self, carrier, context=None, getter=None):  # type: ignore[no-untyped-def]
        calls.append(dict(carrier))
        return original(self, carrier, context) if getter is None else original(self, carrier, context, getter)

    monkeypatch.setattr(W3CBaggagePropagator, "extract", counting)
    context = extract_request_context(DEFAULT, {"baggage": ["a=1"], "traceparent": [TRACEPARENT]})
    assert baggage.get_all(context) == {"a": "1"}
    assert all("baggage" not in carrier for carrier in calls)
    assert isinstance(context, Context)


@pytest.mark.parametrize(
    "header",
    [
        "otel_cancel.root=4bf92f3577b34da6a3ce929d0e0e4736,otel_cancel.depth=1,otel_cancel.started=1764990000000",
        "tenant=acme,otel_cancel.depth=3,otel_cancel.root=4bf92f3577b34da6a3ce929d0e0e4736",  # ours not leading
        "otel_cancel.root=not-a-root,tenant=acme",
        "tenant=acme",
    ],
    ids=["in-place", "reordered", "bad-root", "foreign-only"],
)
@pytest.mark.parametrize("trusted", [True, False])
def test_the_root_established_from_entries_not_set_yet_is_the_one_from_the_context(header, trusted):
    """Handing the header's entries to establish_root unset gives the baggage it gives from the extracted context."""
    carrier = {"baggage": [header]}
    raw = [(b"baggage", header.encode())]
    base, entries = extract_request_baggage(DEFAULT, carrier, Context())
    assert entries is not None  # the fast path
    given = establish_root(base, raw, trusted=trusted, entries=entries)
    expected = establish_root(extract_request_context(DEFAULT, carrier, Context()), raw, trusted=trusted)
    assert (given.depth, given.adopted, given.kept_entries) == (expected.depth, expected.adopted, expected.kept_entries)
    got, wanted = baggage.get_all(given.context), baggage.get_all(expected.context)
    assert list(got) == list(wanted)
    if expected.adopted:
        assert given.root == expected.root and dict(got) == dict(wanted)
    else:  # a new root (random here): the same entries but for the root and the run's start
        assert {k: v for k, v in got.items() if k not in ("otel_cancel.root", "otel_cancel.started")} == {
            k: v for k, v in wanted.items() if k not in ("otel_cancel.root", "otel_cancel.started")
        }
