"""etcd faults: killed, frozen, a member of three lost, a cancel storm across a restart.

Every test runs real etcd processes and real services or workers. Faults are
injected by signal (SIGKILL, SIGSTOP); every wait is for an event (a log line, a
state change, a task ending) under a timeout.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter

import httpx
import pytest
from conftest import python_worker
from debug_service import EVENT_TIMEOUT, hold_scope, open_gated_stream, run_cli, state, until

import otel_cancel
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest
from otel_cancel._core.root import random_root
from otel_cancel.attributes import METRIC_FLAGS_APPLIED
from otel_cancel.exceptions import StoreUnavailableError
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import EtcdCluster, configured

pytestmark = pytest.mark.anyio

WATCHDOG_SECONDS = 0.5
TIMEOUT_SECONDS = 0.5
DETECTION_BOUND_SECONDS = 2 * (WATCHDOG_SECONDS + TIMEOUT_SECONDS)
"""A frozen etcd is noticed within one watchdog interval plus the ping's deadline; as much again is
left for a 2-core machine busy with other processes (the watcher's thread waits its turn too)."""
FAST_ELECTIONS = ["--heartbeat-interval", "50", "--election-timeout", "500"]
OUTAGE_WARNING = "WARNING otel_cancel.watcher otel-cancel: cancel store unavailable"
RECONNECTED = "INFO otel_cancel.watcher otel-cancel: reconnected"
RETRY_PAUSE_SECONDS = 0.05
"""Between two attempts to write a flag while etcd does not answer (a retry pause, not a wait for an event)."""


def _service_env(endpoints: list[str], prefix: str) -> dict[str, str]:
    # A killed etcd or member is noticed at once (the stream breaks, connections are
    # refused), so services keep the default deadline for their etcd calls: a loaded
    # machine must not turn a slow receipt write into a failed one.
    return {
        "OTEL_CANCEL_ETCD_ENDPOINTS": ",".join(endpoints),
        "OTEL_CANCEL_PREFIX": prefix,
        "OTEL_CANCEL_WATCHDOG_SECONDS": str(WATCHDOG_SECONDS),
        # The first request waits for the first listing, however slow the start.
        "OTEL_CANCEL_STARTUP_WAIT_SECONDS": str(EVENT_TIMEOUT),
    }


async def _write_flags(endpoints: list[str], prefix: str, roots: list[str], deadline: float) -> int:
    """Write a flag per root through ``endpoints``, retrying while etcd does not answer; the retries made."""

    async def write() -> int:
        store = EtcdCancelStore(endpoints, prefix=prefix, timeout=TIMEOUT_SECONDS)
        retries = 0
        try:
            for root in roots:
                while True:
                    try:
                        await store.create_flag(CancelRequest.new(root, "fault test", "tests"), 60)
                        break
                    except StoreUnavailableError:
                        retries += 1
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(RETRY_PAUSE_SECONDS)
        finally:
            await store.close()
        return retries

    # On the IO loop, like every etcd call of the library (see debug_service.write_flags).
    return await io_loop().call(write())


async def _assert_all_cancelled(tasks: list[asyncio.Task[None]]) -> None:
    done, pending = await asyncio.wait(tasks, timeout=EVENT_TIMEOUT)
    assert not pending, f"{len(pending)} of {len(tasks)} scopes were never cancelled"
    assert all(isinstance(task.exception(), otel_cancel.Cancelled) for task in done)


def _wait_line(process, text: str) -> str:
    return process.wait_for_line(lambda line: line.startswith(text), timeout=EVENT_TIMEOUT)


async def test_a_killed_etcd_leaves_the_service_serving_with_one_warning_and_later_flags_apply(
    private_etcd, prefix, chain
):
    """SIGKILL etcd: requests are still served, connected drops to 0 with one warning, flags after the restart apply."""
    chain.start(_service_env([private_etcd.endpoint], prefix), levels=("A",), replicas=1, module="debug_app")
    ((url, service),) = chain.levels[0]
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as client:
        before = await state(client, url, connected=True)
        assert before["connected"] is True and before["connected_metric"] == 1
        held_root, held = await open_gated_stream(client, url)
        kept_root, kept = await open_gated_stream(client, url)

        private_etcd.kill(signal.SIGKILL)
        await asyncio.to_thread(_wait_line, service, OUTAGE_WARNING)
        during = await state(client, url, connected=False)
        assert during["connected"] is False and during["connected_metric"] == 0
        # Fail open: new requests are served, streams included, while etcd is gone.
        assert (await client.get(f"{url}/ping")).text == "ok"
        late_root, late = await open_gated_stream(client, url)

        private_etcd.start()
        await asyncio.to_thread(_wait_line, service, RECONNECTED)
        after = await state(client, url, connected=True)
        assert after["connected"] is True and after["connected_metric"] == 1
        assert after["reconnects"] > before["reconnects"]

        await _write_flags([private_etcd.endpoint], prefix, [held_root, late_root], time.monotonic() + EVENT_TIMEOUT)
        for task in (held, late):
            assert (await asyncio.wait_for(task, EVENT_TIMEOUT))[-2] == "event: otel-cancel"
        await client.post(f"{url}/debug/release")
        assert (await asyncio.wait_for(kept, EVENT_TIMEOUT))[-1] == "data: A-2"

    await until(lambda: all(chain.lines("STOPPED", r) for r in (held_root, late_root)), "the cancelled runs stopped")
    await until(lambda: chain.lines("DONE", kept_root), "the other run finished")
    assert not chain.lines("STOPPED", kept_root)
    warnings = [line for line in service.lines if line.startswith("WARNING otel_cancel")]
    assert len(warnings) == 1 and warnings[0].startswith(OUTAGE_WARNING), warnings


async def test_a_frozen_etcd_is_noticed_in_bounded_time_and_flags_written_at_the_thaw_apply(
    private_etcd, prefix, cancel_metrics
):
    """SIGSTOP etcd: the watchdog drops the watch within its bound; flags written right after SIGCONT all apply."""
    with configured(
        endpoints=(private_etcd.endpoint,),
        prefix=prefix,
        watchdog_seconds=WATCHDOG_SECONDS,
        timeout_seconds=TIMEOUT_SECONDS,
    ) as runtime:
        roots = [random_root() for _ in range(20)]
        tasks = [await hold_scope(root) for root in roots]
        assert await asyncio.to_thread(runtime.watcher.wait_connected, True, EVENT_TIMEOUT)
        reconnects = runtime.watcher.reconnects
        applied = cancel_metrics.total(METRIC_FLAGS_APPLIED)

        private_etcd.freeze()
        frozen_at = time.monotonic()
        try:
            assert await asyncio.to_thread(runtime.watcher.wait_connected, False, EVENT_TIMEOUT)
            noticed_after = time.monotonic() - frozen_at
        finally:
            private_etcd.thaw()
        # Written at once, most likely before the watcher has reconnected.
        await _write_flags([private_etcd.endpoint], prefix, roots, time.monotonic() + EVENT_TIMEOUT)
        await _assert_all_cancelled(tasks)
        assert runtime.watcher.reconnects > reconnects
        assert cancel_metrics.total(METRIC_FLAGS_APPLIED) - applied == len(roots)
    print(f"frozen etcd noticed after {noticed_after:.2f}s (bound {DETECTION_BOUND_SECONDS}s)")
    assert noticed_after <= DETECTION_BOUND_SECONDS, f"noticed after {noticed_after:.2f}s"


async def test_a_call_whose_connection_another_call_closes_fails_as_unavailable_not_cancelled(private_etcd, prefix):
    """A store call in flight when another call drops the shared connection raises StoreUnavailableError."""

    async def scenario() -> None:
        store = EtcdCancelStore([private_etcd.endpoint], prefix=prefix, timeout=EVENT_TIMEOUT)
        await store.ping()
        private_etcd.freeze()  # the next call stays in flight
        try:
            in_flight = asyncio.Event()

            async def status(client):  # the watchdog's call, with a signal once it is sent
                call = client.status()
                in_flight.set()
                return await call

            pending = asyncio.create_task(store._call("checking etcd", status))
            await asyncio.wait_for(in_flight.wait(), EVENT_TIMEOUT)
            await store.close()  # what a concurrent call does when it fails (or fails over)
            # grpc.aio cancels the pending call; before the fix the CancelledError escaped
            # and ended the caller (the watcher's loop) silently.
            with pytest.raises(StoreUnavailableError, match="connection was closed"):
                await asyncio.wait_for(pending, EVENT_TIMEOUT)
        finally:
            private_etcd.thaw()
            await store.close()

    await io_loop().call(scenario())


async def test_flags_written_through_another_member_while_the_watched_member_is_frozen_apply_after_the_thaw(
    prefix, cancel_metrics
):
    """A watcher on one frozen member of three misses nothing written through the others, nor at the thaw."""
    with (
        EtcdCluster(extra_args=FAST_ELECTIONS) as cluster,
        configured(
            endpoints=(cluster.endpoints[0],),  # this member only: the watcher must wait for it
            prefix=prefix,
            watchdog_seconds=WATCHDOG_SECONDS,
            timeout_seconds=TIMEOUT_SECONDS,
        ) as runtime,
    ):
        during, at_thaw = [random_root() for _ in range(10)], [random_root() for _ in range(10)]
        tasks = [await hold_scope(root) for root in during + at_thaw]
        assert await asyncio.to_thread(runtime.watcher.wait_connected, True, EVENT_TIMEOUT)
        applied = cancel_metrics.total(METRIC_FLAGS_APPLIED)

        watched = cluster.members[0]
        watched.freeze()
        try:
            # The other two keep a majority (they elect a new leader if the frozen one led).
            await _write_flags(cluster.endpoints[1:], prefix, during, time.monotonic() + EVENT_TIMEOUT)
            assert await asyncio.to_thread(runtime.watcher.wait_connected, False, EVENT_TIMEOUT)
            assert not any(task.done() for task in tasks)
        finally:
            watched.thaw()
        await _write_flags([watched.endpoint], prefix, at_thaw, time.monotonic() + EVENT_TIMEOUT)
        await _assert_all_cancelled(tasks)
        assert cancel_metrics.total(METRIC_FLAGS_APPLIED) - applied == len(during + at_thaw)


async def test_with_the_watched_member_of_three_killed_the_watchers_fail_over_and_cancels_land(prefix, chain):
    """Kill the member the services watch through: they fail over, and a CLI cancel stops the run at both levels."""
    with EtcdCluster(extra_args=FAST_ELECTIONS) as cluster:
        chain.start(_service_env(cluster.endpoints, prefix), levels=("A", "B"), replicas=1, module="debug_app")
        ((edge, edge_process),) = chain.levels[0]
        ((internal, internal_process),) = chain.levels[1]
        async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as client:
            watched = (await state(client, edge, connected=True))["endpoint"]
            assert (await state(client, internal, connected=True))["endpoint"] == watched
            root, stream = await open_gated_stream(client, edge)
            other_root, other = await open_gated_stream(client, edge)
            await until(lambda: all(len(chain.lines("START", r)) == 2 for r in (root, other_root)))

            cluster.member(watched).kill(signal.SIGKILL)
            for process in (edge_process, internal_process):
                await asyncio.to_thread(_wait_line, process, RECONNECTED)
            for url in (edge, internal):
                now = await state(client, url, connected=True)
                assert now["connected"] is True and now["endpoint"] != watched

            # The CLI is given the dead member first: it must fail over too.
            alive = [e for e in cluster.endpoints if e != watched]
            env = {"OTEL_CANCEL_ETCD_ENDPOINTS": ",".join([watched, *alive]), "OTEL_CANCEL_PREFIX": prefix}
            result = await run_cli(
                "cancel",
                root,
                "--reason",
                "member lost",
                "--wait",
                str(EVENT_TIMEOUT),
                "--expect",
                "2",
                "--json",
                env=env,
            )
            assert result.returncode == 0, result.stderr
            receipts = [json.loads(line)["receipt"] for line in result.stdout.splitlines() if '"receipt"' in line]
            assert sorted(r["depth"] for r in receipts) == [0, 1]
            assert (await asyncio.wait_for(stream, EVENT_TIMEOUT))[-2] == "event: otel-cancel"
            for url in (edge, internal):
                await client.post(f"{url}/debug/release")
            assert (await asyncio.wait_for(other, EVENT_TIMEOUT))[-1] == "data: A-2"
    await until(lambda: len(chain.lines("STOPPED", root)) == 2, "the cancelled run stopped at both levels")
    await until(lambda: len(chain.lines("DONE", other_root)) == 2, "the other run finished at both levels")
    assert not chain.lines("DONE", root) and not chain.lines("STOPPED", other_root)


async def test_a_cancel_storm_across_an_etcd_restart_stops_every_root_exactly_once(private_etcd, prefix, spawn):
    """300 roots in a worker; another process cancels them all while etcd is killed and restarted: each stops once."""
    roots = [random_root() for _ in range(300)]
    env = _service_env([private_etcd.endpoint], prefix)
    holder = spawn(python_worker("hold_scopes", *(f"{root}:1" for root in roots)), env=env, name="holder")
    await asyncio.to_thread(holder.wait_for_line, "READY", EVENT_TIMEOUT)
    writer = spawn(python_worker("write_flags"), env=env, name="writer")

    def wrote() -> int:
        return sum(line.startswith("WROTE ") for line in writer.lines)

    def stopped() -> list[str]:
        return [line.split()[1] for line in holder.lines if line.startswith("STOPPED ")]

    for root in roots:
        writer.send(root)
    await until(lambda: wrote() >= len(roots) // 3, "a third of the flags written")
    private_etcd.kill(signal.SIGKILL)
    written_before = wrote()
    await asyncio.to_thread(private_etcd.start)
    await until(lambda: wrote() == len(roots), "every flag written")
    await until(lambda: len(stopped()) >= len(roots), "every root stopped")

    assert holder.process.stdin is not None
    holder.process.stdin.close()
    applied = int((await asyncio.to_thread(holder.wait_for_line, "APPLIED", EVENT_TIMEOUT)).split()[1])
    counts = Counter(stopped())
    assert set(counts) == set(roots) and set(counts.values()) == {1}
    assert applied == len(roots)
    retries = sum(line.startswith("RETRY ") for line in writer.lines)
    print(
        f"storm: {written_before} flags written before the kill, {len(roots) - written_before} during and after "
        f"({retries} attempts retried); {applied} applied, each root stopped once"
    )
