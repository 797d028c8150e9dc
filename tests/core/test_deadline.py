"""Deadlines that travel: narrowing, local enforcement, late hops, bad values."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from chain import Chain
from opentelemetry import baggage

import otel_cancel
from otel_cancel._core.deadline import MAX_AHEAD_SECONDS, now_ms, parse_timeout
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
