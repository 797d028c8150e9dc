"""In-process logic of otel_cancel.a2a: what the adapters publish and record (memory store).

Propagation and cancel across processes are shown in test_a2a.py on real services.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Iterator

import pytest
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event, EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    CancelTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    Task,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import TaskNotCancelableError
from starlette.applications import Starlette
from starlette.routing import Mount, Route

import otel_cancel
from otel_cancel._core.records import TaskRecord
from otel_cancel._core.root import random_root
from otel_cancel.exceptions import ConfigurationError, StoreUnavailableError
from otel_cancel.integrations import a2a
from otel_cancel.integrations.a2a import (
    DEFAULT_REASON,
    CancellableAgentExecutor,
    CancellableRequestHandler,
    _reason_of,
    is_a2a_app,
    warn_if_not_cancellable,
)
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio
TIMEOUT = 10


class RecordingQueue(EventQueue):
    """An event queue that keeps what the executor enqueued."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.changed = asyncio.Event()

    async def enqueue_event(self, event: Event) -> None:
        self.events.append(event)
        self.changed.set()


class ScriptedAgent(AgentExecutor):
    """Creates its task (or answers with a message), then waits, or finishes, as told."""

    def __init__(self, *, create_task: bool = True, answer_with_message: bool = False, finish: bool = False) -> None:
        self.create_task = create_task
        self.answer_with_message = answer_with_message
        self.finish = finish
        self.busy = asyncio.Event()
        self.release = asyncio.Event()
        self.cancel_calls = 0

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id, context_id = context.task_id or "", context.context_id or ""
        if self.answer_with_message:
            await event_queue.enqueue_event(Message(message_id="m", role=Role.ROLE_AGENT, parts=[Part(text="hi")]))
        elif self.create_task:
            working = TaskStatus(state=TaskState.TASK_STATE_WORKING)
            await event_queue.enqueue_event(Task(id=task_id, context_id=context_id, status=working))
        if self.finish:
            done = TaskStatus(state=TaskState.TASK_STATE_COMPLETED)
            await event_queue.enqueue_event(TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=done))
        self.busy.set()
        await self.release.wait()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.cancel_calls += 1


@pytest.fixture
def store() -> MemoryCancelStore:
    return MemoryCancelStore()


@pytest.fixture
def runtime(store: MemoryCancelStore) -> Iterator[object]:
    with configured(store=store, service="agent", instance="a1") as runtime:
        yield runtime


def _context(task_id: str | None = None) -> RequestContext:
    message = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=[Part(text="go")])
    return RequestContext(
        call_context=ServerCallContext(),
        request=SendMessageRequest(message=message),
        task_id=task_id or str(uuid.uuid4()),
    )


async def _run_until_busy(
    executor: CancellableAgentExecutor, agent: ScriptedAgent, context: RequestContext, queue: RecordingQueue
) -> asyncio.Task[None]:
    running = asyncio.create_task(executor.execute(context, queue))
    await asyncio.wait_for(agent.busy.wait(), TIMEOUT)
    return running


async def _cancel_root_of(context: RequestContext, store: MemoryCancelStore, reason: str) -> None:
    record = await store.get_task(context.task_id or "")
    assert record is not None
    await otel_cancel.cancel(record.root, reason=reason)


async def test_a_cancelled_task_ends_canceled_with_reason_and_root(runtime, store):
    """Cancelling the root of a running task publishes one final `canceled` status naming reason and root."""
    agent, queue, context = ScriptedAgent(), RecordingQueue(), _context()
    running = await _run_until_busy(CancellableAgentExecutor(agent), agent, context, queue)
    await _recorded(store, context.task_id or "")
    await _cancel_root_of(context, store, "stop it")
    await asyncio.wait_for(running, TIMEOUT)  # execute() returns normally: the task is answered
    final = queue.events[-1]
    assert isinstance(final, TaskStatusUpdateEvent)
    assert final.status.state == TaskState.TASK_STATE_CANCELED
    assert final.status.message.parts[0].text == "cancelled: stop it"
    assert final.status.message.metadata["otel_cancel.reason"] == "stop it"
    assert len(queue.events) == 2


