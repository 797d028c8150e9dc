"""A graph whose node never awaits: a sync node that stops at ``otel_cancel.check()``.

``task.cancel()`` cannot reach code running in a thread, so sync nodes (and sync model
loops) call :func:`otel_cancel.check` between units of work; a cancelled root then
raises there and the run ends ``interrupted`` like any other. The sub-sub-agent's
deployment serves it as ``sync_answer``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph

import otel_cancel


class AgentState(TypedDict, total=False):
    tag: str
    tokens: int
    interval: float
    produced: int


def say(event: str, state: AgentState, role: str, *extra: object) -> None:
    """One marker line on stdout, as in ``agent.py``."""
    fields = " ".join(str(e) for e in extra)
    sys.stdout.write(f"AGENT {event} {state.get('tag', '-')} {role} {time.time_ns()} {fields}".rstrip() + "\n")
    sys.stdout.flush()


def answer_sync(state: AgentState) -> dict[str, Any]:
    say("START", state, "sync_answer", otel_cancel.current_root() or "-")
    finished = False
    produced = 0
    try:
        for index in range(int(state.get("tokens", 50))):
            time.sleep(float(state.get("interval", 0.05)))
            otel_cancel.check()  # the cooperative stop: raises Cancelled once the root is cancelled
            produced += 1
            say("TOKEN", state, "sync_answer", index)
        finished = True
    finally:
        say("END", state, "sync_answer", "done" if finished else "stopped")
    return {"produced": produced}


builder = StateGraph(AgentState)
builder.add_node("answer_sync", answer_sync)
builder.add_edge(START, "answer_sync")
builder.add_edge("answer_sync", END)
graph = builder.compile()
