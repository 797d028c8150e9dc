"""Shared fixtures: a real etcd for the session, a fresh prefix and runtime per test."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from chain import Chain

from otel_cancel._core import process_state as _runtime
from otel_cancel._core.io_loop import io_loop
from otel_cancel.testing import CancelMetrics, EtcdServer, ManagedProcess, unique_prefix

WORKERS = os.path.join(os.path.dirname(__file__), "workers")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def _grpc_pinned_to_the_io_loop() -> None:
    """Bind gRPC's asyncio poller to otel-cancel's IO loop before any test opens a channel.

    gRPC dispatches every completion of the process through the loop that first
    initialised it; a test that opened a raw aetcd client first would bind it to that
    test's loop, which closes when the test ends (see otel_cancel._core.io_loop).
    """
    io_loop().start()


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    """One real etcd server for the session (tests isolate themselves by prefix)."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def private_etcd() -> Iterator[EtcdServer]:
    """A real etcd server of the test's own, for tests that stop or freeze it."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def cancel_metrics() -> CancelMetrics:
    """otel-cancel's metrics in this process, read back from an in-memory reader (totals add up over the session)."""
    return CancelMetrics()


@pytest.fixture
def prefix() -> str:
    return unique_prefix()


@pytest.fixture(autouse=True)
def _reset_runtime() -> Iterator[None]:
    """Every test starts and ends without a configured otel-cancel runtime."""
    _runtime.reset()
    yield
    _runtime.reset()


@pytest.fixture
def etcd_env(etcd: EtcdServer, prefix: str) -> dict[str, str]:
    """Environment that points a child process at the session etcd and the test's prefix."""
    return {
        "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
        "OTEL_CANCEL_PREFIX": prefix,
        "OTEL_CANCEL_WATCHDOG_SECONDS": "1",
    }


@pytest.fixture
def spawn() -> Iterator[object]:
    """Start child processes that are always stopped (by pid) when the test ends."""
    started: list[ManagedProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None, name: str = "") -> ManagedProcess:
        process = ManagedProcess(args, env=env, name=name)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def chain() -> Iterator[Chain]:
    """A chain of real uvicorn services (tests call ``chain.start(...)``), always stopped."""
    started = Chain()
    yield started
    started.stop()


def python_worker(name: str, *args: str) -> list[str]:
    """The command that runs ``tests/workers/{name}.py``."""
    return [sys.executable, os.path.join(WORKERS, f"{name}.py"), *args]


def cli(*args: str) -> list[str]:
    """The command that runs the ``otel-cancel`` CLI of this interpreter."""
    return [sys.executable, "-m", "otel_cancel", *args]