async def _recorded(store: MemoryCancelStore, task_id: str) -> TaskRecord:
    """The task's record, once its write (on the IO loop, not awaited by the task) completed."""
    write = a2a._running()[task_id].record_write
    assert write is not None
    await asyncio.wait_for(asyncio.wrap_future(write), TIMEOUT)
    record = await store.get_task(task_id)
    assert record is not None
    return record


async def test_a_task_stopped_before_the_agent_created_it_is_born_canceled(runtime, store):
    """When the agent had not enqueued its task yet, the adapter enqueues the task itself, already canceled."""
    agent, queue, context = ScriptedAgent(create_task=False), RecordingQueue(), _context()
    running = await _run_until_busy(CancellableAgentExecutor(agent), agent, context, queue)
    await _recorded(store, context.task_id or "")
    await _cancel_root_of(context, store, "early")
    await asyncio.wait_for(running, TIMEOUT)
    (born,) = queue.events
    assert isinstance(born, Task) and born.id == context.task_id
    assert born.status.state == TaskState.TASK_STATE_CANCELED
    assert born.history[0].parts[0].text == "go"


@pytest.mark.parametrize(
    "agent",
    [ScriptedAgent(finish=True), ScriptedAgent(answer_with_message=True)],
    ids=["completed", "answered-with-a-message"],
)
async def test_an_answered_task_is_not_overwritten(runtime, store, agent):
    """A cancel arriving after the agent completed (or answered with a Message) adds no second final event."""
    queue, context = RecordingQueue(), _context()
    running = await _run_until_busy(CancellableAgentExecutor(agent), agent, context, queue)
    before = list(queue.events)
    await _recorded(store, context.task_id or "")
    await _cancel_root_of(context, store, "too late")
    await asyncio.wait_for(running, TIMEOUT)
    assert queue.events == before


async def test_executor_cancel_writes_the_flag_and_waits_for_the_task_to_end(runtime, store):
    """The SDK's cancel path (executor.cancel) cancels the task's root and returns once the task ended."""
    agent, queue, context = ScriptedAgent(), RecordingQueue(), _context()
    executor = CancellableAgentExecutor(agent)
    running = await _run_until_busy(executor, agent, context, queue)
    record = await _recorded(store, context.task_id or "")
    await asyncio.wait_for(executor.cancel(context, RecordingQueue()), TIMEOUT)
    assert running.done()
    flag = await store.get_flag(record.root)
    assert flag is not None and flag.reason == DEFAULT_REASON
    assert agent.cancel_calls == 0  # an executing task stops through its scope


async def test_executor_cancel_of_a_task_not_executing_here_asks_the_agent(runtime):
    """For a task not executing in this process the agent's own cancel() runs."""
    agent = ScriptedAgent()
    await CancellableAgentExecutor(agent).cancel(_context(), RecordingQueue())
    assert agent.cancel_calls == 1


async def test_the_task_record_is_removed_when_the_execution_ends(runtime, store):
    """The record under {prefix}tasks/ lives as long as the execution."""
    agent, queue, context = ScriptedAgent(finish=True), RecordingQueue(), _context()
    running = await _run_until_busy(CancellableAgentExecutor(agent), agent, context, queue)
    record = await _recorded(store, context.task_id or "")
    assert (record.service, record.instance, record.task_id) == ("agent", "a1", context.task_id)
    entry = a2a._running()[record.task_id]
    agent.release.set()
    await asyncio.wait_for(running, TIMEOUT)
    assert entry.record_removal is not None and record.task_id not in a2a._running()
    await asyncio.wait_for(asyncio.wrap_future(entry.record_removal), TIMEOUT)
    assert await store.get_task(record.task_id) is None


