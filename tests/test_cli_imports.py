"""`otel-cancel cancel` starts light (only what writing a flag needs) and its gateway client writes flags right."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from otel_cancel._root import random_root

# Each of these costs tens of milliseconds at start-up and is not needed to write a flag.
_HEAVY = ("asyncio", "grpc", "aetcd", "google.protobuf", "opentelemetry", "otel_cancel._runtime", "otel_cancel.asgi")

_PROBE = """
import json, sys
from otel_cancel.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _cancel_and_list_modules(env: dict[str, str], *args: str) -> tuple[int, list[str], str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["code"], report["modules"], result.stdout


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == name or m.startswith(name + ".") for name in _HEAVY)]


def test_cancel_writes_its_flag_without_importing_grpc_asyncio_or_opentelemetry(etcd_env):
    """A plain cancel (no span exporter) and one that waits for receipts load none of the heavy modules."""
    root = random_root()
    code, modules, stdout = _cancel_and_list_modules(etcd_env, "cancel", root, "--reason", "light")
    assert code == 0 and f"cancelled {root}" in stdout
    assert _heavy(modules) == []
    code, modules, stdout = _cancel_and_list_modules(etcd_env, "cancel", root, "--wait", "0.1", "--json")
    assert code == 0 and '"created": false' in stdout and '"reason": "light"' in stdout
    assert _heavy(modules) == []


def test_status_still_reads_through_the_grpc_store(etcd_env):
    """Commands that list or watch keep the gRPC client (the fast path is for cancel only)."""
    root = random_root()
    code, modules, _ = _cancel_and_list_modules(etcd_env, "status", root, "--json")
    assert code == 0 and "aetcd" in modules


def test_the_light_client_fails_over_past_a_dead_endpoint_and_keeps_the_first_flag(etcd, prefix):
    """The gateway client tries the next endpoint when one is down; a second create keeps the first flag."""
    from otel_cancel._request import CancelRequest
    from otel_cancel.store.etcd_gateway import EtcdGatewayClient
    from otel_cancel.testing import free_port

    client = EtcdGatewayClient([f"127.0.0.1:{free_port()}", etcd.endpoint], prefix=prefix, timeout=1)
    root = random_root()
    stored, created = client.create_flag(CancelRequest.new(root, "first", "tests"), 60)
    again, created_again = client.create_flag(CancelRequest.new(root, "second", "tests"), 60)
    client.close()
    assert created and not created_again
    assert again.reason == stored.reason == "first" and again.requested_at == stored.requested_at


def test_a_create_whose_answer_was_lost_and_retried_still_reports_created(etcd, prefix):
    """The first attempt commits but its answer is lost; the retry finds our own flag: created, and it stays."""
    from otel_cancel._request import CancelRequest
    from otel_cancel.exceptions import StoreUnavailableError
    from otel_cancel.store.etcd_gateway import EtcdGatewayClient

    client = EtcdGatewayClient([etcd.endpoint, etcd.endpoint], prefix=prefix, timeout=2)
    real_call = client._authenticated_call
    lost = []

    def answer_lost_once(action, path, body):
        answer = real_call(action, path, body)
        if path == "/v3/kv/txn" and not lost:
            lost.append(answer)
            raise StoreUnavailableError("etcd did not answer in time while writing a cancel flag")
        return answer

    client._authenticated_call = answer_lost_once
    root = random_root()
    stored, created = client.create_flag(CancelRequest.new(root, "mine", "tests"), 60)
    assert lost and lost[0]["succeeded"] and created and stored.reason == "mine"
    again, created_again = client.create_flag(CancelRequest.new(root, "later", "tests"), 60)
    client.close()
    assert not created_again and again == stored  # the flag survived: its lease was not revoked
