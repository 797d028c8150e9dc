"""The one retry policy: capped exponential backoff with full jitter, what it retries, when it gives up.

The helper runs with tenacity's sleep injected, so the waits are observed and never slept.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from otel_cancel._core import retry as _retry
from otel_cancel._core.records import Receipt
from otel_cancel._core.retry import RECEIPT_WRITE, WATCH_RECONNECT, Backoff, retry_async, retry_sync
from otel_cancel._core.root import random_root
from otel_cancel.exceptions import StorePermissionError, StoreUnavailableError
from otel_cancel.store import FlagEvent
from otel_cancel.store import embedded_etcd as _etcd_server
from otel_cancel.store.embedded_etcd import EtcdServer
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio


class _Waits(list[float]):
    """Records each wait instead of sleeping it."""

    async def sleep(self, seconds: float) -> None:
        self.append(seconds)

    def sleep_sync(self, seconds: float) -> None:
        self.append(seconds)


def _failing(times: int, error: Callable[[int], Exception] = StoreUnavailableError) -> Callable[[], object]:
    """An operation whose first ``times`` calls raise ``error(call)``; later calls return the number of calls."""
    calls = 0

    def operation() -> int:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise error(calls)
        return calls

    return operation


def _async(operation: Callable[[], object]) -> Callable[[], object]:
    async def call() -> object:
        return operation()

    return call


def _window(backoff: Backoff, failures: int) -> float:
    return min(backoff.first_window * 2 ** (failures - 1), backoff.max_window)


async def test_each_wait_is_drawn_between_zero_and_a_window_doubling_from_the_first():
    """The n-th wait lies in [0, first * 2^(n-1)] and the draws spread over that window (full jitter)."""
    backoff = Backoff(first_window=0.1, max_window=100.0)
    by_attempt: list[list[float]] = [[] for _ in range(6)]
    for _ in range(200):
        waits = _Waits()
        assert await retry_async(_async(_failing(6)), backoff, retry_on=StoreUnavailableError, sleep=waits.sleep) == 7
        for n, wait in enumerate(waits):
            by_attempt[n].append(wait)
    for n, draws in enumerate(by_attempt, start=1):
        window = _window(backoff, n)
        assert all(0 <= wait <= window for wait in draws)
        # Spread over the whole window, not a fixed fraction of it.
        assert min(draws) < window / 4 and max(draws) > window * 3 / 4


async def test_the_window_stops_growing_at_the_cap():
    """Past the cap every wait stays under it, and still spreads up to it."""
    backoff = Backoff(first_window=0.01, max_window=0.05)
    waits = _Waits()
    await retry_async(_async(_failing(200)), backoff, retry_on=StoreUnavailableError, sleep=waits.sleep)
    capped = waits[3:]  # the window is 0.01, 0.02, 0.04, then capped
    assert len(capped) == 197
    assert all(0 <= wait <= 0.05 for wait in capped)
    assert max(capped) > 0.04


async def test_jitter_leaves_the_global_random_generator_alone():
    """Retrying draws from its own generator: a seeded global `random` (an app's, Hypothesis's) sees no draw."""
    state = random.getstate()
    waits = _Waits()
    await retry_async(_async(_failing(5)), RECEIPT_WRITE, retry_on=StoreUnavailableError, sleep=waits.sleep)
    assert len(waits) == 5 and random.getstate() == state


async def test_an_error_not_retried_is_raised_at_once_without_a_wait():
    """A refusal is not an outage: raised on the first attempt, no wait, no retry reported."""
    waits, reported = _Waits(), []
    refusal = StorePermissionError("permission denied")

    async def refuse() -> None:
        raise refusal

    with pytest.raises(StorePermissionError) as raised:
        await retry_async(
            refuse,
            RECEIPT_WRITE,
            retry_on=StoreUnavailableError,
            on_retry=lambda error, wait: reported.append(error),
            sleep=waits.sleep,
        )
    assert raised.value is refusal and waits == [] and reported == []


async def test_a_predicate_decides_what_is_retried_after_an_outage():
    """With a predicate, the retried errors go on and the first one it declines ends the retrying."""
    waits = _Waits()
    operation = _failing(4, lambda call: StoreUnavailableError() if call < 3 else StorePermissionError(str(call)))
    with pytest.raises(StorePermissionError, match="3"):
        await retry_async(
            _async(operation),
            RECEIPT_WRITE,
            retry_on=lambda error: isinstance(error, StoreUnavailableError),
            sleep=waits.sleep,
        )
    assert len(waits) == 2


async def test_a_cancellation_is_never_retried():
    """A CancelledError ends the retrying at once, even under a predicate that accepts everything."""
    waits = _Waits()
    calls = 0

    async def cancelled_on_second_call() -> None:
        nonlocal calls
        calls += 1
        raise StoreUnavailableError() if calls == 1 else asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        await retry_async(cancelled_on_second_call, RECEIPT_WRITE, retry_on=lambda error: True, sleep=waits.sleep)
    assert calls == 2 and len(waits) == 1


async def test_gives_up_with_the_last_error_when_the_next_wait_would_end_past_the_limit():
    """Under give_up_after no wait reaches past the limit, and the last attempt's own error is raised."""
    for _ in range(50):
        waits, errors = _Waits(), []

        def unavailable(call: int, errors: list[Exception] = errors) -> Exception:
            errors.append(StoreUnavailableError(f"attempt {call}"))
            return errors[-1]

        with pytest.raises(StoreUnavailableError) as raised:
            await retry_async(
                _async(_failing(10_000, unavailable)),
                Backoff(first_window=0.1, max_window=5.0),
                retry_on=StoreUnavailableError,
                give_up_after=1.0,
                sleep=waits.sleep,
            )
        assert raised.value is errors[-1]
        assert len(errors) == len(waits) + 1
        # The waits are recorded, not slept: no time passes, so each one alone stays under the
        # limit, and the first four (windows 0.1 to 0.8 s) always fit.
        assert all(wait < 1.0 for wait in waits) and len(waits) >= 4


