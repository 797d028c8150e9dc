"""``otel-cancel demo --langgraph-server``: the agents as LangGraph Server deployments, cancelled three ways.

Starts ``examples/langgraph_server`` (supervisor -> sub-agent -> sub-sub-agent, three
``langgraph dev`` servers chained by ``RemoteGraph``) on an embedded etcd, and stops a
run midway: by its root (``otel-cancel cancel``), by LangGraph's own
``client.runs.cancel`` on the supervisor, and by a client that drops its stream with
``on_disconnect="cancel"``. For each, it prints every depth's stop (from the receipts)
and how long after the cancel each level's node stopped.

Needs the ``langgraph-server`` extra (``langgraph-cli[inmem]``, ``langgraph-sdk``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any

from ..cli.table import format_table
from ..store.embedded_etcd import EtcdServer
from . import demo_prefix, run_cli
from .langgraph_server_chain import ROLES, ServerChain

TOKENS = 400
INTERVAL = 0.05
_COLUMNS = ("depth", "service", "interrupted", "node_stopped_ms", "latency_ms")
"""``node_stopped_ms``: from sending the cancel to the node's own stop (the CLI's start-up
included for ``otel-cancel cancel``); ``latency_ms``: the receipt's, flag written to work
stopped (0 where the process stopped its work first and then wrote the flag)."""


async def _until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)  # polling the servers' output: there is no event to await
    return True


async def _leaf_started(chain: ServerChain, tag: str) -> None:
    if not await _until(lambda: any(role == ROLES[-1] for role, _ in chain.lines("TOKEN", tag)), 90):
        raise TimeoutError(f"the run {tag} never reached the sub-sub-agent")


async def _rows(chain: ServerChain, tag: str, root: str, sent_ns: int, env: dict[str, str]) -> list[dict[str, Any]]:
    """Every depth's stop: the receipt, and when its node's own marker stopped."""
    await _until(lambda: len(chain.lines("END", tag)) >= len(ROLES), 30)
    result = run_cli(["status", root, "--json"], env)
    receipts = json.loads(result.stdout)["receipts"] if result.returncode == 0 else []
    ends = {role: fields for role, fields in chain.lines("END", tag)}
    rows = []
    for depth, role in enumerate(ROLES):
        receipt = next((r for r in receipts if r["service"] == role), None)
        end = ends.get(role)
        rows.append(
            {
                "depth": depth,
                "service": role,
                "interrupted": receipt["interrupted"] if receipt else "-",
                "node_stopped_ms": round((int(end[0]) - sent_ns) / 1e6, 1) if end else "running",
                "latency_ms": receipt["latency_ms"] if receipt else "-",
            }
        )
    return rows


def _show(title: str, root: str, rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"scenario": title, "root": root, "stopped": rows}), flush=True)
        return
    print(f"\n== {title}\nroot {root}")
    print(format_table(rows, _COLUMNS), flush=True)


async def _scenarios(chain: ServerChain, env: dict[str, str], as_json: bool) -> bool:
    from langgraph_sdk import get_client

    ok = True
    payload: dict[str, Any] = {"prompt": "tell me about etcd", "tokens": TOKENS, "interval": INTERVAL}
    async with get_client(url=chain.top.url) as client:
        for how in ("otel-cancel cancel ROOT", "client.runs.cancel on the supervisor", "a client disconnect"):
            tag = f"demo-{uuid.uuid4().hex[:8]}"
            thread = await client.threads.create()
            streaming: asyncio.Task[None] | None = None
            run: dict[str, Any]
            if how == "a client disconnect":

                async def stream(thread_id: str = thread["thread_id"], tag: str = tag) -> None:
                    async for _ in client.runs.stream(
                        thread_id, "agent", input={**payload, "tag": tag}, on_disconnect="cancel"
                    ):
                        pass

                streaming = asyncio.create_task(stream())
                await _leaf_started(chain, tag)
                run = dict((await client.runs.list(thread["thread_id"]))[0])
            else:
                run = dict(await client.runs.create(thread["thread_id"], "agent", input={**payload, "tag": tag}))
                await _leaf_started(chain, tag)
            root = run["metadata"]["otel_cancel_root"]
            sent = time.time_ns()
            if how.startswith("otel-cancel"):
                run_cli(["cancel", root, "--reason", "user clicked stop"], env)
            elif streaming is None:
                await client.runs.cancel(thread["thread_id"], run["run_id"])
            else:
                streaming.cancel()  # the client goes away mid-stream
                await asyncio.gather(streaming, return_exceptions=True)
            rows = await _rows(chain, tag, root, sent, env)
            _show(f"cancelled midway by {how}", root, rows, as_json)
            ok &= all(isinstance(r["node_stopped_ms"], float) for r in rows) and rows[-1]["interrupted"] != "-"
    return ok


def run_langgraph_server_demo(as_json: bool = False) -> int:
    """Run the three scenarios on LangGraph Server deployments; return the exit code."""
    endpoint = os.environ.get("OTEL_CANCEL_ETCD_ENDPOINTS")
    server: EtcdServer | None = None
    chain: ServerChain | None = None
    try:
        if not endpoint:
            server = EtcdServer().start()
            endpoint = server.endpoint
        env = {"OTEL_CANCEL_ETCD_ENDPOINTS": endpoint, "OTEL_CANCEL_PREFIX": demo_prefix()}
        if not as_json:
            print(
                f"etcd {endpoint} ({'embedded' if server else 'from OTEL_CANCEL_ETCD_ENDPOINTS'}); starting "
                "supervisor, sub-agent, sub-sub-agent as langgraph dev deployments (RemoteGraph between them)...",
                flush=True,
            )
        chain = ServerChain(env).start()
        return 0 if asyncio.run(_scenarios(chain, env, as_json)) else 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        return 130
    except (FileNotFoundError, TimeoutError, RuntimeError, OSError) as error:
        print(f"otel-cancel demo: {error}", file=sys.stderr)
        return 1
    finally:
        if chain is not None:
            chain.stop()
        if server is not None:
            server.stop()
