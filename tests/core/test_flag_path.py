"""The flag path in one process: keys read once, flags kept unread where nothing needs them, stops batched."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import weakref

import pytest

import otel_cancel
from otel_cancel._core import delivery
from otel_cancel._core.delivery import StopDelivery
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.live import MAX_PUBLISHED_BYTES, MAX_PUBLISHED_ROOTS, LivePublisher, build_record
from otel_cancel._core.records import CancelRequest, LiveEntry, LiveRecord, Receipt
from otel_cancel._core.registry import CancelRegistry, Registration
from otel_cancel._core.root import random_root
from otel_cancel._core.startup_wait import wait_for_listing
from otel_cancel.store._keys import parse_flag_key
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio


def test_a_flag_key_is_read_once_into_a_root_or_a_bulk_id():
    """A root's flag key gives the root, a bulk flag's its id; anything else, or another prefix, gives None."""
    root = random_root()
    assert parse_flag_key("/p/", f"/p/flags/{root}") == ("root", root)
    assert parse_flag_key("/p/", "/p/flags/bulk/0123456789abcdef") == ("bulk", "0123456789abcdef")
    for key in (f"/q/flags/{root}", "/p/flags/not-a-root", "/p/flags/bulk/xyz", f"/p/flags/{root}/x", "/p/flags/"):
        assert parse_flag_key("/p/", key) is None


def test_flags_and_receipts_encode_every_field():
    """The hand-written JSON of a flag and of a receipt holds exactly the record's fields."""
    flag = CancelRequest.new(random_root(), 'a "quoted" reason', "svc/i", "deadline")
    assert json.loads(flag.to_json()) == dataclasses.asdict(flag)
    assert CancelRequest.from_json(flag.to_json(), flag.root) == flag
    receipt = Receipt(flag.root, "svc", "inst", 2, 3, 4, 5, ("node", "handler"), 2, "why")
    assert json.loads(receipt.to_json()) == {**dataclasses.asdict(receipt), "interrupted": ["node", "handler"]}
    assert Receipt.from_json(receipt.to_json()) == receipt


def test_only_a_flag_of_its_own_root_passes_the_cheap_check():
    """A flag as the writer encodes it passes for its root only; another root, or garbage, needs a decode."""
    root = random_root()
    raw = CancelRequest.new(root, "r", "x").to_json()
    assert CancelRequest.starts_as_flag_of(raw, root)
    assert not CancelRequest.starts_as_flag_of(raw, random_root())
    for other in (b"", b"\x00garbage", b'{"reason":"r","root":"' + root.encode() + b'"}', b'{"root":"' + root.encode()):
        assert not CancelRequest.starts_as_flag_of(other, root)


def test_a_flag_for_a_root_not_held_here_is_decoded_only_when_a_refusal_needs_it():
    """A bystander keeps the flag's bytes; a later scope is refused with the flag's reason, read then, once."""
    registry = CancelRegistry()
    decoded = []

    def decode(root: str, raw: bytes) -> CancelRequest:
        decoded.append(root)
        return CancelRequest.from_json(raw, root)

    registry.decode_flag = decode
    flag = CancelRequest.new(random_root(), "guardrail: pii", "svc/i")
    assert registry.apply_unread(flag.root, flag.to_json())
    assert registry.applied == 1 and registry.cancelled_roots() == 1 and decoded == []
    assert registry.apply_unread(flag.root, flag.to_json())  # seen twice (listing and watch): no-op
    assert registry.apply(flag) == (False, [])
    registration, refused = registry.enter(flag.root, 1, "late", task_mode=False)
    assert refused == flag and decoded == [flag.root]
    registry.exit(registration)
    assert registry.is_cancelled(flag.root) == flag and decoded == [flag.root]
    assert registry.applied == 1


def test_a_flag_for_a_root_held_here_is_left_to_the_caller_to_decode_and_apply():
    """With work live for the root, apply_unread declines: the caller decodes the flag and stops the work."""
    registry = CancelRegistry()
    root = random_root()
    registration, _ = registry.enter(root, 0, "work", task_mode=False)
    flag = CancelRequest.new(root, "user", "cli@host")
    assert not registry.apply_unread(root, flag.to_json())
    assert registry.apply(flag) == (True, [registration])