async def test_a_limit_already_reached_gives_up_at_the_first_failure():
    """give_up_after=0: the first failure is raised, nothing is waited for."""
    waits = _Waits()
    with pytest.raises(StoreUnavailableError):
        await retry_async(
            _async(_failing(1)), RECEIPT_WRITE, retry_on=StoreUnavailableError, give_up_after=0, sleep=waits.sleep
        )
    assert waits == []


async def test_gives_up_after_max_attempts_with_the_last_error():
    """max_attempts bounds the calls; the error of the last one is raised."""
    waits = _Waits()
    with pytest.raises(StoreUnavailableError, match="3"):
        await retry_async(
            _async(_failing(5, lambda call: StoreUnavailableError(str(call)))),
            RECEIPT_WRITE,
            retry_on=StoreUnavailableError,
            max_attempts=3,
            sleep=waits.sleep,
        )
    assert len(waits) == 2


async def test_each_retry_is_reported_with_its_error_and_wait():
    """on_retry hears every failed attempt before its wait, with the wait that follows."""
    waits, reported = _Waits(), []
    result = await retry_async(
        _async(_failing(3, lambda call: StoreUnavailableError(str(call)))),
        RECEIPT_WRITE,
        retry_on=StoreUnavailableError,
        on_retry=lambda error, wait: reported.append((str(error), wait)),
        sleep=waits.sleep,
    )
    assert result == 4
    assert reported == [("1", waits[0]), ("2", waits[1]), ("3", waits[2])]


async def test_a_failure_the_caller_met_first_is_the_first_attempt():
    """failed_with: the operation is first called after one wait in the first window (a dropped watch)."""
    waits, reported = _Waits(), []
    dropped = StoreUnavailableError("the watch broke")
    result = await retry_async(
        _async(_failing(0)),
        RECEIPT_WRITE,
        retry_on=StoreUnavailableError,
        on_retry=lambda error, wait: reported.append(error),
        failed_with=dropped,
        sleep=waits.sleep,
    )
    assert result == 1
    assert reported == [dropped] and len(waits) == 1 and 0 <= waits[0] <= RECEIPT_WRITE.first_window


def test_the_blocking_twin_waits_by_the_same_policy():
    """retry_sync retries what retry_on accepts, in the same jittered windows, up to max_attempts."""
    waits = _Waits()
    backoff = Backoff(first_window=0.05, max_window=0.2)
    with pytest.raises(RuntimeError, match="3"):
        retry_sync(
            _failing(5, lambda call: RuntimeError(str(call))),
            backoff,
            retry_on=RuntimeError,
            max_attempts=3,
            sleep=waits.sleep_sync,
        )
    assert len(waits) == 2 and all(0 <= wait <= _window(backoff, n) for n, wait in enumerate(waits, start=1))
    assert retry_sync(_failing(1), backoff, retry_on=StoreUnavailableError, sleep=waits.sleep_sync) == 2


