"""FastAPI services under ``opentelemetry-instrument``: real uvicorn processes, cancelled by the CLI."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from debug_service import run_cli

from otel_cancel.testing import wait_for_output

pytestmark = pytest.mark.anyio


async def test_a_fastapi_chain_under_opentelemetry_instrument_is_cancelled_at_every_level(chain, etcd_env):
    """A -> B, both FastAPI apps that never import otel_cancel: the CLI's cancel stops the run at both levels."""
    chain.start(etcd_env, levels=("A", "B"), module="fastapi_app", auto_instrument=True, replicas=1)
    async with httpx.AsyncClient(timeout=60) as client:
        request = client.build_request("GET", f"{chain.urls(0)[0]}/stream", params={"tokens": 2000, "interval": 0.05})
        response = await client.send(request, stream=True)
        root = response.headers["otel-cancel-root"]
        await asyncio.to_thread(wait_for_output, lambda: len(chain.lines("START", root)) == 2, 30, "both started")
        result = await run_cli("cancel", root, "--reason", "fastapi", "--wait", "2", "--expect", "2", env=etcd_env)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = [line async for line in response.aiter_lines() if line]
        await response.aclose()
        # The edge's stream ends with the cancel's own event, not a broken connection.
        cancelled = {"error": "cancelled", "root": root, "reason": "fastapi"}
        assert lines[-2:] == ["event: otel-cancel", f"data: {json.dumps(cancelled)}"]
        await asyncio.to_thread(wait_for_output, lambda: len(chain.lines("STOPPED", root)) == 2, 30, "both stopped")
        # A late hop of the cancelled run is refused before its handler runs.
        late = await client.get(f"{chain.urls(1)[0]}/work", headers={"baggage": f"otel_cancel.root={root}"})
        assert late.status_code == 409
        assert not chain.lines("RAN", root)


async def test_a_fastapi_handler_cancelled_mid_request_answers_409(chain, etcd_env):
    """A FastAPI JSON handler still working when its root is cancelled: the client gets 409 with the reason."""
    chain.start(etcd_env, levels=("A",), module="fastapi_app", auto_instrument=True, replicas=1)
    async with httpx.AsyncClient(timeout=60) as client:
        call = asyncio.create_task(client.get(f"{chain.urls(0)[0]}/work", params={"seconds": 60}))
        line = await asyncio.to_thread(chain.levels[0][0][1].wait_for_line, "RAN ", 30)
        root = line.split()[1]
        result = await run_cli("cancel", root, "--reason", "user left", env=etcd_env)
        assert result.returncode == 0, result.stdout + result.stderr
        response = await asyncio.wait_for(call, 30)
    assert response.status_code == 409
    assert response.json() == {"error": "cancelled", "root": root, "reason": "user left"}
    assert response.headers["otel-cancel-root"] == root
