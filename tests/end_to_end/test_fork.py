"""A process forked after otel-cancel was set up (a pre-fork server, gunicorn ``--preload``) is a process of its own.

The parent configured otel-cancel (and the OpenTelemetry SDK, whose resource names the
instance) before the fork; each child must run its own watch, stop its own work and
write its receipt under an instance name of its own, not its parent's (which every
sibling would share).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import python_worker
from debug_service import run_cli

from otel_cancel._core.root import random_root
from otel_cancel.testing import wait_for_output

pytestmark = pytest.mark.anyio


async def test_children_forked_from_a_configured_parent_sign_their_own_receipts(spawn, etcd_env):
    """Two children of a configured parent: each is stopped by its flag and writes its receipt under its own name."""
    roots = [random_root(), random_root()]
    worker = spawn(python_worker("forking_worker", *roots), env=etcd_env, name="forking")
    parent = (await asyncio.to_thread(worker.wait_for_line, lambda line: line.startswith("PARENT "), 60)).split()[1]
    # The children print in either order.
    await asyncio.to_thread(
        wait_for_output, lambda: sum(line.startswith("ENTERED ") for line in worker.lines) == 2, 30, "both entered"
    )
    result = await run_cli("cancel", *roots, env=etcd_env)
    assert result.returncode == 0, result.stdout + result.stderr
    await asyncio.to_thread(
        wait_for_output, lambda: sum(line.startswith("RECEIPT ") for line in worker.lines) == 2, 30, "both receipts"
    )
    instances = {line.split()[1]: line.split()[3] for line in worker.lines if line.startswith("STOPPED ")}
    assert set(instances) == set(roots)
    assert len(set(instances.values())) == 2 and parent not in instances.values(), (parent, instances)
    for root in roots:
        status = json.loads((await run_cli("status", root, "--json", env=etcd_env)).stdout)
        assert [receipt["instance"] for receipt in status["receipts"]] == [instances[root]]
