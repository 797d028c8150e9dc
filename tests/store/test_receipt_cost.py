"""A receipt costs one etcd call: it joins the lease its flag arrived with, counted at etcd itself."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable

import pytest

import otel_cancel
from otel_cancel._core.records import CancelRequest, Receipt
from otel_cancel._core.root import random_root
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import EtcdServer, configured, on_io_loop
from otel_cancel.testing.etcd_metrics import KV_AND_LEASE_CALLS, etcd_grpc_calls

pytestmark = pytest.mark.anyio


def _etcd_calls(etcd: EtcdServer) -> Counter[str]:
    """Every KV and lease-grant RPC etcd has started, by method, from its own Prometheus metrics."""
    return etcd_grpc_calls(etcd.client_url, KV_AND_LEASE_CALLS)


async def _calls_during(etcd: EtcdServer, operation: Awaitable[None]) -> Counter[str]:
    before = await asyncio.to_thread(_etcd_calls, etcd)
    await operation
    after = await asyncio.to_thread(_etcd_calls, etcd)
    return after - before


async def _see_flag_in_watch(store: EtcdCancelStore, revision: int) -> None:
    async for _ in store.watch_flags(revision):
        return


def _two_stores(etcd: EtcdServer, prefix: str) -> tuple[EtcdCancelStore, EtcdCancelStore]:
    """One store that writes the flags (a canceller), one that sees them and acknowledges."""
    return EtcdCancelStore([etcd.endpoint], prefix=prefix), EtcdCancelStore([etcd.endpoint], prefix=prefix)


async def _close(*stores: EtcdCancelStore) -> None:
    for store in stores:
        await store.close()


async def _assert_on_its_flags_lease(store: EtcdCancelStore, prefix: str, root: str) -> None:
    """The receipt of ``root`` (service ``svc``, instance ``i``) lives on its flag's lease."""
    client = store._connection()
    flag = await client.get(f"{prefix}flags/{root}".encode())
    stored = await client.get(f"{prefix}acks/{root}/svc/i".encode())
    assert stored.lease == flag.lease != 0


@on_io_loop
async def test_a_receipt_for_a_watched_flag_is_one_put_on_the_flags_lease(etcd, prefix):
    """After the watch delivered the flag, writing the receipt is one Put on the flag's lease, no read, no grant."""
    canceller, watcher = _two_stores(etcd, prefix)
    root = random_root()
    start = (await watcher.list_flags()).revision + 1
    await canceller.create_flag(CancelRequest.new(root, "t", "tests"), 120)
    await _see_flag_in_watch(watcher, start)
    receipt = Receipt(root, "svc", "i", 1, 1, 2, 0)
    calls = await _calls_during(etcd, watcher.put_receipt(receipt, 120))
    assert calls == Counter({"Put": 1})
    await _assert_on_its_flags_lease(watcher, prefix, root)
    await _close(canceller, watcher)


@on_io_loop
async def test_a_listed_flag_also_gives_a_one_call_receipt(etcd, prefix):
    """A flag found by the listing (written before the process started) is as cheap to acknowledge."""
    canceller, watcher = _two_stores(etcd, prefix)
    root = random_root()
    await canceller.create_flag(CancelRequest.new(root, "t", "tests"), 120)
    await watcher.list_flags()
    calls = await _calls_during(etcd, watcher.put_receipt(Receipt(root, "svc", "i", 1, 1, 2, 0), 120))
    assert calls == Counter({"Put": 1})
    await _close(canceller, watcher)


@on_io_loop
async def test_a_flag_listed_keys_only_in_small_pages_also_gives_a_one_call_receipt(etcd, prefix):
    """The watcher lists past its first flags keys-only and page by page: the lease comes with the keys."""
    canceller, watcher = _two_stores(etcd, prefix)
    roots = [random_root() for _ in range(3)]
    for root in roots:
        await canceller.create_flag(CancelRequest.new(root, "t", "tests"), 120)
    pages = [page async for page in watcher.list_flag_pages(keys_only=True, page_size=2)]
    assert len(pages) == 2 and all(flag.value == b"" for page in pages for flag in page.flags)
    for root in roots:
        calls = await _calls_during(etcd, watcher.put_receipt(Receipt(root, "svc", "i", 1, 1, 2, 0), 120))
        assert calls == Counter({"Put": 1})
    await _close(canceller, watcher)


