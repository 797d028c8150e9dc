"""The request path on a real uvicorn: the app runs in the server's own task, and every way it stops stays quiet.

One process serves every test of this module (``tests/services/bare_app.py``): plain ASGI
streams that never listen for the client themselves, behind CancelMiddleware, as an
internal hop and as an edge.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from chain import SERVICES

from otel_cancel._core.records import CancelRequest
from otel_cancel._core.root import random_root
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import EtcdServer, ManagedProcess, free_port, on_io_loop, unique_prefix, wait_for_output

pytestmark = pytest.mark.anyio


class _Service:
    def __init__(self, etcd: EtcdServer) -> None:
        self.prefix = unique_prefix()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
            "OTEL_CANCEL_PREFIX": self.prefix,
            "OTEL_SERVICE_NAME": "bare",
            "LEVEL": "B",
            "PYTHONPATH": os.pathsep.join([SERVICES, os.environ.get("PYTHONPATH", "")]),
        }
        command = [sys.executable, "-m", "uvicorn", "bare_app:app", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = ManagedProcess([*command, "--app-dir", SERVICES, "--no-access-log"], env=env, name="bare")
        self.process.wait_for_line(lambda line: "Uvicorn running on" in line, timeout=60)

    def lines(self, event: str, root: str) -> list[str]:
        return [line for line in self.process.lines if line.startswith(f"{event} {root} ")]

    async def wait_line(self, event: str, root: str, timeout: float = 20) -> str:
        await asyncio.to_thread(wait_for_output, lambda: bool(self.lines(event, root)), timeout, f"{event} {root}")
        return self.lines(event, root)[0]


@pytest.fixture(scope="module")
def service(etcd: EtcdServer) -> Iterator[_Service]:
    running = _Service(etcd)
    yield running
    running.process.stop()


def _internal_headers(root: str) -> dict[str, str]:
    return {"baggage": f"otel_cancel.root={root},otel_cancel.depth=1"}


async def _open(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, AsyncIterator[str]]:
    """Open a stream and read its first event; return the response and the rest of its lines."""
    response = await client.send(client.build_request("GET", url, headers=headers), stream=True)
    assert response.status_code == 200
    lines = response.aiter_lines()
    assert await anext(lines) == "data: first"
    return response, lines


async def test_an_internal_hop_stops_a_silent_stream_when_its_caller_leaves(service):
    """The caller hangs up while the app neither sends nor receives: the work stops, with no traceback."""
    root = random_root()
    async with httpx.AsyncClient(timeout=30) as client:
        response, _ = await _open(client, f"{service.url}/internal/silent", _internal_headers(root))
        await service.wait_line("START", root)
        await response.aclose()
    assert (await service.wait_line("STOPPED", root)).endswith("CancelledError")
    async with httpx.AsyncClient(timeout=30) as client:  # the server is fine and serves on
        again, _ = await _open(client, f"{service.url}/internal/ticks", _internal_headers(random_root()))
        await again.aclose()
    assert not [line for line in service.process.lines if "Traceback" in line or "ERROR" in line]


async def test_an_edge_cancels_the_root_when_the_client_leaves_a_silent_stream(service, etcd):
    """At the edge, a user leaving a quiet stream writes the root's flag (client disconnected); the work stops."""
    async with httpx.AsyncClient(timeout=30) as client:
        response, _ = await _open(client, f"{service.url}/edge/silent")
        root = response.headers["otel-cancel-root"]
        await service.wait_line("START", root)
        await response.aclose()
    await service.wait_line("STOPPED", root)
    flag = await on_io_loop(_get_flag)(etcd, service.prefix, root)
    assert flag is not None and flag.reason == "client disconnected"
    assert not [line for line in service.process.lines if "Traceback" in line]


async def test_a_flag_mid_stream_ends_an_internal_stream_with_the_cancel_event(service, etcd):
    """A flag for a running stream's root: the caller reads the final otel-cancel event; the server logs nothing."""
    root = random_root()
    async with httpx.AsyncClient(timeout=30) as client:
        response, lines = await _open(client, f"{service.url}/internal/ticks", _internal_headers(root))
        await service.wait_line("START", root)
        await on_io_loop(_write_flag)(etcd, service.prefix, root)
        rest = [line async for line in lines if line]
        await response.aclose()
    assert rest[-2:] == ["event: otel-cancel", f'data: {{"error": "cancelled", "root": "{root}", "reason": "t"}}']
    assert (await service.wait_line("STOPPED", root)).endswith("CancelledError")
    assert not [line for line in service.process.lines if "Traceback" in line]


async def _write_flag(etcd: EtcdServer, prefix: str, root: str) -> None:
    store = EtcdCancelStore([etcd.endpoint], prefix=prefix)
    try:
        await store.create_flag(CancelRequest.new(root, "t", "tests"), 60)
    finally:
        await store.close()


async def _get_flag(etcd: EtcdServer, prefix: str, root: str) -> CancelRequest | None:
    store = EtcdCancelStore([etcd.endpoint], prefix=prefix)
    try:
        return await store.get_flag(root)
    finally:
        await store.close()
