"""A TCP relay on loopback that a test can cut, wholly or for one process's connections.

Tests put one in front of each etcd member's peer port: cutting a member off its
peers is then closing the relays' connections that lead to it or come from it,
while its client port stays reachable.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from otel_cancel.testing import EtcdServer, free_port


def _inodes_of_local_port(port: int) -> set[str]:
    """Inodes of the TCP sockets whose local port is ``port`` (from /proc/net/tcp)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


def owner_pid(peer_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` owns the socket whose local port is ``peer_port``, if any."""
    wanted = {f"socket:[{inode}]" for inode in _inodes_of_local_port(peer_port)}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket, client_port: int) -> None:
        self.sockets = (client, upstream)
        self.client_port = client_port

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpRelay:
    """Relays connections from its own loopback port to ``target_port``.

    Args:
        target_port: where connections go.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._refuse_all = False
        self._refused_origins: set[int] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, address = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused_origins = list(self._refused_origins)
                refused = self._closed or self._refuse_all
            if not refused and refused_origins:
                refused = owner_pid(address[1], refused_origins) is not None
            if refused:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            link = _Link(client, upstream, address[1])
            with self._lock:
                self._links.add(link)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(link, source, sink), daemon=True).start()

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._links.discard(link)
        link.close()

    def cut(self, origin: int | None = None) -> None:
        """Close every relayed connection (or those from ``origin``) and refuse new ones."""
        with self._lock:
            if origin is None:
                self._refuse_all = True
                links = list(self._links)
            else:
                self._refused_origins.add(origin)
                links = list(self._links)
        if origin is not None:
            # The socket still exists: which process holds its client end tells where it comes from.
            links = [link for link in links if owner_pid(link.client_port, [origin]) == origin]
        for link in links:
            link.close()

    def heal(self) -> None:
        """Relay everything again."""
        with self._lock:
            self._refuse_all = False
            self._refused_origins.clear()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links = list(self._links)
        self._listener.close()
        for link in links:
            link.close()


class PartitionableCluster:
    """Relays for the peer ports of an :class:`~otel_cancel.testing.EtcdCluster`'s members."""

    def __init__(self) -> None:
        self.relays: dict[str, TcpRelay] = {}

    def relay_for(self, member: EtcdServer) -> int:
        """The ``peer_relay`` hook of ``EtcdCluster``: a relay in front of ``member``'s peer port."""
        relay = TcpRelay(member.peer_port)
        self.relays[member.name] = relay
        return relay.port

    def isolate(self, member: EtcdServer) -> None:
        """Cut ``member`` off its peers: nothing reaches its peer port, nothing it dials gets through."""
        pid = member.pid
        for name, relay in self.relays.items():
            if name == member.name:
                relay.cut()
            else:
                relay.cut(origin=pid)

    def heal(self) -> None:
        for relay in self.relays.values():
            relay.heal()

    def close(self) -> None:
        for relay in self.relays.values():
            relay.close()
