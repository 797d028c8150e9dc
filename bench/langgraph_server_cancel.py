"""The LangGraph Server chain: flag -> leaf stop and ``runs.cancel`` -> leaf stop, with and without otel-cancel.

    .venv/bin/python bench/langgraph_server_cancel.py [--quick]

Starts ``examples/langgraph_server`` twice as real ``langgraph dev`` deployments
(supervisor -> sub-agent -> sub-sub-agent through ``RemoteGraph`` with default
arguments): once under ``opentelemetry-instrument`` with otel-cancel, once plain
(LangGraph alone). Each round starts a run on the supervisor, waits until the leaf's
node produces tokens, then stops it:

- ``flag``: ``otel_cancel.cancel(root)`` from this process (otel-cancel only);
- ``runs.cancel``: ``client.runs.cancel(thread_id, run_id)`` on the supervisor.

Per level: node ended (its ``END`` marker, ``time.time_ns()``) minus the moment the
cancel was sent, one machine clock; a level counts as stopped when its node ended
before half of the leaf's own work (``TOKENS`` x ``INTERVAL``) could have run. The anchor, measured in the same run,
is the supervisor's own node stopping under ``runs.cancel`` (LangGraph's in-process
interrupt); the leaf's figure is also given as a ratio to it. A leaf that is not
stopped runs to its natural end (``TOKENS`` x ``INTERVAL``) and is counted as such.
Writes ``bench/results/langgraph_server.json``.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, loadavg, say, summary, until, write_results

import otel_cancel
from otel_cancel.demo.langgraph_server_chain import ROLES, ServerChain
from otel_cancel.testing import EtcdServer, configured, unique_prefix

TOKENS = 100
INTERVAL = 0.05


async def one_round(chain: ServerChain, how: str) -> dict[str, Any]:
    from langgraph_sdk import get_client

    tag = f"bench-{uuid.uuid4().hex[:8]}"
    async with get_client(url=chain.top.url) as client:
        thread = await client.threads.create()
        run = await client.runs.create(
            thread["thread_id"], "agent", input={"prompt": "bench", "tag": tag, "tokens": TOKENS, "interval": INTERVAL}
        )
        if not await until(lambda: any(r == ROLES[-1] for r, _ in chain.lines("TOKEN", tag)), 90, 0.01):
            raise TimeoutError(f"{tag} never reached the leaf")
        sent = time.time_ns()
        if how == "flag":
            await otel_cancel.cancel(run["metadata"]["otel_cancel_root"], reason="bench")
        else:
            await client.runs.cancel(thread["thread_id"], run["run_id"])
        await until(lambda: len(chain.lines("END", tag)) >= len(ROLES), TOKENS * INTERVAL + 30, 0.01)
        status = "running"
        for _ in range(200):  # the run's status is written as its worker finishes
            status = (await client.runs.get(thread["thread_id"], run["run_id"]))["status"]
            if status not in ("pending", "running"):
                break
            await asyncio.sleep(0.05)
    ends = {role: fields for role, fields in chain.lines("END", tag)}
    levels = []
    for depth, role in enumerate(ROLES):
        end = ends.get(role)
        levels.append(
            {
                "depth": depth,
                "how": end[1] if end else "running",
                "latency_ms": round((int(end[0]) - sent) / 1e6, 3) if end else None,
            }
        )
    return {"top_run_status": status, "levels": levels}


def _stopped(level: dict[str, Any]) -> bool:
    # A relay's node may end "done" a moment before its own stop lands: the run below
    # it was interrupted and its stream ended cleanly (its run still ends interrupted).
    # What counts is that it ended long before the leaf's work could have: half of it.
    latency = level["latency_ms"]
    return latency is not None and latency < TOKENS * INTERVAL * 1000 / 2


async def scenario(chain: ServerChain, how: str, rounds: int) -> dict[str, Any]:
    samples = [await one_round(chain, how) for _ in range(rounds)]
    out: dict[str, Any] = {"how": how, "otel_cancel": chain.instrumented, "rounds": rounds, "levels": []}
    for depth in range(len(ROLES)):
        per = [s["levels"][depth] for s in samples]
        stopped = [lv["latency_ms"] for lv in per if _stopped(lv)]
        ran_on = [lv["latency_ms"] for lv in per if not _stopped(lv) and lv["latency_ms"] is not None]
        out["levels"].append(
            {"depth": depth, "stopped": len(stopped), "ms": summary(stopped), "ran_on_ms": summary(ran_on)}
        )
    out["top_run_status"] = sorted({s["top_run_status"] for s in samples})
    out["samples"] = samples
    return out


async def run(args: Any) -> dict[str, Any]:
    rounds = 3 if args.quick else 10
    with EtcdServer() as etcd:
        env = {"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": unique_prefix()}
        with_otel = ServerChain(env)
        plain = ServerChain(env, instrumented=False, name_suffix="-plain")
        try:
            with_otel.start()
            plain.start()
            say("6 langgraph dev deployments ready")
            with configured(endpoints=(etcd.endpoint,), prefix=env["OTEL_CANCEL_PREFIX"]):
                scenarios = [
                    await scenario(with_otel, "flag", rounds),
                    await scenario(with_otel, "runs.cancel", rounds),
                    await scenario(plain, "runs.cancel", min(rounds, 3)),
                ]
        finally:
            with_otel.stop()
            plain.stop()
    for row in scenarios:
        say(
            f"{row['how']:>12} otel-cancel={row['otel_cancel']!s:5}: "
            + "; ".join(
                f"depth {lv['depth']} stopped {lv['stopped']}/{row['rounds']} p50 {lv['ms']['p50']} ms"
                for lv in row["levels"]
            )
        )
    return {"quick": args.quick, "tokens": TOKENS, "token_interval_s": INTERVAL, "scenarios": scenarios}


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    started, load_before = time.time(), loadavg()
    data = asyncio.run(run(args))
    write_results("langgraph_server", data, started, load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
