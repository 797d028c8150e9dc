"""A2A agents (``a2a-sdk``): every task in a scope, cancel-task as a distributed cancel.

An A2A server built with ``a2a-sdk`` gets otel-cancel in three parts:

- :class:`CancellableAgentExecutor` wraps the agent's executor. Each execution
  runs in a scope for the root that came with the request (in baggage), so the
  flag for that root stops it, and the A2A client calls it makes (httpx, plain
  and streaming) carry the root on. A stopped task ends in the protocol's
  ``canceled`` state, with the reason in its status message. The executor also
  records which root the task runs under, in this process and in the store
  (``{prefix}tasks/{task_id}``, on a TTL lease, removed when the execution ends).
- :class:`CancellableRequestHandler` wraps the request handler. A cancel-task
  call (``CancelTask``; ``tasks/cancel`` for 0.3 clients) on *any* replica writes
  the flag for the task's root: the task stops wherever it runs, and so does
  everything it called downstream. The reason is taken from the call's
  ``metadata.reason``.
- :class:`~otel_cancel.integrations.asgi.CancelMiddleware` with ``run_in_scope=False`` in
  front of the A2A routes (the instrumentor picks that mode by itself for apps
  with a2a-sdk routes): it establishes the root but leaves stopping to the
  executor, so a cancelled call still gets a well-formed A2A answer (a task in
  state ``canceled``; a stream whose last event says so) instead of a 409.

Cancelling a task cancels its *root*: the whole run it belongs to. That is the
point when the supervisor's task is cancelled; a caller inside the run that
sends cancel-task for one sub-task stops the run too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events.event_queue import Event, EventQueue
from a2a.server.request_handlers import RequestHandler
from a2a.types import a2a_pb2
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError
from google.protobuf import json_format

from .. import attributes
from .._core.labels import usable_labels
from .._core.process_state import ProcessState, get_process_state
from .._core.rate_limited_log import RateLimitedLogger
from .._core.records import MAX_TEXT, TaskRecord
from .._core.scope import cancel, scope
from ..exceptions import Cancelled, ConfigurationError, InvalidTaskIdError, StoreError
from ..store._keys import validate_task_id

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from a2a.server.context import ServerCallContext

__all__ = (
    "DEFAULT_REASON",
    "CancellableAgentExecutor",
    "CancellableRequestHandler",
    "is_a2a_app",
    "warn_if_not_cancellable",
)

_log = logging.getLogger("otel_cancel.a2a")
_rate_limited = RateLimitedLogger(_log)

DEFAULT_REASON = "a2a cancel-task"
"""The reason of a cancel-task call that gives none in ``metadata.reason``."""
STOP_WAIT_SECONDS = 10.0
"""How long a cancel-task call waits for a task running here to end before answering."""
RECORD_WAIT_SECONDS = 2.0
"""How long a task's first event waits for its record to be in the store (etcd connected)."""

_TERMINAL = frozenset(
    {
        a2a_pb2.TASK_STATE_COMPLETED,
        a2a_pb2.TASK_STATE_CANCELED,
        a2a_pb2.TASK_STATE_FAILED,
        a2a_pb2.TASK_STATE_REJECTED,
    }
)

# The reason of the cancel-task call being handled (read by the executor's cancel()).
_cancel_reason: contextvars.ContextVar[str] = contextvars.ContextVar("otel_cancel_a2a_reason", default=DEFAULT_REASON)


@dataclasses.dataclass
class _RunningTask:
    """A task executing in this process."""

    task_id: str
    root: str
    stopped: asyncio.Event
    runtime: ProcessState
    """The process state the task started under (its table holds the task)."""
    record_write: concurrent.futures.Future[int] | None = None
    record_removal: concurrent.futures.Future[None] | None = None


def _running() -> dict[str, _RunningTask]:
    """Task id -> the execution running it here, in the process state (``configure()`` and
    ``reset()`` replace it with everything else). Task ids are unique per agent; one process
    may serve several agents, which share this table."""
    table: dict[str, _RunningTask] = get_process_state().running_tasks
    return table


# -- the task records in the store ----------------------------------------------------------


async def _put_record(runtime: ProcessState, record: TaskRecord) -> int:
    store = await runtime.watcher.store()
    return await store.put_task(record, runtime.settings.ttl_seconds)


async def _delete_record(runtime: ProcessState, task_id: str, written: concurrent.futures.Future[int]) -> None:
    try:
        revision = await asyncio.wrap_future(written)
    except Exception:  # already logged when the write failed
        return
    store = await runtime.watcher.store()
    await store.delete_task(task_id, revision)


