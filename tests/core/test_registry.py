"""The registry on its own: it holds registrations and cancelled roots, and books the outcomes scopes decide."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable

import pytest

from otel_cancel._core.bulk import BulkCancel
from otel_cancel._core.outcome import Outcome
from otel_cancel._core.records import CancelRequest
from otel_cancel._core.registry import CancelRegistry, Registration
from otel_cancel._core.root import random_root


def test_the_registry_books_the_outcome_it_is_given():
    """An early stop booked by the scope is claimed by the root's flag: one report, the scope's names."""
    reports = []
    registry = CancelRegistry(on_stopped=reports.append)
    root = random_root()
    registration, refused = registry.enter(root, 2, "relay", task_mode=False)
    assert refused is None
    claimed = []
    outcome, request = registry.exit(registration, Outcome.STOPPED_EARLY, lambda: claimed.append)
    assert (outcome, request) == (Outcome.STOPPED_EARLY, None)
    flag = CancelRequest.new(root, "user", "cli@host")
    assert registry.apply(flag) == (True, [])
    (report,) = reports
    assert (report.request, report.depth, report.interrupted, report.tasks) == (flag, 2, ("relay",), 1)
    assert claimed == [flag]


def _enter_in_another_thread(registry: CancelRegistry, root: str, name: str) -> Registration:
    """A registration of its own for ``root`` (one per thread), as another task's would be."""
    entered: list[Registration] = []
    thread = threading.Thread(target=lambda: entered.append(registry.enter(root, 1, name, task_mode=False)[0]))
    thread.start()
    thread.join()
    return entered[0]


def test_an_early_stop_is_claimed_while_other_work_of_its_root_is_still_live():
    """The flag records the early stop at once; the receipt, when the rest stops, counts both tasks."""
    reports = []
    registry = CancelRegistry(on_stopped=reports.append)
    root = random_root()
    early, _ = registry.enter(root, 2, "relay", task_mode=False)
    claimed = []
    registry.exit(early, Outcome.STOPPED_EARLY, lambda: claimed.append)
    still_live = _enter_in_another_thread(registry, root, "node")
    flag = CancelRequest.new(root, "user", "cli@host")
    assert registry.apply(flag) == (True, [still_live])
    assert claimed == [flag] and reports == []
    registry.exit(still_live, Outcome.STOPPED)
    (report,) = reports
    assert (report.request, report.depth, report.interrupted, report.tasks) == (flag, 1, ("relay", "node"), 2)


def test_an_early_stop_gets_its_receipt_when_the_other_work_of_its_root_completes():
    """Work of the root that was live at the flag and ends by itself still leaves the early stop's receipt."""
    reports = []
    registry = CancelRegistry(on_stopped=reports.append)
    root = random_root()
    early, _ = registry.enter(root, 2, "relay", task_mode=False)
    registry.exit(early, Outcome.STOPPED_EARLY)
    still_live = _enter_in_another_thread(registry, root, "node")
    flag = CancelRequest.new(root, "user", "cli@host")
    registry.apply(flag)
    registry.exit(still_live, Outcome.COMPLETED)
    (report,) = reports
    assert (report.request, report.depth, report.interrupted, report.tasks) == (flag, 2, ("relay",), 1)


class _ReadThenPreempted(dict):  # type: ignore[type-arg]
    """The cancelled roots, whose first miss lets ``meanwhile`` run before it is answered.

    As another thread would, when it takes the GIL from a reader between two of its reads.
    """

    def __init__(self, meanwhile: Callable[[], object]) -> None:
        super().__init__()
        self.meanwhile: Callable[[], object] | None = meanwhile

    def get(self, key, default=None):  # type: ignore[no-untyped-def]
        found = super().get(key, default)
        if found is None and self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
        return found


