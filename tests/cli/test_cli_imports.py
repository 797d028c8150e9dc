"""Each `otel-cancel` command imports what it uses: no SDK, no integrations, no demo; no gRPC for a plain cancel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from otel_cancel._core.root import random_root

# None of these is needed to write a flag or read one back; each costs start-up time.
_UNUSED = (
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "opentelemetry.instrumentation",
    "otel_cancel.asgi",
    "otel_cancel.a2a",
    "otel_cancel.langgraph",
    "otel_cancel.instrumentation",
    "otel_cancel.demo",
    "otel_cancel.cli.doctor",
    "otel_cancel.testing",
    "langgraph",
    "a2a",
    "httpx",
    "starlette",
    "uvicorn",
)

_PROBE = """
import json, sys
from otel_cancel.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _run_and_list_modules(env: dict[str, str], *args: str) -> tuple[int, list[str], str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        env={**os.environ, "OTEL_TRACES_EXPORTER": "none", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["code"], report["modules"], result.stdout


def _unused(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == name or m.startswith(name + ".") for name in _UNUSED)]


def test_cancel_imports_neither_the_sdk_nor_integrations(etcd_env):
    """A plain cancel and one that waits for receipts write the flag without the SDK or any integration."""
    root = random_root()
    code, modules, stdout = _run_and_list_modules(etcd_env, "cancel", root, "--reason", "light")
    assert code == 0 and f"cancelled {root}" in stdout
    assert _unused(modules) == []
    code, modules, stdout = _run_and_list_modules(etcd_env, "cancel", root, "--wait", "0.1", "--json")
    assert code == 0 and '"created": false' in stdout and '"reason": "light"' in stdout
    assert _unused(modules) == []


# A plain cancel writes through etcd's HTTP gateway with the standard library: none of these.
_NOT_FOR_A_PLAIN_CANCEL = (
    "grpc",
    "aetcd",
    "google.protobuf",
    "asyncio",
    "opentelemetry",
    "otel_cancel.store.etcd",
    "otel_cancel.store.events",
    "otel_cancel._core.records",
)


def test_a_plain_cancel_loads_no_grpc_aetcd_protobuf_asyncio_or_opentelemetry(etcd_env):
    """`cancel ROOT [ROOT...]` (no --wait, no --all) writes its flags without any of the gRPC store's imports."""
    roots = [random_root(), random_root()]
    code, modules, stdout = _run_and_list_modules(etcd_env, "cancel", *roots, "--reason", "quick")
    assert code == 0 and all(f"cancelled {root}" in stdout for root in roots)
    loaded = [m for m in modules if any(m == name or m.startswith(name + ".") for name in _NOT_FOR_A_PLAIN_CANCEL)]
    assert loaded == []
    assert "otel_cancel.store.etcd_gateway" in modules and _unused(modules) == []
    code, modules, stdout = _run_and_list_modules(etcd_env, "cancel", roots[0])
    assert code == 0 and "already cancelled" in stdout and "grpc" not in modules


def test_status_imports_neither_the_runtime_nor_bulk_cancelling(etcd_env):
    """status reads through the store and loads none of what only cancel or a service uses."""
    root = random_root()
    code, modules, _ = _run_and_list_modules(etcd_env, "status", root, "--json")
    assert code == 0 and "aetcd" in modules
    assert _unused(modules) == []
    assert "otel_cancel._core.process_state" not in modules and "otel_cancel._core.cancel_many" not in modules


def test_the_package_loads_its_public_names_on_first_use():
    """`import otel_cancel` loads no runtime or OpenTelemetry; each public name still resolves."""
    probe = (
        "import json, sys, otel_cancel\n"
        "before = sorted(sys.modules)\n"
        "names = {n: callable(getattr(otel_cancel, n)) for n in otel_cancel.__all__}\n"
        "print(json.dumps({'before': before, 'names': names}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(result.stdout)
    assert not [
        m for m in report["before"] if m.startswith(("opentelemetry", "otel_cancel._core.process_state", "asyncio"))
    ]
    assert set(report["names"]) == set(__import__("otel_cancel").__all__)
