"""A service for fault, load and security tests: streams like chain_app, and shows its insides.

Wired by hand (``CancelMiddleware``, httpx instrumentation, one shared httpx client),
with an in-memory OpenTelemetry metric reader so otel-cancel's metrics (the
``otel_cancel.watch.connected`` gauge, the flags applied, the receipts written) can be
read back. otel-cancel's log lines go to stdout as ``LEVEL logger message``.

Environment: ``LEVEL`` and ``NEXT_URLS`` as for chain_app; ``DEBUG_APP_METRICS=0``
leaves the OpenTelemetry SDK out (then ``connected_metric``, ``flags_applied`` and
``receipts_written`` are ``null``).

Routes under ``CancelMiddleware``:

- ``GET /stream?tokens=N&interval=S&gate=1`` streams server-sent events: the next
  level's events relayed, then N tokens of its own. With ``gate=1`` each level sends
  its first token, then waits until its ``/debug/release`` is called before the rest
  (so no level finishes on its own while a test cancels).
  Prints ``START <root> <LEVEL>`` when its body starts, then ``DONE`` or ``STOPPED``.
  (Every flag the process applies prints ``APPLIED <root> <LEVEL>``.)
- ``GET /ping`` answers ``ok`` (a plain ASGI app: the cheapest request there is).

Routes outside it (they run in no scope, so they never count in the registry):

- ``GET /debug/state[?connected=true|false&timeout=S]``: the registry, the watcher
  and the metrics, as JSON; with ``connected``, first waits (at most S seconds) until
  the watcher's connection state is that;
- ``POST /debug/release``: open the gate of every gated stream started so far;
- ``POST /debug/cancel?root=R``: call ``otel_cancel.cancel(R)``; JSON ``{"created"}`` or ``{"error", "message"}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys

import httpx
from opentelemetry import baggage, metrics
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

import otel_cancel
from otel_cancel._core.process_state import get_process_state
from otel_cancel._core.records import CancelRequest
from otel_cancel._core.registry import CancelRegistry
from otel_cancel.asgi import CancelMiddleware
from otel_cancel.attributes import METRIC_FLAGS_APPLIED, METRIC_RECEIPTS, METRIC_WATCH_CONNECTED
from otel_cancel.exceptions import OtelCancelError
from otel_cancel.testing import CancelMetrics

LEVEL = os.environ.get("LEVEL", "?")
NEXT_URLS = [url for url in os.environ.get("NEXT_URLS", "").split(",") if url]

_handler = logging.StreamHandler(sys.stdout)
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
_otel_cancel_log = logging.getLogger("otel_cancel")
_otel_cancel_log.addHandler(_handler)
_otel_cancel_log.setLevel(logging.INFO)
_otel_cancel_log.propagate = False

_reader = InMemoryMetricReader()
_metrics: CancelMetrics | None = None
if os.environ.get("DEBUG_APP_METRICS", "1") != "0":
    metrics.set_meter_provider(MeterProvider(metric_readers=[_reader]))
    _metrics = CancelMetrics(_reader)
HTTPXClientInstrumentor().instrument()

_client: httpx.AsyncClient | None = None
_gate: asyncio.Event | None = None


def _http() -> httpx.AsyncClient:
    global _client
    if _client is None:
        _client = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None))
    return _client


def _gate_event() -> asyncio.Event:
    global _gate
    if _gate is None:
        _gate = asyncio.Event()
    return _gate


def _log(event: str, root: str) -> None:
    # One write per line: lines come from the IO loop's thread too, and print() writes
    # the text and the newline separately, so two threads could interleave them.
    sys.stdout.write(f"{event} {root} {LEVEL}\n")
    sys.stdout.flush()


_apply = CancelRegistry.apply


def _apply_and_say(self: CancelRegistry, request: CancelRequest) -> object:
    """Apply a flag, and say so: tests await this line instead of racing the watch."""
    result = _apply(self, request)
    if result[0]:
        _log("APPLIED", request.root)
    return result


_apply_unread = CancelRegistry.apply_unread


def _apply_unread_and_say(self: CancelRegistry, root: str, raw: bytes) -> bool:
    """The same for a flag kept unread (nothing here works for its root)."""
    applied = self.applied
    handled = _apply_unread(self, root, raw)
    if self.applied > applied:
        _log("APPLIED", root)
    return handled


CancelRegistry.apply = _apply_and_say  # type: ignore[method-assign,assignment]
CancelRegistry.apply_unread = _apply_unread_and_say  # type: ignore[method-assign]


async def stream(request: Request) -> StreamingResponse:
    tokens = int(request.query_params.get("tokens", "3"))
    interval = float(request.query_params.get("interval", "0"))
    gated = request.query_params.get("gate") == "1"
    root = str(baggage.get_baggage("otel_cancel.root"))

    async def events():
        gate = _gate_event()  # this stream's gate: a later release opens only the streams started before it
        _log("START", root)
        finished = False
        try:
            if NEXT_URLS:
                url = f"{random.choice(NEXT_URLS)}/stream"
                async with _http().stream("GET", url, params=dict(request.query_params)) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            yield f"{line}\n\n"
            for index in range(tokens):
                if index == 1 and gated:
                    await gate.wait()
                await asyncio.sleep(interval)
                yield f"data: {LEVEL}-{index}\n\n"
            finished = True
        finally:
            _log("DONE" if finished else "STOPPED", root)

    return StreamingResponse(events(), media_type="text/event-stream")


async def ping(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _gauge(name: str) -> int | None:
    if _metrics is None:
        return None
    data = _reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == name:
                    return int(metric.data.data_points[-1].value)
    return None


def _counter(name: str) -> int | None:
    """A counter of this process's otel-cancel metrics, over all its labels."""
    return None if _metrics is None else int(_metrics.total(name))


