"""One level of a benchmark service chain. It never imports otel_cancel at module level.

Modelled on ``tests/services/chain_app.py``, with what the benchmarks need on top:
one shared httpx client per process (a real service does not build a client per
request), a run id that works without otel-cancel, shared-clock timestamps in
every log line, a non-streaming endpoint and a cheap request/response route.

Environment:
    LEVEL       this level's index (0 = the edge)
    INSTANCE    this replica's name in log lines
    NEXT_URLS   comma-separated base URLs of the next level's replicas (empty: the leaf)
    CALL_MODE   how ``/stream`` calls the next level: ``stream`` (default) or
                ``buffered`` (one non-streaming request, body read in full)
    NEXT_PATH   the next level's route ``/stream`` calls (default ``/stream``;
                ``/invoke`` makes the next hop a non-streaming endpoint)
    BENCH_DISCONNECT_LISTENER=off
                a diagnostic, not a setting: stub out CancelMiddleware's
                disconnect listener, to measure what it costs under OpenTelemetry
    BENCH_RUNTIME_ONLY=1
                a diagnostic, not a setting: start otel-cancel's runtime (the
                watcher on etcd, the IO loop, the live-work publisher) as the app
                starts, with no middleware: run it with otel-cancel's instrumentation
                disabled to measure what a process pays for being cancellable
                before any request is

Routes:
    ``GET /stream?tokens=N&interval=S&run=ID``  server-sent events: the next
        level's events relayed, then N tokens of its own, S seconds apart.
    ``GET /invoke?tokens=N&interval=S&run=ID``  the same work behind a
        non-streaming endpoint (an RPC-style "tool call"): it reads the next
        level in full (``/stream``, buffered), then answers one JSON body.
    ``GET /hop``  calls the next level's ``/hop`` and answers a small JSON body
        (the throughput benchmark).
    ``GET /debug/otel-cancel``  what otel-cancel did in this process (etcd calls
        made by its store, live scopes), without configuring it. Flags applied and
        receipts written are otel-cancel's metrics (``otel_cancel.flags.applied``,
        ``otel_cancel.receipts``): this app installs no SDK of its own, so that the
        overhead benchmarks measure only what the service's own setup records.
    ``GET /debug/loop-lag?since=EPOCH_S``  how late the event loop ran a 20 ms
        timer since then (p50, p99, max in ms): how overloaded this process was;
        and the garbage collector's pauses since then (longest, total, and per generation).
    ``GET /healthz``

Log lines (stdout), times from ``time.time_ns()`` (one clock for every process on
the machine): ``START <run> <level> <instance> <t_ns>`` when a handler starts and
``END <run> <level> <instance> <t_ns> <done|stopped>`` when its work loop ends.
The run id is the ``run`` query parameter, else otel-cancel's root from baggage.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import sys
import time
from collections import deque

import httpx
from opentelemetry import baggage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

LEVEL = os.environ.get("LEVEL", "0")
INSTANCE = os.environ.get("INSTANCE", f"{LEVEL}-{os.getpid()}")
NEXT_URLS = [url for url in os.environ.get("NEXT_URLS", "").split(",") if url]
CALL_MODE = os.environ.get("CALL_MODE", "stream")
NEXT_PATH = os.environ.get("NEXT_PATH", "/stream")

_client: httpx.AsyncClient | None = None

if os.environ.get("BENCH_DISCONNECT_LISTENER") == "off":
    from otel_cancel.integrations import asgi as _otel_cancel_asgi

    _otel_cancel_asgi._CancellableRequest._listen_soon = lambda self: None


def client() -> httpx.AsyncClient:
    """The process's one client, created on the serving loop at first use."""
    global _client
    if _client is None:
        _client = httpx.AsyncClient(
            timeout=httpx.Timeout(300.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=2000),
        )
    return _client


def _run_id(request: Request) -> str:
    return request.query_params.get("run") or str(baggage.get_baggage("otel_cancel.root"))


def _log(event: str, run: str, extra: str = "") -> None:
    sys.stdout.write(f"{event} {run} {LEVEL} {INSTANCE} {time.time_ns()}{extra}\n")
    sys.stdout.flush()


def _next(path: str) -> str:
    return f"{random.choice(NEXT_URLS)}{path}"


