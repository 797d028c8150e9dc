"""Spans and metrics for cancels, through the OpenTelemetry API.

Without a configured SDK every call here is a no-op. Metric attributes are
bounded: the root id is never a label (it lives on spans), depths are capped and
reasons are reduced to a short, bounded vocabulary (:func:`reason_label`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, Status, StatusCode

from .. import attributes

_SCOPE_NAME = "otel_cancel"
_MAX_REASON_LABELS = 64
_MAX_DEPTH_LABEL = 16

_tracer = trace.get_tracer(_SCOPE_NAME)
_meter = metrics.get_meter(_SCOPE_NAME)

_latency = _meter.create_histogram(
    attributes.METRIC_PROPAGATION_LATENCY,
    unit="ms",
    description="From the cancel flag written (or the deadline passed) to the first work of the root stopped here.",
    explicit_bucket_boundaries_advisory=[0.5, 1, 2, 3, 5, 7.5, 10, 15, 25, 50, 100, 250, 500, 1000, 2500, 5000],
)
_late_arrivals = _meter.create_counter(
    attributes.METRIC_LATE_ARRIVALS,
    unit="{request}",
    description="Work refused because its root was already cancelled (409) or its deadline had passed (504).",
)
_reconnects = _meter.create_counter(
    attributes.METRIC_WATCH_RECONNECTS, unit="{reconnect}", description="Times the watcher lost the store and retried."
)
_receipts = _meter.create_counter(
    attributes.METRIC_RECEIPTS, unit="{receipt}", description="Receipts this process wrote."
)
_requests = _meter.create_counter(
    attributes.METRIC_REQUESTS, unit="{request}", description="Cancel flags requested from this process."
)
_baggage_rejected = _meter.create_counter(
    attributes.METRIC_BAGGAGE_REJECTED,
    unit="{request}",
    description="Requests whose incoming otel_cancel baggage was malformed or untrusted.",
)

_bulk_cancels = _meter.create_counter(
    attributes.METRIC_BULK_CANCELS,
    unit="{cancel}",
    description="Bulk cancels (cancel --all, cancel ROOT ROOT...) requested from this process.",
)

# Roots already counted in otel_cancel.cancellations and the latency histogram: nested
# scopes (a scope inside a request's scope) each record a span, but a root counts once
# per process. Bounded: the oldest roots are forgotten first (a root that comes back
# after thousands of others would count again, which is the lesser error).
_MAX_COUNTED_ROOTS = 4096
_counted_roots: OrderedDict[str, None] = OrderedDict()
_counted_lock = threading.Lock()
# otel_cancel.cancellations by (reason label, kind, depth label): counted here under the
# lock above and observed at collection time, rather than an SDK counter's add per stop.
_cancellation_counts: dict[tuple[str, str, int], int] = {}

_connected_sources: list[Callable[[], bool]] = []
_live_sources: list[Callable[[], int]] = []
_flags_applied_sources: list[Callable[[], int]] = []
_scope_sources: list[Callable[[], int]] = []
_reason_labels: set[str] = set()
_reason_lock = threading.Lock()


def _observe_cancellations(options: CallbackOptions) -> Iterable[Observation]:
    with _counted_lock:
        counts = list(_cancellation_counts.items())
    for (reason, kind, depth), count in counts:
        yield Observation(count, {attributes.REASON: reason, attributes.KIND: kind, attributes.DEPTH: depth})


# Observed, not added to: a flag storm stops thousands of roots a second, and an SDK
# counter's add costs microseconds per stop where a count read at collection costs nothing.
_meter.create_observable_counter(
    attributes.METRIC_CANCELLATIONS,
    callbacks=[_observe_cancellations],
    unit="{cancellation}",
    description="Roots whose work stopped in this process, by reason and kind (explicit or deadline).",
)


def _observe_connected(options: CallbackOptions) -> Iterable[Observation]:
    for source in list(_connected_sources):
        yield Observation(1 if source() else 0)


_meter.create_observable_gauge(
    attributes.METRIC_WATCH_CONNECTED,
    callbacks=[_observe_connected],
    # An annotation, not "1": the collector would add a _ratio suffix that a direct
    # Prometheus scrape does not, and dashboards must find one name on both paths.
    unit="{state}",
    description="1 while the watcher's stream to the cancel store is up, else 0.",
)


def _observe_live_roots(options: CallbackOptions) -> Iterable[Observation]:
    for source in list(_live_sources):
        yield Observation(source())


_meter.create_observable_gauge(
    attributes.METRIC_LIVE_ROOTS,
    callbacks=[_observe_live_roots],
    unit="{root}",
    description="Roots this process holds live work for (what otel-cancel ps lists).",
)


def observe_live_roots(source: Callable[[], int]) -> None:
    """Report ``source()`` as ``otel_cancel.live.roots`` (one source per process)."""
    _live_sources[:] = [source]


def bulk_cancel_requested(kind: str) -> None:
    """Count one bulk cancel; ``kind`` is ``roots`` (listed roots) or ``selector`` (cancel --all)."""
    _bulk_cancels.add(1, {attributes.KIND: kind})


def initialise_counters() -> None:
    """Give the unlabelled counters a zero point, so dashboards show 0 rather than no data.

    Counters whose every point carries labels (cancellations by reason and kind, late
    arrivals by kind) get none: a zero point without labels would be a series of its own,
    shown as an empty entry in "by kind" and "by reason" panels.
    """
    _reconnects.add(0)
    _receipts.add(0)


def observe_watch_connected(source: Callable[[], bool]) -> None:
    """Report ``source()`` as ``otel_cancel.watch.connected`` (one source per process)."""
    _connected_sources[:] = [source]


def reason_label(reason: str) -> str:
    """A bounded label for a free-text reason.

    The text up to the first ``:`` (so ``guardrail: pii found`` counts as
    ``guardrail``), at most 40 characters; after 64 distinct labels, ``other``.
    """
    label = reason.split(":", 1)[0].strip()[:40] or "unspecified"
    with _reason_lock:
        if label in _reason_labels:
            return label
        if len(_reason_labels) >= _MAX_REASON_LABELS:
            return "other"
        _reason_labels.add(label)
        return label


def _count_first_stop(root: str, reason: str, kind: str, depth: int) -> bool:
    """Count the stop of ``root`` in ``otel_cancel.cancellations`` if it is the root's first here; whether it was."""
    with _counted_lock:
        if root in _counted_roots:
            _counted_roots.move_to_end(root)
            return False
        _counted_roots[root] = None
        if len(_counted_roots) > _MAX_COUNTED_ROOTS:
            _counted_roots.popitem(last=False)
    key = (reason_label(reason), kind, _depth_label(depth))
    with _counted_lock:
        _cancellation_counts[key] = _cancellation_counts.get(key, 0) + 1
    return True


