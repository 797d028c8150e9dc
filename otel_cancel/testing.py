"""Helpers for testing code that uses otel-cancel (shipped for users, used by our own tests).

- :class:`EtcdServer` runs a real etcd on loopback with a temporary data dir
  (optionally with TLS, :class:`EtcdTls`); :class:`EtcdCluster` runs several
  members as one cluster.
- :func:`configured` configures otel-cancel for a block and restores it after.
- :class:`ManagedProcess` runs a child process, reads its output lines with a
  timeout (await an event instead of sleeping) and always kills it by pid.
- :func:`on_io_loop` runs an async test on otel-cancel's IO loop, for tests
  that call a store directly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from ._etcd_server import EtcdCluster as EtcdCluster
from ._etcd_server import EtcdServer as EtcdServer
from ._etcd_server import EtcdTls as EtcdTls
from ._etcd_server import find_etcd_binary as find_etcd_binary
from ._etcd_server import find_etcdctl_binary as find_etcdctl_binary
from ._etcd_server import free_port as free_port
from ._io_loop import io_loop
from ._runtime import Runtime, configure, reset
from .store import CancelStore

P = ParamSpec("P")
T = TypeVar("T")


def on_io_loop(test: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Run the async ``test`` on otel-cancel's IO loop instead of the test runner's loop.

    gRPC's asyncio calls must not outlive the loop they were made on: a test loop
    that closes while a cancelled watch still awaits its last completion makes
    gRPC raise "Event loop is closed" later, in another test. Store calls made on
    the IO loop (where the library makes all of its own) never hit that.
    """

    @functools.wraps(test)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        async def body() -> T:
            return await test(*args, **kwargs)

        return await io_loop().call(body())

    return run


def unique_prefix() -> str:
    """A fresh key prefix, so tests sharing one etcd do not see each other's flags."""
    return f"/otel-cancel-test-{uuid.uuid4().hex[:12]}/"


@contextlib.contextmanager
def configured(*, store: CancelStore | None = None, **overrides: Any) -> Iterator[Runtime]:
    """Configure otel-cancel for the ``with`` block; stop its watcher afterwards."""
    runtime = configure(store=store, **overrides)
    try:
        yield runtime
    finally:
        reset()


_output_changed = threading.Condition()


def wait_for_output(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Block until ``predicate()`` holds, re-checking whenever any ManagedProcess prints a line.

    Raises:
        TimeoutError: it did not hold within ``timeout`` seconds.
    """
    with _output_changed:
        if not _output_changed.wait_for(predicate, timeout):
            raise TimeoutError(f"{what} not reached within {timeout}s")


class ManagedProcess:
    """A child process whose output is read line by line with timeouts.

    Args:
        args: the command.
        env: extra environment variables (added to this process's environment).
        name: a label for error messages.
    """

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, name: str = "") -> None:
        self.name = name or os.path.basename(args[0])
        self.args = list(args)
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            with _output_changed:
                self.lines.append(line)
                _output_changed.notify_all()
            self._queue.put(line)
        self._queue.put(None)
        with _output_changed:
            _output_changed.notify_all()

    def wait_for_line(self, predicate: Callable[[str], bool] | str, timeout: float = 20.0) -> str:
        """The next output line matching ``predicate`` (a callable or a prefix).

        Raises:
            TimeoutError: no such line within ``timeout`` (the output so far is in the message).
        """
        match = predicate if callable(predicate) else (lambda line: line.startswith(predicate))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise TimeoutError(self._describe(f"no matching line within {timeout}s")) from None
            if line is None:
                raise RuntimeError(self._describe(f"exited with {self.process.wait()} before a matching line"))
            if match(line):
                return line

    def _describe(self, what: str) -> str:
        tail = "\n".join(self.lines[-40:])
        return f"{self.name} (pid {self.pid}) {what}; output:\n{tail}"

    def send(self, text: str) -> None:
        """Write a line to the process's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate the process group (SIGTERM, then SIGKILL) and return the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        with contextlib.suppress(Exception):
            if self.process.stdin:
                self.process.stdin.close()
        self._reader.join(timeout)
        with contextlib.suppress(Exception):
            if self.process.stdout:
                self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


__all__ = (
    "EtcdCluster",
    "EtcdServer",
    "EtcdTls",
    "ManagedProcess",
    "configured",
    "find_etcd_binary",
    "find_etcdctl_binary",
    "free_port",
    "reset",
    "unique_prefix",
    "wait_for_output",
)
