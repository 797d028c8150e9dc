"""The A2A scenario of ``otel-cancel demo --a2a``: cancel-task on the replica that is not running the task.

Needs the ``a2a`` extra (``a2a-sdk``); :mod:`otel_cancel.demo` imports this module only
when asked for the A2A chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

import httpx
from a2a.client import Client, ClientConfig, ClientFactory
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    CancelTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    TaskState,
)
from a2a.utils.errors import A2AError

TOKENS_BEFORE_CANCEL = 8
STREAM_TIMEOUT = 60.0


@dataclasses.dataclass
class CancelTaskOutcome:
    """What the caller saw when its task was cancelled from the other replica."""

    root: str
    task_id: str
    answered_canceled: bool
    """The cancel-task call answered with the task in state ``canceled``."""
    stream_ended_canceled: bool
    """The caller's stream ended by itself, its last event saying ``canceled``."""
    cancel_answer_ms: float
    """From sending cancel-task to its answer."""
    stream_end_ms: float
    """From sending cancel-task to the end of the caller's stream."""


@contextlib.asynccontextmanager
async def a2a_client(url: str, responses: list[httpx.Response] | None = None) -> AsyncIterator[Client]:
    """A streaming A2A client of the agent at ``url``; its HTTP responses are appended to ``responses``."""

    async def keep(response: httpx.Response) -> None:
        if responses is not None:
            responses.append(response)

    async with httpx.AsyncClient(timeout=STREAM_TIMEOUT, event_hooks={"response": [keep]}) as http:
        card = AgentCard(
            name="otel-cancel demo",
            supported_interfaces=[AgentInterface(protocol_binding="JSONRPC", protocol_version="1.0", url=f"{url}/")],
            capabilities=AgentCapabilities(streaming=True),
        )
        yield ClientFactory(ClientConfig(streaming=True, httpx_client=http)).create(card)


def task_id_of(event: StreamResponse) -> str:
    """The id of the task a stream event is about."""
    if event.HasField("task"):
        return event.task.id
    if event.HasField("status_update"):
        return event.status_update.task_id
    return event.artifact_update.task_id if event.HasField("artifact_update") else ""


async def cancel_task_midway(
    stream_url: str, cancel_url: str, prompt: str, reason: str = "user clicked stop"
) -> CancelTaskOutcome:
    """Stream ``prompt`` from the agent at ``stream_url``; midway, send cancel-task to ``cancel_url``."""
    responses: list[httpx.Response] = []
    async with a2a_client(stream_url, responses) as client, a2a_client(cancel_url) as canceller:
        message = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=[Part(text=prompt)])
        events = client.send_message(SendMessageRequest(message=message))
        task_id, tokens = "", 0
        async for event in events:
            task_id = task_id or task_id_of(event)
            tokens += len(event.artifact_update.artifact.parts) if event.HasField("artifact_update") else 0
            if tokens >= TOKENS_BEFORE_CANCEL:
                break
        root = responses[0].headers["otel-cancel-root"]
        cancel = CancelTaskRequest(id=task_id)
        cancel.metadata.update({"reason": reason})
        sent = time.perf_counter()
        answered = await canceller.cancel_task(cancel)
        answered_at = time.perf_counter()
        async with asyncio.timeout(STREAM_TIMEOUT):
            rest = [event async for event in events]
        ended_at = time.perf_counter()
    last = rest[-1] if rest else None
    return CancelTaskOutcome(
        root=root,
        task_id=task_id,
        answered_canceled=answered.status.state == TaskState.TASK_STATE_CANCELED,
        stream_ended_canceled=last is not None
        and last.HasField("status_update")
        and last.status_update.status.state == TaskState.TASK_STATE_CANCELED,
        cancel_answer_ms=(answered_at - sent) * 1000,
        stream_end_ms=(ended_at - sent) * 1000,
    )


def cancel_task_from_the_other_replica(supervisor_urls: list[str], prompt: str) -> CancelTaskOutcome:
    """Stream ``prompt`` from the first supervisor replica; send cancel-task to the second midway."""
    running_here, elsewhere = supervisor_urls[:2]
    try:
        return asyncio.run(cancel_task_midway(running_here, elsewhere, prompt))
    except A2AError as error:  # the demo reports failures in one line
        raise RuntimeError(f"A2A call failed: {type(error).__name__}: {error}") from error