def _depth_label(depth: int) -> int:
    return min(depth, _MAX_DEPTH_LABEL)


def watch_reconnected() -> None:
    _reconnects.add(1)


def receipts_written(count: int) -> None:
    """Count ``count`` receipts written (one add per batch written together)."""
    _receipts.add(count)


def _observe_flags_applied(options: CallbackOptions) -> Iterable[Observation]:
    for source in list(_flags_applied_sources):
        yield Observation(source())


# Observed, not added to: every replica applies every flag, and an SDK counter's add costs
# microseconds per flag where reading a count at collection costs nothing per flag.
_meter.create_observable_counter(
    attributes.METRIC_FLAGS_APPLIED,
    callbacks=[_observe_flags_applied],
    unit="{flag}",
    description="Cancel flags this process applied: roots its watcher marked cancelled here, each once "
    "(a bulk cancel counts every root it selected).",
)


def _observe_scopes(options: CallbackOptions) -> Iterable[Observation]:
    for source in list(_scope_sources):
        yield Observation(source())


# Observed from the registry at collection, not added to on every scope's entry and exit:
# two SDK adds per request were a quarter of the middleware's cost with metrics on.
_meter.create_observable_up_down_counter(
    attributes.METRIC_SCOPES_ACTIVE,
    callbacks=[_observe_scopes],
    unit="{scope}",
    description="Scopes live in this process.",
)


