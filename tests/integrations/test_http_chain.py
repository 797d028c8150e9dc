"""Cancellation across real HTTP hops: three levels of uvicorn services, two replicas each."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from collections import defaultdict

import httpx
import pytest
from conftest import cli

from otel_cancel.testing import wait_for_output

pytestmark = pytest.mark.anyio


async def _open_stream(client: httpx.AsyncClient, url: str, tokens: int, interval: float):
    request = client.build_request("GET", f"{url}/stream", params={"tokens": tokens, "interval": interval})
    response = await client.send(request, stream=True)
    return response


async def _read_all(response: httpx.Response) -> list[str]:
    lines = [line async for line in response.aiter_lines() if line]
    await response.aclose()
    return lines


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


async def test_cancel_three_of_ten_runs_by_root_stops_exactly_those_at_every_level(chain, etcd_env):
    """Ten streaming runs through A -> B -> C; the CLI cancels three; only those stop, everywhere."""
    chain.start(etcd_env)
    # The runs to cancel are picked up front and made far longer than the test, so each is
    # still working at every level when its flag lands, however long the CLI takes to start
    # on a loaded machine (the leaf of a 40-token run is done 2 s after it starts). A lost
    # cancel still fails the test: such a run would outlast the readers' timeout.
    to_cancel = set(random.sample(range(10), 3))
    async with httpx.AsyncClient(timeout=60) as client:
        responses = [
            await _open_stream(
                client, random.choice(chain.urls(0)), tokens=2000 if index in to_cancel else 40, interval=0.05
            )
            for index in range(10)
        ]
        roots = [response.headers["otel-cancel-root"] for response in responses]
        assert len(set(roots)) == 10
        readers = [asyncio.create_task(_read_all(response)) for response in responses]
        # Every level has started every run before the cancel.
        await asyncio.to_thread(
            wait_for_output,
            lambda: all(len(chain.lines("START", r)) == 3 for r in roots),
            30,
            "every run started at every level",
        )
        cancelled = {roots[index] for index in to_cancel}
        # One CLI process per root, all at once: three operators cancelling together.
        results = await asyncio.gather(
            *(asyncio.to_thread(_run_cli, "cancel", root, "--reason", "test", env=etcd_env) for root in cancelled)
        )
        assert [result.returncode for result in results] == [0, 0, 0]
        bodies = dict(zip(roots, await asyncio.wait_for(asyncio.gather(*readers), 60), strict=True))

    for root in roots:
        if root in cancelled:
            # The stream ended cleanly with the final otel-cancel event.
            assert bodies[root][-2:] == [
                "event: otel-cancel",
                f'data: {{"error": "cancelled", "root": "{root}", "reason": "test"}}',
            ]
            await asyncio.to_thread(wait_for_output, lambda r=root: len(chain.lines("STOPPED", r)) == 3, 20)
            assert chain.lines("DONE", root) == []
        else:
            assert bodies[root][-1] == "data: A-39"
            await asyncio.to_thread(wait_for_output, lambda r=root: len(chain.lines("DONE", r)) == 3, 20)
            assert chain.lines("STOPPED", root) == []

    by_depth: dict[int, list[float]] = defaultdict(list)
    for root in cancelled:
        waited = _run_cli("cancel", root, "--wait", "20", "--expect", "3", "--json", env=etcd_env)
        receipts = [json.loads(line)["receipt"] for line in waited.stdout.splitlines() if '"receipt"' in line]
        assert sorted(r["depth"] for r in receipts) == [0, 1, 2]
        for receipt in receipts:
            by_depth[receipt["depth"]].append(receipt["latency_ms"])
    print("flag -> stop latency by depth (ms):", {d: sorted(v) for d, v in sorted(by_depth.items())})


async def test_a_late_hop_gets_409_and_runs_no_handler(chain, etcd_env):
    """C receives a request for an already-cancelled root: 409 with the JSON body, handler not run.

    The answer follows the cancel's kind, not its text: a cancel whose reason reads "deadline"
    is still an explicit cancel (409), not an expired deadline (504).
    """
    chain.start(etcd_env, levels=("C",), replicas=1, level_env={"C": {"OTEL_CANCEL_TRUST_INCOMING": "true"}})
    for root, reason in (("ab" * 16, "too late"), ("cd" * 16, "deadline")):
        assert _run_cli("cancel", root, "--reason", reason, env=etcd_env).returncode == 0
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"{chain.urls(0)[0]}/work", headers={"baggage": f"otel_cancel.root={root},otel_cancel.depth=1"}
            )
        assert response.status_code == 409
        assert response.json() == {"error": "cancelled", "root": root, "reason": reason}
        assert response.headers["otel-cancel-root"] == root
        assert chain.lines("RAN", root) == []


async def test_closing_the_root_stream_stops_every_level_of_that_run_only(chain, etcd_env):
    """The client closes one stream midway: every level of that run stops; another run finishes."""
    chain.start(etcd_env)
    async with httpx.AsyncClient(timeout=60) as client:
        closed = await _open_stream(client, chain.urls(0)[0], tokens=60, interval=0.05)
        kept = await _open_stream(client, chain.urls(0)[1], tokens=20, interval=0.05)
        closed_root, kept_root = closed.headers["otel-cancel-root"], kept.headers["otel-cancel-root"]
        kept_reader = asyncio.create_task(_read_all(kept))
        await asyncio.to_thread(wait_for_output, lambda: len(chain.lines("START", closed_root)) == 3, 30)
        async for line in closed.aiter_lines():
            if line.startswith("data: "):
                break
        await closed.aclose()
        await asyncio.to_thread(
            wait_for_output,
            lambda: len(chain.lines("STOPPED", closed_root)) == 3,
            20,
            "the closed run stopped at every level",
        )
        assert (await asyncio.wait_for(kept_reader, 30))[-1] == "data: A-19"
    await asyncio.to_thread(wait_for_output, lambda: len(chain.lines("DONE", kept_root)) == 3, 20)
    status = json.loads(_run_cli("status", closed_root, "--json", env=etcd_env).stdout)
    assert status["flag"]["reason"] == "client disconnected"
    # Every level reports its stop, the edge too: its app stopped on the disconnect by itself
    # (Starlette's streaming response listens for it) before the edge's own flag came back.
    await asyncio.to_thread(
        wait_for_output,
        lambda: len(json.loads(_run_cli("status", closed_root, "--json", env=etcd_env).stdout)["receipts"]) == 3,
        20,
        "a receipt from every level",
    )


async def test_a_plain_chunked_stream_cancelled_midway_ends_without_an_event(chain, etcd_env):
    """A non-SSE stream whose root is cancelled ends (truncated, no hang); status tells why."""
    chain.start(etcd_env, levels=("A",), replicas=1)
    async with httpx.AsyncClient(timeout=60) as client:
        request = client.build_request("GET", f"{chain.urls(0)[0]}/stream", params={"tokens": 200, "plain": "1"})
        response = await client.send(request, stream=True)
        root = response.headers["otel-cancel-root"]
        body = response.aiter_lines()
        assert (await anext(body)).startswith("data: A-")
        assert _run_cli("cancel", root, "--reason", "plain", env=etcd_env).returncode == 0
        rest = [line async for line in body if line]
        await response.aclose()
    assert rest and all(line.startswith("data: A-") for line in rest) and rest[-1] != "data: A-199"
    await asyncio.to_thread(wait_for_output, lambda: len(chain.lines("STOPPED", root)) == 1, 20)
    status = json.loads(_run_cli("status", root, "--json", env=etcd_env).stdout)
    assert status["flag"]["reason"] == "plain"