async def _get_record(runtime: ProcessState, task_id: str) -> TaskRecord | None:
    store = await runtime.watcher.store()
    return await store.get_task(task_id)


def _log_store_failure(what: str, consequence: str, future: concurrent.futures.Future[Any]) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        _rate_limited.warning(f"a2a {what}", "otel-cancel: %s failed (%s); %s", what, error, consequence)


def _started(task_id: str, root: str, context_id: str) -> _RunningTask:
    runtime = get_process_state()
    running = _RunningTask(task_id, root, asyncio.Event(), runtime)
    runtime.running_tasks[task_id] = running
    try:
        validate_task_id(task_id)
    except InvalidTaskIdError as error:
        _rate_limited.warning("a2a task id", "otel-cancel: task not recorded in the store: %s", error)
        return running
    settings = runtime.settings
    record = TaskRecord(task_id, root, context_id[:MAX_TEXT], settings.service, settings.instance, time.time_ns())
    # Not awaited here: the agent starts at once, and the write runs beside it. The
    # task's first event waits for it (see _ObservedQueue): a caller learns the task
    # id from that event, so any replica it sends cancel-task to finds the record.
    running.record_write = runtime.watcher.submit(_put_record(runtime, record))
    running.record_write.add_done_callback(
        lambda future: _log_store_failure(
            "writing the task record", "a cancel-task call on another replica will not find this task", future
        )
    )
    return running


def _finished(running: _RunningTask) -> None:
    runtime = running.runtime
    if runtime.running_tasks.get(running.task_id) is running:
        del runtime.running_tasks[running.task_id]
    running.stopped.set()
    if running.record_write is not None:
        removal = runtime.watcher.submit(_delete_record(runtime, running.task_id, running.record_write))
        removal.add_done_callback(
            lambda future: _log_store_failure("removing the task record", "it expires with its lease", future)
        )
        running.record_removal = removal


# -- ending a cancelled task in the protocol ---------------------------------------------------


class _ObservedQueue(EventQueue):
    """The executor's event queue, noting what the agent already told its caller."""

    def __init__(self, queue: EventQueue) -> None:
        self._queue = queue
        self.task_known = False
        self.terminal = False
        self.answered_with_message = False
        self.running: _RunningTask | None = None

    async def enqueue_event(self, event: Event) -> None:
        if not self.task_known and not isinstance(event, a2a_pb2.Message):
            await self._record_written()
        await self._queue.enqueue_event(event)
        if isinstance(event, a2a_pb2.Message):
            self.answered_with_message = True
            return
        self.task_known = True
        if isinstance(event, a2a_pb2.Task | a2a_pb2.TaskStatusUpdateEvent) and event.status.state in _TERMINAL:
            self.terminal = True

    async def _record_written(self) -> None:
        """Hold the event that names the task until the task's record is in the store.

        Bounded, and skipped while the watcher is disconnected: with etcd down the
        write cannot land, and the agent's answer matters more than a record.
        """
        write = self.running.record_write if self.running is not None else None
        if write is None or write.done() or not get_process_state().watcher.connected:
            return
        # A failed or slow write is logged by its own callback.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(write)), RECORD_WAIT_SECONDS)


def _cancelled_status(task_id: str, context_id: str, root: str, reason: str) -> a2a_pb2.TaskStatus:
    metadata = {attributes.ROOT: root, attributes.REASON: reason}
    message = a2a_pb2.Message(
        message_id=uuid.uuid4().hex,
        task_id=task_id,
        context_id=context_id,
        role=a2a_pb2.ROLE_AGENT,
        parts=[a2a_pb2.Part(text=f"cancelled: {reason}")],
        metadata=metadata,
    )
    status = a2a_pb2.TaskStatus(state=a2a_pb2.TASK_STATE_CANCELED, message=message)
    status.timestamp.GetCurrentTime()
    return status


async def _end_as_cancelled(context: RequestContext, queue: _ObservedQueue, stopped: Cancelled) -> None:
    if queue.terminal or queue.answered_with_message:
        return  # the agent had already answered for good; nothing to change
    task_id, context_id = context.task_id or "", context.context_id or ""
    status = _cancelled_status(task_id, context_id, stopped.root, stopped.reason)
    event: Event
    if queue.task_known or context.current_task is not None:
        event = a2a_pb2.TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=status)
    else:
        # Stopped before the agent created its task (a late hop does no work at all):
        # the task is born cancelled.
        history = [context.message] if context.message is not None else []
        event = a2a_pb2.Task(id=task_id, context_id=context_id, status=status, history=history)
    await queue.enqueue_event(event)


# -- the adapters --------------------------------------------------------------------------


