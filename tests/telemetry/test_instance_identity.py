"""One instance identity across receipts, spans and metrics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import httpx
import pytest
from conftest import cli
from otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.anyio


async def _receipts(root: str, env: dict[str, str], count: int) -> list[dict]:
    async with asyncio.timeout(30):
        while True:
            status = subprocess.run(
                cli("status", root, "--json"), env={**os.environ, **env}, capture_output=True, text=True, check=True
            )
            receipts = json.loads(status.stdout)["receipts"]
            if len(receipts) >= count:
                return receipts
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("given", [None, "pod-7"], ids=["sdk-random-id", "resource-attribute"])
async def test_receipts_name_the_process_as_its_telemetry_does(given, chain, etcd_env):
    """Without OTEL_CANCEL_INSTANCE a receipt carries the service.instance.id of the process's spans and metrics."""
    receiver = OtlpReceiver().start()
    try:
        env = {**etcd_env, **receiver.env()}
        if given:
            env["OTEL_RESOURCE_ATTRIBUTES"] = f"service.instance.id={given}"
        chain.start(
            env,
            levels=("A",),
            module="chain_app",
            auto_instrument=True,
            replicas=1,
            level_env={"A": {"OTEL_CANCEL_INSTANCE": ""}},
        )
        async with httpx.AsyncClient(timeout=60) as client:
            request = client.build_request("GET", f"{chain.urls(0)[0]}/stream", params={"tokens": 200})
            response = await client.send(request, stream=True)
            root = response.headers["otel-cancel-root"]
            async with asyncio.timeout(30):
                while not chain.lines("START", root):
                    await asyncio.sleep(0.05)
            subprocess.run(cli("cancel", root), env={**os.environ, **env}, check=True, capture_output=True)
            await response.aclose()
        [receipt] = await _receipts(root, env, 1)
        receiver.wait_for(lambda r: "service-A" in r.instances and "service-A" in r.metrics, what="A's telemetry")
        assert receiver.received.instances["service-A"] == {receipt["instance"]}
        if given:
            assert receipt["instance"] == given
    finally:
        receiver.stop()
