"""Labels, bulk selection and live-work publishing as in-process logic (memory store; no network)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context

import otel_cancel
from otel_cancel import attributes
from otel_cancel._core.bulk import BulkCancel
from otel_cancel._core.labels import current_labels, decode_labels, usable_labels, validate_labels, with_labels
from otel_cancel._core.live import MAX_PUBLISHED_BYTES, LivePublisher, LiveRecord, build_record
from otel_cancel._core.records import CancelRequest, LiveEntry
from otel_cancel._core.registry import CancelRegistry
from otel_cancel._core.root import random_root, root_started_ms, with_root
from otel_cancel._core.startup_wait import wait_for_listing
from otel_cancel.exceptions import InvalidLabelError, StorePermissionError
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "labels",
    [
        {"": "x"},
        {"1tenant": "x"},
        {"tenant": ""},
        {"tenant": "a b"},
        {"tenant": "a;b"},
        {"k" * 65: "x"},
        {"t": "v" * 129},
    ],
)
def test_labels_that_do_not_fit_are_refused_with_a_clear_error(labels):
    """Keys and values are validated like roots: a bad one raises InvalidLabelError naming the rule."""
    with pytest.raises(InvalidLabelError, match="label"):
        validate_labels(labels)


def test_at_most_sixteen_labels_travel_with_a_run():
    """A run carries at most 16 labels; more raise, and excess pairs off the wire are dropped."""
    with pytest.raises(InvalidLabelError, match="at most 16"):
        validate_labels({f"k{i}": "v" for i in range(17)})
    raw = ";".join(f"k{i}=v" for i in range(40)) + ";bad key=x;=;junk"
    assert len(decode_labels(raw)) == 16
    assert usable_labels({"thread_id": "t-1", "bad": "has space", "none": None}) == {"thread_id": "t-1"}


def test_labels_travel_in_baggage_and_a_new_root_keeps_its_own_start_and_drops_another_runs_labels():
    """with_labels merges; the run's start time is kept for the same root and reset (labels dropped) for another."""
    root, other = random_root(), random_root()
    context = with_labels({"tenant": "acme"}, with_root(root, 0, otel_context.Context()))
    started = root_started_ms(context)
    assert started is not None and abs(started - time.time_ns() // 1_000_000) < 60_000
    context = with_labels({"user_id": "u-1"}, context)
    assert current_labels(context) == {"tenant": "acme", "user_id": "u-1"}
    hop = with_root(root, 1, baggage.set_baggage(attributes.BAGGAGE_STARTED, "1000", context))
    assert root_started_ms(hop) == 1000 and current_labels(hop) == {"tenant": "acme", "user_id": "u-1"}
    replaced = with_root(other, 0, hop)
    assert root_started_ms(replaced) != 1000 and current_labels(replaced) == {}


def test_a_bulk_cancel_selects_by_service_labels_and_start_time():
    """A run is selected only when it began at or before the cut-off and matches the service and every label."""
    bulk = BulkCancel.new(service="beta", labels={"tenant": "t1"}, reason="r", requested_by="me")
    cutoff_ms = bulk.requested_at // 1_000_000
    assert bulk.selects("beta", {"tenant": "t1", "x": "y"}, cutoff_ms - 5)
    assert not bulk.selects("beta", {"tenant": "t1"}, cutoff_ms + 5)
    assert not bulk.selects("alpha", {"tenant": "t1"}, cutoff_ms - 5)
    assert not bulk.selects("beta", {"tenant": "t2"}, cutoff_ms - 5)
    assert BulkCancel.from_json(bulk.to_json(), bulk.id) == bulk
    with pytest.raises(ValueError):
        BulkCancel.from_json(bulk.to_json(), "0" * 16)


def test_a_live_record_stays_bounded_keeping_the_oldest_work():
    """Thousands of live roots publish within the size bound; the oldest are kept and the rest counted."""
    live = [
        LiveEntry(random_root(), 0, i, 0, ("scope-" + "x" * 200,), {"tenant": f"t{i}", "user_id": "u" * 100})
        for i in range(5000)
    ]
    record = build_record("svc", "inst", live)
    assert len(record.to_json()) <= MAX_PUBLISHED_BYTES
    assert record.truncated == 5000 - len(record.roots) > 0
    assert [entry.started_at for entry in record.roots] == list(range(len(record.roots)))
    assert LiveRecord.from_json(record.to_json()).roots == record.roots


async def test_publishing_costs_at_most_one_write_per_interval_whatever_the_request_rate():
    """2,000 scopes entered and left in a burst cost a handful of writes; an idle process writes nothing."""
    store = MemoryCancelStore()
    registry = CancelRegistry(service="svc")
    publisher = LivePublisher(registry, lambda: _ready(store), service="svc", instance="i", interval_ms=50)
    task = asyncio.ensure_future(publisher.run())
    try:
        await asyncio.sleep(0.2)  # idle: several intervals pass
        assert publisher.writes == 0 and await store.list_live() == []
        began = time.monotonic()
        for _ in range(2000):
            registration, _ = registry.enter(random_root(), 0, "r")
            registry.exit(registration)
            await asyncio.sleep(0)
        keep = random_root()
        registration, _ = registry.enter(keep, 0, "long")
        while not any(entry.root == keep for record in await store.list_live() for entry in record.roots):
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - began
        assert publisher.writes <= elapsed / 0.05 + 2
        registry.exit(registration)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await store.list_live() == []  # the lease was revoked on the way out


async def _ready(store: MemoryCancelStore) -> MemoryCancelStore:
    return store


async def test_labelled_and_scope_labels_reach_the_context_and_this_process_live_work():
    """labelled() and scope(labels=...) label the run in the context and in this process's live work."""
    with configured(store=MemoryCancelStore()) as runtime:
        with otel_cancel.labelled(tenant="acme"):
            async with otel_cancel.scope(name="edge", labels={"user_id": "u-1"}) as bound:
                assert otel_cancel.current_labels() == {"tenant": "acme", "user_id": "u-1"}
                with otel_cancel.labelled({"plan": "pro"}):
                    (entry,) = runtime.registry.live_work()
        assert entry.root == bound.root and entry.scopes == ("edge",)
        assert entry.labels == {"tenant": "acme", "user_id": "u-1", "plan": "pro"}
        with pytest.raises(InvalidLabelError):
            otel_cancel.labelled(tenant="has space")


async def test_cancel_many_validates_what_it_selects():
    """cancel_many refuses nothing selected, roots mixed with a selector, and everything with a selector."""
    with configured(store=MemoryCancelStore()):
        for kwargs in ({}, {"roots": [random_root()], "service": "s"}, {"everything": True, "labels": {"a": "b"}}):
            with pytest.raises(ValueError):
                await otel_cancel.cancel_many(**kwargs)


async def test_cancel_many_everything_stops_this_process_runs_and_spares_a_run_begun_after():
    """cancel_many(everything=True) stops running scopes here; a scope entered afterwards runs."""
    with configured(store=MemoryCancelStore()):
        entered = asyncio.Event()

        async def work() -> None:
            async with otel_cancel.scope(name="w"):
                entered.set()
                await asyncio.Event().wait()

        running = asyncio.ensure_future(work())
        await asyncio.wait_for(entered.wait(), 10)
        result = await otel_cancel.cancel_many(everything=True, reason="kill switch")
        assert result.bulk is not None
        with pytest.raises(otel_cancel.Cancelled, match="kill switch"):
            await asyncio.wait_for(running, 10)
        await asyncio.sleep(0.002)  # the next run begins in a later millisecond than the cut-off
        async with otel_cancel.scope(name="after"):
            pass


async def test_a_lost_lease_is_granted_again_and_the_live_record_rewritten():
    """When the process's lease disappears (etcd restarted), the next change is published on a new lease."""
    store = MemoryCancelStore()
    registry = CancelRegistry(service="svc")
    publisher = LivePublisher(
        registry, lambda: _ready(store), service="svc", instance="i", interval_ms=20, ttl_seconds=60
    )
    task = asyncio.ensure_future(publisher.run())

    async def published(root: str) -> None:
        while not any(entry.root == root for record in await store.list_live() for entry in record.roots):
            await asyncio.sleep(0.01)

    try:
        first, second = random_root(), random_root()
        registration, _ = registry.enter(first, 0, "a")
        await asyncio.wait_for(published(first), 10)
        lease = publisher._lease
        assert lease is not None
        await store.revoke_lease(lease)
        assert await store.list_live() == []
        registry.exit(registration)
        registration, _ = registry.enter(second, 0, "b")
        await asyncio.wait_for(published(second), 10)
        assert publisher._lease not in (None, lease)
        registry.exit(registration)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_ages_read_at_a_glance():
    """Ages are short and grow units: ms, s with a decimal, m+s, h+m, d+h."""
    from otel_cancel.cli.fleet import format_age

    second = 10**9
    assert [
        format_age(n) for n in (-5, 850 * 10**6, 12_340 * 10**6, 245 * second, 7380 * second, 273_600 * second)
    ] == [
        "0ms",
        "850ms",
        "12.3s",
        "4m05s",
        "2h03m",
        "3d04h",
    ]


def test_ps_rows_filter_by_service_and_every_label_and_sort_oldest_first():
    """ps_rows keeps a root's row per process, filters by service and all labels, oldest work first."""
    from otel_cancel.cli.fleet import ps_rows

    shared, other = random_root(), random_root()
    records = [
        LiveRecord("a", "a0", 0, (LiveEntry(shared, 0, 20, 0, ("edge",), {"tenant": "t1", "user_id": "u"}),)),
        LiveRecord(
            "b", "b0", 0, (LiveEntry(shared, 1, 30, 0, (), {"tenant": "t1"}), LiveEntry(other, 0, 10, 0, (), {}))
        ),
    ]
    assert [(r["root"], r["service"]) for r in ps_rows(records, None, [])] == [
        (other, "b"),
        (shared, "a"),
        (shared, "b"),
    ]
    assert [r["service"] for r in ps_rows(records, None, [("tenant", "t1"), ("user_id", "u")])] == ["a"]
    assert [r["root"] for r in ps_rows(records, "b", [("tenant", "t1")])] == [shared]


class _FlagRefusingStore(MemoryCancelStore):
    """A store whose role may not write flags (the README's service role)."""

    def __init__(self) -> None:
        super().__init__()
        self.flag_writes = 0

    async def create_flag(self, request, ttl_seconds):  # type: ignore[no-untyped-def]
        self.flag_writes += 1
        raise StorePermissionError("etcd denied writing a cancel flag: permission denied")


def test_a_role_that_may_not_write_flags_costs_one_log_line_for_a_whole_bulk_selection(caplog):
    """Flags of 50 roots a bulk cancel selected here, refused by etcd: one attempt, one warning."""
    store = _FlagRefusingStore()
    with configured(store=store) as runtime:
        requests = [CancelRequest.new(random_root(), "kill switch", "tests") for _ in range(50)]
        with caplog.at_level("WARNING", logger="otel_cancel"):
            runtime._write_selected_flags(requests).result(10)
            runtime._write_selected_flags(requests).result(10)
    assert store.flag_writes == 2
    lines = [r for r in caplog.records if "selected by a bulk cancel" in r.getMessage()]
    assert len(lines) == 1


async def test_garbage_under_the_live_prefix_is_skipped_and_a_bad_entry_costs_only_itself(caplog):
    """ps reads on past foreign values under live/: a malformed record is skipped, a bad entry dropped alone."""
    store = MemoryCancelStore()
    good = random_root()
    store.put_raw(f"{store.prefix}live/x/garbage", b"\xff not json")
    store.put_raw(
        f"{store.prefix}live/svc/mixed",
        json.dumps(
            {
                "service": "svc",
                "instance": "mixed",
                "roots": [
                    {"root": "../../etc", "labels": {}},
                    {"root": good, "depth": 0, "started_at": 1, "scopes": ["a"], "labels": {"bad key": "x"}},
                    {"root": good, "depth": 2, "started_at": 5, "scopes": ["b"], "labels": {"tenant": "t"}},
                ],
            }
        ).encode(),
    )
    with caplog.at_level("WARNING", logger="otel_cancel.store"):
        (record,) = await store.list_live()
    assert [(e.root, e.depth, dict(e.labels)) for e in record.roots] == [(good, 2, {"tenant": "t"})]
    assert len([r for r in caplog.records if "malformed live record" in r.getMessage()]) == 1


async def test_a_bulk_cancel_listed_keys_only_is_fetched_and_refuses_runs_begun_before_it(monkeypatch):
    """A listing past its values (keys only) still applies a bulk flag: the watcher fetches it by id."""
    import otel_cancel._core.watcher as watcher_module

    monkeypatch.setattr(watcher_module, "LISTED_WITH_VALUES", 0)  # every flag listed keys-only
    store = MemoryCancelStore()
    root = random_root()
    begun_before = otel_context.attach(with_root(root, 1))  # the run begins before the bulk cancel
    try:
        bulk = BulkCancel.new(service=None, labels={}, reason="kill switch", requested_by="tests")
        await store.create_bulk(bulk, 60)
        with configured(store=store) as runtime:
            await wait_for_listing(runtime)
            with pytest.raises(otel_cancel.Cancelled) as refused:
                async with otel_cancel.scope(name="late hop"):
                    pytest.fail("a hop of a run begun before the bulk cancel ran")
            assert refused.value.reason == "kill switch"
    finally:
        otel_context.detach(begun_before)


async def test_cancel_many_in_store_tries_every_root_and_reports_each_flag_before_raising():
    """One root refused: the others are still flagged and reported through on_flag, then the refusal is raised."""
    from otel_cancel._core.cancel_many import cancel_many_in_store

    refused_root, first, second = random_root(), random_root(), random_root()

    refusal_made = asyncio.Event()

    class RefusingOneRoot(MemoryCancelStore):
        async def create_flag(self, request: CancelRequest, ttl_seconds: int) -> tuple[CancelRequest, bool]:
            if request.root == refused_root:
                refusal_made.set()
                raise StorePermissionError("etcd denied writing a cancel flag")
            # The other writes are slower than the refusal: still under way when it is known.
            await refusal_made.wait()
            for _ in range(3):
                await asyncio.sleep(0)
            return await super().create_flag(request, ttl_seconds)

    store = RefusingOneRoot()
    reported: dict[str, bool] = {}
    with pytest.raises(StorePermissionError):
        await cancel_many_in_store(
            store,
            roots=[refused_root, first, second],
            reason="r",
            requested_by="tests",
            ttl_seconds=60,
            on_flag=lambda request, created: reported.__setitem__(request.root, created),
        )
    assert reported == {first: True, second: True}
    assert await store.get_flag(first) is not None and await store.get_flag(second) is not None


async def test_a_flag_an_earlier_try_of_the_same_cancel_stored_counts_as_created():
    """A flag found in the store that is one of `attempted` was this cancel's own write; another is not."""
    from otel_cancel._core.cancel_many import cancel_many_in_store

    store = MemoryCancelStore()
    ours, _ = await store.create_flag(CancelRequest.new(random_root(), "r", "tests"), 60)  # as stored, stamped
    theirs, _ = await store.create_flag(CancelRequest.new(random_root(), "r", "tests"), 60)
    result = await cancel_many_in_store(
        store,
        roots=[ours.root, theirs.root],
        reason="r",
        requested_by="tests",
        ttl_seconds=60,
        read_live=False,
        attempted=[ours],
    )
    assert result.flags == ((ours, True), (theirs, False))