class SlowTaskStore(MemoryCancelStore):
    """A store whose task-record write lands only once the agent is announcing its task."""

    def __init__(self) -> None:
        super().__init__()
        self.announcing = threading.Event()

    async def put_task(self, record: TaskRecord, ttl_seconds: int) -> int:
        await asyncio.to_thread(self.announcing.wait, TIMEOUT)
        return await super().put_task(record, ttl_seconds)


class AnnouncingAgent(ScriptedAgent):
    """Says (to the slow store) when it is about to enqueue its task, then does."""

    def __init__(self, store: SlowTaskStore) -> None:
        super().__init__()
        self.store = store

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.store.announcing.set()
        await super().execute(context, event_queue)


class RecordCheckingQueue(RecordingQueue):
    """Notes, for each event, whether the task's record was in the store when the event went out."""

    def __init__(self, store: MemoryCancelStore, task_id: str) -> None:
        super().__init__()
        self.store, self.task_id = store, task_id
        self.recorded: list[bool] = []

    async def enqueue_event(self, event: Event) -> None:
        self.recorded.append(await self.store.get_task(self.task_id) is not None)
        await super().enqueue_event(event)


async def test_the_event_that_names_the_task_waits_until_its_record_is_in_the_store():
    """A caller learns the task id only once another replica could find the task (no window for cancel-task)."""
    store = SlowTaskStore()
    with configured(store=store, service="agent", instance="a1") as runtime:
        runtime.start()  # as when the service starts serving
        assert await asyncio.to_thread(runtime.watcher.wait_connected, True, TIMEOUT)
        context = _context()
        agent, queue = AnnouncingAgent(store), RecordCheckingQueue(store, context.task_id or "")
        running = await _run_until_busy(CancellableAgentExecutor(agent), agent, context, queue)
        agent.release.set()
        await asyncio.wait_for(running, TIMEOUT)
    assert queue.recorded == [True]


class FailingTaskStore(MemoryCancelStore):
    """A store whose task records cannot be written (as under a role without tasks/ permission)."""

    async def put_task(self, record: TaskRecord, ttl_seconds: int) -> int:
        raise StoreUnavailableError("refused")


async def test_a_record_that_cannot_be_written_is_logged_once_and_the_task_still_stops(caplog):
    """A failed record write logs one warning; the task runs, and a cancel still stops it in this process."""
    store = FailingTaskStore()
    with configured(store=store, service="agent", instance="a1"), caplog.at_level(logging.WARNING, "otel_cancel"):
        agent, queue, context = ScriptedAgent(), RecordingQueue(), _context()
        executor = CancellableAgentExecutor(agent)
        running = await _run_until_busy(executor, agent, context, queue)
        await asyncio.wait_for(executor.cancel(context, RecordingQueue()), TIMEOUT)
        await asyncio.wait_for(running, TIMEOUT)
    assert queue.events[-1].status.state == TaskState.TASK_STATE_CANCELED
    assert [r for r in caplog.records if "task record" in r.getMessage()]


