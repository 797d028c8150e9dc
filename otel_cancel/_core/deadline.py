"""Deadlines that travel: an absolute time budget in baggage, enforced at every hop.

The deadline of a run is carried as ``otel_cancel.deadline`` (epoch milliseconds)
in baggage. Anyone may narrow it (:func:`deadline`, the middleware's
``deadline_seconds``, the request header ``otel-cancel-timeout``); nobody can widen
it. Every scope whose context carries a deadline cancels its own work locally when
the deadline passes, with reason ``deadline``, exactly like a remote cancel but
without any etcd round trip (deadline stops record spans and metrics, not receipts).

Clock skew: deadlines are absolute wall-clock times, so hops compare them with
their own clocks. The design assumes clocks synchronised by NTP (skew of a few
milliseconds); a skewed hop stops early or late by its skew. Absurd values are
treated as invalid input, logged and ignored: a deadline more than
:data:`MAX_AHEAD_SECONDS` away, or more than :data:`MAX_BEHIND_SECONDS` in the past.
"""

from __future__ import annotations

import logging
import re
import time

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from .. import attributes
from .rate_limited_log import RateLimitedLogger

_log = RateLimitedLogger(logging.getLogger("otel_cancel.deadline"))

MAX_AHEAD_SECONDS = 24 * 3600
"""A deadline further away than this is not a budget but garbage (or a clock years off)."""
MAX_BEHIND_SECONDS = 3600
"""A deadline further in the past than this is garbage; a more recent one has simply expired."""
DEADLINE_REASON = "deadline"

_TIMEOUT_PATTERN = re.compile(r"([0-9]{1,9})(ms|s|m)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def now_ms() -> int:
    """The wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def parse_timeout(value: str) -> float:
    """Parse an ``otel-cancel-timeout`` value (``30s``, ``1500ms``, ``2m``) into seconds.

    Raises:
        ValueError: the value is not digits followed by ``ms``, ``s`` or ``m``, or is 0
            or longer than a day.
    """
    match = _TIMEOUT_PATTERN.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"a timeout is digits and a unit (ms, s or m), like 30s or 1500ms; got {value[:40]!r}")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not 0 < seconds <= MAX_AHEAD_SECONDS:
        raise ValueError(f"a timeout must be more than 0 and at most {MAX_AHEAD_SECONDS}s; got {value!r}")
    return seconds


def validate_deadline(value: object, *, now: int | None = None) -> int | None:
    """A deadline (epoch ms) from baggage, or ``None`` when it is absent or invalid (logged once).

    An expired deadline within :data:`MAX_BEHIND_SECONDS` is valid (and expired).
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 15:
        _log.warning("malformed", "otel-cancel: ignoring malformed deadline %.40r in baggage", value)
        return None
    deadline_ms = int(value)
    current = now_ms() if now is None else now
    if deadline_ms > current + MAX_AHEAD_SECONDS * 1000:
        _log.warning("ahead", "otel-cancel: ignoring deadline %d: more than a day away (clock skew?)", deadline_ms)
        return None
    if deadline_ms < current - MAX_BEHIND_SECONDS * 1000:
        _log.warning("behind", "otel-cancel: ignoring deadline %d: over an hour past (clock skew?)", deadline_ms)
        return None
    return deadline_ms


def current_deadline(context: Context | None = None) -> int | None:
    """The deadline of ``context`` (epoch ms), or ``None``."""
    return validate_deadline(baggage.get_baggage(attributes.BAGGAGE_DEADLINE, context))


def with_deadline(deadline_ms: int, context: Context | None = None) -> Context:
    """``context`` with its deadline narrowed to ``deadline_ms`` (never widened)."""
    context = context if context is not None else otel_context.get_current()
    existing = current_deadline(context)
    if existing is not None and existing <= deadline_ms:
        return context
    return baggage.set_baggage(attributes.BAGGAGE_DEADLINE, str(deadline_ms), context)


def time_left(context: Context | None = None) -> float | None:
    """Seconds left before the current deadline (0 when passed), or ``None`` without one.

    Use it to bound calls that take a timeout, such as an LLM request.
    """
    deadline_ms = current_deadline(context)
    if deadline_ms is None:
        return None
    return max(0.0, (deadline_ms - now_ms()) / 1000)
