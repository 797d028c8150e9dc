"""Helpers for testing code that uses otel-cancel (shipped for users, used by our own tests).

- :class:`EtcdServer` runs a real etcd on loopback with a temporary data dir
  (optionally with TLS, :class:`EtcdTls`) and injects faults: kill, freeze, thaw,
  restart; :class:`EtcdCluster` runs several members as one cluster.
- :func:`configured` configures otel-cancel for a block and restores it after.
- :class:`CancelMetrics` reads otel-cancel's own metrics back (flags applied,
  receipts written...), so a test asserts what an operator's dashboard would show.
- :class:`ManagedProcess` runs a child process, reads its output lines with a
  timeout (await an event instead of sleeping) and always kills it by pid.
- :func:`on_io_loop` runs an async test on otel-cancel's IO loop, for tests
  that call a store directly.

The demo's embedded etcd and child processes are product code
(``otel_cancel.store.embedded_etcd``, ``otel_cancel.demo.processes``); the classes here
extend them with what only tests need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from opentelemetry import metrics

from .._core.io_loop import io_loop
from .._core.process_state import ProcessState, configure, reset
from ..demo.processes import ChildProcess, output_changed
from ..store import CancelStore
from ..store import embedded_etcd as _etcd_server
from ..store._tls import ssl_context
from ..store.embedded_etcd import find_etcd_binary as find_etcd_binary
from ..store.embedded_etcd import find_etcdctl_binary as find_etcdctl_binary
from ..store.embedded_etcd import free_port as free_port

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

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
def configured(*, store: CancelStore | None = None, **overrides: Any) -> Iterator[ProcessState]:
    """Configure otel-cancel for the ``with`` block; stop its watcher afterwards."""
    runtime = configure(store=store, **overrides)
    try:
        yield runtime
    finally:
        reset()


def wait_for_output(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Block until ``predicate()`` holds, re-checking whenever a child process prints a line.

    Child processes are :class:`ManagedProcess` instances and the demo's
    (``otel_cancel.demo.ExampleChain``, the LangGraph Server chain).

    Raises:
        TimeoutError: it did not hold within ``timeout`` seconds.
    """
    with output_changed:
        if not output_changed.wait_for(predicate, timeout):
            raise TimeoutError(f"{what} not reached within {timeout}s")


