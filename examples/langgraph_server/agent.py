"""The three example agents as LangGraph Server deployments; no otel-cancel import here.

Each deployment's ``langgraph.json`` serves one graph of this module as ``agent``:

- ``supervisor``: ``prepare`` (one quick step, so a resumed thread shows where it
  picks up), then in parallel ``agent`` (streams the sub-agent's run through
  ``RemoteGraph``) and ``guardrail`` (stops the whole run with LangGraph's own
  ``runs.cancel`` when the prompt asks for something forbidden);
- ``sub_agent``: ``research``, streaming the sub-sub-agent's run through ``RemoteGraph``;
- ``sub_sub_agent``: ``answer``, a "model" that produces ``tokens`` tokens ``interval``
  seconds apart.

``RemoteGraph`` is used with its default arguments: under ``opentelemetry-instrument``
with otel-cancel installed, the root travels with it, and one cancel (``otel-cancel
cancel``, ``runs.cancel``, a client that leaves) stops every level.

Environment: ``NEXT_AGENT_URL`` (the next deployment; the leaf has none). Every
node prints ``AGENT <event> <tag> <role> <epoch ns> ...`` lines (``START`` with the
root it sees in its baggage, ``TOKEN``, ``END done|stopped``): the demo and the
tests read them.
"""

from __future__ import annotations

import asyncio
import operator
import os
import sys
import time
from typing import Annotated, Any

from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.pregel.remote import RemoteGraph
from opentelemetry import baggage
from typing_extensions import TypedDict

NEXT_AGENT_URL = os.environ.get("NEXT_AGENT_URL", "")
FORBIDDEN = ("forbidden", "exfiltrate")


class AgentState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    """Chat messages: how the A2A endpoint (``/a2a/{assistant_id}``) talks to the supervisor."""
    prompt: str
    tag: str
    tokens: int
    interval: float
    produced: Annotated[int, operator.add]
    prepared: Annotated[int, operator.add]


def say(event: str, state: AgentState, role: str, *extra: object) -> None:
    """One marker line on stdout (the demo and the tests read them)."""
    fields = " ".join(str(e) for e in extra)
    sys.stdout.write(f"AGENT {event} {state.get('tag', '-')} {role} {time.time_ns()} {fields}\n".rstrip() + "\n")
    sys.stdout.flush()


async def _relay(state: AgentState, role: str) -> dict[str, Any]:
    """Stream the next deployment's run (RemoteGraph, default arguments)."""
    say("START", state, role, baggage.get_baggage("otel_cancel.root") or "-")
    finished = False
    produced = 0
    try:
        remote = RemoteGraph("agent", url=NEXT_AGENT_URL)
        payload = {key: state[key] for key in ("prompt", "tag", "tokens", "interval") if key in state}  # type: ignore[literal-required]
        async for _ in remote.astream(payload, stream_mode="values"):
            produced += 1
        finished = True
    finally:
        say("END", state, role, "done" if finished else "stopped")
    return {"produced": produced}


async def answer(state: AgentState) -> dict[str, Any]:
    """The leaf's "model": ``tokens`` tokens, ``interval`` seconds apart."""
    say("START", state, "sub_sub_agent", baggage.get_baggage("otel_cancel.root") or "-")
    finished = False
    produced = 0
    try:
        for index in range(int(state.get("tokens", 50))):
            await asyncio.sleep(float(state.get("interval", 0.05)))
            produced += 1
            say("TOKEN", state, "sub_sub_agent", index)
        finished = True
    finally:
        say("END", state, "sub_sub_agent", "done" if finished else "stopped")
    return {"produced": produced}


async def research(state: AgentState) -> dict[str, Any]:
    return await _relay(state, "sub_agent")


async def agent(state: AgentState) -> dict[str, Any]:
    result = await _relay(state, "supervisor")
    return {**result, "messages": [AIMessage(f"the sub-agents produced {result['produced']} updates")]}


def prepare(state: AgentState) -> dict[str, Any]:
    """The prompt (and tag) from the last chat message when the caller sent messages only (A2A)."""
    update: dict[str, Any] = {"prepared": 1}
    if "prompt" not in state and state.get("messages"):
        text = str(state["messages"][-1].content)
        words = text.split()
        update.update(prompt=text, tag=words[0] if words else "-")
        # "tokens=N" in the message sets the leaf's length (A2A sends text only).
        for word in words:
            if word.startswith("tokens=") and word[7:].isdigit():
                update["tokens"] = int(word[7:])
    say("PREPARE", {**state, **update}, "supervisor")  # type: ignore[typeddict-item]
    return update


async def guardrail(state: AgentState, config: RunnableConfig) -> dict[str, Any]:
    """Stop the whole run, in every deployment, when the prompt asks for something forbidden."""
    if any(word in state.get("prompt", "").lower() for word in FORBIDDEN):
        from langgraph_sdk import get_client

        configurable, metadata = config.get("configurable", {}), config.get("metadata", {})
        thread_id = configurable.get("thread_id") or metadata.get("thread_id")
        run_id = configurable.get("run_id") or metadata.get("run_id")
        say("GUARDRAIL", state, "supervisor")
        # LangGraph's own cancel of this very run (get_client() with no URL talks to
        # this server in-process): otel-cancel carries it to every level.
        await get_client().runs.cancel(thread_id, run_id, wait=False)
    return {}


def _single(name: str, node: Any) -> Any:
    builder = StateGraph(AgentState)
    builder.add_node(name, node)
    builder.add_edge(START, name)
    builder.add_edge(name, END)
    return builder.compile()


def _supervisor() -> Any:
    builder = StateGraph(AgentState)
    builder.add_node("prepare", prepare)
    builder.add_node("agent", agent)
    builder.add_node("guardrail", guardrail)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "agent")
    builder.add_edge("prepare", "guardrail")
    builder.add_edge("agent", END)
    builder.add_edge("guardrail", END)
    return builder.compile()


supervisor = _supervisor()
sub_agent = _single("research", research)
sub_sub_agent = _single("answer", answer)
