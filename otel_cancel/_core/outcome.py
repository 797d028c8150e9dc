"""How a scope's work ended, as the scope decided it.

The scope is the one place that classifies a stop (it knows what it saw at entry and
which cancellations it delivered); the registry only books the outcome it is given:
a stopped scope counts towards its root's receipt, an early one is remembered until
the root's flag arrives to claim it.
"""

from __future__ import annotations

import enum


class Outcome(enum.Enum):
    """How one scope's work ended."""

    COMPLETED = "completed"
    """The body ended by itself (returned or raised), or the scope was refused on entry."""
    STOPPED = "stopped"
    """This root's cancel stopped it: a cancellation otel-cancel delivered, a ``Cancelled``
    for this root raised inside, or a caller's cancellation after the flag was applied here.
    It counts towards the root's receipt and gets an ``otel_cancel.cancelled`` span."""
    STOPPED_EARLY = "stopped early"
    """Stopped before any flag for its root arrived here, by a cancellation otel-cancel did
    not deliver (its caller left) or by news of the cancel from downstream. Remembered, so
    the flag, when it comes, still yields a receipt and a span for it."""
    DEADLINE = "deadline"
    """The run's deadline passed here: a span and metrics, no flag and no receipt."""
