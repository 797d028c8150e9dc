"""Calls the next level with every httpx flavour and reports what the next level saw.

Used by the propagation test: ``GET /relay`` on level A calls level B's ``/work``
with an async client, a sync client, and streaming requests of both, after adding
an application baggage entry of its own.
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
from chain_app import healthz, work
from opentelemetry import baggage, context
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from otel_cancel.asgi import CancelMiddleware

NEXT = os.environ.get("NEXT_URLS", "").split(",")[0]


def _seen(payload: dict) -> dict:
    return {
        "root": payload["root"],
        "depth": payload["baggage"].split("otel_cancel.depth=")[1].split(",")[0],
        "baggage": payload["baggage"],
    }


async def relay(request: Request) -> JSONResponse:
    token = context.attach(baggage.set_baggage("app.key", "set-by-app"))
    try:
        url = f"{NEXT}/work"
        results = {}
        async with httpx.AsyncClient() as client:
            results["async"] = _seen((await client.get(url)).json())
            async with client.stream("GET", url) as response:
                results["async_stream"] = _seen(json.loads(await response.aread()))

        def sync_calls() -> None:
            with httpx.Client() as client:
                results["sync"] = _seen(client.get(url).json())
                with client.stream("GET", url) as response:
                    results["sync_stream"] = _seen(json.loads(response.read()))

        await asyncio.to_thread(sync_calls)  # to_thread copies the context
        return JSONResponse(results)
    finally:
        context.detach(token)


HTTPXClientInstrumentor().instrument()
app = CancelMiddleware(Starlette(routes=[Route("/relay", relay), Route("/work", work), Route("/healthz", healthz)]))
