"""A fresh process on a large flag set: how long until it is listed and enforcing, what the set costs.

Usage: list_probe.py ROOT [--memory]

Configured from the ``OTEL_CANCEL_*`` environment. Starts the runtime, waits for
the first listing, enters a scope for ROOT (a cancelled root: it must be refused)
and prints one JSON line: seconds from the watcher's start to listed, to the
refusal, the roots held, and with ``--memory`` the bytes ``tracemalloc`` still
holds after the listing (the cancelled-root set and the rest of the runtime) and
its peak while listing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
import tracemalloc

import otel_cancel
from otel_cancel._core.process_state import get_process_state


async def main(root: str, memory: bool) -> None:
    runtime = get_process_state()
    if memory:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    runtime.start()
    listed = await runtime.watcher.wait_listed(120)
    listed_at = time.perf_counter()
    refused = False
    try:
        async with otel_cancel.scope(root=root):
            pass
    except otel_cancel.Cancelled:
        refused = True
    refused_at = time.perf_counter()
    result = {
        "listed": listed,
        "refused": refused,
        "listed_s": listed_at - started,
        "refused_s": refused_at - started,
        "roots": runtime.registry.cancelled_roots(),
    }
    if memory:
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        result.update(held_bytes=current - before, peak_bytes=peak - before)
    print(json.dumps(result), flush=True)
    runtime.shutdown()


asyncio.run(main(sys.argv[1], "--memory" in sys.argv[2:]))