def test_a_first_attempt_that_succeeds_loads_no_retry_machinery():
    """Success at the first call never imports tenacity: a command that meets no failure does not pay for it."""
    probe = (
        "import asyncio, sys\n"
        "from otel_cancel._core.retry import RECEIPT_WRITE, retry_async, retry_sync\n"
        "async def ok(): return 1\n"
        "assert asyncio.run(retry_async(ok, RECEIPT_WRITE, retry_on=OSError)) == 1\n"
        "assert retry_sync(lambda: 2, RECEIPT_WRITE, retry_on=OSError) == 2\n"
        "print('tenacity' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


class _StoreWhoseReceiptsFailFirst(MemoryCancelStore):
    """A memory store on which the first receipt writes fail as they do while etcd restarts."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures_left = failures

    async def put_receipts(self, receipts, ttl_seconds):
        if self.failures_left:
            self.failures_left -= 1
            raise StoreUnavailableError("etcd is restarting")
        await super().put_receipts(receipts, ttl_seconds)


async def test_receipts_of_two_replicas_retry_apart_after_the_same_outage(monkeypatch):
    """Two replicas whose receipt writes failed alike wait different, jittered times: no lockstep."""
    root, failures = random_root(), 5
    waits_of: dict[str, list[float]] = {}
    for replica in ("replica-a", "replica-b"):
        waits = _Waits()
        monkeypatch.setattr(_retry, "_async_sleep", waits.sleep)
        store = _StoreWhoseReceiptsFailFirst(failures)
        with configured(store=store, service="agent", instance=replica) as runtime:
            await runtime._write_receipts([Receipt(root, "agent", replica, 1, 1, 2, 0)])
            # Written once the outage was over.
            assert [receipt.instance for receipt in await store.list_receipts(root)] == [replica]
        waits_of[replica] = waits
    a, b = waits_of["replica-a"], waits_of["replica-b"]
    assert len(a) == len(b) == failures
    for n, (wait_a, wait_b) in enumerate(zip(a, b, strict=True), start=1):
        assert 0 <= wait_a <= _window(RECEIPT_WRITE, n) and 0 <= wait_b <= _window(RECEIPT_WRITE, n)
    assert a != b


class _StoreThatRestarts(MemoryCancelStore):
    """A memory store whose watch drops and whose pings fail on cue, as etcd's do while it restarts."""

    def __init__(self, drops: int, failed_pings: list[int]) -> None:
        super().__init__()
        self.drops_left = drops
        self.failed_pings = failed_pings  # failures before each ping that answers, in order
        self.watching = threading.Event()

    async def ping(self) -> None:
        if self.failed_pings and self.failed_pings[0] > 0:
            self.failed_pings[0] -= 1
            raise StoreUnavailableError("etcd is restarting")
        if self.failed_pings:
            self.failed_pings.pop(0)

    async def watch_flags(self, start_revision: int) -> AsyncIterator[FlagEvent]:
        if self.drops_left:
            self.drops_left -= 1
            raise StoreUnavailableError("the watch broke")
        self.watching.set()
        async for event in super().watch_flags(start_revision):
            yield event


class _TopOfTheWindow:
    """Pins the jitter at the top of each window, so the schedule itself shows."""

    @staticmethod
    def uniform(low: float, high: float) -> float:
        return high


def test_the_watcher_backs_off_through_an_outage_and_starts_afresh_after_each_reconnect(monkeypatch, caplog):
    """Reconnect waits double through an outage and reset on reconnect; one warning per outage; every retry counted."""
    waits = _Waits()
    monkeypatch.setattr(_retry, "_async_sleep", waits.sleep)
    monkeypatch.setattr(_retry, "_jitter", _TopOfTheWindow())
    # Outage 1: the watch drops, then three pings fail. Outage 2: the watch drops, the next ping answers.
    store = _StoreThatRestarts(drops=2, failed_pings=[3, 0])
    with (
        caplog.at_level(logging.INFO, logger="otel_cancel.watcher"),
        configured(store=store, service="unit", watchdog_seconds=3600) as runtime,
    ):
        runtime.watcher.start()
        assert store.watching.wait(10) and runtime.watcher.wait_connected(True, 10)
        reconnects = runtime.watcher.reconnects
    first = WATCH_RECONNECT.first_window
    assert waits == [first, 2 * first, 4 * first, 8 * first, first]
    assert reconnects == 5
    lines = [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records if r.name == "otel_cancel.watcher"]
    unavailable = ("WARNING", "otel-cancel: cancel store unavailable")
    reconnected = [line for line in lines if line[1].startswith("otel-cancel: reconnected")]
    assert lines.count(unavailable) == 2 and len(reconnected) == 2 and len(lines) == 4


def _count_starts(monkeypatch) -> list[int]:
    """Counts the etcd processes an EtcdServer launches (one command line per start)."""
    starts: list[int] = []
    command = EtcdServer.command

    def counted(server: EtcdServer) -> list[str]:
        starts.append(server.client_port)
        return command(server)

    monkeypatch.setattr(EtcdServer, "command", counted)
    return starts


def test_an_embedded_etcd_whose_ports_stay_taken_gives_up_after_three_starts(monkeypatch):
    """Every port offered is taken: three starts on 'new' ports, then etcd's own error, not tenacity's."""
    starts = _count_starts(monkeypatch)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        monkeypatch.setattr(_etcd_server, "free_port", lambda host="127.0.0.1": taken)
        server = EtcdServer()
        try:
            with pytest.raises(RuntimeError, match="etcd exited"):
                server.start()
        finally:
            server.stop()
    assert starts == [taken, taken, taken]


def test_an_embedded_etcd_that_fails_for_another_reason_is_not_started_again(monkeypatch):
    """Only a lost port is retried: an etcd that rejects its arguments fails on the first start."""
    starts = _count_starts(monkeypatch)
    server = EtcdServer(extra_args=["--no-such-option"])
    try:
        with pytest.raises(RuntimeError, match="etcd exited"):
            server.start()
    finally:
        server.stop()
    assert len(starts) == 1
