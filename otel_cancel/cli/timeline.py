"""Draw how a cancel propagated, as a timeline in the terminal.

One bar per process, from the flag written (time 0) to its work stopped, grouped
by depth. The scale is shared, so a slow replica stands out at a glance::

    depth 0
      supervisor/host-12  |██                                      |  1.8 ms
    depth 1
      sub-agent/host-31   |███                                     |  2.4 ms
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

from .._core.records import CancelRequest, Receipt

_WIDTH = 40
# Labels come from the receipts (service/instance, up to MAX_TEXT characters each): cut
# so that one verbose process cannot push every bar off the screen.
_MAX_LABEL = 40


def _label(receipt: Receipt) -> str:
    label = f"{receipt.service}/{receipt.instance}"
    return label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "…"


def _ms(ns: int) -> str:
    """``ns`` in milliseconds with one decimal, exact for any integer and at most 10 characters."""
    if ns >= 10**14:  # over a day: a hostile or broken clock, not a cancel worth a long number
        return ">1e8"
    tenths = (ns + 50_000) // 100_000
    return f"{tenths // 10}.{tenths % 10}"


def render_timeline(flag: CancelRequest, receipts: Sequence[Receipt], width: int = _WIDTH) -> str:
    """The timeline of ``receipts`` against ``flag`` as text (no trailing newline).

    Every line fits in ``width`` columns of bar plus a label of at most 40 characters,
    whatever the receipts hold: work that stopped before the flag was written (LangGraph's
    own cancel, a client that left) is drawn from when its process saw the flag.
    """
    if not receipts:
        return "no receipts yet"
    width = max(width, 2)
    ordered = sorted(receipts, key=lambda r: (r.depth, r.stopped_at))
    origin = flag.requested_at or min(r.seen_at for r in ordered)
    # The scale covers the latest moment drawn: a bar starts at seen and ends at
    # max(seen, stopped), so stopped alone under-counts when work stopped before the flag.
    span_ns = max(max(max(r.seen_at, r.stopped_at) - origin for r in ordered), 1)
    label_width = max(10, *(len(_label(r)) for r in ordered))
    lines = [f"{'flag written':<{label_width + 2}} |0{' ' * (width - 2)}|{_ms(span_ns)} ms"]
    for depth, group in groupby(ordered, key=lambda r: r.depth):
        lines.append(f"depth {depth}")
        for receipt in group:
            seen = min(max(0, receipt.seen_at - origin), span_ns)
            stopped = min(max(seen, receipt.stopped_at - origin), span_ns)
            # Integer arithmetic (a stored time is any JSON integer, too large for a float),
            # clamped to the bar, so no value can draw outside it.
            start_col = min(seen * width // span_ns, width - 1)
            end_col = min(max(start_col + 1, (stopped * width + span_ns // 2) // span_ns), width)
            bar = " " * start_col + "█" * (end_col - start_col)
            lines.append(f"  {_label(receipt):<{label_width}} |{bar:<{width}}| {_ms(stopped):>6} ms")
    return "\n".join(lines)
