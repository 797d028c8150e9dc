"""Hold scopes for given roots until they are cancelled; report each stop on stdout.

Usage: hold_scopes.py ROOT:COUNT [ROOT:COUNT ...]

Prints ``READY`` once every scope is entered, then ``STOPPED <root> <index>
<epoch_ns>`` for each task its root's cancel stopped. When stdin closes it prints
``APPLIED <n>`` (flags its watcher applied, from the ``otel_cancel.flags.applied``
metric) and exits.
"""

from __future__ import annotations

import asyncio
import sys
import time

import otel_cancel
from otel_cancel.attributes import METRIC_FLAGS_APPLIED
from otel_cancel.testing import CancelMetrics

METRICS = CancelMetrics()


async def hold(root: str, index: int, entered: asyncio.Event, counter: list[int], total: int) -> None:
    try:
        async with otel_cancel.scope(root=root, name=f"task-{index}"):
            counter[0] += 1
            if counter[0] == total:
                entered.set()
            await asyncio.Event().wait()
    except otel_cancel.Cancelled as error:
        print(f"STOPPED {error.root} {index} {time.time_ns()}", flush=True)


async def main() -> None:
    specs = [arg.split(":") for arg in sys.argv[1:]]
    total = sum(int(count) for _, count in specs)
    entered = asyncio.Event()
    counter = [0]
    tasks = [
        asyncio.create_task(hold(root, i, entered, counter, total)) for root, count in specs for i in range(int(count))
    ]
    await entered.wait()
    print("READY", flush=True)
    # Exit when the test closes stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in tasks:
        task.cancel()
    print(f"APPLIED {int(METRICS.total(METRIC_FLAGS_APPLIED))}", flush=True)


asyncio.run(main())