class CancellableAgentExecutor(AgentExecutor):
    """Runs an A2A agent's executions in scopes; see the module docstring.

    Args:
        executor: the agent's own executor.
        name: what receipts and spans call an interrupted execution (default
            ``a2a:<executor class>``).

    The agent's own ``cancel()`` is called only for tasks that are not executing
    in this process (such as a task waiting for input); an executing task stops
    through its scope: ``execute()`` is interrupted like any cancelled coroutine,
    so cleanup belongs in ``finally`` blocks there.
    """

    def __init__(self, executor: AgentExecutor, *, name: str | None = None) -> None:
        if isinstance(executor, CancellableAgentExecutor):
            raise ConfigurationError("the executor is already a CancellableAgentExecutor; wrap it once")
        self.executor = executor
        self.name = name or f"a2a:{type(executor).__name__}"

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Run the agent's execution in a scope; end it as ``canceled`` when its root is cancelled."""
        observed = _ObservedQueue(event_queue)
        running: _RunningTask | None = None
        try:
            labels = usable_labels({"task_id": context.task_id, "context_id": context.context_id})
            async with scope(name=self.name, labels=labels) as bound:
                assert bound.root is not None
                running = observed.running = _started(context.task_id or "", bound.root, context.context_id or "")
                await self.executor.execute(context, observed)
        except Cancelled as stopped:
            await _end_as_cancelled(context, observed, stopped)
        finally:
            if running is not None:
                _finished(running)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Cancel the task's root (every replica, every depth), then wait for the task to end here."""
        running = _running().get(context.task_id or "")
        if running is None:
            await self.executor.cancel(context, event_queue)
            return
        try:
            await cancel(running.root, reason=_cancel_reason.get())
        except StoreError as error:
            # The work here is stopped anyway (cancel() applies the flag locally first).
            _log.warning("otel-cancel: cancel-task %s stopped it here only: %s", running.task_id, error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(running.stopped.wait(), STOP_WAIT_SECONDS)


def _reason_of(params: a2a_pb2.CancelTaskRequest) -> str:
    if not params.HasField("metadata"):
        return DEFAULT_REASON
    reason = json_format.MessageToDict(params.metadata).get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return DEFAULT_REASON
    return reason[:MAX_TEXT]


def _cancelled_task(record: TaskRecord, reason: str) -> a2a_pb2.Task:
    status = _cancelled_status(record.task_id, record.context_id, record.root, reason)
    return a2a_pb2.Task(id=record.task_id, context_id=record.context_id, status=status)


class CancellableRequestHandler(RequestHandler):
    """Makes cancel-task a distributed cancel; every other call goes to ``handler`` unchanged.

    Args:
        handler: the SDK's request handler (``DefaultRequestHandler``), built with a
            :class:`CancellableAgentExecutor`.

    Raises:
        ConfigurationError: ``handler`` runs an executor that is not wrapped.
    """

    def __init__(self, handler: RequestHandler) -> None:
        executor = getattr(handler, "agent_executor", None)
        if executor is not None and not isinstance(executor, CancellableAgentExecutor):
            raise ConfigurationError(
                "wrap the agent executor too: DefaultRequestHandler(CancellableAgentExecutor(executor), ...)"
            )
        self.handler = handler

    async def on_cancel_task(
        self, params: a2a_pb2.CancelTaskRequest, context: ServerCallContext
    ) -> a2a_pb2.Task | None:
        """Cancel the task's root wherever the task runs; answer with the task, now ``canceled``."""
        reason = _reason_of(params)
        token = _cancel_reason.set(reason)
        try:
            if params.id in _running():
                # It runs here: the SDK stops it through the executor's cancel(), which
                # writes the flag and waits for the task to end as canceled.
                return await self.handler.on_cancel_task(params, context)
            record = await self._find(params.id)
            if record is None:
                return await self.handler.on_cancel_task(params, context)
            try:
                await cancel(record.root, reason=reason)
            except StoreError as error:
                _log.warning("otel-cancel: cancel-task %s could not write the flag: %s", params.id, error)
                raise
            try:
                return await self.handler.on_cancel_task(params, context)
            except TaskNotFoundError:
                # Another replica runs it and this one's task store does not know it.
                return _cancelled_task(record, reason)
            except TaskNotCancelableError:
                # A task store shared with the replica running it: that replica may have
                # saved the task canceled (our flag stopped it) before this call read it.
                # Then the cancel worked; a task that ended otherwise was not cancelable.
                stored = await self.handler.on_get_task(a2a_pb2.GetTaskRequest(id=params.id), context)
                if stored is not None and stored.status.state == a2a_pb2.TaskState.TASK_STATE_CANCELED:
                    return stored
                raise
        finally:
            _cancel_reason.reset(token)

    @staticmethod
    async def _find(task_id: str) -> TaskRecord | None:
        runtime = get_process_state()
        runtime.start()
        try:
            validate_task_id(task_id)
            return await asyncio.wrap_future(runtime.watcher.submit(_get_record(runtime, task_id)))
        except InvalidTaskIdError:
            return None
        except StoreError as error:
            _log.warning("otel-cancel: cannot look up task %s in the store: %s", task_id, error)
            return None

    # -- everything else, unchanged ----------------------------------------------------------

    async def on_get_task(self, params: a2a_pb2.GetTaskRequest, context: ServerCallContext) -> a2a_pb2.Task | None:
        """Delegated to the wrapped handler."""
        return await self.handler.on_get_task(params, context)

    async def on_list_tasks(
        self, params: a2a_pb2.ListTasksRequest, context: ServerCallContext
    ) -> a2a_pb2.ListTasksResponse:
        """Delegated to the wrapped handler."""
        return await self.handler.on_list_tasks(params, context)

    async def on_message_send(
        self, params: a2a_pb2.SendMessageRequest, context: ServerCallContext
    ) -> a2a_pb2.Task | a2a_pb2.Message:
        """Delegated to the wrapped handler."""
        return await self.handler.on_message_send(params, context)

    async def on_message_send_stream(
        self, params: a2a_pb2.SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        """Delegated to the wrapped handler."""
        async with contextlib.aclosing(self.handler.on_message_send_stream(params, context)) as events:
            async for event in events:
                yield event

    async def on_create_task_push_notification_config(
        self, params: a2a_pb2.TaskPushNotificationConfig, context: ServerCallContext
    ) -> a2a_pb2.TaskPushNotificationConfig:
        """Delegated to the wrapped handler."""
        return await self.handler.on_create_task_push_notification_config(params, context)

    async def on_get_task_push_notification_config(
        self, params: a2a_pb2.GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> a2a_pb2.TaskPushNotificationConfig:
        """Delegated to the wrapped handler."""
        return await self.handler.on_get_task_push_notification_config(params, context)

    async def on_subscribe_to_task(
        self, params: a2a_pb2.SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        """Delegated to the wrapped handler."""
        async with contextlib.aclosing(self.handler.on_subscribe_to_task(params, context)) as events:
            async for event in events:
                yield event

    async def on_list_task_push_notification_configs(
        self, params: a2a_pb2.ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> a2a_pb2.ListTaskPushNotificationConfigsResponse:
        """Delegated to the wrapped handler."""
        return await self.handler.on_list_task_push_notification_configs(params, context)

    async def on_delete_task_push_notification_config(
        self, params: a2a_pb2.DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        """Delegated to the wrapped handler."""
        await self.handler.on_delete_task_push_notification_config(params, context)

    async def on_get_extended_agent_card(
        self, params: a2a_pb2.GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> a2a_pb2.AgentCard:
        """Delegated to the wrapped handler."""
        return await self.handler.on_get_extended_agent_card(params, context)


def _endpoints(app: Any) -> list[Any]:
    endpoints, routes = [], list(getattr(app, "routes", None) or ())
    while routes:
        route = routes.pop()
        endpoints.append(getattr(route, "endpoint", None))
        routes.extend(getattr(route, "routes", None) or ())  # mounted apps and routers
    return endpoints


def is_a2a_app(app: Any) -> bool:
    """Whether a Starlette app serves a2a-sdk routes (JSON-RPC, REST or the agent card), mounted or not."""
    # JSON-RPC and REST endpoints are dispatcher methods, the card a function: all from a2a.server.
    return any(str(getattr(endpoint, "__module__", "")).startswith("a2a.server.") for endpoint in _endpoints(app))


def warn_if_not_cancellable(app: Any) -> bool:
    """Log one warning when an A2A app's request handler is not a :class:`CancellableRequestHandler`.

    Returns:
        Whether it warned.
    """
    handlers = {
        id(handler): handler
        for endpoint in _endpoints(app)
        if (handler := getattr(getattr(endpoint, "__self__", None), "request_handler", None)) is not None
    }
    plain = [type(h).__name__ for h in handlers.values() if not isinstance(h, CancellableRequestHandler)]
    if plain:
        _log.warning(
            "otel-cancel: this A2A app's request handler (%s) is not wrapped: cancel-task stops only local work "
            "and reaches nothing downstream. Use CancellableRequestHandler(DefaultRequestHandler("
            "CancellableAgentExecutor(executor), ...)) from otel_cancel.a2a",
            ", ".join(sorted(set(plain))),
        )
    return bool(plain)
