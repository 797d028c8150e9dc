"""A plain LangGraph run whose items are taken one per task keeps one root and stops as a whole."""

from __future__ import annotations

import asyncio
import logging
import operator
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph

import otel_cancel
from otel_cancel.integrations.one_task_stream import OneTaskStream
from otel_cancel.langgraph import instrument_langgraph, uninstrument_langgraph
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio


class State(TypedDict, total=False):
    steps: Annotated[int, operator.add]


@pytest.fixture(autouse=True)
def langgraph_instrumented():
    instrument_langgraph()
    yield
    uninstrument_langgraph()


def _three_steps(roots: list[str | None], third_started: asyncio.Event) -> object:
    async def step(state: State) -> State:
        roots.append(otel_cancel.current_root())
        if len(roots) == 3:
            third_started.set()
            await asyncio.Event().wait()  # the last step holds until the run is cancelled
        return {"steps": 1}

    builder = StateGraph(State)
    for name in ("a", "b", "c"):
        builder.add_node(name, step)
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", "c")
    builder.add_edge("c", END)
    return builder.compile()


async def test_a_run_consumed_one_item_per_task_keeps_its_root_and_stops_when_cancelled(caplog):
    """`wait_for(anext(stream))` per item: every step runs under one root; cancelling it ends the run, cleanly."""
    roots: list[str | None] = []
    third_started = asyncio.Event()
    graph = _three_steps(roots, third_started)
    with configured(store=MemoryCancelStore()) as runtime, caplog.at_level(logging.ERROR):
        stream = graph.astream({"steps": 0}, stream_mode="updates")
        items = [await asyncio.wait_for(anext(stream), 5) for _ in range(2)]
        third = asyncio.ensure_future(anext(stream))  # a task of its own, as wait_for makes on Python 3.11
        await asyncio.wait_for(third_started.wait(), 5)
        assert len(items) == 2 and len(set(roots)) == 1 and roots[0] is not None
        await otel_cancel.cancel(roots[0], reason="stop")
        with pytest.raises(otel_cancel.Cancelled):
            await asyncio.wait_for(third, 5)
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        assert runtime.registry.live_scopes() == 0
    assert [r.getMessage() for r in caplog.records if "detach" in r.getMessage()] == []


async def test_a_consumer_leaving_mid_item_ends_the_run_in_its_own_task(caplog):
    """A consumer cancelled while it waits for an item cancels the step, and the run's scope is left cleanly."""
    roots: list[str | None] = []
    third_started = asyncio.Event()
    graph = _three_steps(roots, third_started)
    with configured(store=MemoryCancelStore()) as runtime, caplog.at_level(logging.ERROR):
        stream = graph.astream({"steps": 0}, stream_mode="updates")
        for _ in range(2):
            await asyncio.wait_for(anext(stream), 5)
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.wait_for(third_started.wait(), 5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stream.aclose()
        assert runtime.registry.live_scopes() == 0 and runtime.registry.is_cancelled(roots[0]) is None
    assert [r.getMessage() for r in caplog.records if "detach" in r.getMessage()] == []


async def _consumer_cancelled_while_the_step_waits(on_cancel: Callable[[], Awaitable[None]]) -> OneTaskStream:
    """A stream whose step waits until it is cancelled, then runs ``on_cancel``; its consumer cancelled as it waits."""
    started = asyncio.Event()

    async def run() -> AsyncIterator[int]:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await on_cancel()
            raise
        yield 1

    stream = OneTaskStream(run, name="test run")
    consumer = asyncio.ensure_future(anext(stream))
    await asyncio.wait_for(started.wait(), 5)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    return stream


async def test_a_consumer_cancelled_while_its_step_fails_its_own_way_leaves_no_unretrieved_error():
    """The consumer and the run stopped in one turn (a flag reaches both): the runner ends clean, its step cancelled."""
    step_cancelled = []

    async def fail_its_own_way() -> None:
        step_cancelled.append(True)
        raise RuntimeError("stopped its own way")  # as a run's scope raises Cancelled

    stream = await _consumer_cancelled_while_the_step_waits(fail_its_own_way)
    runner = stream._runner
    assert runner is not None
    await asyncio.wait_for(asyncio.wait({runner}), 5)
    assert step_cancelled == [True]
    assert runner.cancelled() or runner.exception() is None  # else asyncio logs "never retrieved"


async def test_a_consumer_cancelled_while_it_waits_goes_on_only_once_the_step_has_stopped():
    """As when the run ran in the consumer's own task: the step's cleanup is done when the cancel surfaces."""
    cleaned_up = []

    async def clean_up() -> None:
        for _ in range(3):  # cleanup that takes a few loop turns (a node closing its client)
            await asyncio.sleep(0)
        cleaned_up.append(True)

    await _consumer_cancelled_while_the_step_waits(clean_up)
    assert cleaned_up == [True]
