"""A 3-member etcd cluster whose members are partitioned, frozen and killed under the watcher.

The members talk to each other through TCP relays the tests control (tests/tcp_relay.py),
so one member can be cut off from its peers while its clients still reach it. The
cluster is shared by the module; every test leaves it whole (healed, thawed, restarted).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import cli, python_worker
from debug_service import EVENT_TIMEOUT, hold_scope, until
from tcp_relay import PartitionableCluster

import otel_cancel
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest, Receipt
from otel_cancel._core.root import random_root
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import EtcdCluster, configured

pytestmark = pytest.mark.anyio

FAST_ELECTIONS = ["--heartbeat-interval", "50", "--election-timeout", "500"]
WATCHDOG_SECONDS = 0.5
TIMEOUT_SECONDS = 0.5


@pytest.fixture(scope="module")
def relays() -> Iterator[PartitionableCluster]:
    partitionable = PartitionableCluster()
    yield partitionable
    partitionable.close()


@pytest.fixture(scope="module")
def cluster(relays: PartitionableCluster) -> Iterator[EtcdCluster]:
    with EtcdCluster(3, extra_args=FAST_ELECTIONS, peer_relay=relays.relay_for) as started:
        yield started


@pytest.fixture
def whole(cluster: EtcdCluster, relays: PartitionableCluster) -> Iterator[EtcdCluster]:
    """The cluster, made whole again after the test (healed, thawed, every member running)."""
    yield cluster
    relays.heal()
    for member in cluster.members:
        if member.process is not None:
            member.thaw()
        else:
            member.start()


async def _write_flag(endpoints: list[str], prefix: str, root: str) -> None:
    async def write() -> None:
        store = EtcdCancelStore(endpoints, prefix=prefix, timeout=EVENT_TIMEOUT / 4)
        try:
            await store.create_flag(CancelRequest.new(root, "test", "tests"), 600)
        finally:
            await store.close()

    await io_loop().call(write())


def _watched_endpoint(runtime: object) -> str:
    store = runtime.watcher._store  # type: ignore[attr-defined]
    assert isinstance(store, EtcdCancelStore)
    return store.endpoint


async def test_a_member_cut_off_from_its_peers_is_left_and_a_flag_written_through_the_majority_stops_the_work(
    whole, relays, prefix
):
    """The watched member loses its leader: the watcher moves to a member that has one and applies the flag."""
    with configured(
        endpoints=tuple(whole.endpoints),
        prefix=prefix,
        watchdog_seconds=WATCHDOG_SECONDS,
        timeout_seconds=TIMEOUT_SECONDS,
    ) as runtime:
        task = await hold_scope(root := random_root())
        assert runtime.watcher.wait_connected(True, EVENT_TIMEOUT)
        watched = whole.member(_watched_endpoint(runtime))
        reconnects = runtime.watcher.reconnects
        relays.isolate(watched)
        majority = [e for e in whole.endpoints if e != watched.endpoint]
        await _write_flag(majority, prefix, root)
        with pytest.raises(otel_cancel.Cancelled):
            await asyncio.wait_for(task, EVENT_TIMEOUT)
        # Stopped during the partition, through another member, after a reconnect.
        assert _watched_endpoint(runtime) != watched.endpoint
        assert runtime.watcher.reconnects > reconnects


async def test_a_fresh_process_whose_first_endpoint_is_frozen_refuses_a_late_hop(whole, prefix, spawn):
    """With the default start-up wait, a new process lists through the next endpoint before its first scope runs."""
    await _write_flag(whole.endpoints, prefix, root := random_root())
    first = whole.members[0]
    first.freeze()
    worker = spawn(
        python_worker("late_scope", root),
        env={"OTEL_CANCEL_ETCD_ENDPOINTS": ",".join(whole.endpoints), "OTEL_CANCEL_PREFIX": prefix},
        name="late-scope",
    )
    line = worker.wait_for_line(lambda text: text.startswith(("REFUSED", "RAN")), EVENT_TIMEOUT)
    assert line.strip() == f"REFUSED {root}", worker.lines


async def test_a_fresh_process_whose_first_endpoint_has_no_leader_refuses_a_late_hop(whole, relays, prefix, spawn):
    """A first endpoint that never answers (a member cut off its peers) costs one deadline: in the wait."""
    relays.isolate(whole.members[0])
    # Written through the majority once it has a leader (the cut member may have been it).
    await _write_flag(whole.endpoints[1:], prefix, root := random_root())
    worker = spawn(
        python_worker("late_scope", root),
        env={"OTEL_CANCEL_ETCD_ENDPOINTS": ",".join(whole.endpoints), "OTEL_CANCEL_PREFIX": prefix},
        name="late-scope",
    )
    line = worker.wait_for_line(lambda text: text.startswith(("REFUSED", "RAN")), EVENT_TIMEOUT)
    assert line.strip() == f"REFUSED {root}", worker.lines


def _cli_env(cluster: EtcdCluster, prefix: str) -> dict[str, str]:
    return {
        "OTEL_CANCEL_ETCD_ENDPOINTS": ",".join(cluster.endpoints),
        "OTEL_CANCEL_PREFIX": prefix,
        "OTEL_CANCEL_WATCHDOG_SECONDS": str(WATCHDOG_SECONDS),
        "OTEL_CANCEL_ETCD_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS),
    }


async def test_watch_replays_with_a_mark_and_survives_its_member_killed_then_frozen(whole, prefix, spawn):
    """`watch` marks replayed flags, times every line, and goes on printing through a killed and a frozen member."""
    await _write_flag(whole.endpoints, prefix, old := random_root())
    watch = spawn(cli("watch", "--json"), env=_cli_env(whole, prefix), name="watch")
    replayed = json.loads(watch.wait_for_line(lambda line: old in line, EVENT_TIMEOUT))
    assert replayed["replayed"] is True and replayed["event"] == "cancelled" and replayed["time"].endswith("Z")
    # The watch starts on the first endpoint: kill it, then a flag written through the others shows.
    whole.members[0].kill()
    await _write_flag(whole.endpoints[1:], prefix, after_kill := random_root())
    line = json.loads(watch.wait_for_line(lambda text: after_kill in text, EVENT_TIMEOUT))
    assert line["replayed"] is False
    whole.members[0].start()
    # Now on the second member: freeze it; the watchdog moves the watch on.
    whole.members[1].freeze()
    await _write_flag([whole.endpoints[0], whole.endpoints[2]], prefix, after_freeze := random_root())
    line = json.loads(watch.wait_for_line(lambda text: after_freeze in text, EVENT_TIMEOUT))
    assert line["replayed"] is False
    assert watch.process.poll() is None


async def test_a_cancel_storm_from_two_writers_with_the_watched_member_killed_loses_nothing_and_stops_nothing_else(
    whole, prefix, spawn
):
    """3 workers, 2 writers racing on every root, member killed mid-storm: 0 lost, 0 collateral, 0 missing receipts."""
    env = {
        "OTEL_CANCEL_ETCD_ENDPOINTS": ",".join(whole.endpoints),
        "OTEL_CANCEL_PREFIX": prefix,
        "OTEL_CANCEL_WATCHDOG_SECONDS": str(WATCHDOG_SECONDS),
        "OTEL_CANCEL_STARTUP_WAIT_SECONDS": str(EVENT_TIMEOUT),
    }
    cancelled = {f"w{index}": [random_root() for _ in range(80)] for index in range(3)}
    bystanders = {name: [random_root() for _ in range(20)] for name in cancelled}
    workers = {
        name: spawn(
            python_worker("hold_scopes", *(f"{root}:1" for root in cancelled[name] + bystanders[name])),
            env={**env, "OTEL_SERVICE_NAME": "storm", "OTEL_CANCEL_INSTANCE": name},
            name=name,
        )
        for name in cancelled
    }
    for worker in workers.values():
        await asyncio.to_thread(worker.wait_for_line, "READY", EVENT_TIMEOUT)
    every_root = [root for roots in cancelled.values() for root in roots]
    writers = [spawn(python_worker("write_flags"), env=env, name=f"writer{i}") for i in range(2)]
    for index, writer in enumerate(writers):
        for root in every_root[index::2] + every_root[1 - index :: 2]:  # both write every root, in other orders
            writer.send(root)

    def written() -> list[str]:
        return [line for writer in writers for line in writer.lines if line.startswith("WROTE ")]

    await until(lambda: len(written()) >= len(every_root) // 2, "a quarter of the writes done")
    whole.members[0].kill()  # every process started on the first endpoint
    await until(lambda: len(written()) == 2 * len(every_root), "every write done")

    def stops(name: str) -> Counter[str]:
        return Counter(line.split()[1] for line in workers[name].lines if line.startswith("STOPPED "))

    await until(lambda: all(sum(stops(n).values()) >= len(cancelled[n]) for n in workers), "every root stopped")

    async def receipts() -> list[Receipt]:
        async def read() -> list[Receipt]:
            store = EtcdCancelStore(whole.endpoints[1:], prefix=prefix)
            try:
                return [r for root in every_root for r in await store.list_receipts(root)]
            finally:
                await store.close()

        return await io_loop().call(read())

    found: list[Receipt] = []
    for _ in range(int(EVENT_TIMEOUT / 0.5)):
        found = await receipts()
        if len(found) >= len(every_root):
            break
        await asyncio.sleep(0.5)  # receipts are written in the background: poll the store
    for name, worker in workers.items():
        assert worker.process.stdin is not None
        worker.process.stdin.close()
        applied = int((await asyncio.to_thread(worker.wait_for_line, "APPLIED", EVENT_TIMEOUT)).split()[1])
        assert applied == len(every_root)
        counts = stops(name)
        assert set(counts) == set(cancelled[name]), "lost or collateral stops"
        assert set(counts.values()) == {1}
    created = Counter(line.split()[1] for line in written() if line.endswith(" created"))
    assert set(created) == set(every_root) and set(created.values()) == {1}, "each flag created exactly once"
    by_root = Counter((r.root, r.instance) for r in found)
    expected = {(root, name) for name, roots in cancelled.items() for root in roots}
    assert set(by_root) == expected and set(by_root.values()) == {1}, "missing or extra receipts"
