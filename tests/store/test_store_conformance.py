"""The conformance suite every CancelStore backend must pass (memory and real etcd)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from otel_cancel._core.bulk import BulkCancel
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest, LiveEntry, LiveRecord, Receipt, TaskRecord
from otel_cancel._core.root import random_root
from otel_cancel.exceptions import InvalidRootError, InvalidTaskIdError, RevisionCompactedError
from otel_cancel.store import CancelStore
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import on_io_loop

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "etcd"])
def store(request, etcd, prefix) -> Iterator[CancelStore]:
    if request.param == "memory":
        backend: CancelStore = MemoryCancelStore(prefix)
    else:
        backend = EtcdCancelStore([etcd.endpoint], prefix=prefix)
    yield backend
    io_loop().run(backend.close(), timeout=10)


def _request(root: str, reason: str = "test") -> CancelRequest:
    return CancelRequest.new(root, reason, "tests")


async def _compact(store: CancelStore) -> None:
    if isinstance(store, MemoryCancelStore):
        store.compact()
    else:
        assert isinstance(store, EtcdCancelStore)
        listing = await store.list_flags()
        client = store._connection()
        await client.compact(listing.revision)


@on_io_loop
async def test_create_flag_writes_once_and_keeps_the_first(store):
    """A second cancel of the same root keeps the first flag (reason, time, requester)."""
    root = random_root()
    first, created = await store.create_flag(_request(root, "first"), 60)
    again, created_again = await store.create_flag(_request(root, "second"), 60)
    assert created and not created_again
    assert again == first and again.reason == "first"
    assert await store.get_flag(root) == first


@on_io_loop
async def test_get_flag_of_an_uncancelled_root_is_none(store):
    """Reading the flag of a root nobody cancelled gives None."""
    assert await store.get_flag(random_root()) is None


@on_io_loop
async def test_get_flag_of_a_malformed_value_still_says_the_root_is_cancelled(store):
    """A value no decoder accepts (a foreign writer's): the key still cancels the root; no error but StoreError."""
    root = random_root()
    key = f"{store.prefix}flags/{root}"
    if isinstance(store, MemoryCancelStore):
        store.put_raw(key, b"\xff not json")
    else:
        assert isinstance(store, EtcdCancelStore)
        await store._connection().put(key.encode(), b"\xff not json")
    flag = await store.get_flag(root)
    assert flag == CancelRequest.of_malformed_flag(root)


@on_io_loop
async def test_list_flags_returns_every_flag_and_a_revision(store):
    """The listing holds each flag under {prefix}flags/{root} and the revision it was taken at."""
    roots = {random_root() for _ in range(3)}
    for root in roots:
        await store.create_flag(_request(root), 60)
    listing = await store.list_flags()
    assert {event.key.rsplit("/", 1)[1] for event in listing.flags} == roots
    assert all(event.key.startswith(f"{store.prefix}flags/") for event in listing.flags)
    assert listing.revision >= max(event.revision for event in listing.flags)


@on_io_loop
async def test_flag_pages_list_every_flag_once_in_key_order_at_one_revision(store):
    """Pages of 2: every flag once, in key order, one revision throughout; a flag written meanwhile waits."""
    roots = sorted(random_root() for _ in range(5))
    for root in roots:
        await store.create_flag(_request(root), 60)
    pages = []
    async for page in store.list_flag_pages(page_size=2):
        pages.append(page)
        if len(pages) == 1:
            await store.create_flag(_request(random_root()), 60)  # after the listing's revision
    assert [len(page.flags) for page in pages][:3] == [2, 2, 1]
    assert len({page.revision for page in pages}) == 1
    listed = [flag.key.rsplit("/", 1)[1] for page in pages for flag in page.flags]
    assert listed == roots
    assert all(CancelRequest.from_json(flag.value, flag.key.rsplit("/", 1)[1]) for page in pages for flag in page.flags)


@on_io_loop
async def test_flag_pages_carry_values_for_the_first_flags_only_when_asked(store):
    """``values_for_first=3``: the first three flags come with values, the rest as keys only; ``keys_only``: none."""
    for _ in range(5):
        await store.create_flag(_request(random_root()), 60)
    flags = [flag async for page in store.list_flag_pages(page_size=2, values_for_first=3) for flag in page.flags]
    assert [bool(flag.value) for flag in flags] == [True, True, True, False, False]
    keys = [flag async for page in store.list_flag_pages(keys_only=True) for flag in page.flags]
    assert len(keys) == 5 and not any(flag.value for flag in keys)


@on_io_loop
async def test_watch_from_a_revision_replays_later_flags_in_order(store):
    """A watch started at listing revision + 1 sees flags written after the listing, in order."""
    listing = await store.list_flags()
    roots = [random_root() for _ in range(3)]
    for root in roots:
        await store.create_flag(_request(root), 60)
    seen = []
    watch = store.watch_flags(listing.revision + 1)
    async with asyncio.timeout(10):
        async for event in watch:
            seen.append(event)
            if len(seen) == 3:
                break
    await watch.aclose()
    assert [e.key.rsplit("/", 1)[1] for e in seen] == roots
    assert [e.kind for e in seen] == ["put"] * 3
    assert seen[0].revision < seen[1].revision < seen[2].revision
    assert CancelRequest.from_json(seen[0].value, roots[0]).root == roots[0]


@on_io_loop
async def test_watch_from_a_compacted_revision_raises(store):
    """Watching from a revision the store compacted raises RevisionCompactedError."""
    first = (await store.list_flags()).revision
    for _ in range(3):
        await store.create_flag(_request(random_root()), 60)
    await _compact(store)
    with pytest.raises(RevisionCompactedError):
        async with asyncio.timeout(10):
            async for _ in store.watch_flags(first):
                pass


@on_io_loop
async def test_receipts_round_trip_per_process(store):
    """Receipts are stored one per service/instance under the root and read back."""
    root = random_root()
    await store.create_flag(_request(root), 60)
    for instance in ("a", "b"):
        receipt = Receipt(root, "svc", instance, 1, 10, 20, 5, ("node",), 2, "test")
        await store.put_receipt(receipt, 60)
        await store.put_receipt(receipt, 60)  # written twice: still one per process
    receipts = await store.list_receipts(root)
    assert sorted(r.instance for r in receipts) == ["a", "b"]
    assert receipts[0].interrupted == ("node",) and receipts[0].latency_ms == pytest.approx(15e-6)


@on_io_loop
async def test_receipts_written_together_land_like_receipts_written_one_by_one(store):
    """put_receipts writes every receipt of the batch, for flags the store has seen and for flags it has not."""
    seen_roots = [random_root() for _ in range(3)]
    for root in seen_roots:
        await store.create_flag(_request(root), 60)
    unflagged = random_root()  # no flag at all: its receipt still lands, on a lease of its own
    batch = [Receipt(root, "svc", "i", 1, 10, 20, 5) for root in [*seen_roots, unflagged]]
    await store.put_receipts(batch, 60)
    for root in [*seen_roots, unflagged]:
        assert [r.root for r in await store.list_receipts(root)] == [root]


@on_io_loop
async def test_keys_are_built_only_from_valid_roots(store):
    """A root that could escape the prefix is refused before any key is built."""
    for bad in ("../../etc", "A" * 32, "0" * 32, "g" * 32, ""):
        with pytest.raises(InvalidRootError):
            await store.get_flag(bad)
        with pytest.raises(InvalidRootError):
            await store.list_receipts(bad)


@on_io_loop
async def test_receipt_names_cannot_escape_their_segment(store):
    """Service and instance names with slashes stay inside one key segment."""
    root = random_root()
    await store.put_receipt(Receipt(root, "a/../../b", "x/y", 0, 1, 2, 0), 60)
    (receipt,) = await store.list_receipts(root)
    assert receipt.service == "a/../../b"


@on_io_loop
async def test_ping_answers(store):
    """ping() returns when the store is up."""
    await store.ping()


def _record(task_id: str, root: str, instance: str = "i1") -> TaskRecord:
    return TaskRecord(task_id, root, "ctx-1", "agent", instance, 1)


@on_io_loop
async def test_task_records_round_trip_and_a_later_write_replaces_them(store):
    """A task record reads back as written; a second write for the same task replaces it."""
    task_id = str(uuid.uuid4())
    assert await store.get_task(task_id) is None
    first = _record(task_id, random_root())
    await store.put_task(first, 60)
    assert await store.get_task(task_id) == first
    second = _record(task_id, random_root(), instance="i2")
    await store.put_task(second, 60)
    assert await store.get_task(task_id) == second


@on_io_loop
async def test_deleting_a_task_record_spares_a_later_write(store):
    """delete_task removes the record written at its revision, never a newer one."""
    task_id = str(uuid.uuid4())
    old = await store.put_task(_record(task_id, random_root()), 60)
    newer = _record(task_id, random_root(), instance="i2")
    new = await store.put_task(newer, 60)
    assert not await store.delete_task(task_id, old)
    assert await store.get_task(task_id) == newer
    assert await store.delete_task(task_id, new)
    assert await store.get_task(task_id) is None
    assert not await store.delete_task(task_id, new)


@on_io_loop
async def test_task_ids_that_could_escape_the_prefix_are_refused(store):
    """Task ids with slashes, dot segments, odd characters or no characters build no key."""
    for bad in ("../flags/x", "a/b", ".", "..", "", "x" * 129, "tab\there", "ünïcode"):
        with pytest.raises(InvalidTaskIdError):
            await store.get_task(bad)
        with pytest.raises(InvalidTaskIdError):
            await store.put_task(_record(bad, random_root()), 60)


@on_io_loop
async def test_a_bulk_flag_is_stamped_at_its_write_and_streams_with_the_flags(store):
    """create_bulk writes {prefix}flags/bulk/{id} with the write's time as cut-off; the flags watch carries it."""
    listing = await store.list_flags()
    bulk = BulkCancel.new(service="svc", labels={"tenant": "t1"}, reason="r", requested_by="tests")
    stored = await store.create_bulk(bulk, 60)
    assert stored.id == bulk.id and stored.requested_at >= bulk.requested_at
    events = store.watch_flags(listing.revision + 1)
    try:
        event = await asyncio.wait_for(anext(events), 10)
    finally:
        await events.aclose()
    assert event.key == f"{store.prefix}flags/bulk/{bulk.id}"
    assert BulkCancel.from_json(event.value, bulk.id) == stored
    assert any(e.key == event.key for e in (await store.list_flags()).flags)
    assert await store.get_bulk(bulk.id) == stored
    assert await store.get_bulk(BulkCancel.new(service="svc", labels={}, reason="r", requested_by="tests").id) is None


@on_io_loop
async def test_live_records_live_on_their_lease_and_go_with_it(store):
    """put_live writes one record per process on a lease; keep-alive renews it; revoking removes the record."""
    lease = await store.grant_lease(30)
    entry = LiveEntry(random_root(), 1, 123, 45, ("node",), {"tenant": "t1"})
    for instance in ("i1", "i2"):
        await store.put_live(LiveRecord("svc", instance, 1, (entry,)), lease)
    await store.put_live(LiveRecord("svc", "i1", 2, ()), lease)  # rewritten in place
    records = sorted(await store.list_live(), key=lambda r: r.instance)
    assert [(r.instance, r.published_at, r.roots) for r in records] == [("i1", 2, ()), ("i2", 1, (entry,))]
    assert await store.keep_lease_alive(lease)
    await store.revoke_lease(lease)
    assert await store.list_live() == []
    assert not await store.keep_lease_alive(lease)
    await store.revoke_lease(lease)  # already gone: not an error
