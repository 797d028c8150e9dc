"""Deadlines that travel: narrowing, local enforcement, late hops, bad values."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from chain import Chain
from opentelemetry import baggage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import otel_cancel
from otel_cancel import attributes
from otel_cancel._core import telemetry
from otel_cancel._core.deadline import MAX_AHEAD_SECONDS, now_ms, parse_timeout
from otel_cancel._core.root import random_root
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured, wait_for_output

pytestmark = pytest.mark.anyio


@pytest.fixture
def runtime():
    with configured(store=MemoryCancelStore(), service="unit") as runtime:
        yield runtime


async def test_a_nested_deadline_narrows_but_cannot_extend(runtime):
    """deadline(10) inside deadline(1) keeps the 1 s budget; deadline(0.5) inside narrows it."""
    with otel_cancel.deadline(1):
        outer = int(baggage.get_baggage("otel_cancel.deadline"))
        with otel_cancel.deadline(10):
            assert int(baggage.get_baggage("otel_cancel.deadline")) == outer
            assert otel_cancel.time_left() <= 1
        with otel_cancel.deadline(0.5):
            assert int(baggage.get_baggage("otel_cancel.deadline")) < outer
    assert otel_cancel.time_left() is None


async def test_an_async_deadline_stops_the_block_with_reason_deadline_and_no_store(runtime):
    """`async with deadline(0.2)` cancels its block locally when the budget runs out; no flag is written."""
    with pytest.raises(otel_cancel.Cancelled) as caught:
        async with otel_cancel.scope(), otel_cancel.deadline(0.2):
            await asyncio.Event().wait()
    assert caught.value.reason == "deadline"
    assert asyncio.current_task().cancelling() == 0
    store = runtime.watcher.submit(runtime.watcher.store()).result(5)
    assert (await store.list_flags()).flags == ()


async def test_an_inner_deadline_is_swallowed_by_its_own_scope_only(runtime):
    """An inner deadline stops the inner block; the outer scope carries on."""
    async with otel_cancel.scope():
        with pytest.raises(otel_cancel.Cancelled):
            async with otel_cancel.deadline(0.1):
                await asyncio.Event().wait()
        await asyncio.sleep(0)  # the outer scope is still alive and not cancelled
    assert asyncio.current_task().cancelling() == 0


async def test_check_in_a_thread_honours_the_deadline(runtime):
    """Sync code stops at check() once the deadline passed."""
    stopped = threading.Event()

    def work():
        with otel_cancel.scope(), otel_cancel.deadline(0.1):
            try:
                while True:
                    otel_cancel.check()
                    threading.Event().wait(0.005)
            except otel_cancel.Cancelled as error:
                assert error.reason == "deadline"
                stopped.set()

    await asyncio.wait_for(asyncio.to_thread(work), 5)
    assert stopped.is_set()


@pytest.fixture
def tracer_provider(monkeypatch):
    """otel-cancel's spans and the app's, exported in memory (``tracer_provider.exporter``)."""
    provider = TracerProvider()
    provider.exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(provider.exporter))
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("otel-cancel-test"))
    return provider


async def _deadline_stops(exporter, count):
    """The ``otel_cancel.cancelled`` spans once ``count`` are there (recorded a loop turn after the stop)."""
    for _ in range(100):  # loop turns, not time: task stops are recorded with call_soon
        stops = [span for span in exporter.get_finished_spans() if span.name == attributes.SPAN_CANCELLED]
        if len(stops) >= count:
            break
        await asyncio.sleep(0)
    return stops


async def test_a_thread_stopped_by_the_deadline_records_its_stop_as_a_task_does(
    runtime, tracer_provider, cancel_metrics
):
    """check() raising the deadline's Cancelled in a thread: a deadline span and metric, the work span in error,
    and no stop kept for a flag to claim."""
    root = random_root()
    recorded = cancel_metrics.total(attributes.METRIC_CANCELLATIONS)

    def work():
        with (
            tracer_provider.get_tracer("app").start_as_current_span("work"),
            otel_cancel.deadline(0.1),
            otel_cancel.scope(root=root, name="thread-work"),
        ):
            while True:
                otel_cancel.check()
                threading.Event().wait(0.005)

    with pytest.raises(otel_cancel.Cancelled) as caught:
        await asyncio.wait_for(asyncio.to_thread(work), 5)
    assert caught.value.kind == attributes.KIND_DEADLINE
    spans = tracer_provider.exporter.get_finished_spans()
    (stop,) = [span for span in spans if span.name == attributes.SPAN_CANCELLED]
    assert stop.attributes[attributes.KIND] == attributes.KIND_DEADLINE
    assert (stop.attributes[attributes.ROOT], stop.attributes[attributes.NODE]) == (root, "thread-work")
    (work_span,) = [span for span in spans if span.name == "work"]
    assert work_span.status.status_code is StatusCode.ERROR
    assert cancel_metrics.total(attributes.METRIC_CANCELLATIONS) - recorded == 1
    # Not a stop waiting for a flag: a flag for the root now claims nothing (a claim records its span at once).
    await otel_cancel.cancel(root)
    assert [span.name for span in tracer_provider.exporter.get_finished_spans()].count(attributes.SPAN_CANCELLED) == 1


async def test_each_nested_scope_the_deadline_stops_records_its_stop_as_for_a_flag(runtime, tracer_provider):
    """A node scope inside a request scope of the same task: both stopped by the deadline, each with its span."""
    root = random_root()
    inner_raised = []

    async def work():
        async with otel_cancel.scope(root=root, name="request"):
            try:
                async with otel_cancel.scope(name="node"):
                    await asyncio.Event().wait()
            except BaseException as error:
                inner_raised.append(error)
                raise

    with otel_cancel.deadline(0.1):
        task = asyncio.get_running_loop().create_task(work())
    with pytest.raises(otel_cancel.Cancelled) as caught:
        await asyncio.wait_for(task, 5)
    assert caught.value.kind == attributes.KIND_DEADLINE and not task.cancelled()
    (inner,) = inner_raised
    assert isinstance(inner, otel_cancel.Cancelled) and inner.kind == attributes.KIND_DEADLINE
    stops = await _deadline_stops(tracer_provider.exporter, 2)
    assert sorted(span.attributes[attributes.NODE] for span in stops) == ["node", "request"]
    assert {span.attributes[attributes.KIND] for span in stops} == {attributes.KIND_DEADLINE}


def test_timeout_values_are_parsed_strictly():
    """30s, 1500ms and 2m parse; anything else is a ValueError."""
    assert parse_timeout("30s") == 30 and parse_timeout("1500ms") == 1.5 and parse_timeout("2m") == 120
    for bad in (
        "",
        "30",
        "1.5s",
        "-1s",
        "0s",
        "1h",
        "s",
        "30 s",
        "9999999999s",
        "1e3ms",
        str(MAX_AHEAD_SECONDS + 1) + "s",
    ):
        with pytest.raises(ValueError):
            parse_timeout(bad)


@pytest.fixture
def leaf(etcd_env):
    chain = Chain().start(etcd_env, levels=("C",), replicas=1, level_env={"C": {"OTEL_CANCEL_TRUST_INCOMING": "true"}})
    yield chain
    chain.stop()


async def test_a_hop_arriving_after_its_deadline_gets_504_and_does_no_work(leaf):
    """A request whose deadline already passed is refused with 504 and its handler never runs."""
    root = "cd" * 16
    past = now_ms() - 50
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{leaf.urls(0)[0]}/work", headers={"baggage": f"otel_cancel.root={root},otel_cancel.deadline={past}"}
        )
    assert response.status_code == 504
    assert response.json() == {"error": "deadline_exceeded", "root": root, "deadline": past}
    assert leaf.lines("RAN", root) == []


@pytest.mark.parametrize(
    ("header", "entry"),
    [
        ("otel-cancel-timeout", "soon"),
        ("otel-cancel-timeout", "-5s"),
        ("otel-cancel-timeout", "99999999m"),
        ("baggage", "otel_cancel.deadline=not-a-number"),
        ("baggage", "otel_cancel.deadline=99999999999999"),  # years away
        ("baggage", "otel_cancel.deadline=1000"),  # 1970: far in the past
    ],
)
async def test_malformed_or_absurd_deadlines_are_ignored_with_one_log_line(leaf, header, entry):
    """Bad deadline values are ignored (the request runs) and logged once, however often they come."""
    root = "ef" * 16
    if header == "baggage":
        headers = {"baggage": f"otel_cancel.root={root},{entry}"}
    else:
        headers = {"baggage": f"otel_cancel.root={root}", header: entry}
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            response = await client.get(f"{leaf.urls(0)[0]}/work", headers=headers)
            assert response.status_code == 200
            assert "otel_cancel.deadline" not in response.json()["baggage"]
    # A request's log lines come before its handler's RAN line on the one output: read up to
    # the third (the output is read by another thread, which may lag behind the responses).
    await asyncio.to_thread(wait_for_output, lambda: len(leaf.lines("RAN", root)) == 3, 30, "the three requests ran")
    process = leaf.processes()[0]
    warnings = [line for line in process.lines if "deadline" in line.lower() or "otel-cancel-timeout" in line]
    assert len(warnings) == 1, warnings
