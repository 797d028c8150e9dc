"""A2A cancel-task as a distributed cancel: how fast every depth stops.

    /work/venv/bin/python bench/a2a_cancel.py [--quick]

The A2A example chain (``examples/a2a_chain``: supervisor -> sub-agent ->
sub-sub-agent, two replicas each, under ``opentelemetry-instrument``) on a real
etcd. Each round streams a message through one supervisor replica and, once
tokens flow from the leaf, sends cancel-task (``CancelTask``, with a reason) to

- ``running replica``: the supervisor replica that runs the task (a2a-sdk's own
  path, through the executor's ``cancel()``), or
- ``other replica``: the one that does not (it finds the task's root under
  ``{prefix}tasks/`` and writes the flag).

Measured per round: flag written -> work stopped in each process (from the
receipts: ``stopped_at - requested_at``, one clock, one machine), the time until
the cancel-task call answers ``canceled``, and the time until the caller's stream
ends. Writes ``bench/results/a2a.json``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import A2A_COLUMNS, A2A_HEADERS, base_parser, loadavg, say, summary, table, write_results

from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import Receipt
from otel_cancel.demo import A2A_APP, ExampleChain
from otel_cancel.demo.a2a import CancelTaskOutcome, cancel_task_midway
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import EtcdServer, unique_prefix

TARGETS = ("running replica", "other replica")
RECEIPT_TIMEOUT = 20.0


async def _receipts(store: EtcdCancelStore, root: str, expect: int) -> list[Receipt]:
    # Receipts come from other processes: poll the acks prefix, as `otel-cancel cancel --wait` does.
    deadline = time.monotonic() + RECEIPT_TIMEOUT
    while True:
        receipts = await store.list_receipts(root)
        if len(receipts) >= expect or time.monotonic() > deadline:
            return receipts
        await asyncio.sleep(0.02)


def one_round(chain: ExampleChain, store: EtcdCancelStore, target: str, index: int) -> dict[str, Any]:
    running_here, elsewhere = chain.urls["supervisor"][index % 2], chain.urls["supervisor"][(index + 1) % 2]
    cancel_url = running_here if target == "running replica" else elsewhere
    outcome: CancelTaskOutcome = asyncio.run(cancel_task_midway(running_here, cancel_url, f"round {index}"))
    receipts = io_loop().run(_receipts(store, outcome.root, expect=3))
    return {
        "target": target,
        "answered_canceled": outcome.answered_canceled,
        "stream_ended_canceled": outcome.stream_ended_canceled,
        "cancel_answer_ms": round(outcome.cancel_answer_ms, 2),
        "stream_end_ms": round(outcome.stream_end_ms, 2),
        "stops": [{"depth": r.depth, "instance": r.instance, "latency_ms": round(r.latency_ms, 3)} for r in receipts],
    }


def summarise(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cancel-task target and depth: flag -> stop, cancel-task answer, stream end."""
    rows = []
    for target in TARGETS:
        mine = [r for r in rounds if r["target"] == target]
        for depth in (0, 1, 2):
            latencies = [s["latency_ms"] for r in mine for s in r["stops"] if s["depth"] == depth]
            rows.append(
                {"target": target, "depth": depth, "stopped": f"{len(latencies)}/{len(mine)}", **summary(latencies)}
            )
        rows.append(
            {
                "target": target,
                "depth": "cancel-task answered",
                "stopped": f"{sum(r['answered_canceled'] for r in mine)}/{len(mine)} canceled",
                **summary([r["cancel_answer_ms"] for r in mine]),
            }
        )
        rows.append(
            {
                "target": target,
                "depth": "caller's stream ended",
                "stopped": f"{sum(r['stream_ended_canceled'] for r in mine)}/{len(mine)} canceled",
                **summary([r["stream_end_ms"] for r in mine]),
            }
        )
    return rows


def main() -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    rounds_per_target = 5 if args.quick else 40
    started, load_before = time.time(), loadavg()
    rounds: list[dict[str, Any]] = []
    with EtcdServer() as etcd:
        env = {"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": unique_prefix()}
        chain = ExampleChain(env, app=A2A_APP)
        store = EtcdCancelStore([etcd.endpoint], prefix=env["OTEL_CANCEL_PREFIX"])
        try:
            chain.start()
            say(f"A2A chain up (2 replicas per agent); {rounds_per_target} rounds per cancel-task target")
            for index in range(rounds_per_target):
                for target in TARGETS:
                    rounds.append(one_round(chain, store, target, index))
        finally:
            io_loop().run(store.close())
            chain.stop()
    rows = summarise(rounds)
    say(table(rows, A2A_COLUMNS, A2A_HEADERS))
    path = write_results("a2a", {"quick": args.quick, "rounds": rounds, "rows": rows}, started, load_before)
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
