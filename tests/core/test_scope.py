"""The scope, check(), cancel() and cancel_current() in one process (memory store)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context

import otel_cancel
from otel_cancel._core.root import random_root, with_root
from otel_cancel._core.scope import CancelScope, request_scope
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio


@pytest.fixture
def runtime():
    with configured(store=MemoryCancelStore(), service="svc", instance="one") as runtime:
        yield runtime


async def _started(coroutine_factory, count=1):
    """Start ``count`` tasks that signal once inside their scope; return (tasks, root)."""
    loop = asyncio.get_running_loop()
    ready = [loop.create_future() for _ in range(count)]
    tasks = [asyncio.create_task(coroutine_factory(fut)) for fut in ready]
    roots = await asyncio.wait_for(asyncio.gather(*ready), 5)
    return tasks, roots[0]


async def test_cancel_stops_the_task_and_raises_cancelled_with_root_and_reason(runtime):
    """A cancelled root's task leaves its scope with Cancelled(root, reason)."""
    body_finished = False

    async def work(ready):
        nonlocal body_finished
        async with otel_cancel.scope(name="work") as scope:
            ready.set_result(scope.root)
            await asyncio.Event().wait()
            body_finished = True

    (task,), root = await _started(work)
    result = await otel_cancel.cancel(root, reason="user")
    with pytest.raises(otel_cancel.Cancelled) as caught:
        await asyncio.wait_for(task, 5)
    assert (caught.value.root, caught.value.reason) == (root, "user")
    assert result.created and not body_finished
    assert not task.cancelled()  # converted: the task ended with Cancelled, not CancelledError


async def test_a_scope_entered_after_the_cancel_raises_without_running_its_body(runtime):
    """A late scope raises Cancelled at once; its body never runs."""
    root = random_root()
    await otel_cancel.cancel(root, reason="early")
    ran = False
    with pytest.raises(otel_cancel.Cancelled):
        async with otel_cancel.scope(root=root):
            ran = True
    assert not ran
    assert runtime.registry.live_scopes() == 0


async def test_a_scope_without_a_root_starts_one_and_puts_it_in_the_context(runtime):
    """With no root in the context, the scope starts a new root at depth 0, visible inside only."""
    assert otel_cancel.current_root() is None
    async with otel_cancel.scope() as scope:
        assert otel_cancel.current_root() == scope.root
        assert baggage.get_baggage("otel_cancel.depth") == "0"
    assert otel_cancel.current_root() is None


async def test_a_scope_uses_the_root_already_in_the_context(runtime):
    """A scope inside a context carrying a root binds to that root and depth."""
    root = random_root()
    token = otel_context.attach(with_root(root, 2))
    try:
        async with otel_cancel.scope() as scope:
            assert (scope.root, scope.depth) == (root, 2)
    finally:
        otel_context.detach(token)


async def test_cancel_of_one_root_never_stops_another(runtime):
    """Cancelling root A leaves the tasks of root B running."""

    async def work(ready):
        async with otel_cancel.scope() as scope:
            ready.set_result(scope.root)
            await asyncio.Event().wait()

    (task_a,), root_a = await _started(work)
    (task_b,), _ = await _started(work)
    await otel_cancel.cancel(root_a)
    with pytest.raises(otel_cancel.Cancelled):
        await asyncio.wait_for(task_a, 5)
    assert not task_b.done()
    task_b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task_b


async def test_a_foreign_cancellation_propagates_as_cancelled_error(runtime):
    """A cancellation otel-cancel did not deliver passes through the scope untouched."""

    async def work(ready):
        async with otel_cancel.scope() as scope:
            ready.set_result(scope.root)
            await asyncio.Event().wait()

    (task,), _ = await _started(work)
    task.cancel("someone else")
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runtime.registry.live_scopes() == 0


async def test_nested_scopes_of_one_root_convert_the_cancellation_once(runtime):
    """Inner and outer scopes of the same root: the inner converts, the outer passes Cancelled on."""
    seen = []

    async def work(ready):
        async with otel_cancel.scope(name="outer") as outer:
            try:
                async with otel_cancel.scope(name="inner"):
                    ready.set_result(outer.root)
                    await asyncio.Event().wait()
            except otel_cancel.Cancelled:
                seen.append("inner raised Cancelled")
                raise

    (task,), root = await _started(work)
    await otel_cancel.cancel(root)
    with pytest.raises(otel_cancel.Cancelled):
        await asyncio.wait_for(task, 5)
    assert seen == ["inner raised Cancelled"]
    assert asyncio.current_task().cancelling() == 0


async def test_check_and_is_cancelled_stop_sync_code_in_a_thread(runtime):
    """A thread in a sync scope stops at its next check() after the cancel."""
    started, stop_reason = threading.Event(), []
    root = random_root()

    def sync_work():
        with otel_cancel.scope(root=root, name="sync"):
            started.set()
            try:
                while True:
                    otel_cancel.check()
                    threading.Event().wait(0.001)  # a unit of sync work
            except otel_cancel.Cancelled as error:
                stop_reason.append(error.reason)
                assert otel_cancel.is_cancelled()
                raise

    thread_done = asyncio.get_running_loop().run_in_executor(None, sync_work)
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    assert not otel_cancel.is_cancelled()
    await otel_cancel.cancel(root, reason="stop thread")
    with pytest.raises(otel_cancel.Cancelled):
        await asyncio.wait_for(thread_done, 5)
    assert stop_reason == ["stop thread"]


