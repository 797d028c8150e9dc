"""Production serving: gunicorn with uvicorn workers, the app preloaded in the master and then forked.

With ``--preload`` the master imports the app, and ``opentelemetry-instrument`` loads
otel-cancel, before any worker exists; each worker is a fork of it. Each worker must
still run its own watch (on an IO loop of its own), stop its own requests and write
its own receipt.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import httpx
import pytest
from chain import SERVICES
from debug_service import run_cli

from otel_cancel.testing import free_port, wait_for_output

pytestmark = pytest.mark.anyio

_BIN = os.path.dirname(sys.executable)
WORKERS = 2


async def test_workers_forked_from_a_preloaded_app_stop_their_streams_and_write_receipts(spawn, etcd_env):
    """`opentelemetry-instrument gunicorn --preload -w 2 -k uvicorn.workers.UvicornWorker`: every cancel lands."""
    port = free_port()
    env = {
        **etcd_env,
        "LEVEL": "A",
        "OTEL_SERVICE_NAME": "gunicorn-edge",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "PYTHONPATH": os.pathsep.join([SERVICES, os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        os.path.join(_BIN, "opentelemetry-instrument"),
        os.path.join(_BIN, "gunicorn"),
        "chain_app:app",
        "--preload",
        "--workers",
        str(WORKERS),
        "--worker-class",
        "uvicorn.workers.UvicornWorker",
        "--bind",
        f"127.0.0.1:{port}",
    ]
    server = spawn(command, env=env, name="gunicorn")
    await asyncio.to_thread(
        wait_for_output,
        lambda: sum("Application startup complete" in line for line in server.lines) == WORKERS,
        60,
        "both workers started",
    )
    instances = set()
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(4):
            request = client.build_request(
                "GET", f"http://127.0.0.1:{port}/stream", params={"tokens": 2000, "interval": 0.05}
            )
            response = await client.send(request, stream=True)
            root = response.headers["otel-cancel-root"]
            await asyncio.to_thread(wait_for_output, lambda r=root: f"START {r} A" in server.lines, 30, "started")
            result = await run_cli("cancel", root, "--wait", "10", "--expect", "1", env=etcd_env)
            assert result.returncode == 0, result.stdout + result.stderr
            lines = [line async for line in response.aiter_lines() if line]
            await response.aclose()
            assert lines[-2] == "event: otel-cancel"
            await asyncio.to_thread(wait_for_output, lambda r=root: f"STOPPED {r} A" in server.lines, 30, "stopped")
            status = json.loads((await run_cli("status", root, "--json", env=etcd_env)).stdout)
            instances |= {receipt["instance"] for receipt in status["receipts"]}
    # Each receipt names the worker process that stopped the work (hostname-pid by default).
    assert 1 <= len(instances) <= WORKERS
    assert not [line for line in server.lines if "Traceback" in line]
