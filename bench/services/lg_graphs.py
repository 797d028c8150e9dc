"""A LangGraph graph for ``langgraph dev``: one level of a chain of deployments.

No otel-cancel here: this is LangGraph's own cancel, for comparison.

Environment (of the ``langgraph dev`` process):
    LG_LEVEL          this deployment's level (0 = the one the client calls)
    LG_NEXT_URL       the next deployment's URL (empty: the leaf)
    LG_ON_DISCONNECT  ``default``: call the next deployment the way ``RemoteGraph``
                      does by itself; ``cancel``: pass ``on_disconnect="cancel"`` so
                      the next deployment cancels its run when this one stops reading

State: ``run`` (an id every level logs), ``tokens``, ``interval``. The node
``work`` streams the next deployment's run through ``RemoteGraph`` (non-leaf
levels), then "generates" ``tokens`` tokens ``interval`` seconds apart. It prints
``LGBENCH START <run> <level> <t_ns>`` and ``LGBENCH END <run> <level> <t_ns>
<done|stopped>`` (``time.time_ns()``, one clock for every process).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.pregel.remote import RemoteGraph

LEVEL = os.environ.get("LG_LEVEL", "0")
NEXT_URL = os.environ.get("LG_NEXT_URL", "")
ON_DISCONNECT = os.environ.get("LG_ON_DISCONNECT", "default")


class State(TypedDict, total=False):
    run: str
    tokens: int
    interval: float
    produced: int


def _log(event: str, run: str, extra: str = "") -> None:
    sys.stdout.write(f"LGBENCH {event} {run} {LEVEL} {time.time_ns()}{extra}\n")
    sys.stdout.flush()


async def work(state: State) -> dict[str, Any]:
    run = state.get("run", "?")
    tokens = int(state.get("tokens", 50))
    interval = float(state.get("interval", 0.1))
    _log("START", run)
    finished = False
    produced = 0
    try:
        if NEXT_URL:
            remote = RemoteGraph("agent", url=NEXT_URL)
            extra = {"on_disconnect": "cancel"} if ON_DISCONNECT == "cancel" else {}
            async for _ in remote.astream(
                {"run": run, "tokens": tokens, "interval": interval}, stream_mode="values", **extra
            ):
                produced += 1
        for _ in range(tokens):
            await asyncio.sleep(interval)
            produced += 1
        finished = True
    finally:
        _log("END", run, " done" if finished else " stopped")
    return {"produced": produced}


builder = StateGraph(State)
builder.add_node("work", work)
builder.add_edge(START, "work")
builder.add_edge("work", END)
graph = builder.compile()
