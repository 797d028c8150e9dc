"""A flag set whose listing passes gRPC's 4 MiB message limit: listed page by page, enforced throughout.

One etcd for the module holds the large set (written in transactions of 128 puts);
the largest sizes are measured in bench/listing.py instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator

import aetcd
import aetcd.exceptions
import pytest
from conftest import cli, python_worker
from debug_service import EVENT_TIMEOUT
from tcp_relay import TcpRelay

import otel_cancel
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest
from otel_cancel._core.registry import LISTED_REASON
from otel_cancel._core.root import random_root
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import EtcdServer, configured, unique_prefix

pytestmark = pytest.mark.anyio

FLAGS = 16_000
REASON = "r" * 400
LONG_PREFIX = "/" + "p" * 220
"""Keys of about 300 bytes: even the watcher's keys-only listing (4.8 MB) passes gRPC's 4 MiB,
and with values (about 520 bytes each) a listing is 13 MB."""
TXN_OPS = 128  # etcd's default --max-txn-ops


@pytest.fixture(scope="module")
def big_etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="module")
def big_set(big_etcd: EtcdServer) -> tuple[str, list[str]]:
    """A prefix holding FLAGS flags, and their roots in key order."""
    prefix = LONG_PREFIX + unique_prefix()
    roots = sorted(random_root() for _ in range(FLAGS))

    async def write() -> None:
        host, port = big_etcd.endpoint.split(":")
        async with aetcd.Client(host, int(port), timeout=EVENT_TIMEOUT) as client:
            for start in range(0, FLAGS, TXN_OPS):
                puts = [
                    client.transactions.put(
                        f"{prefix}flags/{root}".encode(), CancelRequest.new(root, REASON, "tests").to_json()
                    )
                    for root in roots[start : start + TXN_OPS]
                ]
                await client.transaction(compare=[], success=puts, failure=[])

    io_loop().run(write(), timeout=120)
    return prefix, roots


def _env(etcd: EtcdServer, prefix: str) -> dict[str, str]:
    return {"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": prefix}


async def test_the_set_is_past_the_message_limit_of_one_unpaginated_range(big_etcd, big_set):
    """The fixture is what it claims: one range over the flags prefix fails on gRPC's 4 MiB limit."""
    prefix, _ = big_set

    async def unpaginated() -> None:
        host, port = big_etcd.endpoint.split(":")
        async with aetcd.Client(host, int(port), timeout=EVENT_TIMEOUT) as client:
            await client.get_prefix(f"{prefix}flags/".encode())

    with pytest.raises(aetcd.exceptions.ClientError, match="larger than max"):
        await io_loop().call(unpaginated())


def test_a_new_process_lists_the_whole_set_and_refuses_a_late_hop(big_etcd, big_set, spawn):
    """A process started on the large set refuses late hops for its first and last roots."""
    prefix, roots = big_set
    for root in (roots[0], roots[-1]):
        worker = spawn(python_worker("late_scope", root), env=_env(big_etcd, prefix), name="late-scope")
        line = worker.wait_for_line(lambda text: text.startswith(("REFUSED", "RAN")), EVENT_TIMEOUT)
        assert line.strip() == f"REFUSED {root}"


def test_list_prints_every_flag_of_the_set(big_etcd, big_set):
    """``otel-cancel list --json`` pages through the set: every root, with its reason."""
    prefix, roots = big_set
    result = subprocess.run(
        cli("list", "--json"),
        env={**os.environ, **_env(big_etcd, prefix)},
        capture_output=True,
        text=True,
        timeout=EVENT_TIMEOUT * 2,
    )
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert [flag["root"] for flag in listing["flags"]] == roots
    assert {flag["reason"] for flag in listing["flags"]} == {REASON}


async def test_a_process_that_must_list_again_keeps_enforcing_and_applies_what_it_missed(big_etcd, big_set):
    """Cut off, compacted past its revision, the watcher re-lists the large set: old roots stay refused throughout."""
    prefix, roots = big_set
    relay = TcpRelay(big_etcd.client_port)
    try:
        with configured(
            endpoints=(f"127.0.0.1:{relay.port}",), prefix=prefix, watchdog_seconds=0.5, timeout_seconds=1.0
        ) as runtime:
            runtime.start()
            assert await runtime.watcher.wait_listed(EVENT_TIMEOUT)
            assert runtime.registry.cancelled_roots() == FLAGS
            held = asyncio.Event()

            async def work() -> None:
                async with otel_cancel.scope(root=new_root):
                    held.set()
                    await asyncio.Event().wait()

            task = asyncio.create_task(work())
            await asyncio.wait_for(held.wait(), EVENT_TIMEOUT)
            listings = runtime.watcher.listings
            relay.cut()
            assert runtime.watcher.wait_connected(False, EVENT_TIMEOUT)

            async def write_and_compact() -> None:
                store = EtcdCancelStore([big_etcd.endpoint], prefix=prefix)
                try:
                    await store.create_flag(CancelRequest.new(new_root, "missed", "tests"), 600)
                finally:
                    await store.close()
                host, port = big_etcd.endpoint.split(":")
                async with aetcd.Client(host, int(port)) as client:
                    # Past the flag: resuming from the watcher's revision is no longer possible.
                    head = await client.put(f"{prefix}other".encode(), b"x")
                    await client.compact(head.header.revision)

            await io_loop().call(write_and_compact())
            relay.heal()
            # While it reconnects and lists again, what it knew is still enforced.
            with pytest.raises(otel_cancel.Cancelled):
                async with otel_cancel.scope(root=roots[len(roots) // 2]):
                    pass
            with pytest.raises(otel_cancel.Cancelled) as stopped:
                await asyncio.wait_for(task, EVENT_TIMEOUT)
            assert stopped.value.reason == "missed"
            assert runtime.watcher.listings > listings
            with pytest.raises(otel_cancel.Cancelled):
                async with otel_cancel.scope(root=roots[-1]):
                    pass
            assert runtime.registry.cancelled_roots() == FLAGS + 1
    finally:
        relay.close()


new_root = random_root()


async def test_a_refusal_of_a_root_known_only_by_its_key_fetches_its_reason_for_later_refusals(big_etcd, big_set):
    """Past the flags listed with values, the first refusal says why it cannot tell the reason; the next one can."""
    prefix, roots = big_set
    with configured(endpoints=(big_etcd.endpoint,), prefix=prefix) as runtime:
        runtime.start()
        assert await runtime.watcher.wait_listed(EVENT_TIMEOUT)
        assert runtime.registry.is_cancelled(roots[0]).reason == REASON  # among the first, listed with values
        with pytest.raises(otel_cancel.Cancelled) as first:
            async with otel_cancel.scope(root=roots[-1]):
                pass
        assert first.value.reason == LISTED_REASON
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EVENT_TIMEOUT
        # The fetch runs on the IO loop; nothing to await from here but the registry's answer.
        while runtime.registry.is_cancelled(roots[-1]).reason != REASON and loop.time() < deadline:
            await asyncio.sleep(0.01)
        with pytest.raises(otel_cancel.Cancelled) as later:
            async with otel_cancel.scope(root=roots[-1]):
                pass
        assert later.value.reason == REASON