@on_io_loop
async def test_a_receipt_whose_flag_expired_after_the_watch_gets_its_own_lease(etcd, prefix):
    """The flag's lease is gone by the time of the receipt: the receipt still lands, on a fresh TTL lease."""
    canceller, watcher = _two_stores(etcd, prefix)
    root = random_root()
    start = (await watcher.list_flags()).revision + 1
    await canceller.create_flag(CancelRequest.new(root, "t", "tests"), 120)
    await _see_flag_in_watch(watcher, start)
    client = canceller._connection()
    flag = await client.get(f"{prefix}flags/{root}".encode())
    await client.revoke_lease(flag.lease)  # what expiry does: the flag and its lease go
    await watcher.put_receipt(Receipt(root, "svc", "i", 1, 1, 2, 0), 120)
    stored = await client.get(f"{prefix}acks/{root}/svc/i".encode())
    assert stored is not None and stored.lease not in (0, flag.lease)
    info = await client.get_lease_info(stored.lease)
    assert 100 < info.TTL <= 120
    await _close(canceller, watcher)


async def test_a_process_that_stops_work_writes_its_receipt_with_one_etcd_call(etcd, prefix):
    """Through the real watcher: flag seen, work stopped, receipt written, and the receipt was one Put."""
    with configured(endpoints=(etcd.endpoint,), prefix=prefix, service="svc") as runtime:
        root = random_root()
        started = asyncio.Event()

        async def work() -> None:
            async with otel_cancel.scope(root=root):
                started.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(work())
        await asyncio.wait_for(started.wait(), 10)
        canceller = EtcdCancelStore([etcd.endpoint], prefix=prefix)
        before = await asyncio.to_thread(_etcd_calls, etcd)
        await on_io_loop(canceller.create_flag)(CancelRequest.new(root, "t", "tests"), 120)
        with pytest.raises(otel_cancel.Cancelled):
            await asyncio.wait_for(task, 10)
        assert await runtime.wait_receipt(root, 10)
        after = await asyncio.to_thread(_etcd_calls, etcd)
        await on_io_loop(canceller.close)()
        # The canceller's own calls: a lease grant and the create-if-absent transaction.
        assert after - before == Counter({"LeaseGrant": 1, "Txn": 1, "Put": 1})


@on_io_loop
async def test_receipts_due_together_share_one_etcd_call(etcd, prefix):
    """Five receipts for watched flags, written together: one Txn, each receipt on its own flag's lease."""
    canceller, watcher = _two_stores(etcd, prefix)
    roots = [random_root() for _ in range(5)]
    for root in roots:
        await canceller.create_flag(CancelRequest.new(root, "t", "tests"), 120)
    await watcher.list_flags()
    receipts = [Receipt(root, "svc", "i", 1, 1, 2, 0) for root in roots]
    assert await _calls_during(etcd, watcher.put_receipts(receipts, 120)) == Counter({"Txn": 1})
    for root in roots:
        await _assert_on_its_flags_lease(watcher, prefix, root)
    await _close(canceller, watcher)


@on_io_loop
async def test_a_batch_with_an_expired_flag_still_writes_every_receipt(etcd, prefix):
    """One flag's lease is gone: the batch falls back to one put per receipt, and all of them land."""
    canceller, watcher = _two_stores(etcd, prefix)
    roots = [random_root() for _ in range(3)]
    for root in roots:
        await canceller.create_flag(CancelRequest.new(root, "t", "tests"), 120)
    await watcher.list_flags()
    client = canceller._connection()
    expired = await client.get(f"{prefix}flags/{roots[0]}".encode())
    await client.revoke_lease(expired.lease)
    await watcher.put_receipts([Receipt(root, "svc", "i", 1, 1, 2, 0) for root in roots], 120)
    for root in roots:
        assert await client.get(f"{prefix}acks/{root}/svc/i".encode()) is not None
    await _close(canceller, watcher)