async def test_cancel_current_from_one_branch_stops_its_siblings_and_itself(runtime):
    """A guardrail task calling cancel_current() stops its sibling and its own scope; the flag is written."""

    async def run():
        async with otel_cancel.scope(name="run"):

            async def agent():
                async with otel_cancel.scope(name="agent"):
                    await asyncio.Event().wait()

            async def guardrail():
                async with otel_cancel.scope(name="guardrail"):
                    await otel_cancel.cancel_current(reason="guardrail: unsafe")
                    await asyncio.Event().wait()

            async with asyncio.TaskGroup() as group:
                group.create_task(agent())
                group.create_task(guardrail())

    with pytest.raises(BaseException) as caught:
        await asyncio.wait_for(run(), 5)
    # TaskGroup wraps child errors; every branch ended with Cancelled.
    errors = caught.value.exceptions if isinstance(caught.value, BaseExceptionGroup) else [caught.value]
    assert errors and all(isinstance(e, otel_cancel.Cancelled) for e in errors)
    flags = (await runtime.watcher.submit(runtime.watcher.store()).result(5).list_flags()).flags
    assert len(flags) == 1 and b"guardrail: unsafe" in flags[0].value


async def test_cancel_current_outside_a_scope_is_a_clear_error(runtime):
    """cancel_current() with no root in the context raises RuntimeError naming the rule."""
    with pytest.raises(RuntimeError, match=r"inside otel_cancel\.scope"):
        await otel_cancel.cancel_current()


async def test_cancelling_twice_keeps_the_first_flag(runtime):
    """A second cancel() reports created=False and returns the first flag."""
    root = random_root()
    first = await otel_cancel.cancel(root, reason="first")
    second = await otel_cancel.cancel(root, reason="second")
    assert first.created and not second.created
    assert second.request == first.request


async def test_one_receipt_per_process_lists_what_was_interrupted(runtime):
    """Three tasks of one root stop; the process writes one receipt naming all three."""
    store = runtime.watcher.submit(runtime.watcher.store()).result(5)
    root = random_root()

    async def work(ready, name):
        async with otel_cancel.scope(root=root, name=name):
            ready.set_result(root)
            await asyncio.Event().wait()

    loop = asyncio.get_running_loop()
    ready = [loop.create_future() for _ in range(3)]
    tasks = [asyncio.create_task(work(f, f"n{i}")) for i, f in enumerate(ready)]
    await asyncio.gather(*ready)
    await otel_cancel.cancel(root, reason="r")
    await asyncio.gather(*tasks, return_exceptions=True)
    assert await runtime.wait_receipt(root, 5)
    (receipt,) = await store.list_receipts(root)
    assert receipt.tasks == 3 and set(receipt.interrupted) == {"n0", "n1", "n2"}
    assert receipt.seen_at <= receipt.stopped_at and receipt.reason == "r"


async def test_thousands_of_scopes_leave_nothing_behind(runtime):
    """Entering and leaving 5,000 scopes (some cancelled) leaves the registry empty."""
    roots = [random_root() for _ in range(50)]
    await otel_cancel.cancel(roots[0])

    async def one(i):
        try:
            async with otel_cancel.scope(root=roots[i % 50]):
                await asyncio.sleep(0)
        except otel_cancel.Cancelled:
            pass

    for batch in range(5):
        await asyncio.gather(*(one(i) for i in range(batch * 1000, batch * 1000 + 1000)))
    assert runtime.registry.live_scopes() == 0 and runtime.registry.live_roots() == 0


async def test_a_scope_object_cannot_be_entered_twice(runtime):
    """Re-entering one CancelScope raises RuntimeError with the rule."""
    scope = otel_cancel.scope()
    async with scope:
        pass
    with pytest.raises(RuntimeError, match="only once"):
        async with scope:
            pass


async def test_work_stopped_by_a_departing_caller_before_the_flag_still_gets_a_receipt(runtime):
    """The cascade can beat the watch: work cancelled by someone else just before the flag is still reported."""
    root = random_root()

    async def work(ready):
        async with otel_cancel.scope(root=root, name="relay"):
            ready.set_result(root)
            await asyncio.Event().wait()

    (task,), _ = await _started(work)
    task.cancel("the caller left")
    with pytest.raises(asyncio.CancelledError):
        await task
    await otel_cancel.cancel(root, reason="user")
    assert await runtime.wait_receipt(root, 5)
    store = runtime.watcher.submit(runtime.watcher.store()).result(5)
    (receipt,) = await store.list_receipts(root)
    assert receipt.interrupted == ("relay",) and receipt.tasks == 1


def test_a_request_scope_has_every_field_a_constructed_scope_has():
    """request_scope skips the constructor: it sets every field the constructor sets, and only its facts besides."""
    built = CancelScope(name="GET /hop")
    fast = request_scope("GET /hop", "ab" * 16, 1, None, {}, None)
    assert set(vars(fast)) == set(vars(built)) | {"_known"}
    assert {key: vars(fast)[key] for key in vars(built)} == vars(built)
