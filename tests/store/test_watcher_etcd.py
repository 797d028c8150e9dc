"""The watcher against a real etcd: restarts, disconnections, compaction, foreign values."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aetcd
import pytest

import otel_cancel
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest
from otel_cancel._core.registry import CancelRegistry
from otel_cancel._core.root import random_root
from otel_cancel._core.watcher import CancelWatcher
from otel_cancel.store import FlagEvent
from otel_cancel.store.etcd import EtcdCancelStore, parse_endpoint
from otel_cancel.testing import ManagedProcess, configured, find_etcd_binary, free_port

pytestmark = pytest.mark.anyio


async def _hold(root: str) -> tuple[asyncio.Task[None], asyncio.Future[None]]:
    entered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        async with otel_cancel.scope(root=root):
            entered.set_result(None)
            await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await asyncio.wait_for(entered, 10)
    return task, entered


async def _write_flag(endpoint: str, prefix: str, root: str) -> None:
    async def write() -> None:
        store = EtcdCancelStore([endpoint], prefix=prefix)
        await store.create_flag(CancelRequest.new(root, "test", "tests"), 60)
        await store.close()

    await io_loop().call(write())  # where the library makes its etcd calls


async def _with_client(endpoint: str, action: Callable[[aetcd.Client], Awaitable[object]]) -> None:
    """Run ``action`` with a raw etcd client, on the IO loop like every etcd call."""

    async def run() -> None:
        host, port = parse_endpoint(endpoint)
        async with aetcd.Client(host, port) as client:
            await action(client)

    await io_loop().call(run())


async def _assert_cancelled(task: asyncio.Task[None], timeout: float = 15) -> None:
    with pytest.raises(otel_cancel.Cancelled):
        await asyncio.wait_for(task, timeout)


async def test_watcher_survives_an_etcd_restart(private_etcd, prefix):
    """After etcd stops and starts again, a flag written after the restart still cancels."""
    with configured(endpoints=(private_etcd.endpoint,), prefix=prefix, watchdog_seconds=0.5) as runtime:
        task, _ = await _hold(root := random_root())
        assert runtime.watcher.wait_connected(True, 10)
        private_etcd.restart()
        await _write_flag(private_etcd.endpoint, prefix, root)
        await _assert_cancelled(task)
        assert runtime.watcher.reconnects >= 1


class GrpcProxy:
    """An etcd gRPC proxy in front of etcd: stopping it cuts off only the clients behind it."""

    def __init__(self, etcd_endpoint: str) -> None:
        self.endpoint = f"127.0.0.1:{free_port()}"
        self._command = [
            find_etcd_binary(),
            "grpc-proxy",
            "start",
            f"--endpoints={etcd_endpoint}",
            f"--listen-addr={self.endpoint}",
        ]
        self._process: ManagedProcess | None = None

    def start(self) -> str:
        self._process = ManagedProcess(self._command, name="grpc-proxy")
        return self.endpoint

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None


@pytest.fixture
def grpc_proxy(private_etcd):
    proxy = GrpcProxy(private_etcd.endpoint)
    yield proxy
    proxy.stop()


async def test_a_flag_written_while_the_watcher_is_disconnected_is_applied_on_reconnect(
    private_etcd, grpc_proxy, prefix
):
    """The watcher resumes from its last revision: a flag written while it was cut off still cancels."""
    with configured(endpoints=(grpc_proxy.start(),), prefix=prefix, watchdog_seconds=0.5) as runtime:
        # The proxy may take a moment to listen; the watcher retries until connected.
        runtime.start()
        assert runtime.watcher.wait_connected(True, 15)
        task, _ = await _hold(root := random_root())
        grpc_proxy.stop()  # etcd stays up; only the watcher is cut off
        assert runtime.watcher.wait_connected(False, 15)
        await _write_flag(private_etcd.endpoint, prefix, root)
        assert not task.done()
        grpc_proxy.start()
        await _assert_cancelled(task)


async def test_compaction_past_the_watchers_revision_lists_again_and_misses_nothing(private_etcd, grpc_proxy, prefix):
    """When the revision to resume from was compacted, the watcher re-lists and applies every flag."""
    with configured(
        endpoints=(grpc_proxy.start(),), prefix=prefix, watchdog_seconds=0.5, timeout_seconds=1.0
    ) as runtime:
        runtime.start()
        assert runtime.watcher.wait_connected(True, 15)
        task, _ = await _hold(root := random_root())
        listings = runtime.watcher.listings
        grpc_proxy.stop()
        assert runtime.watcher.wait_connected(False, 15)
        await _write_flag(private_etcd.endpoint, prefix, root)
        for _ in range(5):
            await _write_flag(private_etcd.endpoint, prefix, random_root())

        async def compact_to_head(client: aetcd.Client) -> None:
            await client.compact((await client.get_prefix(prefix.encode())).header.revision)

        await _with_client(private_etcd.endpoint, compact_to_head)
        grpc_proxy.start()
        await _assert_cancelled(task)
        assert runtime.watcher.listings > listings


async def test_foreign_values_under_the_flags_prefix_are_logged_and_do_not_stop_the_watcher(etcd, prefix, caplog):
    """Garbage keys and values under flags/ are logged once each; real flags still apply."""
    with configured(endpoints=(etcd.endpoint,), prefix=prefix) as runtime:
        task, _ = await _hold(root := random_root())
        assert runtime.watcher.wait_connected(True, 10)

        async def write_garbage(client: aetcd.Client) -> None:
            await client.put(f"{prefix}flags/not-a-root".encode(), b"{}")
            await client.put(f"{prefix}flags/{random_root()}".encode(), b"\x00garbage")

        with caplog.at_level(logging.WARNING, logger="otel_cancel.watcher"):
            await _with_client(etcd.endpoint, write_garbage)
            await _write_flag(etcd.endpoint, prefix, root)
            await _assert_cancelled(task)
        messages = [r.getMessage() for r in caplog.records]
        assert any("not a valid root" in m for m in messages)
        assert any("malformed flag" in m for m in messages)


NESTED_DEPTH = 30_000
"""Deeper than any Python's JSON parser goes (3.13's takes 8,000), within the 64 KiB a flag may hold."""


async def test_a_flag_value_no_parser_accepts_cancels_its_root_and_the_watcher_goes_on(etcd, prefix, caplog):
    """A non-string kind or a deeply nested value cancels its root (held here or not); later flags still apply."""
    with configured(endpoints=(etcd.endpoint,), prefix=prefix) as runtime:
        held_list, _ = await _hold(list_root := random_root())
        held_nested, _ = await _hold(nested_root := random_root())
        held_after, _ = await _hold(after_root := random_root())
        assert runtime.watcher.wait_connected(True, 10)
        bystander_root = random_root()

        async def write_foreign(client: aetcd.Client) -> None:
            # Not the way a flag starts: decoded at once, in every process.
            await client.put(f"{prefix}flags/{list_root}".encode(), b'{"kind":[],"root":"%s"}' % list_root.encode())
            await client.put(
                f"{prefix}flags/{bystander_root}".encode(), b'{"kind":{},"root":"%s"}' % bystander_root.encode()
            )
            nested = b'{"root":"%s","x":' % nested_root.encode() + b"[" * NESTED_DEPTH + b"]" * NESTED_DEPTH + b"}"
            await client.put(f"{prefix}flags/{nested_root}".encode(), nested)

        with caplog.at_level(logging.WARNING, logger="otel_cancel.watcher"):
            await _with_client(etcd.endpoint, write_foreign)
            for task in (held_list, held_nested):
                with pytest.raises(otel_cancel.Cancelled) as stopped:
                    await asyncio.wait_for(task, 15)
                assert stopped.value.reason == "unknown (malformed flag)"
            await _write_flag(etcd.endpoint, prefix, after_root)
            await _assert_cancelled(held_after)
        assert not runtime.watcher.done and runtime.watcher.connected
        assert runtime.registry.is_cancelled(bystander_root) is not None
        assert len([r for r in caplog.records if "malformed flag" in r.getMessage()]) == 3  # one line each


async def test_an_unexpected_error_in_the_watch_is_logged_and_retried_like_an_outage(etcd, prefix, caplog):
    """The watcher does not end: it logs the error, reconnects and applies the flag it was handling."""
    registry = CancelRegistry()
    failures = [RuntimeError("listener bug")]

    def listener(event: FlagEvent, listed: bool) -> None:
        if not listed and failures:
            raise failures.pop()

    watcher = CancelWatcher(
        lambda: EtcdCancelStore([etcd.endpoint], prefix=prefix), registry, watchdog_seconds=0.5, listener=listener
    )
    with caplog.at_level(logging.WARNING, logger="otel_cancel.watcher"):
        watcher.start()
        try:
            assert watcher.wait_connected(True, 10)
            await _write_flag(etcd.endpoint, prefix, root := random_root())
            async with asyncio.timeout(15):
                while registry.is_cancelled(root) is None:
                    await asyncio.sleep(0.01)
            assert not watcher.done and watcher.reconnects == 1 and not failures
        finally:
            watcher.stop()
    (line,) = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert "listener bug" in line.getMessage() and line.exc_info is not None


async def test_a_scope_fails_open_after_the_start_up_wait_when_etcd_is_unreachable(caplog):
    """With etcd unreachable, the first scope waits the bounded start-up time, then runs and logs one line."""
    from otel_cancel.testing import free_port

    with (
        caplog.at_level(logging.WARNING, logger="otel_cancel"),
        configured(endpoints=(f"127.0.0.1:{free_port()}",), startup_wait_seconds=0.3, timeout_seconds=0.2),
    ):
        ran = []
        for _ in range(3):
            async with otel_cancel.scope():
                ran.append(True)
    assert ran == [True, True, True]
    fail_open = [r for r in caplog.records if "fail open" in r.getMessage()]
    assert len(fail_open) == 1


async def test_with_unlisted_refuse_a_scope_that_cannot_be_checked_is_refused_after_the_start_up_wait(caplog):
    """OTEL_CANCEL_UNLISTED=refuse: with etcd unreachable, the scope raises Cancelled naming why, once waited."""
    from otel_cancel._core.process_state import UNLISTED_REASON
    from otel_cancel.testing import free_port

    with (
        caplog.at_level(logging.WARNING, logger="otel_cancel"),
        configured(
            endpoints=(f"127.0.0.1:{free_port()}",), startup_wait_seconds=0.3, timeout_seconds=0.2, unlisted="refuse"
        ),
    ):
        ran = []
        for _ in range(2):
            with pytest.raises(otel_cancel.Cancelled) as refused:
                async with otel_cancel.scope():
                    ran.append(True)
            assert refused.value.reason == UNLISTED_REASON
    assert ran == []
    assert len([r for r in caplog.records if "OTEL_CANCEL_UNLISTED=refuse" in r.getMessage()]) == 1