def observe_live_scopes(source: Callable[[], int]) -> None:
    """Report ``source()`` as ``otel_cancel.scopes.active`` (one source per process)."""
    _scope_sources[:] = [source]


def observe_flags_applied(source: Callable[[], int]) -> None:
    """Report ``source()`` (a running count) as ``otel_cancel.flags.applied`` (one source per process).

    Every replica applies every flag, whether or not it holds work for the root: a
    replica whose count falls behind the flags written has missed some.
    """
    _flags_applied_sources[:] = [source]


def baggage_rejected(why: str) -> None:
    _baggage_rejected.add(1, {attributes.OUTCOME: why})


def cancel_requested(root: str, reason: str, created: bool) -> None:
    """Count a cancel request and record the ``otel_cancel.request`` span in the current trace."""
    _requests.add(1, {attributes.REASON: reason_label(reason), attributes.OUTCOME: "created" if created else "exists"})


def start_request_span(root: str, reason: str, context: Context | None = None) -> Span:
    """Start the canceller's ``otel_cancel.request`` span (ended by the caller)."""
    return _tracer.start_span(
        attributes.SPAN_REQUEST,
        context=context,
        attributes={attributes.ROOT: root, attributes.REASON: reason},
    )


def work_cancelled(
    *,
    root: str,
    reason: str,
    kind: str,
    depth: int,
    node: str | None,
    start_ns: int,
    latency_ms: float | None,
    context: Context | None = None,
    end_ns: int | None = None,
    before_flag: bool = False,
) -> None:
    """Record that work for ``root`` stopped here: metrics and an ``otel_cancel.cancelled`` span.

    The span is a child of the current span of ``context`` (the interrupted work),
    so it lands in the cancelled trace; it starts at ``start_ns`` and ends at
    ``end_ns`` (default: now). Every stopped scope gets its span; the metrics count
    the root once per process (its first stop), as their help text says.
    """
    if _count_first_stop(root, reason, kind, depth) and latency_ms is not None:
        # A process that stopped its own work first and then wrote the flag (LangGraph's
        # runs.cancel on LangGraph Server) stopped before the flag: 0, never negative.
        _latency.record(max(latency_ms, 0.0), {attributes.KIND: kind, attributes.DEPTH: _depth_label(depth)})
    span_attributes: dict[str, str | int | float] = {
        attributes.ROOT: root,
        attributes.REASON: reason,
        attributes.DEPTH: depth,
        attributes.KIND: kind,
    }
    if latency_ms is not None:
        span_attributes[attributes.LATENCY_MS] = round(latency_ms, 3)
    if node:
        span_attributes[attributes.NODE] = node
    if before_flag:
        span_attributes[attributes.BEFORE_FLAG] = True
    span = _tracer.start_span(
        attributes.SPAN_CANCELLED, context=context, attributes=span_attributes, start_time=start_ns
    )
    span.end(end_time=end_ns)


def mark_span_cancelled(span: Span, reason: str) -> None:
    """Give an interrupted work span a status that says cancelled (not a generic error)."""
    if span.is_recording():
        span.set_attribute(attributes.REASON, reason)
        span.set_attribute("error.type", "otel_cancel.Cancelled")
        span.set_status(Status(StatusCode.ERROR, f"cancelled: {reason}"))


def late_arrival(root: str, reason: str, kind: str, context: Context | None = None) -> None:
    """Count a refused late hop and record it as an ``otel_cancel.refused`` span."""
    _late_arrivals.add(1, {attributes.KIND: kind})
    span = _tracer.start_span(
        attributes.SPAN_REFUSED,
        context=context,
        attributes={attributes.ROOT: root, attributes.REASON: reason, attributes.KIND: kind},
    )
    span.end()
