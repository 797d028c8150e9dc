"""One example agent service; ``AGENT_ROLE`` picks which.

Roles (each a LangGraph graph, served over HTTP with streaming):

- ``supervisor``: runs two branches in parallel, ``agent`` (calls the sub-agent and
  relays its tokens) and ``guardrail`` (cancels the whole run, everywhere, when the
  prompt asks for something forbidden);
- ``sub_agent``: ``research`` (calls the sub-sub-agent and relays its tokens), then
  ``answer`` (its own model);
- ``sub_sub_agent``: ``answer`` (its own model).

Environment: ``AGENT_ROLE``, ``NEXT_AGENT_URL`` (comma-separated replicas of the
next agent; one is picked at random per call), ``MODEL_TOKENS`` (default 50),
``MODEL_INTERVAL`` (seconds, default 0.05). Start it with
``opentelemetry-instrument uvicorn examples.chain.app:app``: the instrumentor puts
the requests and the graph runs in scopes and carries the root to the next agent.

HTTP: ``POST /run`` with ``{"prompt": "..."}`` streams server-sent events
``data: {"agent": ..., "token": ...}``; ``GET /healthz`` answers 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import os
import random
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypedDict

import httpx
from langgraph.config import get_stream_writer
from langgraph.graph import START, StateGraph
from opentelemetry import baggage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

import otel_cancel

from .fake_model import PacedFakeChatModel

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

ROLE = os.environ.get("AGENT_ROLE", "sub_sub_agent")
NEXT_AGENT_URLS = [u.strip() for u in os.environ.get("NEXT_AGENT_URL", "").split(",") if u.strip()]
MODEL = PacedFakeChatModel(
    name=ROLE,
    tokens=int(os.environ.get("MODEL_TOKENS", "50")),
    interval=float(os.environ.get("MODEL_INTERVAL", "0.05")),
)
FORBIDDEN = ("forbidden", "exfiltrate")


class AgentState(TypedDict, total=False):
    prompt: str
    answers: Annotated[list[str], operator.add]


# Per run (by root): set once the next agent streams tokens, so the guardrail can
# trip while the whole chain is busy (what the demo wants to show).
_downstream_streaming: dict[str, asyncio.Event] = {}


def _run_key() -> str:
    return str(baggage.get_baggage("otel_cancel.root"))


def _downstream_event() -> asyncio.Event:
    return _downstream_streaming.setdefault(_run_key(), asyncio.Event())


async def _relay_next_agent(state: AgentState) -> AgentState:
    """Call the next agent over HTTP (streaming) and relay its tokens to our stream."""
    if not NEXT_AGENT_URLS:
        return {"answers": []}
    write = get_stream_writer()
    streaming = _downstream_event()
    url = f"{random.choice(NEXT_AGENT_URLS)}/run"
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5)) as client,
        client.stream("POST", url, json={"prompt": state["prompt"]}) as response,
    ):
        event = "message"
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "otel-cancel":
                    # The next agent's part of this run was cancelled, so this run was:
                    # stop here too, even if the flag has not reached this process yet.
                    raise otel_cancel.Cancelled(data["root"], data["reason"])
                streaming.set()
                write(data)
            elif not line:
                event = "message"
    return {"answers": [f"relayed from {url}"]}


async def _answer(state: AgentState) -> AgentState:
    write = get_stream_writer()
    words = []
    async for chunk in MODEL.astream(state["prompt"]):
        words.append(str(chunk.content))
        write({"agent": ROLE, "token": chunk.content})
    return {"answers": [" ".join(words)]}


async def _guardrail(state: AgentState) -> AgentState:
    prompt = state["prompt"].lower()
    if any(word in prompt for word in FORBIDDEN):
        # The guardrail pattern: stop this run in every service.
        write = get_stream_writer()
        # A real classifier takes a moment; here it decides once the agents downstream
        # are streaming (or after 5 s), so the cancel visibly stops a busy chain.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_downstream_event().wait(), 5)
        write({"agent": ROLE, "token": "[guardrail tripped]"})
        await otel_cancel.cancel_current(reason="guardrail: forbidden request")
    return {"answers": []}


Node = Callable[[AgentState], Awaitable[AgentState]]


def build_graph(role: str, relay: Node = _relay_next_agent, *, guardrail: bool = True) -> Any:
    """The graph of ``role``; ``relay`` calls the next agent (examples.a2a_chain passes its A2A relay)."""
    builder = StateGraph(AgentState)
    if role == "supervisor":
        builder.add_node("agent", relay)
        builder.add_edge(START, "agent")
        if guardrail:
            builder.add_node("guardrail", _guardrail)
            builder.add_edge(START, "guardrail")
    elif role == "sub_agent":
        builder.add_node("research", relay)
        builder.add_node("answer", _answer)
        builder.add_edge(START, "research")
        builder.add_edge("research", "answer")
    else:
        builder.add_node("answer", _answer)
        builder.add_edge(START, "answer")
    return builder.compile(name=role)


GRAPH = build_graph(ROLE)


async def run(request: Request) -> StreamingResponse:
    body = await request.json()
    prompt = str(body.get("prompt", "hello"))

    async def events() -> Any:
        try:
            async for event in GRAPH.astream({"prompt": prompt, "answers": []}, stream_mode="custom"):
                yield f"data: {json.dumps(event)}\n\n"
        finally:
            _downstream_streaming.pop(_run_key(), None)

    return StreamingResponse(events(), media_type="text/event-stream")


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/run", run, methods=["POST"]), Route("/healthz", healthz)])