@pytest.mark.parametrize("known_as", ["unread", "listed"])
def test_a_root_cancelled_all_along_is_seen_cancelled_while_another_thread_reads_its_flag(known_as):
    """is_cancelled() never answers None for a root that moves from unread or listed to decoded as it reads."""
    registry = CancelRegistry()
    flag = CancelRequest.new(random_root(), "r", "x")
    if known_as == "unread":
        registry.apply_unread(flag.root, flag.to_json())
        moved = lambda: registry.enter(flag.root, 0, "late", task_mode=False)  # noqa: E731  # decodes the bytes
    else:
        registry.apply_listed(flag.root)
        moved = lambda: registry.apply(flag)  # noqa: E731  # the flag's value, fetched
    registry._cancelled = _ReadThenPreempted(moved)
    assert registry.is_cancelled(flag.root) == flag
    assert registry._cancelled.meanwhile is None  # the move did happen during the read


def test_work_whose_loop_was_closed_with_its_scope_open_is_not_waited_for():
    """A flag drops such a registration: the root's other work still gets its receipt, and the loop is not kept."""
    reports = []
    registry = CancelRegistry(on_stopped=reports.append)
    root = random_root()
    loop = asyncio.new_event_loop()
    entered = loop.create_future()

    async def held(entered: asyncio.Future[None]) -> None:
        registry.enter(root, 1, "abandoned")
        entered.set_result(None)
        await asyncio.Event().wait()

    task = loop.create_task(held(entered))
    loop.run_until_complete(entered)
    loop.close()  # with the task still in its scope
    closed = weakref.ref(loop)
    del loop, entered, task
    other, _ = registry.enter(root, 1, "node", task_mode=False)
    flag = CancelRequest.new(root, "user", "cli@host")
    assert registry.apply(flag) == (True, [other])
    registry.exit(other, Outcome.STOPPED)
    (report,) = reports
    assert (report.interrupted, report.tasks) == (("node",), 1)
    assert registry.live_scopes() == 0
    gc.collect()
    assert closed() is None


def test_the_registry_asks_the_scope_under_its_lock_with_the_request_applied_meanwhile():
    """A flag applied while a scope is leaving reaches the scope's decision: the registry passes it in."""
    registry = CancelRegistry()
    root = random_root()
    registration, _ = registry.enter(root, 0, "work", task_mode=False)
    flag = CancelRequest.new(root, "user", "cli@host")
    registry.apply(flag)
    seen = []

    def decide(request):
        seen.append(request)
        return Outcome.STOPPED

    assert registry.exit(registration, decide) == (Outcome.STOPPED, flag)
    assert seen == [flag]


def test_the_registry_refuses_a_late_scope_of_a_selected_run_and_admits_a_run_begun_after():
    """After a bulk cancel, a scope of a run begun before it is refused on entry; a later run enters."""
    registry = CancelRegistry(service="svc")
    refused: list[str] = []
    registry.on_bulk_refusal = lambda request, others: refused.append(request.root)
    live_root = random_root()
    registration, _ = registry.enter(live_root, 0, "work", task_mode=False)
    bulk = BulkCancel.new(service=None, labels={}, reason="kill switch", requested_by="me")
    selected = registry.apply_bulk(bulk)
    assert [request.root for request, _ in selected] == [live_root]
    assert registry.apply_bulk(bulk) == []  # applied once
    registry.exit(registration, Outcome.STOPPED)

    late_root = random_root()
    late, request = registry.enter(late_root, 1, "hop", task_mode=False, run_started_ms=time.time_ns() // 10**6 - 1000)
    assert request is not None and request.reason == "kill switch" and refused == [late_root]
    registry.exit(late)
    fresh, request = registry.enter(
        random_root(), 0, "new", task_mode=False, run_started_ms=time.time_ns() // 10**6 + 5
    )
    assert request is None
    registry.exit(fresh)


def test_importing_otel_cancel_first_leaves_asyncio_whole():
    """Imported before asyncio (as in the CLI), the registry leaves asyncio's current_task() and wait_for working."""
    probe = (
        "import otel_cancel._core.registry, asyncio\n"
        "async def main():\n"
        "    seen = asyncio.current_task()\n"
        "    await asyncio.wait_for(asyncio.sleep(0), 1)\n"
        "    return seen is not None\n"
        "print(asyncio.run(main()))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