def test_an_unread_flag_is_forgotten_with_its_key():
    """A deleted (expired) flag kept unread admits new work for its root again, as a decoded one does."""
    registry = CancelRegistry()
    flag = CancelRequest.new(random_root(), "r", "x")
    registry.apply_unread(flag.root, flag.to_json())
    registry.forget(flag.root)
    registration, refused = registry.enter(flag.root, 0, "again", task_mode=False)
    assert refused is None and registry.cancelled_roots() == 0
    registry.exit(registration)
    other = CancelRequest.new(random_root(), "r", "x")
    registry.apply_unread(other.root, other.to_json())
    registry.retain_only(set())
    assert registry.is_cancelled(other.root) is None


async def test_a_malformed_flag_kept_unread_still_refuses_its_root_and_is_logged_when_read(caplog):
    """A flag that starts like its root's but does not parse: refused with an unknown reason, logged once when read."""
    root = random_root()
    store = MemoryCancelStore()
    with configured(store=store) as runtime:
        await wait_for_listing(runtime)
        applied = runtime.registry.applied
        with caplog.at_level(logging.WARNING, logger="otel_cancel.watcher"):
            store.put_raw(f"{store.prefix}flags/{root}", b'{"root":"' + root.encode() + b'","reason":42}')
            await _until(lambda: runtime.registry.applied > applied)
            assert not [r for r in caplog.records if "malformed flag" in r.getMessage()]
            with pytest.raises(otel_cancel.Cancelled) as refused:
                async with otel_cancel.scope(root=root):
                    pass
        assert refused.value.reason == "unknown (malformed flag)"
        assert len([r for r in caplog.records if "malformed flag" in r.getMessage()]) == 1


async def _until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_the_stops_bound_for_one_loop_take_one_wake_up():
    """Three tasks of one root on one loop are cancelled through a single call_soon_threadsafe."""
    registry = CancelRegistry()
    root = random_root()
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()
    registrations = []

    async def hold() -> None:
        registration, _ = registry.enter(root, 0, "held")
        registrations.append(registration)
        if len(registrations) == 3:
            entered.set()
        await asyncio.Event().wait()

    tasks = [asyncio.create_task(hold()) for _ in range(3)]
    await asyncio.wait_for(entered.wait(), 5)
    _, stopping = registry.apply(CancelRequest.new(root, "r", "x"))
    wakes = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        wakes.append(callback)
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        await asyncio.to_thread(StopDelivery().post, stopping)  # from another thread, as the watcher does
        done, _ = await asyncio.wait(tasks, timeout=5)
    finally:
        del loop.call_soon_threadsafe
    assert len(done) == 3 and all(task.cancelled() for task in tasks)
    assert len([wake for wake in wakes if getattr(wake, "__name__", "") == "drain"]) == 1  # (to_thread wakes too)


async def test_the_io_loop_wakes_a_loop_again_only_after_the_pacing_interval(monkeypatch):
    """A stop after a quiet spell is delivered at once; the next ones, due within the interval, wait and go together."""
    monkeypatch.setattr(delivery, "STOP_WAKE_INTERVAL_SECONDS", 1.0)  # long enough to see the wait on any load
    registry = CancelRegistry()
    roots = [random_root() for _ in range(3)]
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()
    stopping: list[Registration] = []

    async def hold(root: str) -> None:
        registration, _ = registry.enter(root, 0, "held")
        stopping.append(registration)
        if len(stopping) == len(roots):
            entered.set()
        await asyncio.Event().wait()

    tasks = {root: asyncio.create_task(hold(root)) for root in roots}
    await asyncio.wait_for(entered.wait(), 5)
    for root in roots:
        registry.apply(CancelRequest.new(root, "r", "x"))
    by_root = {registration.root: registration for registration in stopping}
    wakes = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        wakes.append(getattr(callback, "__name__", ""))
        return original(callback, *args, **kwargs)

    paced = StopDelivery()

    async def post(root: str) -> None:  # on the IO loop, as the watcher posts
        paced.post([by_root[root]])

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        await io_loop().call(post(roots[0]))
        await asyncio.wait_for(asyncio.wait([tasks[roots[0]]]), 5)  # at once: nothing woke this loop lately
        await io_loop().call(post(roots[1]))
        await io_loop().call(post(roots[2]))
        assert not tasks[roots[1]].done() and not tasks[roots[2]].done()  # within the interval: waiting
        done, _ = await asyncio.wait([tasks[roots[1]], tasks[roots[2]]], timeout=10)
    finally:
        del loop.call_soon_threadsafe
    assert len(done) == 2 and all(task.cancelled() for task in tasks.values())
    assert wakes.count("drain") == 2  # the first stop, then the two together