async def test_a_task_id_that_cannot_name_a_key_is_run_but_not_recorded(runtime, store, caplog):
    """A task id with a slash runs normally, unrecorded, with one log line."""
    agent, queue = ScriptedAgent(finish=True), RecordingQueue()
    context = _context(task_id="../flags/escape")
    with caplog.at_level(logging.WARNING, "otel_cancel"):
        running = await _run_until_busy(CancellableAgentExecutor(agent), agent, context, queue)
        agent.release.set()
        await asyncio.wait_for(running, TIMEOUT)
    assert queue.events[-1].status.state == TaskState.TASK_STATE_COMPLETED
    assert any("not a usable task id" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("state", "answered"), [(TaskState.TASK_STATE_CANCELED, True), (TaskState.TASK_STATE_COMPLETED, False)]
)
async def test_cancel_task_on_a_replica_sharing_the_task_store_answers_what_the_task_became(
    runtime, store, state, answered
):
    """Via a shared task store: a task saved canceled already is answered so; a completed one is not cancelable."""
    task_id, context_id, root = str(uuid.uuid4()), str(uuid.uuid4()), random_root()
    tasks = InMemoryTaskStore()
    # What the replica running the task left: its record, and the task as it ended.
    await store.put_task(TaskRecord(task_id, root, context_id, "agent", "a0", 1), 60)
    await tasks.save(Task(id=task_id, context_id=context_id, status=TaskStatus(state=state)), ServerCallContext())
    other_replica = CancellableRequestHandler(
        DefaultRequestHandler(CancellableAgentExecutor(ScriptedAgent()), tasks, _card())
    )
    request = CancelTaskRequest(id=task_id)
    if answered:
        task = await other_replica.on_cancel_task(request, ServerCallContext())
        assert task is not None and task.id == task_id and task.status.state == TaskState.TASK_STATE_CANCELED
    else:
        with pytest.raises(TaskNotCancelableError):
            await other_replica.on_cancel_task(request, ServerCallContext())


def test_reasons_come_from_metadata_and_bad_ones_fall_back():
    """metadata.reason is the reason; a missing, empty or non-string one gives the default."""
    request = CancelTaskRequest(id="t")
    assert _reason_of(request) == DEFAULT_REASON
    request.metadata.update({"reason": "the user left"})
    assert _reason_of(request) == "the user left"
    for bad in (42, "", "   ", ["x"]):
        request.metadata.update({"reason": bad})
        assert _reason_of(request) == DEFAULT_REASON
    request.metadata.update({"reason": "x" * 2000})
    assert len(_reason_of(request)) == 512


def _card() -> AgentCard:
    return AgentCard(
        name="unit",
        supported_interfaces=[AgentInterface(protocol_binding="JSONRPC", protocol_version="1.0", url="http://x/")],
        capabilities=AgentCapabilities(streaming=True),
    )


def test_the_request_handler_refuses_an_unwrapped_executor():
    """Wrapping the handler but not the executor is a configuration error that says what to do."""
    with pytest.raises(ConfigurationError, match="CancellableAgentExecutor"):
        CancellableRequestHandler(DefaultRequestHandler(ScriptedAgent(), InMemoryTaskStore(), _card()))


def test_a2a_apps_are_recognised_mounted_or_not():
    """Apps with a2a-sdk routes (JSON-RPC, card; also under a Mount) are A2A apps; plain apps are not."""
    handler = CancellableRequestHandler(
        DefaultRequestHandler(CancellableAgentExecutor(ScriptedAgent()), InMemoryTaskStore(), _card())
    )
    a2a_routes = [*create_agent_card_routes(_card()), *create_jsonrpc_routes(handler, "/")]

    async def plain(request):  # type: ignore[no-untyped-def]
        return None

    assert is_a2a_app(Starlette(routes=a2a_routes))
    assert is_a2a_app(Starlette(routes=[Mount("/agent", routes=a2a_routes)]))
    assert not is_a2a_app(Starlette(routes=[Route("/run", plain)]))


def test_an_a2a_app_with_an_unwrapped_handler_is_reported(caplog):
    """The instrumentor's check names an A2A app whose request handler is not wrapped; a wrapped one passes."""
    plain = DefaultRequestHandler(ScriptedAgent(), InMemoryTaskStore(), _card())
    wrapped = CancellableRequestHandler(
        DefaultRequestHandler(CancellableAgentExecutor(ScriptedAgent()), InMemoryTaskStore(), _card())
    )
    with caplog.at_level(logging.WARNING, "otel_cancel"):
        assert warn_if_not_cancellable(Starlette(routes=create_jsonrpc_routes(plain, "/")))
        assert not warn_if_not_cancellable(Starlette(routes=create_jsonrpc_routes(wrapped, "/")))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "otel_cancel.a2a"]
    assert "DefaultRequestHandlerV2" in line and "CancellableRequestHandler" in line
