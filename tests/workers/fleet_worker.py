"""Hold runs on command, for the fleet tests (``ps``, ``cancel --all``, ``--wait``).

Reads one command per line on stdin and answers on stdout:

- ``start NAME ROOT|new [KEY=VALUE ...]``: hold a scope (named NAME, with those labels)
  for ROOT, or for a new root; prints ``ENTERED NAME ROOT``, then ``STOPPED NAME ROOT``
  when its root is cancelled or ``DONE NAME ROOT`` after ``finish NAME``;
- ``hop NAME ROOT STARTED_MS [KEY=VALUE ...]``: a hop of ROOT (depth 1, the run begun
  at STARTED_MS, those labels in its baggage) enters a scope: ``ENTERED`` (held like
  ``start``) or ``REFUSED NAME ROOT``;
- ``graph NAME THREAD_ID``: run a LangGraph graph (instrumented) whose node waits;
  prints ``ENTERED NAME ROOT`` once the node runs;
- ``finish NAME``: let NAME's work end normally.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from opentelemetry import baggage
from opentelemetry import context as otel_context

import otel_cancel
from otel_cancel import attributes
from otel_cancel._core.labels import encode_labels

finishes: dict[str, asyncio.Event] = {}


def _labels(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


async def hold(name: str, root: str | None, labels: dict[str, str]) -> None:
    finish = finishes.setdefault(name, asyncio.Event())
    entered = False
    try:
        async with otel_cancel.scope(root=root, name=name, labels=labels or None) as bound:
            entered = True
            print(f"ENTERED {name} {bound.root}", flush=True)
            await finish.wait()
        print(f"DONE {name} {bound.root}", flush=True)
    except otel_cancel.Cancelled as error:
        print(f"{'STOPPED' if entered else 'REFUSED'} {name} {error.root}", flush=True)


async def hop(name: str, root: str, started_ms: str, labels: dict[str, str]) -> None:
    context = baggage.set_baggage(attributes.BAGGAGE_ROOT, root)
    context = baggage.set_baggage(attributes.BAGGAGE_DEPTH, "1", context)
    context = baggage.set_baggage(attributes.BAGGAGE_STARTED, started_ms, context)
    if labels:
        context = baggage.set_baggage(attributes.BAGGAGE_LABELS, encode_labels(labels), context)
    token = otel_context.attach(context)
    try:
        await hold(name, None, {})
    finally:
        otel_context.detach(token)


async def graph(name: str, thread_id: str) -> None:
    from langgraph.graph import END, START, StateGraph
    from typing_extensions import TypedDict

    from otel_cancel.langgraph import instrument_langgraph

    instrument_langgraph()

    class State(TypedDict):
        done: bool

    async def wait_node(state: State) -> dict[str, Any]:
        print(f"ENTERED {name} {otel_cancel.current_root()}", flush=True)
        await finishes.setdefault(name, asyncio.Event()).wait()
        return {"done": True}

    builder = StateGraph(State)
    builder.add_node("wait_node", wait_node)
    builder.add_edge(START, "wait_node")
    builder.add_edge("wait_node", END)
    compiled = builder.compile(name="fleet_graph")
    try:
        await compiled.ainvoke({"done": False}, config={"configurable": {"thread_id": thread_id}})
        print(f"DONE {name}", flush=True)
    except otel_cancel.Cancelled as error:
        print(f"STOPPED {name} {error.root}", flush=True)


async def main() -> None:
    loop = asyncio.get_running_loop()
    tasks = []
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command, *args = line.split()
        if command == "start":
            name, root, *labels = args
            tasks.append(asyncio.create_task(hold(name, None if root == "new" else root, _labels(labels))))
        elif command == "hop":
            name, root, started_ms, *labels = args
            tasks.append(asyncio.create_task(hop(name, root, started_ms, _labels(labels))))
        elif command == "graph":
            tasks.append(asyncio.create_task(graph(*args)))
        elif command == "finish":
            finishes.setdefault(args[0], asyncio.Event()).set()
    for task in tasks:
        task.cancel()


asyncio.run(main())
