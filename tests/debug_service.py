"""Talk to ``services/debug_app.py`` from tests: its state, gated streams, the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess

import httpx
from conftest import cli

import otel_cancel
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import wait_for_output

EVENT_TIMEOUT = 30.0
"""How long any awaited event may take before a test fails (generous: a 2-core machine under load)."""


async def state(client: httpx.AsyncClient, url: str, connected: bool | None = None) -> dict:
    """The service's registry and watcher; with ``connected``, once the watcher's state is that."""
    params = {} if connected is None else {"connected": str(connected).lower(), "timeout": str(EVENT_TIMEOUT)}
    response = await client.get(f"{url}/debug/state", params=params, timeout=EVENT_TIMEOUT + 5)
    return response.json()


async def open_gated_stream(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> tuple[str, asyncio.Task[list[str]]]:
    """Start a stream that every level holds after its first token; its root and a task reading it to the end."""
    request = client.build_request("GET", f"{url}/stream", params={"tokens": 3, "gate": "1"}, headers=headers)
    response = await client.send(request, stream=True)

    async def read() -> list[str]:
        lines = [line async for line in response.aiter_lines() if line]
        await response.aclose()
        return lines

    return response.headers["otel-cancel-root"], asyncio.create_task(read())


async def until(predicate, what: str = "condition") -> None:
    """Await ``predicate()``, re-checked on every line a managed process prints."""
    await asyncio.to_thread(wait_for_output, predicate, EVENT_TIMEOUT, what)


async def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``otel-cancel ARGS`` with ``env`` added to this environment."""
    return await asyncio.to_thread(
        subprocess.run,
        cli(*args),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=EVENT_TIMEOUT * 2,
    )


async def write_flags(
    endpoints: list[str], prefix: str, roots: list[str], reason: str = "test", ttl: int = 300
) -> None:
    """Write a flag for each root (concurrently), from the process's IO loop.

    Every etcd call of a test runs there, like the library's own: a gRPC call still
    in flight when a test's event loop closes would be delivered to a closed loop.
    """

    async def write() -> None:
        store = EtcdCancelStore(endpoints, prefix=prefix)
        try:
            await asyncio.gather(*(store.create_flag(CancelRequest.new(r, reason, "tests"), ttl) for r in roots))
        finally:
            await store.close()

    await io_loop().call(write())


async def hold_scope(root: str) -> asyncio.Task[None]:
    """A task that sits in a scope for ``root`` until cancelled (returned once inside)."""
    entered = asyncio.Event()

    async def work() -> None:
        async with otel_cancel.scope(root=root):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await asyncio.wait_for(entered.wait(), EVENT_TIMEOUT)
    return task
