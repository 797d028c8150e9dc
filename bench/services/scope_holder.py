"""A process that holds otel-cancel scopes on command (the scale benchmark's worker).

Configured from the ``OTEL_CANCEL_*`` environment. Commands on stdin, one per line:

``hold SEED N``   start N tasks, task i in ``otel_cancel.scope()`` for the root
                  ``roots(SEED, N)[i]``, each waiting until it is cancelled; answers
                  ``HELD SEED N <t_ns>`` once all are inside their scope.
``release SEED``  stop the tasks of SEED (plain ``task.cancel()``); ``RELEASED SEED``.
``stats``         ``STATS {json}``: live scopes, flags applied, receipts written, etcd calls.
                  Flags applied and receipts written are otel-cancel's own metrics
                  (``otel_cancel.flags.applied``, ``otel_cancel.receipts``), read from an
                  in-memory OpenTelemetry reader, as a service's SDK would export them.
``quit``

With ``BENCH_RECEIPTS=off`` (a diagnostic, not a supported setting) the worker
detaches the runtime's receipt writer, to show what receipts cost under load. With
``BENCH_QUIET_STOPS=1`` it only counts its stops (``stats``: ``stopped``) instead of
printing a line for each: a CPU measurement then leaves out the harness's own output.
With ``BENCH_STOP_TELEMETRY=off`` (a diagnostic too) a stop records no span and no
metrics, to show what the stop's telemetry costs under load; ``BENCH_STOP_WAKE_MS=N``
sets the least time between two wake-ups of the app's loop by the watcher (default 2).

Each task whose scope raises ``Cancelled`` prints ``STOPPED <root> <t_ns>``
(``time.time_ns()`` right after the scope exits). Prints ``READY`` when the
watcher has listed the flags.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time

import otel_cancel
from otel_cancel._core.process_state import get_process_state
from otel_cancel._core.startup_wait import wait_for_listing
from otel_cancel.attributes import METRIC_FLAGS_APPLIED, METRIC_RECEIPTS
from otel_cancel.testing import CancelMetrics


def roots(seed: str, count: int) -> list[str]:
    """``count`` distinct valid roots derived from ``seed`` (the benchmark derives the same)."""
    return [hashlib.md5(f"{seed}-{index}".encode()).hexdigest() for index in range(count)]


_QUIET_STOPS = os.environ.get("BENCH_QUIET_STOPS") == "1"
_stopped = [0]


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _hold(root: str, entered: asyncio.Event, counter: list[int], total: int) -> None:
    try:
        async with otel_cancel.scope(root=root, name="held"):
            counter[0] += 1
            if counter[0] == total:
                entered.set()
            await asyncio.Future()
    except otel_cancel.Cancelled:
        if _QUIET_STOPS:
            _stopped[0] += 1
        else:
            _say(f"STOPPED {root} {time.time_ns()}")


async def main() -> None:
    metrics = CancelMetrics()  # the process's meter provider, before otel-cancel records anything
    runtime = get_process_state()
    if os.environ.get("BENCH_RECEIPTS") == "off":
        runtime.registry.on_stopped = None
    if os.environ.get("BENCH_STOP_TELEMETRY") == "off":
        from otel_cancel._core import telemetry

        telemetry.work_cancelled = lambda **_: None  # type: ignore[assignment]
    if "BENCH_STOP_WAKE_MS" in os.environ:
        from otel_cancel._core import delivery

        delivery.STOP_WAKE_INTERVAL_SECONDS = float(os.environ["BENCH_STOP_WAKE_MS"]) / 1000
    await wait_for_listing(runtime)
    _say("READY")
    loop = asyncio.get_running_loop()
    held: dict[str, list[asyncio.Task[None]]] = {}
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "hold":
            seed, count = parts[1], int(parts[2])
            entered = asyncio.Event()
            counter = [0]
            held[seed] = [asyncio.create_task(_hold(root, entered, counter, count)) for root in roots(seed, count)]
            await entered.wait()
            _say(f"HELD {seed} {count} {time.time_ns()}")
        elif parts[0] == "release":
            tasks = held.pop(parts[1], [])
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            _say(f"RELEASED {parts[1]}")
        elif parts[0] == "stats":
            _say(
                "STATS "
                + json.dumps(
                    {
                        "live_scopes": runtime.registry.live_scopes(),
                        "stopped": _stopped[0],
                        "cancelled_roots": runtime.registry.cancelled_roots(),
                        "flags_applied": int(metrics.total(METRIC_FLAGS_APPLIED)),
                        "receipts_written": int(metrics.total(METRIC_RECEIPTS)),
                        "connected": runtime.watcher.connected,
                    }
                )
            )
        elif parts[0] == "quit":
            return


if __name__ == "__main__":
    asyncio.run(main())
