"""A streaming service for chain tests. It never imports otel_cancel.

Environment:
    LEVEL        the name printed in its log lines (A, B, C...)
    NEXT_URLS    comma-separated base URLs of the next level's replicas (empty: leaf)
    STREAM_MODE  how it calls the next level: ``stream`` (default) or ``buffered``

``GET /stream?tokens=N&interval=S`` streams server-sent events: the next level's
events relayed, then N tokens of its own, S seconds apart. It prints
``START <root>``, then ``DONE <root>`` or ``STOPPED <root>`` on stdout, the root
read from OpenTelemetry baggage. ``GET /work?seconds=S`` does S seconds of work
and answers JSON (``RAN <root>`` is printed when its handler runs).
"""

from __future__ import annotations

import asyncio
import os
import random

import httpx
from opentelemetry import baggage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

LEVEL = os.environ.get("LEVEL", "?")
NEXT_URLS = [url for url in os.environ.get("NEXT_URLS", "").split(",") if url]
STREAM_MODE = os.environ.get("STREAM_MODE", "stream")


def _root() -> str:
    return str(baggage.get_baggage("otel_cancel.root"))


def _log(event: str, root: str) -> None:
    print(f"{event} {root} {LEVEL}", flush=True)


async def stream(request: Request) -> StreamingResponse:
    tokens = int(request.query_params.get("tokens", "20"))
    interval = float(request.query_params.get("interval", "0.05"))
    root = _root()
    _log("START", root)

    async def events():
        finished = False
        try:
            if NEXT_URLS:
                url = f"{random.choice(NEXT_URLS)}/stream"
                params = {"tokens": tokens, "interval": interval}
                async with httpx.AsyncClient(timeout=60) as client:
                    if STREAM_MODE == "stream":
                        async with client.stream("GET", url, params=params) as response:
                            async for line in response.aiter_lines():
                                if line.startswith("data: "):
                                    yield f"{line}\n\n"
                    else:
                        response = await client.get(url, params=params)
                        for line in response.text.splitlines():
                            if line.startswith("data: "):
                                yield f"{line}\n\n"
            for index in range(tokens):
                await asyncio.sleep(interval)
                yield f"data: {LEVEL}-{index}\n\n"
            finished = True
        finally:
            _log("DONE" if finished else "STOPPED", root)

    media_type = "text/plain" if request.query_params.get("plain") else "text/event-stream"
    return StreamingResponse(events(), media_type=media_type)


async def work(request: Request) -> JSONResponse:
    _log("RAN", _root())
    await asyncio.sleep(float(request.query_params.get("seconds", "0")))
    return JSONResponse({"level": LEVEL, "root": _root(), "baggage": request.headers.get("baggage", "")})


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/stream", stream), Route("/work", work), Route("/healthz", healthz)])
