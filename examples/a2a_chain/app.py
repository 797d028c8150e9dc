"""One example agent speaking A2A (``a2a-sdk``); ``AGENT_ROLE`` picks which.

The same supervisor -> sub-agent -> sub-sub-agent chain as ``examples.chain`` (its
graphs, model and settings, without the guardrail), with A2A between the agents
instead of plain REST. Each agent is a LangGraph graph
behind an A2A ``AgentExecutor``; tokens stream to the caller as artifact chunks:

- ``supervisor``: ``agent`` (sends the prompt to the sub-agent over A2A, streaming,
  and relays its tokens);
- ``sub_agent``: ``research`` (the same, to the sub-sub-agent), then ``answer`` (its
  own model);
- ``sub_sub_agent``: ``answer`` (its own model).

otel-cancel comes in through :mod:`otel_cancel.a2a`: the executor is wrapped in
``CancellableAgentExecutor`` and the request handler in ``CancellableRequestHandler``,
so a cancel-task call on any replica of any agent stops the whole run everywhere
and the task ends ``canceled`` with the reason. Started with
``opentelemetry-instrument uvicorn examples.a2a_chain.app:app``, the instrumentor
adds the middleware (in its A2A mode) and carries the root on every A2A call.

Environment: ``AGENT_ROLE``, ``AGENT_URL`` (this replica's URL, for its agent card;
default ``http://127.0.0.1:8000/``), ``NEXT_AGENT_URL`` (comma-separated replicas of
the next agent; one is picked at random per call), ``NEXT_AGENT_STREAMING``
(``false`` calls the next agent with a plain ``SendMessage`` instead of
``SendStreamingMessage``), ``MODEL_TOKENS`` (default 50), ``MODEL_INTERVAL``
(seconds, default 0.05).

HTTP: A2A JSON-RPC at ``/`` (``SendMessage``, ``SendStreamingMessage``, ``GetTask``,
``CancelTask``; 0.3 clients too), the agent card at ``/.well-known/agent-card.json``,
``GET /healthz``.
"""

from __future__ import annotations

import contextlib
import os
import random
import uuid
from collections.abc import AsyncIterator

import httpx
from a2a.client import ClientConfig, ClientFactory
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events.event_queue import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Message,
    Part,
    Role,
    SendMessageRequest,
    Task,
    TaskState,
    TaskStatus,
)
from langgraph.config import get_stream_writer
from starlette.applications import Starlette
from starlette.routing import Route

import otel_cancel
from otel_cancel.a2a import CancellableAgentExecutor, CancellableRequestHandler

from ..chain.app import NEXT_AGENT_URLS, ROLE, AgentState, build_graph, healthz

AGENT_URL = os.environ.get("AGENT_URL", "http://127.0.0.1:8000/")


def agent_card(url: str, name: str) -> AgentCard:
    """The card of one example agent at ``url`` (JSON-RPC, streaming)."""
    return AgentCard(
        name=name,
        description=f"otel-cancel example agent ({name})",
        version="0.1.0",
        supported_interfaces=[AgentInterface(protocol_binding="JSONRPC", protocol_version="1.0", url=url)],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id=name, name=name, description="answers a prompt, token by token", tags=["example"])],
    )


# -- the graph -----------------------------------------------------------------------------


_http = httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5))
# SendStreamingMessage by default; NEXT_AGENT_STREAMING=false makes the hop a plain
# SendMessage that answers once, with the whole task (as a "sub-agent as a tool" call).
_STREAMING = os.environ.get("NEXT_AGENT_STREAMING", "true").strip().lower() not in ("false", "0", "no")
_clients = ClientFactory(ClientConfig(streaming=_STREAMING, httpx_client=_http))


def _stop_if_cancelled(status: TaskStatus) -> None:
    if status.state == TaskState.TASK_STATE_CANCELED:
        # The next agent's part of this run was cancelled, so this run was: stop here
        # too, even if the flag has not reached this process yet.
        reason = dict(status.message.metadata.items()).get("otel_cancel.reason", "next agent cancelled")
        raise otel_cancel.Cancelled(str(otel_cancel.current_root()), str(reason))


async def _relay_next_agent(state: AgentState) -> AgentState:
    """Send the prompt to the next agent over A2A and relay its tokens."""
    if not NEXT_AGENT_URLS:
        return {"answers": []}
    write = get_stream_writer()
    url = random.choice(NEXT_AGENT_URLS)
    client = _clients.create(agent_card(url, "next"))
    message = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=[Part(text=state["prompt"])])
    async with contextlib.aclosing(client.send_message(SendMessageRequest(message=message))) as events:
        async for event in events:
            if event.HasField("status_update"):
                _stop_if_cancelled(event.status_update.status)
            artifacts = [event.artifact_update.artifact] if event.HasField("artifact_update") else []
            if event.HasField("task"):  # the plain call's one answer (or a stream's first event)
                _stop_if_cancelled(event.task.status)
                artifacts = list(event.task.artifacts)
            for artifact in artifacts:
                for part in artifact.parts:
                    write({"agent": str(artifact.metadata["agent"]), "token": part.text})
    return {"answers": [f"relayed from {url}"]}


GRAPH = build_graph(ROLE, _relay_next_agent, guardrail=False)


# -- the A2A agent -------------------------------------------------------------------------


class ChainAgentExecutor(AgentExecutor):
    """Runs the graph for each message; every token becomes an artifact chunk."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id, context_id = context.task_id or "", context.context_id or ""
        if context.current_task is None:
            history = [context.message] if context.message is not None else []
            submitted = TaskStatus(state=TaskState.TASK_STATE_SUBMITTED)
            await event_queue.enqueue_event(Task(id=task_id, context_id=context_id, status=submitted, history=history))
        updater = TaskUpdater(event_queue, task_id, context_id)
        await updater.start_work()
        artifact_id = uuid.uuid4().hex
        first = True
        async for event in GRAPH.astream({"prompt": context.get_user_input(), "answers": []}, stream_mode="custom"):
            await updater.add_artifact(
                [Part(text=str(event["token"]))],
                artifact_id=artifact_id,
                metadata={"agent": event["agent"]},
                append=not first,
            )
            first = False
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        # Called only for a task not executing here (CancellableAgentExecutor stops
        # executing ones through their scope): nothing runs, just close it.
        await TaskUpdater(event_queue, context.task_id or "", context.context_id or "").cancel()


CARD = agent_card(AGENT_URL, ROLE)
_handler = DefaultRequestHandler(CancellableAgentExecutor(ChainAgentExecutor()), InMemoryTaskStore(), CARD)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    await _handler.aclose()
    await _http.aclose()


app = Starlette(
    routes=[
        *create_agent_card_routes(CARD),
        *create_jsonrpc_routes(CancellableRequestHandler(_handler), "/", enable_v0_3_compat=True),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
)
