"""Real LangGraph graphs in scopes: parallel branches, sync nodes, resume, the guardrail pattern."""

from __future__ import annotations

import asyncio
import operator
import threading
from typing import Annotated, TypedDict

import httpx
import pytest
from chain import Chain
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

import otel_cancel
from otel_cancel._core.root import random_root
from otel_cancel.langgraph import instrument_langgraph, uninstrument_langgraph
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured, wait_for_output

pytestmark = pytest.mark.anyio


class State(TypedDict, total=False):
    log: Annotated[list[str], operator.add]


@pytest.fixture(autouse=True)
def langgraph_instrumented():
    instrument_langgraph()
    yield
    uninstrument_langgraph()


@pytest.fixture
def store():
    return MemoryCancelStore()


@pytest.fixture
def runtime(store):
    with configured(store=store, service="graph", instance="g1") as runtime:
        yield runtime


async def test_parallel_branches_all_stop_and_their_node_tasks_really_end(runtime, store):
    """A fan-out of two async nodes: cancel stops both node tasks; the run raises Cancelled; the receipt names them."""
    entered = {name: asyncio.Event() for name in ("left", "right")}
    stopped: dict[str, bool] = {}

    def branch(name):
        async def node(state: State) -> State:
            entered[name].set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                stopped[name] = asyncio.current_task().cancelling() > 0  # cancelled as a task, not an error
                raise
            return {"log": [name]}

        return node

    builder = StateGraph(State)
    builder.add_node("left", branch("left"))
    builder.add_node("right", branch("right"))
    builder.add_edge(START, "left")
    builder.add_edge(START, "right")
    graph = builder.compile()
    root = random_root()

    async def run():
        async with otel_cancel.scope(root=root):
            return await graph.ainvoke({"log": []})

    task = asyncio.create_task(run())
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in entered.values())), 5)
    await otel_cancel.cancel(root, reason="stop")
    with pytest.raises(otel_cancel.Cancelled):
        await asyncio.wait_for(task, 5)
    assert stopped == {"left": True, "right": True}
    assert await runtime.wait_receipt(root, 5)
    (receipt,) = await store.list_receipts(root)
    assert {"left", "right"} <= set(receipt.interrupted)


async def test_a_sync_node_in_a_thread_stops_at_its_next_check(runtime):
    """A sync node that never awaits stops cooperatively at otel_cancel.check()."""
    started, stopped_at_check = threading.Event(), threading.Event()

    def busy(state: State) -> State:
        started.set()
        try:
            while True:
                otel_cancel.check()
                threading.Event().wait(0.002)  # one unit of blocking work
        except otel_cancel.Cancelled:
            stopped_at_check.set()
            raise

    builder = StateGraph(State)
    builder.add_node("busy", busy)
    builder.add_edge(START, "busy")
    graph = builder.compile()
    root = random_root()

    def run_sync():
        with otel_cancel.scope(root=root):
            graph.invoke({"log": []})

    future = asyncio.get_running_loop().run_in_executor(None, run_sync)
    assert await asyncio.to_thread(started.wait, 5)
    await otel_cancel.cancel(root)
    with pytest.raises(otel_cancel.Cancelled):
        await asyncio.wait_for(future, 5)
    assert stopped_at_check.is_set()


async def test_resume_after_cancel_continues_from_the_last_completed_step(runtime):
    """The checkpointer keeps the last completed step; the same thread_id resumes from there."""
    slow_started = asyncio.Event()
    runs = {"first": 0, "slow": 0}
    block = {"slow": True}

    async def first(state: State) -> State:
        runs["first"] += 1
        return {"log": ["first"]}

    async def slow(state: State) -> State:
        runs["slow"] += 1
        slow_started.set()
        if block["slow"]:
            await asyncio.Event().wait()
        return {"log": ["slow"]}

    builder = StateGraph(State)
    builder.add_node("first", first)
    builder.add_node("slow", slow)
    builder.add_edge(START, "first")
    builder.add_edge("first", "slow")
    builder.add_edge("slow", END)
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t-1"}}
    root = random_root()

    async def run():
        async with otel_cancel.scope(root=root):
            await graph.ainvoke({"log": []}, config)

    task = asyncio.create_task(run())
    await asyncio.wait_for(slow_started.wait(), 5)
    await otel_cancel.cancel(root)
    with pytest.raises(otel_cancel.Cancelled):
        await asyncio.wait_for(task, 5)
    state = await graph.aget_state(config)
    assert state.values["log"] == ["first"] and state.next == ("slow",)

    block["slow"] = False
    result = await graph.ainvoke(None, config)  # a new run (new root) on the same thread
    assert result["log"] == ["first", "slow"]
    assert runs == {"first": 1, "slow": 2}


@pytest.fixture
def downstream(etcd_env):
    chain = Chain().start(etcd_env, levels=("C",), replicas=1, level_env={"C": {"OTEL_CANCEL_TRUST_INCOMING": "true"}})
    yield chain
    chain.stop()


async def test_the_guardrail_cancels_its_sibling_and_the_downstream_service(etcd, prefix, downstream):
    """A guardrail branch calls cancel_current() while the agent branch streams from a real service: all stop."""
    HTTPXClientInstrumentor().instrument()
    agent_stopped = asyncio.Event()
    url = downstream.urls(0)[0]
    try:
        with configured(endpoints=(etcd.endpoint,), prefix=prefix, service="supervisor"):

            async def agent(state: State) -> State:
                try:
                    async with httpx.AsyncClient(timeout=60) as client:
                        params = {"tokens": 200, "interval": 0.05}
                        async with client.stream("GET", f"{url}/stream", params=params) as response:
                            async for _ in response.aiter_lines():
                                pass
                        # The downstream service may end its stream (with the cancel event)
                        # before the flag reaches this task: the agent goes on working on
                        # what it read, and only the cancel can stop it.
                        await asyncio.Event().wait()
                except asyncio.CancelledError:
                    agent_stopped.set()
                    raise
                return {"log": ["agent"]}

            async def guardrail(state: State) -> State:
                root = otel_cancel.current_root()
                await asyncio.to_thread(wait_for_output, lambda: bool(downstream.lines("START", root)), 30)
                await otel_cancel.cancel_current(reason="guardrail: unsafe request")
                return {"log": ["guardrail"]}

            builder = StateGraph(State)
            builder.add_node("agent", agent)
            builder.add_node("guardrail", guardrail)
            builder.add_edge(START, "agent")
            builder.add_edge(START, "guardrail")
            graph = builder.compile()

            root = None
            with pytest.raises(otel_cancel.Cancelled) as caught:
                async with otel_cancel.scope() as run_scope:
                    root = run_scope.root
                    await asyncio.wait_for(graph.ainvoke({"log": []}), 30)
            assert caught.value.reason == "guardrail: unsafe request"
            assert agent_stopped.is_set()
            await asyncio.to_thread(wait_for_output, lambda: bool(downstream.lines("STOPPED", root)), 20)
    finally:
        HTTPXClientInstrumentor().uninstrument()
