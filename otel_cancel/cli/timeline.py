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


def render_timeline(flag: CancelRequest, receipts: Sequence[Receipt], width: int = _WIDTH) -> str:
    """The timeline of ``receipts`` against ``flag`` as text (no trailing newline)."""
    if not receipts:
        return "no receipts yet"
    ordered = sorted(receipts, key=lambda r: (r.depth, r.stopped_at))
    origin = flag.requested_at or min(r.seen_at for r in ordered)
    span_ns = max(max(r.stopped_at - origin for r in ordered), 1)
    label_width = max(len(f"{r.service}/{r.instance}") for r in ordered)
    lines = [f"flag written {'':>{label_width - 10}}|0{' ' * (width - 2)}|{span_ns / 1e6:.1f} ms"]
    for depth, group in groupby(ordered, key=lambda r: r.depth):
        lines.append(f"depth {depth}")
        for receipt in group:
            seen = max(0, receipt.seen_at - origin)
            stopped = max(seen, receipt.stopped_at - origin)
            start_col = int(seen / span_ns * width)
            end_col = max(start_col + 1, round(stopped / span_ns * width))
            bar = " " * start_col + "█" * (end_col - start_col)
            label = f"{receipt.service}/{receipt.instance}"
            lines.append(f"  {label:<{label_width}} |{bar:<{width}}| {stopped / 1e6:6.1f} ms")
    return "\n".join(lines)
