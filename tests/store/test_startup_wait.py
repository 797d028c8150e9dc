"""With etcd unreachable at start, the start-up wait is spent once: later scopes neither wait again nor log again."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import otel_cancel
from otel_cancel._core.process_state import UNLISTED_REASON
from otel_cancel.asgi import CancelMiddleware
from otel_cancel.testing import configured, free_port

pytestmark = pytest.mark.anyio


def _spy_on_waits(monkeypatch: pytest.MonkeyPatch, runtime) -> list[float]:
    """The timeouts of every wait for the first listing from now on (the watcher's async and blocking waits)."""
    waits: list[float] = []
    wait_listed, listed_wait = runtime.watcher.wait_listed, runtime.watcher.listed.wait

    async def counted_wait_listed(timeout: float) -> bool:
        waits.append(timeout)
        return await wait_listed(timeout)

    def counted_listed_wait(timeout: float | None = None) -> bool:
        waits.append(timeout)
        return listed_wait(timeout)

    monkeypatch.setattr(runtime.watcher, "wait_listed", counted_wait_listed)
    monkeypatch.setattr(runtime.watcher.listed, "wait", counted_listed_wait)
    return waits


def _sync_scope() -> str:
    try:
        with otel_cancel.scope(name="thread"):
            return "ran"
    except otel_cancel.Cancelled as refused:
        return refused.reason


async def _nested_scopes() -> str:
    try:
        async with otel_cancel.scope(name="request"), otel_cancel.scope(name="node"):
            return "ran"
    except otel_cancel.Cancelled as refused:
        return refused.reason


async def _node(request):
    return PlainTextResponse(await _nested_scopes())


@pytest.mark.parametrize("unlisted", ["run", "refuse"])
async def test_once_the_start_up_wait_ran_out_no_scope_waits_again(caplog, monkeypatch, unlisted):
    """The first scope (sync, in a thread) waits and logs one line; later sync, nested and middleware scopes
    go on at once (run, or are refused with refuse) and log nothing more."""
    expected = "ran" if unlisted == "run" else UNLISTED_REASON
    app = CancelMiddleware(Starlette(routes=[Route("/", _node)]))
    with (
        caplog.at_level(logging.WARNING, logger="otel_cancel"),
        configured(
            endpoints=(f"127.0.0.1:{free_port()}",), startup_wait_seconds=0.3, timeout_seconds=0.2, unlisted=unlisted
        ) as runtime,
    ):
        waits = _spy_on_waits(monkeypatch, runtime)
        assert await asyncio.to_thread(_sync_scope) == expected
        assert len(waits) == 1  # the first scope spent the start-up wait
        later = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for _ in range(2):
                later.append(await _nested_scopes())
                later.append(await asyncio.to_thread(_sync_scope))
                response = await client.get("/")
                if unlisted == "run":
                    later.append(response.text)
                else:
                    assert response.status_code == 409
        assert not runtime.watcher.listed.is_set()
    assert len(waits) == 1
    assert later == [expected] * len(later)
    assert len([r for r in caplog.records if "was not listed within" in r.getMessage()]) == 1
