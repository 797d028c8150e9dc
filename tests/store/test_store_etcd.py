"""etcd-specific behaviour of the store: leases, fail-over, error translation, deadlines."""

from __future__ import annotations

import asyncio
import time

import aetcd.rpc
import grpc
import pytest

from otel_cancel._core.records import CancelRequest, Receipt
from otel_cancel._core.root import random_root
from otel_cancel.exceptions import StoreUnavailableError
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import free_port, on_io_loop

pytestmark = pytest.mark.anyio


async def _leases(store: EtcdCancelStore) -> set[int]:
    client = store._connection()
    await client.connect()
    response = await client.leasestub.LeaseLeases(aetcd.rpc.LeaseLeasesRequest(), timeout=2)
    return {lease.ID for lease in response.leases}


@on_io_loop
async def test_flag_lives_on_a_ttl_lease_and_receipts_share_it(etcd, prefix):
    """The flag is attached to a lease with the configured TTL; receipts use the same lease."""
    store = EtcdCancelStore([etcd.endpoint], prefix=prefix)
    root = random_root()
    await store.create_flag(CancelRequest.new(root, "t", "tests"), 120)
    await store.put_receipt(Receipt(root, "svc", "i", 0, 1, 2, 0), 120)
    client = store._connection()
    flag = await client.get(f"{prefix}flags/{root}".encode())
    receipt = await client.get(f"{prefix}acks/{root}/svc/i".encode())
    assert flag.lease != 0 and receipt.lease == flag.lease
    info = await client.get_lease_info(flag.lease)
    assert 100 < info.TTL <= 120
    await store.close()


@on_io_loop
async def test_a_second_create_revokes_its_unused_lease(etcd, prefix):
    """Create-if-absent that finds a flag revokes the lease it granted (no lease leak)."""
    store = EtcdCancelStore([etcd.endpoint], prefix=prefix)
    root = random_root()
    await store.create_flag(CancelRequest.new(root, "first", "tests"), 60)
    before = await _leases(store)
    for _ in range(5):
        await store.create_flag(CancelRequest.new(root, "again", "tests"), 60)
    assert await _leases(store) == before
    await store.close()


@on_io_loop
async def test_unreachable_etcd_raises_store_unavailable_within_the_deadline():
    """A call to an endpoint nobody listens on fails with StoreUnavailableError, bounded by the timeout."""
    store = EtcdCancelStore([f"127.0.0.1:{free_port()}"], timeout=0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        await store.get_flag(random_root())
    assert time.monotonic() - started < 5
    await store.close()


@on_io_loop
async def test_fails_over_to_the_next_endpoint(etcd, prefix):
    """With the first endpoint dead, the store moves on to the next one."""
    store = EtcdCancelStore([f"127.0.0.1:{free_port()}", etcd.endpoint], prefix=prefix, timeout=0.5)
    root = random_root()
    _, created = await store.create_flag(CancelRequest.new(root, "t", "tests"), 60)
    assert created and store.endpoint == etcd.endpoint
    await store.close()


@on_io_loop
async def test_malformed_receipts_are_skipped(etcd, prefix):
    """Garbage under the acks prefix is skipped (and logged) when reading receipts."""
    store = EtcdCancelStore([etcd.endpoint], prefix=prefix)
    root = random_root()
    client = store._connection()
    await client.put(f"{prefix}acks/{root}/x/y".encode(), b"\xff not json")
    await store.put_receipt(Receipt(root, "svc", "i", 0, 1, 2, 0), 60)
    assert [r.service for r in await store.list_receipts(root)] == ["svc"]
    await store.close()


@on_io_loop
async def test_a_store_reaches_a_restarted_etcd_at_once_while_another_channel_backs_off(private_etcd, prefix):
    """gRPC shares subchannels between channels: one in reconnect backoff must not fail a fresh store's call."""
    private_etcd.kill()
    # A channel of this process tries etcd while it is down and stays open, in backoff
    # (as the watcher's connection is while it waits to reconnect).
    lingering = EtcdCancelStore([private_etcd.endpoint], prefix=prefix, timeout=1)
    client = lingering._connection()
    await client.connect()
    state = client.channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.TRANSIENT_FAILURE:
        await asyncio.wait_for(client.channel.wait_for_state_change(state), 10)
        state = client.channel.get_state()
    private_etcd.start()
    fresh = EtcdCancelStore([private_etcd.endpoint], prefix=prefix, timeout=1)
    _, created = await fresh.create_flag(CancelRequest.new(random_root(), "after the restart", "tests"), 60)
    assert created
    await fresh.close()
    await lingering.close()
