"""Responses cut short on a real uvicorn: how the server sees their end.

One process serves every test of this module (``tests/services/cut_short_app.py``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator

import httpx
import pytest
from chain import SERVICES

from otel_cancel._core.root import random_root
from otel_cancel.testing import EtcdServer, ManagedProcess, free_port, unique_prefix, wait_for_output

pytestmark = pytest.mark.anyio


class _Service:
    def __init__(self, etcd: EtcdServer) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
            "OTEL_CANCEL_PREFIX": unique_prefix(),
            "OTEL_SERVICE_NAME": "cut-short",
            "PYTHONPATH": os.pathsep.join([SERVICES, os.environ.get("PYTHONPATH", "")]),
        }
        command = [sys.executable, "-m", "uvicorn", "cut_short_app:app", "--app-dir", SERVICES, "--no-access-log"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.process = ManagedProcess(command, env=env, name="cut-short")
        self.process.wait_for_line(lambda line: "Uvicorn running on" in line, timeout=60)

    def lines_from(self, start: int) -> list[str]:
        return self.process.lines[start:]

    async def wait_for(self, start: int, *needles: str, timeout: float = 20) -> str:
        """The first line printed since ``start`` that holds one of ``needles``."""

        def found() -> list[str]:
            return [line for line in self.lines_from(start) if any(needle in line for needle in needles)]

        await asyncio.to_thread(wait_for_output, lambda: bool(found()), timeout, " or ".join(needles))
        return found()[0]


@pytest.fixture(scope="module")
def service(etcd: EtcdServer) -> Iterator[_Service]:
    running = _Service(etcd)
    yield running
    running.process.stop()


async def test_an_internal_stream_that_returns_when_its_caller_leaves_hands_the_server_no_cancel(service):
    """The app returns on the disconnect its own receive() reported: no CancelledError reaches what awaits after it."""
    root = random_root()
    start = len(service.process.lines)
    headers = {"baggage": f"otel_cancel.root={root},otel_cancel.depth=1"}
    url = f"{service.url}/internal/returns"
    async with httpx.AsyncClient(timeout=30) as client, client.stream("GET", url, headers=headers) as response:
        async for line in response.aiter_lines():
            if line:
                break  # the caller leaves after the first event
    await service.wait_for(start, f"RETURNED {root}")
    assert await service.wait_for(start, f"AFTER {root}", f"OUTER {root}") == f"AFTER {root}"
    assert not [line for line in service.lines_from(start) if "Traceback" in line or "CancelledError" in line]


async def test_a_response_with_a_content_length_cut_by_its_deadline_ends_without_an_error_in_the_server(service):
    """The deadline stops a download that declared its length: the client sees it cut, the server raises nothing."""
    start = len(service.process.lines)
    async with httpx.AsyncClient(timeout=30) as client:
        request = client.build_request("GET", f"{service.url}/edge/fixed", headers={"otel-cancel-timeout": "300ms"})
        response = await client.send(request, stream=True)
        root = response.headers["otel-cancel-root"]
        with pytest.raises(httpx.RemoteProtocolError):  # fewer bytes than declared, then the connection closes
            await response.aread()
        await response.aclose()
    await service.wait_for(start, f"STOPPED {root}")
    # uvicorn's own line for a response left unfinished, or its traceback for an exception: one comes last.
    await service.wait_for(start, "without completing response", "Exception in ASGI application")
    assert not [line for line in service.lines_from(start) if "Traceback" in line or "Content-Length" in line]