async def test_a_stop_that_reaches_a_closed_loop_is_dropped():
    """A registration whose loop has closed is skipped: posting to it neither raises nor keeps it."""
    other = asyncio.new_event_loop()
    other.close()
    registry = CancelRegistry()
    registration, _ = registry.enter(random_root(), 0, "gone", task_mode=False)
    registration.loop = other
    StopDelivery().post([registration])  # nothing to wake: no error


async def _wait_forever(started: asyncio.Future[None]) -> None:
    started.set_result(None)
    await asyncio.Event().wait()


def test_a_loop_closed_after_its_wake_up_does_not_keep_its_mailbox():
    """Stops that a closed loop never drained are dropped with the next post: the loop is not kept alive."""
    delivery = StopDelivery()
    loop = asyncio.new_event_loop()
    started = loop.create_future()
    task = loop.create_task(_wait_forever(started))
    loop.run_until_complete(started)
    root = random_root()
    stop = Registration(root, 0, task, loop, 0, ["n"], 1, cancel_requested=CancelRequest.new(root, "r", "t"))
    delivery.post([stop])  # not on the IO loop: wakes the loop at once
    loop.close()  # before it ran the drain
    closed = weakref.ref(loop)
    del loop, started, task, stop
    delivery.post([])  # the next stops, bound for any loop
    gc.collect()
    assert closed() is None


def test_the_publisher_reads_only_the_oldest_roots_that_can_fit():
    """With more roots live than a record holds, the registry hands out the first entered, and counts the rest."""
    registry = CancelRegistry()
    roots = [random_root() for _ in range(MAX_PUBLISHED_ROOTS + 50)]
    for root in roots:
        registry.enter(root, 0, "held", task_mode=False)  # one thread: one registration per root
    oldest, total = registry.oldest_live_work(MAX_PUBLISHED_ROOTS)
    assert [entry.root for entry in oldest] == roots[:MAX_PUBLISHED_ROOTS] and total == len(roots)
    record = build_record("svc", "inst", oldest, total)
    assert len(record.to_json()) <= MAX_PUBLISHED_BYTES
    assert record.truncated == len(roots) - len(record.roots) > 50
    assert LiveRecord.from_json(record.to_json()) == record


def test_a_live_record_encodes_as_a_whole_dump_would():
    """A record built from its entries' own text is the JSON of the whole record, escapes included."""
    entry = LiveEntry(random_root(), 1, 2, 3, ('a "node"', "b"), {"tenant": "t\u00e9"})
    record = LiveRecord("svc", 'inst "1"', 5, (entry, entry), 7)
    whole = {
        "service": record.service,
        "instance": record.instance,
        "published_at": record.published_at,
        "roots": [entry.to_dict(), entry.to_dict()],
        "truncated": 7,
    }
    assert record.to_json() == json.dumps(whole, separators=(",", ":")).encode()


def test_the_publisher_encodes_again_only_the_entries_that_changed():
    """An entry equal to the one last published is reused (its text made once); a changed one is taken anew."""
    publisher = LivePublisher(CancelRegistry(), lambda: None, service="svc", instance="i")
    same, moved = (LiveEntry(random_root(), 0, 1, 1, ("a",), {}) for _ in range(2))
    publisher._published = {same.root: same, moved.root: moved}
    now_same = dataclasses.replace(same)
    now_moved = dataclasses.replace(moved, scopes=("a", "b"))
    reused = publisher._reuse([now_same, now_moved])
    assert reused[0] is same and reused[1] is now_moved


async def test_a_stop_that_ends_after_the_armed_receipt_writer_gave_up_still_gets_its_receipt():
    """The writer armed at the hand-over finds nothing yet; the task's late stop starts one of its own."""
    store = MemoryCancelStore()
    with configured(store=store, service="svc", instance="one") as runtime:
        await wait_for_listing(runtime)
        root = random_root()
        entered = asyncio.Event()

        async def slow_to_stop() -> None:
            async with otel_cancel.scope(root=root, name="slow"):
                try:
                    entered.set()
                    await asyncio.Event().wait()
                finally:
                    await asyncio.sleep(0.1)  # unwinding outlasts the writer's start (2 ms)

        task = asyncio.create_task(slow_to_stop())
        await asyncio.wait_for(entered.wait(), 5)
        await otel_cancel.cancel(root, reason="slow")
        with pytest.raises(otel_cancel.Cancelled):
            await asyncio.wait_for(task, 5)
        assert await runtime.wait_receipt(root, 5)
        (receipt,) = await store.list_receipts(root)
        assert receipt.interrupted == ("slow",) and receipt.reason == "slow"