async def stream(request: Request) -> StreamingResponse:
    tokens = int(request.query_params.get("tokens", "20"))
    interval = float(request.query_params.get("interval", "0.1"))
    run = _run_id(request)
    params = {"tokens": tokens, "interval": interval, "run": request.query_params.get("run", "")}
    _log("START", run)

    async def events():
        finished = False
        try:
            if NEXT_URLS:
                if CALL_MODE == "stream":
                    async with client().stream("GET", _next(NEXT_PATH), params=params) as response:
                        async for chunk in response.aiter_raw():
                            yield chunk
                else:
                    response = await client().get(_next(NEXT_PATH), params=params)
                    yield response.content
            for index in range(tokens):
                await asyncio.sleep(interval)
                yield f"data: {LEVEL}-{index}\n\n"
            finished = True
        finally:
            _log("END", run, " done" if finished else " stopped")

    return StreamingResponse(events(), media_type="text/event-stream")


async def invoke(request: Request) -> JSONResponse:
    tokens = int(request.query_params.get("tokens", "20"))
    interval = float(request.query_params.get("interval", "0.1"))
    run = _run_id(request)
    params = {"tokens": tokens, "interval": interval, "run": request.query_params.get("run", "")}
    _log("START", run)
    finished = False
    received = 0
    try:
        if NEXT_URLS:
            response = await client().get(_next("/stream"), params=params)
            received = len(response.content)
        for _ in range(tokens):
            await asyncio.sleep(interval)
        finished = True
    finally:
        _log("END", run, " done" if finished else " stopped")
    return JSONResponse({"level": LEVEL, "received": received})


async def hop(request: Request) -> JSONResponse:
    if NEXT_URLS:
        response = await client().get(_next("/hop"))
        return JSONResponse({"level": LEVEL, "next": response.json()})
    return JSONResponse({"level": LEVEL})


async def debug(request: Request) -> JSONResponse:
    """otel-cancel's state in this process; never configures otel-cancel (etcd calls are counted at etcd)."""
    runtime_module = sys.modules.get("otel_cancel._core.process_state")
    runtime = getattr(runtime_module, "_runtime", None) if runtime_module else None
    if runtime is None:
        return JSONResponse({"otel_cancel": False, "live_scopes": None})
    return JSONResponse(
        {
            "otel_cancel": True,
            "live_scopes": runtime.registry.live_scopes(),
            "watcher_connected": runtime.watcher.connected,
            "watchdog_seconds": runtime.settings.watchdog_seconds,
            "live_interval_ms": runtime.settings.live_interval_ms,
        }
    )


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


LAG_PERIOD = 0.02
_lags: deque[tuple[float, float]] = deque(maxlen=50_000)


async def _probe_loop_lag() -> None:
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(LAG_PERIOD)
        _lags.append((time.time(), (loop.time() - start - LAG_PERIOD) * 1000))


_gc_pauses: deque[tuple[float, int, float]] = deque(maxlen=50_000)
_gc_started = [0.0]


def _record_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        _gc_pauses.append((time.time(), info["generation"], (time.perf_counter() - _gc_started[0]) * 1000))


gc.callbacks.append(_record_gc)


async def loop_lag(request: Request) -> JSONResponse:
    since = float(request.query_params.get("since", "0"))
    values = sorted(lag for at, lag in list(_lags) if at >= since)
    pauses = [(generation, ms) for at, generation, ms in list(_gc_pauses) if at >= since]
    collected = {
        "gc_max_ms": round(max((ms for _, ms in pauses), default=0.0), 3),
        "gc_total_ms": round(sum(ms for _, ms in pauses), 3),
        "gc_collections": [sum(1 for g, _ in pauses if g == generation) for generation in range(3)],
        "gc_gen2_max_ms": round(max((ms for g, ms in pauses if g == 2), default=0.0), 3),
    }
    if not values:
        return JSONResponse({"n": 0, "p50": None, "p99": None, "max": None, **collected})
    return JSONResponse(
        {
            "n": len(values),
            "p50": round(values[len(values) // 2], 3),
            "p99": round(values[min(len(values) - 1, int(len(values) * 0.99))], 3),
            "max": round(values[-1], 3),
            **collected,
        }
    )


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    if os.environ.get("BENCH_RUNTIME_ONLY") == "1":
        from otel_cancel._core.process_state import get_process_state

        get_process_state().start_serving()
    probe = asyncio.create_task(_probe_loop_lag())
    try:
        yield
    finally:
        probe.cancel()


app = Starlette(
    routes=[
        Route("/stream", stream),
        Route("/invoke", invoke),
        Route("/hop", hop),
        Route("/debug/otel-cancel", debug),
        Route("/debug/loop-lag", loop_lag),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
)
