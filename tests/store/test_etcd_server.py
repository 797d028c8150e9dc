"""The embedded etcd: ports that stay free, a start that survives losing one, and no test machinery in it.

The demo runs ``otel_cancel.store.embedded_etcd`` and ``otel_cancel.demo.processes``;
``otel_cancel.testing`` extends them with faults (freeze, restart, clusters, TLS).
"""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from otel_cancel.store import embedded_etcd as _etcd_server
from otel_cancel.store.embedded_etcd import EtcdServer, free_port

PACKAGE = Path(_etcd_server.__file__).parents[1]


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


# The demo's modules: what `otel-cancel demo` runs, with its embedded etcd and child processes.
_DEMO_MODULES = (
    "otel_cancel.demo",
    "otel_cancel.demo.a2a",
    "otel_cancel.demo.langgraph_server",
    "otel_cancel.demo.langgraph_server_chain",
    "otel_cancel.store.embedded_etcd",
    "otel_cancel.demo.processes",
)


def test_an_etcd_that_never_becomes_healthy_is_not_left_running(monkeypatch):
    """A start whose health check times out kills the etcd it launched: a failed ``with`` leaves no process."""
    launched = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        launched.append(real_popen(*args, **kwargs))
        return launched[-1]

    def never_healthy(self, timeout=20.0):
        raise TimeoutError(f"etcd on port {self.client_port} not healthy after {timeout}s")

    monkeypatch.setattr(_etcd_server.subprocess, "Popen", popen)
    monkeypatch.setattr(EtcdServer, "wait_healthy", never_healthy)
    try:
        with EtcdServer():
            raise AssertionError("a start that failed ran the body")
    except TimeoutError:
        pass
    assert len(launched) == 1 and launched[0].poll() is not None


def test_the_demo_and_its_embedded_etcd_load_no_test_machinery():
    """Importing every demo module and running the embedded etcd leaves otel_cancel.testing unloaded."""
    probe = (
        "import importlib, json, sys\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "from otel_cancel.store.embedded_etcd import EtcdServer\n"
        "with EtcdServer() as server:\n"
        "    server.wait_healthy()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *_DEMO_MODULES], capture_output=True, text=True, timeout=120, check=True
    )
    modules = json.loads(result.stdout.splitlines()[-1])
    assert set(_DEMO_MODULES) <= set(modules)
    assert "otel_cancel.testing" not in modules


def _imports_of(path: Path) -> set[str]:
    """Absolute names of the otel_cancel modules ``path`` imports (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level])
                base = f"{package}.{base}" if base else package
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_no_product_module_imports_the_test_helpers():
    """Only otel_cancel.testing itself mentions otel_cancel.testing: the product never reaches into test machinery."""
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "testing.py" and "otel_cancel.testing" in _imports_of(path)
    ]
    assert offenders == []


def test_the_testing_module_keeps_every_name_it_exported():
    """Users' tests keep importing the fixtures from otel_cancel.testing, fault injection included."""
    from otel_cancel import testing

    assert set(testing.__all__) >= {
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
    }
    assert callable(testing.on_io_loop)
    for method in ("kill", "freeze", "thaw", "restart", "wait_for_log"):
        assert callable(getattr(testing.EtcdServer, method))
        assert not hasattr(_etcd_server.EtcdServer, method)
    assert callable(testing.ManagedProcess.send)