async def state(request: Request) -> JSONResponse:
    runtime = get_process_state()
    watcher, registry = runtime.watcher, runtime.registry
    if "connected" in request.query_params:
        wanted = request.query_params["connected"] == "true"
        timeout = float(request.query_params.get("timeout", "10"))
        await asyncio.to_thread(watcher.wait_connected, wanted, timeout)
    store = watcher._store
    return JSONResponse(
        {
            "live_scopes": registry.live_scopes(),
            "live_roots": registry.live_roots(),
            "cancelled_roots": registry.cancelled_roots(),
            "connected": watcher.connected,
            "connected_metric": _gauge(METRIC_WATCH_CONNECTED),
            "reconnects": watcher.reconnects,
            "listings": watcher.listings,
            "flags_applied": _counter(METRIC_FLAGS_APPLIED),
            "last_revision": watcher.last_revision,
            "receipts_written": _counter(METRIC_RECEIPTS),
            "endpoint": getattr(store, "endpoint", None),
        }
    )


async def release(request: Request) -> PlainTextResponse:
    global _gate
    _gate_event().set()
    _gate = None  # streams started from now on wait for the next release
    return PlainTextResponse("released")


async def cancel(request: Request) -> JSONResponse:
    try:
        result = await otel_cancel.cancel(request.query_params["root"], reason="from the service")
    except OtelCancelError as error:
        return JSONResponse({"error": type(error).__name__, "message": str(error)})
    return JSONResponse({"created": result.created})


_debug = Starlette(
    routes=[
        Route("/debug/state", state),
        Route("/debug/release", release, methods=["POST"]),
        Route("/debug/cancel", cancel, methods=["POST"]),
    ]
)
_streams = CancelMiddleware(Starlette(routes=[Route("/stream", stream)]))
_ping = CancelMiddleware(ping)


async def app(scope, receive, send) -> None:
    path = scope.get("path", "")
    if scope["type"] == "lifespan":
        await _streams(scope, receive, send)
    elif path.startswith("/debug/"):
        await _debug(scope, receive, send)
    elif path == "/ping":
        await _ping(scope, receive, send)
    else:
        await _streams(scope, receive, send)
