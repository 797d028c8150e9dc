"""Read and write the root id and depth in an OpenTelemetry context.

The root is the trace id of the run's first span, as 32 lowercase hex digits,
carried in W3C baggage as ``otel_cancel.root`` through every hop; the depth
(``otel_cancel.depth``) counts hops from the root. Only validated roots are ever
stored, so keys built from a root cannot leave the store's prefix.
"""

from __future__ import annotations

import re
import secrets
import time

from opentelemetry import baggage, trace
from opentelemetry.context import Context, get_current

from . import attributes
from .exceptions import InvalidRootError

_ROOT_PATTERN = re.compile(r"[0-9a-f]{32}")
_ALL_ZEROS = "0" * 32
MAX_DEPTH = 1_000
"""Depths above this are treated as malformed input."""


def validate_root(value: object) -> str:
    """Return ``value`` if it is a valid root id, else raise.

    Args:
        value: the candidate root.

    Returns:
        The root, unchanged.

    Raises:
        InvalidRootError: ``value`` is not 32 lowercase hex digits, or is all zeros.
    """
    if not isinstance(value, str) or not _ROOT_PATTERN.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise InvalidRootError(f"a root is 32 lowercase hex digits, got {shown}")
    if value == _ALL_ZEROS:
        raise InvalidRootError("a root cannot be all zeros (that is the invalid trace id)")
    return value


def is_valid_root(value: object) -> bool:
    """Whether ``value`` is a valid root id."""
    try:
        validate_root(value)
    except InvalidRootError:
        return False
    return True


def new_root(context: Context | None = None) -> str:
    """A root for a run that starts here.

    The trace id of the current span when there is a valid one (so the root and the
    trace line up in Jaeger), else a random id.
    """
    span_context = trace.get_current_span(context).get_span_context()
    if span_context.is_valid:
        return trace.format_trace_id(span_context.trace_id)
    return random_root()


def random_root() -> str:
    """A fresh random root id."""
    while True:
        root = secrets.token_hex(16)
        if root != _ALL_ZEROS:
            return root


def current_root(context: Context | None = None) -> str | None:
    """The root id of ``context`` (default: the current context), or ``None``.

    A malformed value in baggage is treated as no root.
    """
    value = baggage.get_baggage(attributes.BAGGAGE_ROOT, context)
    return value if isinstance(value, str) and is_valid_root(value) else None


def current_depth(context: Context | None = None) -> int:
    """Hops from the root in ``context``; 0 when absent or malformed."""
    value = baggage.get_baggage(attributes.BAGGAGE_DEPTH, context)
    return parse_depth(value) or 0


def parse_depth(value: object) -> int | None:
    """Parse a depth from baggage; ``None`` when it is not a small non-negative integer."""
    if not isinstance(value, str) or not value.isascii() or not value.isdigit():
        return None
    if len(value) > 4:
        return None
    depth = int(value)
    return depth if depth <= MAX_DEPTH else None


def parse_started(value: object) -> int | None:
    """Parse a run's start (epoch ms) from baggage; ``None`` when it is not a plausible time."""
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 15:
        return None
    return int(value)


def root_started_ms(context: Context | None = None) -> int | None:
    """When the run of ``context`` began at its root (epoch ms), or ``None`` when unknown."""
    return parse_started(baggage.get_baggage(attributes.BAGGAGE_STARTED, context))


def with_root(
    root: str, depth: int = 0, context: Context | None = None, *, extra: dict[str, str] | None = None
) -> Context:
    """A copy of ``context`` whose baggage carries ``root`` at ``depth``.

    Other baggage entries are kept, after the ``otel_cancel.*`` ones: the W3C
    propagator drops entries from the end when the header grows too large, so
    ours go first and survive. The run's start time (``otel_cancel.started``) is
    kept when the root stays the same, and set to now for a root new to
    ``context``; a root that replaces another one does not inherit its labels.

    Args:
        root: the root id.
        depth: hops from the root.
        context: the context to start from (default: the current one).
        extra: more ``otel_cancel.*`` entries (deadline, signature) to carry.

    Raises:
        InvalidRootError: ``root`` is not valid.
        ValueError: ``depth`` is negative or absurdly large.
    """
    validate_root(root)
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be between 0 and {MAX_DEPTH}, got {depth}")
    context = context if context is not None else get_current()
    entries = dict(baggage.get_all(context))
    ours = {
        key: entries[key]
        for key in attributes.BAGGAGE_KEYS
        if key in entries and key not in (attributes.BAGGAGE_ROOT, attributes.BAGGAGE_DEPTH)
    }
    previous = current_root(context)
    if previous != root or parse_started(ours.get(attributes.BAGGAGE_STARTED)) is None:
        ours[attributes.BAGGAGE_STARTED] = str(time.time_ns() // 1_000_000)
    if previous is not None and previous != root:
        ours.pop(attributes.BAGGAGE_LABELS, None)
    ours.update(extra or {})
    ordered: dict[str, object] = {attributes.BAGGAGE_ROOT: root, attributes.BAGGAGE_DEPTH: str(depth), **ours}
    ordered.update((key, value) for key, value in entries.items() if key not in attributes.BAGGAGE_KEYS)
    context = baggage.clear(context)
    for key, value in ordered.items():
        context = baggage.set_baggage(key, value, context)
    return context


def without_root(context: Context | None = None) -> Context:
    """A copy of ``context`` with every ``otel_cancel.*`` baggage entry removed."""
    context = context if context is not None else get_current()
    for key in attributes.BAGGAGE_KEYS:
        if baggage.get_baggage(key, context) is not None:
            context = baggage.remove_baggage(key, context)
    return context
