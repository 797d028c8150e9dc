"""The cascade of a cancel can beat its own flag inside a process; the stop still yields a receipt."""

from __future__ import annotations

import asyncio

import pytest

import otel_cancel
from otel_cancel._request import CancelRequest
from otel_cancel._root import random_root
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio


async def test_work_stopped_by_its_caller_after_the_flag_applied_but_before_delivery_writes_a_receipt():
    """Flag applied, then the caller's hang-up cancels the task before our delivery runs: one receipt, tasks=1."""
    store = MemoryCancelStore("/race/")
    with configured(store=store, prefix="/race/") as runtime:
        root = random_root()
        entered = asyncio.Event()

        async def work() -> None:
            async with otel_cancel.scope(root=root, name="relay"):
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(work())
        await asyncio.wait_for(entered.wait(), 10)
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
