"""How a scope's work ended is decided by the scope (anyio style) and only booked by the registry."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_cancel
from otel_cancel import attributes
from otel_cancel._core import telemetry
from otel_cancel._core.root import random_root
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio


@pytest.fixture
def runtime():
    with configured(store=MemoryCancelStore(), service="svc", instance="one") as runtime:
        yield runtime


async def _receipt(runtime, root):
    assert await runtime.wait_receipt(root, 5)
    store = runtime.watcher.submit(runtime.watcher.store()).result(5)
    (receipt,) = await store.list_receipts(root)
    return receipt


async def test_a_cancel_that_is_not_the_scopes_own_is_never_swallowed(runtime):
    """Someone else cancels the task as the flag does: CancelledError propagates, the stop still gets its receipt."""
    root = random_root()
    inside = asyncio.Event()

    async def work():
        async with otel_cancel.scope(root=root, name="work"):
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(work())
    await asyncio.wait_for(inside.wait(), 5)
    task.cancel("the server shuts down")
    await otel_cancel.cancel(root, reason="user")
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert task.cancelled()
    receipt = await _receipt(runtime, root)
    assert receipt.interrupted == ("work",) and receipt.tasks == 1


async def test_a_scope_entered_while_its_task_is_cancelling_still_converts_its_own_cancel(runtime):
    """A cancellation pending before the scope began is not the scope's to count: its own cancel becomes Cancelled."""
    root = random_root()
    waiting, inside = asyncio.Event(), asyncio.Event()

    async def work():
        try:
            waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # Clean-up after a cancel, still stoppable by its root.
            async with otel_cancel.scope(root=root, name="clean-up"):
                inside.set()
                await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(work())
    await asyncio.wait_for(waiting.wait(), 5)
    task.cancel("first")
    await asyncio.wait_for(inside.wait(), 5)
    await otel_cancel.cancel(root, reason="user")
    with pytest.raises(otel_cancel.Cancelled) as caught:
        await asyncio.wait_for(task, 5)
    assert (caught.value.root, caught.value.reason, caught.value.kind) == (root, "user", "explicit")
    assert (await _receipt(runtime, root)).interrupted == ("clean-up",)


async def test_a_flag_and_the_deadline_stopping_the_task_together_leak_no_cancelled_error(runtime):
    """The flag's stop and the deadline's timer cancel the task in the same turn: one Cancelled, no CancelledError."""
    from otel_cancel._core.cancel_request import CancelRequest
    from otel_cancel._core.registry import deliver

    root = random_root()
    inside = asyncio.Event()
    scopes = []

    async def work():
        with otel_cancel.deadline(30):
            async with otel_cancel.scope(root=root, name="work") as scope:
                scopes.append(scope)
                inside.set()
                await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(work())
    await asyncio.wait_for(inside.wait(), 5)
    # Both in one turn, before the task runs again: what a flag arriving as the deadline passes does.
    _, registrations = runtime.registry.apply(CancelRequest.new(root, "user", "test"))
    for registration in registrations:
        deliver(registration)
    scopes[0]._deadline_passed()
    with pytest.raises(otel_cancel.Cancelled) as caught:
        await asyncio.wait_for(task, 5)
    assert (caught.value.root, caught.value.reason, caught.value.kind) == (root, "user", "explicit")
    assert not task.cancelled() and task.get_loop() is asyncio.get_running_loop()
    assert (await _receipt(runtime, root)).interrupted == ("work",)


async def test_the_stopped_works_caller_runs_before_the_stop_is_recorded(runtime, monkeypatch):
    """The stop's span comes a loop turn after the stop (the caller runs first), still under the work's span."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("otel-cancel-test"))
    root = random_root()
    inside = asyncio.Event()
    recorded_when_stopped: list[list[str]] = []

    async def work():
        with provider.get_tracer("app").start_as_current_span("work"):
            try:
                async with otel_cancel.scope(root=root, name="work"):
                    inside.set()
                    await asyncio.Event().wait()
            except otel_cancel.Cancelled:
                recorded_when_stopped.append([span.name for span in exporter.get_finished_spans()])
                raise

    task = asyncio.get_running_loop().create_task(work())
    await asyncio.wait_for(inside.wait(), 5)
    await otel_cancel.cancel(root, reason="user")
    with pytest.raises(otel_cancel.Cancelled):
        await asyncio.wait_for(task, 5)
    assert recorded_when_stopped == [[]]
    for _ in range(100):  # loop turns, not time: the record was scheduled with call_soon
        if any(span.name == attributes.SPAN_CANCELLED for span in exporter.get_finished_spans()):
            break
        await asyncio.sleep(0)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    stop, work_span = spans[attributes.SPAN_CANCELLED], spans["work"]
    assert stop.parent is not None and stop.parent.span_id == work_span.context.span_id
    assert stop.attributes[attributes.ROOT] == root and stop.attributes[attributes.NODE] == "work"
