"""The HTTP-disconnect cascade vs otel-cancel: the client closes the root stream.

    /work/venv/bin/python bench/cascade.py [--quick]

The same chain of uvicorn services (two replicas per level), in two builds:

- ``disconnect``: plain services (``bench/services/level_app.py``), no
  otel-cancel anywhere: the only thing that can stop a deeper level is its
  caller closing the connection (Starlette notices ``http.disconnect`` and
  cancels the streaming response, which closes its own outgoing call, and so on);
- ``otel-cancel``: the same app behind ``CancelMiddleware``
  (``cancel_app.py``): the edge sees the client leave and writes the flag.

and three shapes of chain:

- ``stream``: every hop streams (depths 1, 3, 5);
- ``buffered-call`` (depth 3): the middle level still streams its response but
  reads the next level with one non-streaming request;
- ``rpc-endpoint`` (depth 3): the middle level is a non-streaming endpoint
  (``/invoke``: it reads the next level in full, then answers JSON), as a
  "call a sub-agent as a tool" hop usually is.

Each round opens one run, waits until every level is working, closes the
client's stream and records ``time.time_ns()``; every level logs the time its
work loop ended (same clock). Latency = level end - client close. A level that
has not stopped when its work would have finished anyway is reported as not
stopped (it ran to completion). Writes ``bench/results/cascade.json``.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CpuSampler,
    EventLog,
    ServiceChain,
    base_parser,
    cascade_rows,
    loadavg,
    say,
    summary,
    table,
    until,
    write_results,
)

from otel_cancel.testing import EtcdServer, unique_prefix

TOKEN_INTERVAL = 0.1
TOKENS = 40  # a leaf that is never told runs 4 s more, then ends by itself

SHAPES: dict[str, dict[str, Any]] = {
    "stream": {"level_env": {}},
    "buffered-call": {"level_env": {1: {"CALL_MODE": "buffered"}}},
    "rpc-endpoint": {"level_env": {0: {"NEXT_PATH": "/invoke"}}},
}


async def one_round(chain: ServiceChain, events: EventLog, mechanism: str) -> dict[str, Any]:
    depth = chain.depth
    run = uuid.uuid4().hex
    async with httpx.AsyncClient(timeout=httpx.Timeout(60)) as client:
        params = {"tokens": TOKENS, "interval": TOKEN_INTERVAL}
        if mechanism == "disconnect":
            params["run"] = run
        request = client.build_request("GET", f"{random.choice(chain.urls(0))}/stream", params=params)
        response = await client.send(request, stream=True)
        if mechanism == "otel-cancel":
            run = response.headers["otel-cancel-root"]
        reader = asyncio.create_task(response.aread())
        if not await until(lambda: events.started_everywhere([run], depth), 30):
            raise TimeoutError(f"run {run} did not start at every level")
        # Land the close at a random point of the token cadence.
        await asyncio.sleep(random.uniform(0, TOKEN_INTERVAL))
        # Cancelling a read in progress already closes the connection (httpcore), so the
        # close is timed before it.
        closed_ns = time.time_ns()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await response.aclose()
    # Wait for every level to end: stopped, or finished its work anyway.
    await until(lambda: events.ended_everywhere([run], depth), TOKENS * TOKEN_INTERVAL * depth + 10, 0.02)
    events.update()
    levels = []
    for level in range(depth):
        end = events.end.get(run, {}).get(level)
        levels.append(
            {
                "level": level,
                "ended": end is not None,
                "how": end[1] if end else "running",
                "latency_ms": round((end[0] - closed_ns) / 1e6, 3) if end else None,
            }
        )
    return {"run": run, "levels": levels}


def shape_summary(shape: str, mechanism: str, depth: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    deepest = [r["levels"][-1] for r in rounds]
    stopped = [lv for lv in deepest if lv["how"] == "stopped"]
    per_level = []
    for level in range(depth):
        here = [r["levels"][level] for r in rounds]
        stops = [lv["latency_ms"] for lv in here if lv["how"] == "stopped"]
        per_level.append({"level": level, "stopped": f"{len(stops)}/{len(here)}", "latency_ms": summary(stops)})
    ran_on = [lv["latency_ms"] for lv in deepest if lv["how"] == "done"]
    return {
        "shape": shape,
        "mechanism": mechanism,
        "depth": depth,
        "rounds": len(rounds),
        "deepest_stopped": len(stopped),
        "deepest_latency_ms": summary([lv["latency_ms"] for lv in stopped]),
        "deepest_ran_on_ms": summary(ran_on),
        "levels": per_level,
        "samples": rounds,
    }


async def run(args: Any) -> dict[str, Any]:
    rounds_wanted = 4 if args.quick else 30
    plan = [("stream", d) for d in ((1, 3) if args.quick else (1, 3, 5))]
    plan += [("buffered-call", 3), ("rpc-endpoint", 3)]
    results = []
    with CpuSampler() as cpu, EtcdServer() as etcd:
        env = {
            "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
            "OTEL_CANCEL_PREFIX": unique_prefix().replace("test", "bench"),
        }
        for shape, depth in plan:
            for mechanism, module in (("disconnect", "level_app"), ("otel-cancel", "cancel_app")):
                chain = ServiceChain(depth, 2, module, env, level_env=SHAPES[shape]["level_env"]).start()
                try:
                    events = EventLog(chain.processes())
                    rounds: list[dict[str, Any]] = []
                    started = time.time()
                    for _ in range(rounds_wanted):
                        rounds.append(await one_round(chain, events, mechanism))
                        # A shape whose leaf never stops does so every time: three rounds show it.
                        if len(rounds) >= 3 and not any(r["levels"][-1]["how"] == "stopped" for r in rounds):
                            break
                    row = shape_summary(shape, mechanism, depth, rounds)
                    row.update(cpu.window(started, time.time()))
                    row["load1"] = loadavg()[0]
                    results.append(row)
                    lat = row["deepest_latency_ms"]
                    say(
                        f"{shape:>13} depth {depth} {mechanism:>11}: deepest stopped {row['deepest_stopped']}/"
                        f"{row['rounds']}, p50 {lat['p50']} ms, p99 {lat['p99']} ms"
                        + (f", ran on {row['deepest_ran_on_ms']['p50']} ms" if row["deepest_ran_on_ms"]["n"] else "")
                    )
                finally:
                    chain.stop()
    return {
        "quick": args.quick,
        "token_interval_s": TOKEN_INTERVAL,
        "tokens": TOKENS,
        "replicas_per_level": 2,
        "trigger": "the client closes the root stream",
        "measure": "level's handler loop end (time.time_ns) - client close (time.time_ns), same machine clock",
        "results": results,
    }


def main() -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    started, load_before = time.time(), loadavg()
    data = asyncio.run(run(args))
    path = write_results("cascade", data, started, load_before)
    rows = cascade_rows(data["results"])
    say("\nclient closes the root stream -> deepest level's work stops, ms")
    say(
        table(
            rows,
            ["shape", "depth", "mechanism", "stopped", "p50", "p99", "max", "ran_on"],
            ["shape", "depth", "mechanism", "deepest stopped", "p50", "p99", "max", "not stopped: ran on for (p50)"],
        )
    )
    say(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
