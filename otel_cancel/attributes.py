"""Every name otel-cancel puts on the wire or into telemetry, as constants.

Baggage entries travel with each request; span and metric names are what Jaeger
and Prometheus show. Other modules import these constants instead of spelling
the strings again, so a rename happens in one place and tests can enumerate
them (see ``METRIC_NAMES``).
"""

from __future__ import annotations

# Baggage entries (W3C baggage keys).
BAGGAGE_ROOT = "otel_cancel.root"
"""The root run's trace id: 32 lowercase hex digits, set once at the edge."""
BAGGAGE_DEPTH = "otel_cancel.depth"
"""Hops from the root (the root is 0)."""
BAGGAGE_DEADLINE = "otel_cancel.deadline"
"""Absolute deadline of the run, in epoch milliseconds."""
BAGGAGE_SIGNATURE = "otel_cancel.sig"
"""HMAC of the root (and deadline) when roots are signed."""
BAGGAGE_STARTED = "otel_cancel.started"
"""When the run began at its root, in epoch milliseconds (``cancel --all`` compares it with its cut-off)."""
BAGGAGE_LABELS = "otel_cancel.labels"
"""The run's labels, ``key=value`` pairs joined by ``;`` (see :func:`otel_cancel.labelled`)."""
BAGGAGE_KEYS = (
    BAGGAGE_ROOT,
    BAGGAGE_DEPTH,
    BAGGAGE_DEADLINE,
    BAGGAGE_SIGNATURE,
    BAGGAGE_STARTED,
    BAGGAGE_LABELS,
)
"""The entries otel-cancel owns; an untrusted edge drops exactly these."""

# HTTP.
HEADER_ROOT = "otel-cancel-root"
"""Response header that tells a caller which root to cancel."""
HEADER_TIMEOUT = "otel-cancel-timeout"
"""Request header that sets or shortens the run's deadline (``30s``, ``1500ms``)."""
SSE_EVENT_CANCELLED = "otel-cancel"
"""Name of the final server-sent event of a cancelled ``text/event-stream``."""

# Spans.
SPAN_REQUEST = "otel_cancel.request"
SPAN_CANCELLED = "otel_cancel.cancelled"
SPAN_REFUSED = "otel_cancel.refused"

# Span and metric attributes.
ROOT = "otel_cancel.root"
REASON = "otel_cancel.reason"
LATENCY_MS = "otel_cancel.latency_ms"
DEPTH = "otel_cancel.depth"
NODE = "otel_cancel.node"
KIND = "otel_cancel.kind"
"""``explicit`` (a flag in etcd) or ``deadline`` (the budget ran out locally)."""
OUTCOME = "otel_cancel.outcome"
BEFORE_FLAG = "otel_cancel.before_flag"
"""On an ``otel_cancel.cancelled`` span: the work had stopped before this process saw the
flag (its caller hung up, or the agent it called reported the cancel). Its work span had
already ended, without the cancelled status."""

KIND_EXPLICIT = "explicit"
"""A cancel someone asked for: ``otel-cancel cancel``, :func:`otel_cancel.cancel`, a LangGraph
``runs.cancel``, an A2A ``tasks/cancel``, an edge client that left."""
KIND_DEADLINE = "deadline"
"""The run's deadline passed (decided locally at every hop: no flag)."""
KIND_DISCONNECT = "disconnect"
"""The caller of an internal hop left: only that hop's work stops, locally (no flag)."""
KIND_BULK = "bulk"
"""A bulk cancel (``otel-cancel cancel --all`` or a list of roots) selected the run."""
CANCEL_KINDS = frozenset({KIND_EXPLICIT, KIND_DEADLINE, KIND_DISCONNECT, KIND_BULK})
"""Every kind of cancel. A flag carries its kind; HTTP answers are chosen from it (504 for
``deadline``, 409 otherwise), never from the free-text reason."""

# Metrics.
METRIC_CANCELLATIONS = "otel_cancel.cancellations"
METRIC_PROPAGATION_LATENCY = "otel_cancel.propagation.latency"
METRIC_SCOPES_ACTIVE = "otel_cancel.scopes.active"
METRIC_LATE_ARRIVALS = "otel_cancel.late_arrivals"
METRIC_WATCH_RECONNECTS = "otel_cancel.watch.reconnects"
METRIC_WATCH_CONNECTED = "otel_cancel.watch.connected"
METRIC_RECEIPTS = "otel_cancel.receipts"
METRIC_BAGGAGE_REJECTED = "otel_cancel.baggage.rejected"
METRIC_REQUESTS = "otel_cancel.requests"
METRIC_LIVE_ROOTS = "otel_cancel.live.roots"
METRIC_BULK_CANCELS = "otel_cancel.bulk_cancels"
METRIC_FLAGS_APPLIED = "otel_cancel.flags.applied"

METRIC_NAMES = (
    METRIC_CANCELLATIONS,
    METRIC_PROPAGATION_LATENCY,
    METRIC_SCOPES_ACTIVE,
    METRIC_LATE_ARRIVALS,
    METRIC_WATCH_RECONNECTS,
    METRIC_WATCH_CONNECTED,
    METRIC_RECEIPTS,
    METRIC_BAGGAGE_REJECTED,
    METRIC_REQUESTS,
    METRIC_LIVE_ROOTS,
    METRIC_BULK_CANCELS,
    METRIC_FLAGS_APPLIED,
)
"""Every metric otel-cancel emits; dashboards may query only these."""