class ManagedProcess(ChildProcess):
    """A child process whose output is read line by line with timeouts.

    The demo's child process with a test's extra: :meth:`send` writes to its stdin.

    Args:
        args: the command.
        env: extra environment variables (added to this process's environment).
        name: a label for error messages.
    """

    def send(self, text: str) -> None:
        """Write a line to the process's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def __enter__(self) -> ManagedProcess:
        return self


@dataclasses.dataclass(frozen=True)
class EtcdTls:
    """TLS on an :class:`EtcdServer`'s client URL (paths of PEM files).

    Attributes:
        ca_cert: the CA that signed the server's certificate (and the clients', for mutual TLS).
        cert: the server certificate (valid for ``127.0.0.1``).
        key: its key.
        client_cert_auth: require clients to present a certificate signed by ``ca_cert``.
        client_cert: a client certificate for the server's own health probe (mutual TLS).
        client_key: its key.
    """

    ca_cert: str
    cert: str
    key: str
    client_cert_auth: bool = False
    client_cert: str | None = None
    client_key: str | None = None


class EtcdServer(_etcd_server.EtcdServer):
    """A single-member etcd on 127.0.0.1 with a temporary data dir, and faults to inject.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The same
    ports and data dir are reused by :meth:`restart`, so data and revisions
    survive a restart like a real outage.

    Args:
        client_port: the client port (free one by default).
        peer_port: the peer port (free one by default).
        data_dir: where etcd keeps its data (a temporary dir, removed on stop, by default).
        extra_args: more etcd flags (auth, cluster membership...).
        name: the member name.
        log_path: where etcd's output goes (next to the data dir by default).
        tls: serve the client URL over TLS.
    """

    def __init__(
        self,
        *,
        client_port: int | None = None,
        peer_port: int | None = None,
        data_dir: str | None = None,
        extra_args: list[str] | None = None,
        name: str = "otel-cancel",
        log_path: str | None = None,
        tls: EtcdTls | None = None,
    ) -> None:
        super().__init__(
            client_port=client_port,
            peer_port=peer_port,
            data_dir=data_dir,
            extra_args=extra_args,
            name=name,
            log_path=log_path,
        )
        self.tls = tls
        self.advertised_peer_port: int | None = None
        """The peer port the other members dial (a relay in front of :attr:`peer_port`); default the same."""

    @property
    def peer_url(self) -> str:
        """The peer URL this member advertises to the others."""
        return f"http://127.0.0.1:{self.advertised_peer_port or self.peer_port}"

    @property
    def client_url(self) -> str:
        """The client URL (``https://`` with TLS)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        """The etcd command line, with the TLS flags when serving TLS."""
        command = super().command()
        if self.tls is None:
            return command
        command += ["--cert-file", self.tls.cert, "--key-file", self.tls.key, "--trusted-ca-file", self.tls.ca_cert]
        if self.tls.client_cert_auth:
            command.append("--client-cert-auth")
        return command

    def _health_check_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        # Verified as otel-cancel's own HTTPS calls to etcd verify it.
        return ssl_context(self.tls.ca_cert, self.tls.client_cert, self.tls.client_key)

    def start(self, timeout: float = 20.0, wait: bool = True) -> EtcdServer:
        """Start etcd and wait until it answers its health endpoint (see the embedded etcd's ``start``)."""
        super().start(timeout, wait)
        return self

    def wait_for_log(self, text: str, *, since: int = 0, timeout: float = 20.0) -> str:
        """Block until etcd logs a line containing ``text`` after byte ``since``; return the line.

        etcd logs what happens only it can see (a member joining, a simple auth token
        deleted when its TTL ran out): run it with ``--log-level info`` for those.
        :meth:`log_size` gives ``since``.

        Raises:
            TimeoutError: no such line within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, "rb") as log:
                log.seek(since)
                for line in log.read().decode("utf-8", "replace").splitlines():
                    if text in line:
                        return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd did not log {text!r} within {timeout}s; see {self.log_path}")
            time.sleep(0.05)  # etcd writes to a file: there is no event to await

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the process with ``sig`` and wait for it; the data dir stays."""
        self._signal_and_wait(sig)

    def freeze(self) -> None:
        """SIGSTOP etcd: the sockets stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT a frozen etcd."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 20.0) -> None:
        """Stop and start again on the same ports and data."""
        self.kill(signal.SIGTERM)
        self.start(timeout)

    def __enter__(self) -> EtcdServer:
        return self.start()


class EtcdCluster:
    """A cluster of etcd members on 127.0.0.1 (three by default), each with its own ports and data.

    Members can be killed, frozen and restarted one by one (they are
    :class:`EtcdServer` instances); the cluster keeps serving while a majority runs.

    Args:
        size: the number of members.
        extra_args: more etcd flags for every member (for example a shorter
            ``--election-timeout``).
        peer_relay: given a member, returns the port of a relay in front of its peer
            port; the members then talk to each other only through the relays (a test
            cuts one member off its peers while its clients still reach it).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        extra_args: Sequence[str] = (),
        peer_relay: Callable[[EtcdServer], int] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one member, got {size}")
        self.members = [EtcdServer(name=f"member{index}") for index in range(size)]
        if peer_relay is not None:
            for member in self.members:
                member.advertised_peer_port = peer_relay(member)
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"otel-cancel-{uuid.uuid4().hex[:12]}"
        for member in self.members:
            member.extra_args = [
                "--initial-cluster",
                initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                token,
                *extra_args,
            ]

    @property
    def endpoints(self) -> list[str]:
        """``127.0.0.1:port`` of every member, in member order."""
        return [member.endpoint for member in self.members]

    def member(self, endpoint: str) -> EtcdServer:
        """The member serving ``endpoint`` (``host:port``, as ``EtcdCancelStore.endpoint`` says).

        Raises:
            KeyError: no member serves it.
        """
        for member in self.members:
            if member.endpoint == endpoint:
                return member
        raise KeyError(endpoint)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        """Start every member, then wait until each answers its health endpoint.

        The members start together: none is healthy before a majority has joined.
        """
        try:
            for member in self.members:
                member.start(wait=False)
            for member in self.members:
                member.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every member (SIGKILL: the data goes too) and remove its data.

        A member stopped gracefully first hands its leadership over, which the
        members stopping beside it cannot take: seconds lost for data thrown away.
        """
        for member in self.members:
            member.kill(signal.SIGKILL)
        for member in self.members:
            member.stop()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


# The reader CancelMetrics installed with the process's meter provider (there is one per process).
_installed_reader: InMemoryMetricReader | None = None
_installed_lock = threading.Lock()


def _installed_metric_reader() -> InMemoryMetricReader:
    global _installed_reader
    with _installed_lock:
        if _installed_reader is None:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            reader = InMemoryMetricReader()
            provider = MeterProvider(metric_readers=[reader])
            metrics.set_meter_provider(provider)
            if metrics.get_meter_provider() is not provider:
                provider.shutdown()
                raise RuntimeError(
                    "this process already has an OpenTelemetry meter provider, so CancelMetrics cannot install one: "
                    "give that provider an InMemoryMetricReader and pass it, CancelMetrics(reader)"
                )
            _installed_reader = reader
        return _installed_reader


class CancelMetrics:
    """otel-cancel's own metrics in this process, read back in memory (needs ``opentelemetry-sdk``).

    A test asserts on what the library counted (``otel_cancel.flags.applied``,
    ``otel_cancel.receipts``, ``otel_cancel.cancellations``... see
    :data:`otel_cancel.attributes.METRIC_NAMES`), as an operator's dashboard sees it.
    Without ``reader``, the first instance installs an SDK ``MeterProvider`` with an
    ``InMemoryMetricReader`` as the process's global one (OpenTelemetry allows one per
    process; otel-cancel's instruments report to it from then on) and later instances
    share that reader. Counters add up over the process's life: compare a total with
    one read before the code under test ran.

    Args:
        reader: the reader of a meter provider the process installed itself.

    Raises:
        RuntimeError: no ``reader`` given and the process already has a meter provider.
    """

    def __init__(self, reader: InMemoryMetricReader | None = None) -> None:
        self.reader = reader if reader is not None else _installed_metric_reader()

    def total(self, name: str) -> float:
        """The value of metric ``name`` summed over all its labels; 0 before its first point.

        A counter's count, a gauge's sum of current values, a histogram's number of
        recordings.
        """
        from opentelemetry.sdk.metrics.export import NumberDataPoint

        data = self.reader.get_metrics_data()
        total = 0.0
        for resource_metrics in data.resource_metrics if data is not None else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        total += point.value if isinstance(point, NumberDataPoint) else point.count
        return total


__all__ = (
    "CancelMetrics",
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
