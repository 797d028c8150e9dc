"""The cascade of a cancel can beat its own flag inside a process; the stop still yields a receipt."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from opentelemetry import trace

import otel_cancel
from otel_cancel import attributes
from otel_cancel._core import telemetry
from otel_cancel._core.records import CancelRequest
from otel_cancel._core.root import random_root
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio


async def _relay_working_for(root: str, under: trace.Span | None = None) -> asyncio.Task[None]:
    """A task working for ``root`` in a scope named ``relay`` (inside span ``under``), once it is in the scope."""
    entered = asyncio.Event()

    async def work() -> None:
        with trace.use_span(under) if under is not None else contextlib.nullcontext():
            async with otel_cancel.scope(root=root, name="relay"):
                entered.set()
                await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await asyncio.wait_for(entered.wait(), 10)
    return task


async def test_work_stopped_by_its_caller_after_the_flag_applied_but_before_delivery_writes_a_receipt():
    """Flag applied, then the caller's hang-up cancels the task before our delivery runs: one receipt, tasks=1."""
    store = MemoryCancelStore("/race/")
    with configured(store=store, prefix="/race/") as runtime:
        root = random_root()
        task = await _relay_working_for(root)
        # In this order on one loop: the hang-up's CancelledError reaches the task
        # before the delivery the watcher schedules with call_soon_threadsafe.
        task.cancel("the caller hung up")
        runtime.watcher.apply(CancelRequest.new(root, "user", "tests"))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await runtime.wait_receipt(root, 10)
    (receipt,) = await store.list_receipts(root)
    assert receipt.tasks == 1 and receipt.interrupted == ("relay",)


async def test_work_that_finished_as_the_flag_applied_writes_no_receipt():
    """Flag applied while the work was returning normally (not cancelled): nothing was stopped, no receipt."""
    store = MemoryCancelStore("/race/")
    with configured(store=store, prefix="/race/") as runtime:
        root = random_root()
        applied = asyncio.Event()

        async def work() -> None:
            async with otel_cancel.scope(root=root):
                runtime.watcher.apply(CancelRequest.new(root, "user", "tests"))
                applied.set()
                # Returns before the scheduled delivery runs.

        await asyncio.create_task(work())
        assert applied.is_set()
        assert runtime.registry.live_scopes() == 0
    assert await store.list_receipts(root) == []


async def test_work_stopped_by_its_caller_before_the_flag_arrived_writes_a_receipt_when_it_does():
    """The caller hangs up before this process sees the flag: the flag, once applied, still yields the receipt."""
    store = MemoryCancelStore("/race/")
    with configured(store=store, prefix="/race/") as runtime:
        root = random_root()
        task = await _relay_working_for(root)
        task.cancel("the caller hung up")
        with pytest.raises(asyncio.CancelledError):
            await task
        runtime.watcher.apply(CancelRequest.new(root, "user", "tests"))
        assert await runtime.wait_receipt(root, 10)
    (receipt,) = await store.list_receipts(root)
    assert receipt.tasks == 1 and receipt.interrupted == ("relay",)


async def test_work_that_learned_of_its_cancel_from_downstream_before_the_flag_writes_a_receipt_when_it_arrives():
    """A relay raises Cancelled for its own root (the next agent's stream ended cancelled) before the flag: receipt."""
    store = MemoryCancelStore("/race/")
    with configured(store=store, prefix="/race/") as runtime:
        root = random_root()

        async def work() -> None:
            async with otel_cancel.scope(root=root, name="request"), otel_cancel.scope(root=root, name="relay"):
                raise otel_cancel.Cancelled(root, "user")

        with pytest.raises(otel_cancel.Cancelled):
            await asyncio.create_task(work())
        assert runtime.registry.live_scopes() == 0
        runtime.watcher.apply(CancelRequest.new(root, "user", "tests"))
        assert await runtime.wait_receipt(root, 10)
    (receipt,) = await store.list_receipts(root)
    assert receipt.tasks == 1 and set(receipt.interrupted) == {"request", "relay"}


async def test_a_cancelled_of_another_root_is_not_taken_for_an_early_stop_of_this_one():
    """Cancelled raised for a different root says nothing about this root: its later flag stops nothing here."""
    store = MemoryCancelStore("/race/")
    with configured(store=store, prefix="/race/") as runtime:
        root, other = random_root(), random_root()

        async def work() -> None:
            async with otel_cancel.scope(root=root, name="relay"):
                raise otel_cancel.Cancelled(other, "user")

        with pytest.raises(otel_cancel.Cancelled):
            await asyncio.create_task(work())
        reports = []
        runtime.registry.on_stopped = reports.append  # reports are made inside apply, synchronously
        runtime.watcher.apply(CancelRequest.new(root, "user", "tests"))
    assert reports == []


async def test_an_early_stop_claimed_by_its_flag_records_a_cancelled_span_under_the_stopped_work(monkeypatch):
    """The flag that claims an early stop records its otel_cancel.cancelled span, in the work's trace, at the stop."""
    recorded: list[dict[str, object]] = []
    monkeypatch.setattr(telemetry, "work_cancelled", lambda **kwargs: recorded.append(kwargs))
    work_span = trace.NonRecordingSpan(
        trace.SpanContext(trace_id=random.getrandbits(128), span_id=random.getrandbits(64), is_remote=False)
    )
    store = MemoryCancelStore("/race/")
    with configured(store=store, prefix="/race/") as runtime:
        root = random_root()
        task = await _relay_working_for(root, under=work_span)
        # As in a chain: the flag is written, the caller (stopped by it) hangs up, and
        # only then does this process see the flag.
        request = CancelRequest.new(root, "user", "tests")
        task.cancel("the caller hung up")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert recorded == []  # nothing to record until a flag says the stop was a cancel
        runtime.watcher.apply(request)
    (span,) = recorded
    assert (span["root"], span["reason"], span["node"], span["kind"]) == (
        root,
        "user",
        "relay",
        attributes.KIND_EXPLICIT,
    )
    assert span["start_ns"] == span["end_ns"] and span["before_flag"] is True
    assert span["latency_ms"] is not None and span["latency_ms"] >= 0
    parent = trace.get_current_span(span["context"]).get_span_context()  # type: ignore[arg-type]
    assert parent.span_id == work_span.get_span_context().span_id
