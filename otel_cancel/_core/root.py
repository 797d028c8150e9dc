"""Read and write the root id and depth in an OpenTelemetry context.

The root is the trace id of the run's first span, as 32 lowercase hex digits,
carried in W3C baggage as ``otel_cancel.root`` through every hop; the depth
(``otel_cancel.depth``) counts hops from the root. Only validated roots are ever
stored, so keys built from a root cannot leave the store's prefix.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from opentelemetry import baggage, trace
from opentelemetry.context import Context, get_current

from .. import attributes
from .baggage_entries import entries_of, with_entries
from .root_id import MAX_DEPTH as MAX_DEPTH
from .root_id import is_valid_root as is_valid_root
from .root_id import random_root as random_root
from .root_id import validate_root as validate_root


def new_root(context: Context | None = None) -> str:
    """A root for a run that starts here.

    The trace id of the current span when there is a valid one (so the root and the
    trace line up in Jaeger), else a random id.
    """
    span_context = trace.get_current_span(context).get_span_context()
    if span_context.is_valid:
        return trace.format_trace_id(span_context.trace_id)
    return random_root()


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


def root_and_depth(context: Context | None = None) -> tuple[str | None, int]:
    """:func:`current_root` and :func:`current_depth` of ``context``, from one read of its baggage."""
    entries = baggage.get_all(context)
    root = entries.get(attributes.BAGGAGE_ROOT)
    return (root if isinstance(root, str) and is_valid_root(root) else None), parse_depth(
        entries.get(attributes.BAGGAGE_DEPTH)
    ) or 0


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
    return set_root(root, depth, context, entries_of(context), extra)


def set_root(
    root: str, depth: int, context: Context, entries: Mapping[str, object], extra: dict[str, str] | None = None
) -> Context:
    """:func:`with_root` for a caller that validated ``root`` and ``depth`` and read ``entries`` already.

    ``entries`` must be the baggage of ``context`` (``baggage.get_all(context)``): the
    request path reads it once and shares it.
    """
    updated = update_root_in_place(root, depth, context, entries, extra)
    if updated is not None:
        return updated
    ours = {
        key: entries[key]
        for key in attributes.BAGGAGE_KEYS
        if key in entries and key not in (attributes.BAGGAGE_ROOT, attributes.BAGGAGE_DEPTH)
    }
    previous = entries.get(attributes.BAGGAGE_ROOT)
    if not (isinstance(previous, str) and is_valid_root(previous)):
        previous = None
    if previous != root or parse_started(ours.get(attributes.BAGGAGE_STARTED)) is None:
        ours[attributes.BAGGAGE_STARTED] = str(time.time_ns() // 1_000_000)
    if previous is not None and previous != root:
        ours.pop(attributes.BAGGAGE_LABELS, None)
    if extra:
        ours.update(extra)
    ordered: dict[str, object] = {attributes.BAGGAGE_ROOT: root, attributes.BAGGAGE_DEPTH: str(depth), **ours}
    ordered.update((key, value) for key, value in entries.items() if key not in attributes.BAGGAGE_KEYS)
    # Ours lead: the whole baggage is replaced at once, in this order.
    return with_entries(ordered, context, copy=False)


def set_new_root(
    root: str, context: Context, entries: Mapping[str, object], extra: dict[str, str] | None = None
) -> Context:
    """:func:`set_root` at depth 0 for a run that starts now: ours first, then ``entries``.

    ``entries`` are the caller's entries to keep (the baggage of ``context`` without any
    ``otel_cancel.*`` entry); they replace the whole baggage of ``context``.
    """
    ordered: dict[str, object] = {
        attributes.BAGGAGE_ROOT: root,
        attributes.BAGGAGE_DEPTH: "0",
        attributes.BAGGAGE_STARTED: str(time.time_ns() // 1_000_000),
    }
    if extra:
        ordered.update(extra)
    if entries:
        ordered.update(entries)
    return with_entries(ordered, context, copy=False)


def update_root_in_place(
    root: str, depth: int, context: Context, entries: Mapping[str, object], extra: dict[str, str] | None = None
) -> Context | None:
    """:func:`set_root` when the baggage already leads with ``root`` and keeps its order; else ``None``.

    Then no entry moves and no other entry changes: only the depth and ``extra`` are set.
    """
    if not _updatable_in_place(entries, root, extra) or parse_started(entries.get(attributes.BAGGAGE_STARTED)) is None:
        return None
    # A hop that adopts its caller's root: the root already leads the baggage (with
    # the run's start, labels kept as they are), and setting an existing entry keeps
    # its place, so only the depth and ``extra`` are set, in one copy of the baggage
    # (an entry new to it goes last, as set_baggage puts it).
    updated = {**entries, attributes.BAGGAGE_DEPTH: str(depth)}
    if extra:
        updated.update(extra)
    return with_entries(updated, context, copy=False)


def _updatable_in_place(entries: Mapping[str, object], root: str, extra: dict[str, str] | None) -> bool:
    """Whether ``entries`` already start with ``root`` and its depth, every ``otel_cancel.*`` entry before the rest.

    Then updating values in place keeps the order :func:`with_root` promises.
    """
    keys = iter(entries)
    if next(keys, None) != attributes.BAGGAGE_ROOT or entries[attributes.BAGGAGE_ROOT] != root:
        return False
    if next(keys, None) != attributes.BAGGAGE_DEPTH:
        return False
    others_seen = False
    for key in keys:
        if key in attributes.BAGGAGE_KEYS:
            if others_seen:
                return False
        else:
            others_seen = True
    # A new entry would go after the others: only in place when there are none or it exists.
    return not (others_seen and extra and any(key not in entries for key in extra))


def without_root(context: Context | None = None) -> Context:
    """A copy of ``context`` with every ``otel_cancel.*`` baggage entry removed."""
    context = context if context is not None else get_current()
    entries = baggage.get_all(context)
    for key in attributes.BAGGAGE_KEYS:
        if key in entries:
            context = baggage.remove_baggage(key, context)
    return context
