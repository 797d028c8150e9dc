"""Decide the root of an incoming request: adopt the caller's, or start one here.

The rules (docs/contract.md, "The root"):

- An edge (``OTEL_CANCEL_TRUST_INCOMING=false``, the default) never adopts an
  incoming root: a client cannot attach itself to someone else's run. The root is
  the trace id the edge started, or a fresh random id when the trace was continued
  from a trace header of the caller's (``traceparent``, ``b3``...: the caller chose
  that id). The caller's entries of ours (``attributes.BAGGAGE_KEYS``: root, depth,
  deadline, signature, labels, run start) are dropped; every other entry is kept,
  ``otel_cancel.``-prefixed names this release does not know included.
- An internal service adopts a well-formed incoming root at depth + 1. With a
  signing key configured, the root's signature must verify too.
- A trusted hop whose baggage cannot be parsed (malformed, over 8,192 bytes, a
  bad root) becomes its own root, logs a warning and counts it in a metric; it
  never fails the request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from opentelemetry import propagate, trace
from opentelemetry.context import Context

from .. import attributes
from .._core import telemetry
from .._core.baggage_entries import entries_of
from .._core.rate_limited_log import RateLimitedLogger
from .._core.root import (
    MAX_DEPTH,
    is_valid_root,
    parse_depth,
    random_root,
    set_new_root,
    set_root,
    update_root_in_place,
)
from .._core.signing import sign_root, verify_root

_log = RateLimitedLogger(logging.getLogger("otel_cancel.incoming"))

MAX_BAGGAGE_BYTES = 8192


class IncomingRoot(NamedTuple):
    """The outcome: the context to run the request in, its root and depth."""

    context: Context
    root: str
    depth: int
    adopted: bool
    kept_entries: int = 0
    """When the root was adopted with the incoming baggage kept as it was but for the
    depth: how many entries it has (the request's header can then be passed on with
    only its depth replaced); else 0."""


def _header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def _continues_a_trace(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request carries a trace header: a ``traceparent``, or any header the
    propagators read besides ``baggage`` (``b3``, ``uber-trace-id``...). The caller chose
    that trace id, so it must not become the root at an edge."""
    names = {name.lower().encode("latin-1") for name in propagate.get_global_textmap().fields}
    names.discard(b"baggage")
    names.add(b"traceparent")
    return any(key.lower() in names for key, _ in headers)


def establish_root(
    context: Context,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    trusted: bool,
    signing_key: bytes | None = None,
    baggage_header: bytes | None = None,
    continued: bool | None = None,
    entries: Mapping[str, object] | None = None,
) -> IncomingRoot:
    """The root of a request whose extracted context is ``context``.

    Args:
        context: the context extracted from the request (baggage and remote parent).
        headers: the raw request headers (to tell malformed baggage from absent, and
            a continued trace from a new one).
        trusted: whether this service adopts incoming roots (internal service).
        signing_key: when set, adopted roots must carry a valid signature.
        baggage_header: the request's ``baggage`` headers joined by ``,`` (``b""``
            when absent), for a caller that read the headers already; else read
            from ``headers``.
        continued: whether the request carries a trace header (``traceparent``, or
            any other the propagators read but ``baggage``: the caller continued its
            own trace), for a caller that read the headers already.
        entries: the request's baggage, for a caller that read it and did not set it
            on ``context`` (see :func:`~otel_cancel.integrations.request_context.extract_request_baggage`);
            else the baggage of ``context``. The returned context carries the
            established baggage either way (it replaces the whole baggage).
    """
    if baggage_header is None or continued is None:
        headers = list(headers)
        baggage_header = b",".join(_header_values(headers, b"baggage"))
        continued = _continues_a_trace(headers)
    if entries is None:
        entries = entries_of(context)  # one read of the baggage, then dict lookups
    if trusted:
        adopted = _adopt(context, entries, baggage_header, signing_key)
        if adopted is not None:
            return adopted
    elif attributes.BAGGAGE_ROOT in entries:
        telemetry.baggage_rejected("untrusted")
    # The caller's entries of ours are dropped; the rest of its baggage is kept
    # (set_new_root replaces the whole baggage).
    if entries and not entries.keys().isdisjoint(attributes.BAGGAGE_KEYS):
        entries = {key: value for key, value in entries.items() if key not in attributes.BAGGAGE_KEYS}
    root = _root_started_here(context, continued)
    extra = {attributes.BAGGAGE_SIGNATURE: sign_root(signing_key, root)} if signing_key else None
    # None of ours is left in ``entries``: the run starts here, with the caller's entries after ours.
    return IncomingRoot(set_new_root(root, context, entries, extra), root, 0, False)


def _adopt(
    context: Context, entries: Mapping[str, object], raw: bytes, signing_key: bytes | None
) -> IncomingRoot | None:
    incoming = entries.get(attributes.BAGGAGE_ROOT)
    if len(raw) > MAX_BAGGAGE_BYTES:
        telemetry.baggage_rejected("oversized")
        _log.warning("oversized", "otel-cancel: incoming baggage of %d bytes is over the limit; new root", len(raw))
        return None
    if incoming is None:
        if attributes.BAGGAGE_ROOT.encode() in raw:
            # The header names a root that did not reach the context: a malformed member,
            # the name inside another entry's value, or propagators that do not read baggage.
            telemetry.baggage_rejected("malformed")
            _log.warning(
                "malformed",
                "otel-cancel: the incoming baggage mentions %s but no root could be read from it; "
                "this request starts a new root",
                attributes.BAGGAGE_ROOT,
            )
        return None
    if not is_valid_root(incoming):
        telemetry.baggage_rejected("invalid_root")
        _log.warning("invalid_root", "otel-cancel: incoming root %.40r is not valid; new root", incoming)
        return None
    assert isinstance(incoming, str)
    if signing_key is not None and not verify_root(signing_key, incoming, entries.get(attributes.BAGGAGE_SIGNATURE)):
        telemetry.baggage_rejected("bad_signature")
        _log.warning("bad_signature", "otel-cancel: incoming root %s is unsigned or badly signed", incoming)
        return None
    depth_value = entries.get(attributes.BAGGAGE_DEPTH)
    incoming_depth = parse_depth(depth_value) if depth_value is not None else 0
    if incoming_depth is None:
        telemetry.baggage_rejected("invalid_depth")
        _log.warning("invalid_depth", "otel-cancel: incoming depth %.20r is not valid; counting from 0", depth_value)
        incoming_depth = 0
    depth = min(incoming_depth + 1, MAX_DEPTH)
    kept = update_root_in_place(incoming, depth, context, entries)
    if kept is not None:
        return IncomingRoot(kept, incoming, depth, True, len(entries))
    return IncomingRoot(set_root(incoming, depth, context, entries), incoming, depth, True)


def _root_started_here(context: Context, continued: bool) -> str:
    span_context = trace.get_current_span(context).get_span_context()
    if span_context.is_valid and not continued:
        return trace.format_trace_id(span_context.trace_id)  # what new_root gives: the trace starts here
    # The caller chose this trace id (or there is no trace): never let it pick the root.
    return random_root()
