"""One background event loop per process for every etcd call otel-cancel makes.

gRPC's asyncio stack dispatches every completion of the process through the
loop that first initialised it (its poller is bound to that loop). A loop that
closes while another still has calls in flight leaves those calls stranded. So
otel-cancel runs all its etcd traffic on one loop, on a daemon thread that lives
as long as the process, and pins gRPC's poller to it at start. The application's
own loops never await etcd; they hand work over with :meth:`IoLoop.submit`.

Everything submitted runs with OpenTelemetry instrumentation suppressed: our etcd
calls (the watch, its watchdog's pings, flags and receipts) are plumbing, and
with ``opentelemetry-instrumentation-grpc`` installed they would otherwise show
up as traces of the user's service. Our own spans are recorded all the same.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class IoLoop:
    """A lazily started event loop on a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop, started on first use."""
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._loop is None:
                ready = threading.Event()
                self._thread = threading.Thread(target=self._main, args=(ready,), name="otel-cancel-io", daemon=True)
                self._thread.start()
                ready.wait()
            assert self._loop is not None
            return self._loop

    def _main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            import grpc.aio

            # Bind gRPC's poller to this loop for the life of the process (never shut down).
            grpc.aio.init_grpc_aio()
        except ImportError:  # pragma: no cover - grpcio is a dependency
            pass
        ready.set()
        loop.run_forever()

    def start(self) -> None:
        """Start the loop's thread now (idempotent)."""
        self.loop  # noqa: B018 - the property starts the loop

    def is_current(self) -> bool:
        """Whether the caller runs on this loop's thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coroutine`` on the loop, untraced by instrumentations; safe from any thread."""
        return asyncio.run_coroutine_threadsafe(_untraced(coroutine), self.loop)

    async def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and await its result from the caller's loop."""
        if self.is_current():
            return await coroutine
        return await asyncio.wrap_future(self.submit(coroutine))

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and block the calling thread for its result."""
        if self.is_current():
            coroutine.close()
            raise RuntimeError("IoLoop.run() would deadlock on the loop's own thread; await call() instead")
        return self.submit(coroutine).result(timeout)

    def _forget_after_fork(self) -> None:
        # The thread does not survive fork(); the child starts its own loop on demand.
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None


async def _untraced(coroutine: Coroutine[Any, Any, T]) -> T:
    """Await ``coroutine`` in a context where instrumentations (gRPC's client interceptor) record nothing.

    The context is the task's own copy, so tasks the coroutine starts inherit it.
    """
    # Every OpenTelemetry instrumentation checks the suppression through this module, so
    # where it is not loaded (the CLI) nothing can trace our calls: skip the suppression
    # and the module's import (it brings wrapt, about 100 ms of a CLI command's start).
    utils = sys.modules.get("opentelemetry.instrumentation.utils")
    if utils is None:
        return await coroutine
    with utils.suppress_instrumentation():
        return await coroutine


_io_loop = IoLoop()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_io_loop._forget_after_fork)


def io_loop() -> IoLoop:
    """The process's IO loop."""
    return _io_loop
