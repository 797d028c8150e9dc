"""The embedded etcd (demo, tests): ports that stay free, and a start that survives losing one."""

from __future__ import annotations

import socket
import urllib.request

from otel_cancel import _etcd_server
from otel_cancel._etcd_server import EtcdServer, free_port


def test_free_ports_are_below_the_ephemeral_range_and_never_handed_out_twice():
    """Client sockets cannot take them by chance, and two servers of one process never get the same one."""
    low, _ = _etcd_server._ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(port < low for port in ports)


def test_an_etcd_whose_port_was_taken_starts_on_new_ports(monkeypatch):
    """etcd exits with 'address already in use' on a port it chose: it starts again on fresh ones and serves."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_free_port = _etcd_server.free_port
        offered = iter([taken])
        monkeypatch.setattr(_etcd_server, "free_port", lambda host="127.0.0.1": next(offered, None) or real_free_port())
        with EtcdServer() as server:
            assert server.client_port != taken
            with urllib.request.urlopen(f"{server.client_url}/health", timeout=5) as response:
                assert response.status == 200
