"""CancelMiddleware's request logic in process: stops of its own, the server's cancel, spans, baggage order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import otel_cancel
from otel_cancel._core.rate_limited_log import RateLimitedLogger
from otel_cancel._core.root import random_root, with_root
from otel_cancel.asgi import CancelMiddleware
from otel_cancel.exceptions import StoreUnavailableError
from otel_cancel.integrations import asgi as cancel_asgi
from otel_cancel.integrations.incoming import establish_root
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio

ROOT = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def runtime():
    with configured(store=MemoryCancelStore(), service="unit") as runtime:
        yield runtime


def _scope(path: str = "/", baggage_header: str | None = f"otel_cancel.root={ROOT},otel_cancel.depth=1") -> dict:
    headers = [(b"host", b"t")]
    if baggage_header is not None:
        headers.append((b"baggage", baggage_header.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


class _Client:
    """The server side of one request: a body, then a client that stays until told to leave."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.left = asyncio.Event()
        self._body_given = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_given:
            self._body_given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.left.is_set():
            raise OSError("the client is gone")
        self.sent.append(message)


async def test_an_internal_hop_stops_an_app_that_swallows_the_send_error(runtime):
    """A server reporting the caller's exit as OSError from send: the app that ignores it is stopped, quietly."""
    stopped = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"1", "more_body": True})
        streaming.set()
        await client.left.wait()
        with contextlib.suppress(OSError):  # an app that carries on regardless
            await send({"type": "http.response.body", "body": b"2", "more_body": True})
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()

    streaming = asyncio.Event()
    client = _Client()
    client.receive = _never_disconnects(client)  # type: ignore[method-assign]  # only send reports it
    request = asyncio.create_task(CancelMiddleware(app, trust_incoming=True)(_scope(), client.receive, client.send))
    await asyncio.wait_for(streaming.wait(), 5)
    client.left.set()
    await asyncio.wait_for(request, 5)  # returns: no CancelledError reaches the server
    assert stopped.is_set() and not request.cancelled()
    assert request.cancelling() == 0


def _never_disconnects(client: _Client) -> Any:
    async def receive() -> dict[str, Any]:
        if not client._body_given:
            client._body_given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError

    return receive


async def test_the_servers_own_cancel_still_reaches_the_server(runtime):
    """A server that cancels a request (shutdown) gets its CancelledError back: the middleware swallows only its own."""
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await asyncio.sleep(3600)

    client = _Client()
    request = asyncio.create_task(CancelMiddleware(app, trust_incoming=True)(_scope(), client.receive, client.send))
    await asyncio.wait_for(started.wait(), 5)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request


async def test_an_app_that_listens_itself_gets_no_second_listener_and_no_extra_spans(runtime):
    """Under OpenTelemetry's ASGI middleware a Starlette stream or JSON reply makes the spans it makes without us."""

    async def events():
        for index in range(3):
            yield f"data: {index}\n\n"

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream")

    async def reply(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    starlette = Starlette(routes=[Route("/stream", stream), Route("/json", reply)])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    for path in ("/stream", "/json"):
        counts = []
        for app in (starlette, CancelMiddleware(starlette, trust_incoming=True)):
            exporter.clear()
            client = _Client()
            await OpenTelemetryMiddleware(app, tracer_provider=provider)(_scope(path), client.receive, client.send)
            counts.append(sorted(span.name for span in exporter.get_finished_spans()))
        assert counts[0] == counts[1], path


async def test_an_adopted_root_keeps_the_callers_baggage_order_and_the_app_sees_its_depth(runtime):
    """A trusted hop: the inner app sees one baggage header, ours first at depth + 1, the caller's entries after."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["headers"] = [value for key, value in scope["headers"] if key == b"baggage"]
        seen["depth"] = baggage.get_baggage("otel_cancel.depth")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = _Client()
    ours = "otel_cancel.started=1700000000000,otel_cancel.labels=tenant%3Dacme"
    header = f"otel_cancel.root={ROOT},otel_cancel.depth=4,{ours},tenant=acme%20corp;prop=1"
    await CancelMiddleware(app, trust_incoming=True)(_scope(baggage_header=header), client.receive, client.send)
    assert seen["headers"] == [f"otel_cancel.root={ROOT},otel_cancel.depth=5,{ours},tenant=acme%20corp;prop=1".encode()]
    assert seen["depth"] == "5"


def test_with_root_puts_ours_first_whatever_the_incoming_order():
    """Baggage that did not start with the root gets it moved first; baggage that did is updated in place."""
    root = random_root()
    mixed = baggage.set_baggage("otel_cancel.root", root, baggage.set_baggage("tenant", "acme"))
    assert list(baggage.get_all(with_root(root, 2, mixed))) == [
        "otel_cancel.root",
        "otel_cancel.depth",
        "otel_cancel.started",
        "tenant",
    ]
    leading = with_root(root, 1, baggage.set_baggage("tenant", "acme", with_root(root, 0)))
    deadline = with_root(root, 1, leading, extra={"otel_cancel.deadline": "1"})
    assert list(baggage.get_all(deadline)) == [
        "otel_cancel.root",
        "otel_cancel.depth",
        "otel_cancel.started",
        "otel_cancel.deadline",
        "tenant",
    ]
    assert baggage.get_all(deadline)["otel_cancel.depth"] == "1"


_STARTED = "otel_cancel.started=1700000000000"


@pytest.mark.parametrize(
    ("incoming", "forwarded"),
    [
        # Kept as it came but for the depth: ours first, the caller's after, properties and all.
        (
            f"otel_cancel.root={ROOT},otel_cancel.depth=2,{_STARTED},otel_cancel.labels=team%3Dx,a=1;p,b=c%2Cd",
            f"otel_cancel.root={ROOT},otel_cancel.depth=3,{_STARTED},otel_cancel.labels=team%3Dx,a=1;p,b=c%2Cd",
        ),
        # A member OpenTelemetry drops is not passed on.
        (
            f"otel_cancel.root={ROOT},otel_cancel.depth=2,{_STARTED},a=1,b c=2",
            f"otel_cancel.root={ROOT},otel_cancel.depth=3,{_STARTED},a=1",
        ),
        # A repeated entry: the header means the value OpenTelemetry kept.
        (f"otel_cancel.root={ROOT},otel_cancel.depth=2,{_STARTED},a=1,a=2", None),
        # A run start that is not a time is replaced (the hop's context has the new one).
        (f"otel_cancel.root={ROOT},otel_cancel.depth=2,otel_cancel.started=soon,a=1", None),
        # The caller's entries before ours: ours are moved first.
        (f"otel_cancel.root={ROOT},otel_cancel.depth=2,a=1,{_STARTED}", None),
    ],
)
async def test_a_trusted_hop_passes_on_the_baggage_it_runs_with(runtime, incoming, forwarded):
    """The inner app's baggage header says exactly what the hop's context carries, at depth + 1."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["headers"] = [value.decode() for key, value in scope["headers"] if key == b"baggage"]
        seen["baggage"] = dict(baggage.get_all())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = _Client()
    await CancelMiddleware(app, trust_incoming=True)(_scope(baggage_header=incoming), client.receive, client.send)
    [header] = seen["headers"]
    if forwarded is not None:
        assert header == forwarded
    assert seen["baggage"]["otel_cancel.depth"] == "3"
    assert header.startswith(f"otel_cancel.root={ROOT},otel_cancel.depth=3,")
    assert dict(baggage.get_all(W3CBaggagePropagator().extract({"baggage": header}))) == seen["baggage"]


@pytest.mark.parametrize(
    ("textmap", "propagated"),
    [
        (CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]), {"traceparent", "baggage"}),
        (W3CBaggagePropagator(), {"baggage"}),  # a traceparent the propagators do not read still continues the trace
    ],
    ids=["default", "baggage-only"],
)
def test_the_request_headers_are_read_for_what_the_middleware_needs(textmap, propagated):
    """One pass gives the carrier (baggage headers joined), the baggage headers, a continued trace, timeouts, a body."""
    baggage_item = (b"Baggage", b"b=2")
    raw = [
        (b"host", b"t"),
        (b"baggage", b"a=1"),
        (b"TraceParent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        (b"otel-cancel-timeout", b"5s"),
        (b"content-length", b"0"),
        baggage_item,
    ]
    headers = cancel_asgi._RequestHeaders(raw, cancel_asgi._kinds_of(textmap))
    assert set(headers.carrier) == propagated
    assert headers.carrier["baggage"] == ["a=1,b=2"]  # one list, as HTTP reads repeated fields
    assert headers.baggage == (b"a=1", b"b=2") and headers.baggage_item is baggage_item
    assert headers.continued and headers.timeouts == (b"5s",) and not headers.has_body
    for body_header in ((b"content-length", b"12"), (b"Transfer-Encoding", b"chunked")):
        assert cancel_asgi._RequestHeaders([body_header], cancel_asgi._kinds_of(textmap)).has_body
    plain = cancel_asgi._RequestHeaders([(b"host", b"t")], cancel_asgi._kinds_of(textmap))
    assert (plain.carrier, plain.baggage, plain.continued, plain.timeouts, plain.has_body) == ({}, (), False, (), False)


class _B3Single(TextMapPropagator):
    """A trace propagator of another header than traceparent (the shape of OTEL_PROPAGATORS=b3)."""

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        values = carrier.get("b3") if isinstance(carrier, dict) else None
        if not values:
            return context if context is not None else Context()
        trace_id, span_id, *_ = values[0].split("-")
        span = NonRecordingSpan(SpanContext(int(trace_id, 16), int(span_id, 16), True, TraceFlags(1)))
        return trace.set_span_in_context(span, context)

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        pass

    @property
    def fields(self) -> set[str]:
        return {"b3"}


@pytest.fixture
def b3_propagators() -> Iterator[None]:
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([_B3Single(), W3CBaggagePropagator()]))
    try:
        yield
    finally:
        propagate.set_global_textmap(before)


async def test_an_edge_behind_a_non_w3c_trace_propagator_never_takes_the_clients_trace_id_as_root(
    runtime, b3_propagators
):
    """A client's b3 header names a trace id: the edge starts a random root, not that id."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["root"] = otel_cancel.current_root()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    request = _scope(baggage_header=None)
    request["headers"].append((b"b3", f"{ROOT}-00f067aa0ba902b7-1".encode()))
    client = _Client()
    await CancelMiddleware(app)(request, client.receive, client.send)
    assert seen["root"] is not None and seen["root"] != ROOT
    # The same decision for a caller that hands establish_root the raw headers alone.
    context = propagate.extract({"b3": [f"{ROOT}-00f067aa0ba902b7-1"]})
    assert establish_root(context, [(b"B3", f"{ROOT}-00f067aa0ba902b7-1".encode())], trusted=False).root != ROOT


async def test_a_websocket_at_an_edge_runs_without_the_clients_root(runtime):
    """Behind OpenTelemetry's ASGI middleware, a websocket handler's scope starts its own root, not the client's."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        seen["baggage"] = dict(baggage.get_all())
        async with otel_cancel.scope(name="agent"):
            seen["root"] = otel_cancel.current_root()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close"})

    messages = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop()

    async def send(message: dict[str, Any]) -> None:
        pass

    websocket = _scope(baggage_header=f"otel_cancel.root={ROOT},otel_cancel.depth=0,tenant=acme")
    websocket.update(type="websocket", scheme="ws")
    await OpenTelemetryMiddleware(CancelMiddleware(app))(websocket, receive, send)
    assert seen["baggage"] == {"tenant": "acme"}
    assert seen["root"] is not None and seen["root"] != ROOT


async def test_an_internal_hop_whose_app_lets_the_send_error_through_leaves_no_cancel_behind(runtime):
    """The caller left (OSError from send) and the app raises it: the server gets the OSError and can await on."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"1", "more_body": True})
        client.left.set()
        await send({"type": "http.response.body", "body": b"2", "more_body": True})

    async def server() -> str:
        with pytest.raises(OSError):
            await CancelMiddleware(app, trust_incoming=True)(_scope(), client.receive, client.send)
        await asyncio.sleep(0)  # the server's own clean-up after the app
        await asyncio.sleep(0)
        return "served on"

    client = _Client()
    assert await asyncio.wait_for(asyncio.create_task(server()), 5) == "served on"


async def _sends_until_it_fails(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    while True:
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await asyncio.sleep(0.01)


async def _ticks() -> Any:
    while True:
        yield "data: x\n\n"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "app",
    [_sends_until_it_fails, lambda *args: StreamingResponse(_ticks(), media_type="text/event-stream")(*args)],
    ids=["oserror", "starlette-client-disconnect"],
)
async def test_an_edge_whose_app_raises_on_its_client_leaving_reports_its_stop(runtime, app):
    """An ASGI 2.4 server reports the client's exit as OSError from send: the app raises, the edge has a receipt."""
    client = _Client()
    client.receive = _never_disconnects(client)  # type: ignore[method-assign]  # only send reports it
    request = _scope(baggage_header=None)
    request["asgi"]["spec_version"] = "2.4"
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        await client.send(message)
        started.set()

    task = asyncio.create_task(CancelMiddleware(app)(request, client.receive, send))
    await asyncio.wait_for(started.wait(), 5)
    root = dict(client.sent[0]["headers"])[b"otel-cancel-root"].decode()
    client.left.set()
    with pytest.raises(Exception):  # noqa: B017 - whatever the app raised reaches the server
        await asyncio.wait_for(task, 5)
    assert await runtime.wait_receipt(root, 5)


@pytest.mark.parametrize("key", ["otel_cancel.labels", "otel_cancel.sig"])
@pytest.mark.parametrize("value", ["%E4%B8%AD", "%C4%81", "%C3%A9"], ids=["cjk", "beyond-latin-1", "latin-1"])
async def test_a_trusted_hop_passes_on_an_entry_beyond_ascii_quoted(runtime, key, value):
    """A caller's entry of ours that decodes to a letter beyond ASCII: the request runs, the app gets it quoted."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["headers"] = [value for key, value in scope["headers"] if key == b"baggage"]
        seen["baggage"] = dict(baggage.get_all())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = _Client()
    header = f"otel_cancel.root={ROOT},otel_cancel.depth=1,{key}={value},tenant=acme"
    await CancelMiddleware(app, trust_incoming=True)(_scope(baggage_header=header), client.receive, client.send)
    assert client.sent[0]["status"] == 200
    [forwarded] = seen["headers"]
    assert forwarded.isascii()
    assert dict(baggage.get_all(W3CBaggagePropagator().extract({"baggage": forwarded.decode()}))) == seen["baggage"]


async def test_label_headers_label_only_a_run_that_starts_here(runtime):
    """label_headers on a trusted hop: an adopted run (16 labels) keeps its own; a rootless request takes them."""
    seen: list[dict[str, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(otel_cancel.current_labels())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = CancelMiddleware(app, trust_incoming=True, label_headers={"x-tenant-id": "tenant"})
    full = ";".join(f"k{index}=v" for index in range(16))
    adopted = _scope(baggage_header=f"otel_cancel.root={ROOT},otel_cancel.depth=1,otel_cancel.labels={quote(full)}")
    started = _scope(baggage_header=None)
    for request in (adopted, started):
        request["headers"].append((b"x-tenant-id", b"acme"))
        client = _Client()
        await middleware(request, client.receive, client.send)
        assert client.sent[0]["status"] == 200
    assert seen == [{f"k{index}": "v" for index in range(16)}, {"tenant": "acme"}]


@pytest.mark.parametrize("otel_in_front", [False, True], ids=["alone", "behind-otel-asgi"])
@pytest.mark.parametrize(
    ("trusted", "values"),
    [
        (False, ["user=alice", "user=mallory"]),
        (True, [f"otel_cancel.root={ROOT},otel_cancel.depth=1,user=alice", "user=mallory"]),
        (True, ["user=alice", f"otel_cancel.root={ROOT},otel_cancel.depth=1"]),
    ],
    ids=["edge", "trusted", "root-in-second-header"],
)
async def test_several_baggage_headers_are_read_as_one(runtime, otel_in_front, trusted, values):
    """Repeated baggage headers: the context reads them all, as one list, and the header passed on says the same."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["baggage"] = dict(baggage.get_all())
        seen["headers"] = [value.decode() for key, value in scope["headers"] if key == b"baggage"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    request = _scope(baggage_header=None)
    request["headers"] += [(b"baggage", value.encode()) for value in values]
    middleware: Any = CancelMiddleware(app, trust_incoming=trusted)
    if otel_in_front:
        middleware = OpenTelemetryMiddleware(middleware)
    client = _Client()
    await middleware(request, client.receive, client.send)
    [header] = seen["headers"]
    assert dict(baggage.get_all(W3CBaggagePropagator().extract({"baggage": header}))) == seen["baggage"]
    assert header.count("user=") == 1
    assert seen["baggage"]["user"] == ("alice" if values[1].startswith("otel_cancel.root") else "mallory")
    assert (seen["baggage"]["otel_cancel.root"] == ROOT) is trusted


class _RefusesFlags(MemoryCancelStore):
    async def create_flag(self, request: Any, ttl_seconds: int) -> Any:
        raise StoreUnavailableError("etcd is unavailable")


async def test_an_edge_that_cannot_write_the_disconnect_flag_logs_it_once_a_minute(monkeypatch, caplog):
    """While etcd refuses flags, twenty clients leaving give one warning line; each request still stops."""
    monkeypatch.setattr(cancel_asgi, "_failure_log", RateLimitedLogger(cancel_asgi._log), raising=False)

    async def one() -> None:
        streaming = asyncio.Event()

        async def stream(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            streaming.set()
            await asyncio.sleep(3600)

        client = _Client()
        task = asyncio.create_task(CancelMiddleware(stream)(_scope(baggage_header=None), client.receive, client.send))
        await asyncio.wait_for(streaming.wait(), 5)
        client.left.set()
        await asyncio.wait_for(task, 5)  # stopped here all the same

    with configured(store=_RefusesFlags(), service="unit"):
        await asyncio.gather(*(one() for _ in range(20)))
    assert len([r for r in caplog.records if "could not cancel" in r.getMessage()]) == 1


async def test_middleware_outside_sees_what_the_router_wrote_into_the_scope(runtime):
    """After the app, the server's scope holds the route, endpoint and path params as without us; not our headers."""

    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"id": request.path_params["item_id"]})

    starlette = Starlette(routes=[Route("/items/{item_id}", item)])
    seen = []
    for app in (starlette, CancelMiddleware(starlette)):
        request = _scope("/items/7", baggage_header="tenant=acme")
        headers = request["headers"]
        client = _Client()
        await app(request, client.receive, client.send)
        assert request["headers"] is headers
        seen.append({key: request.get(key) for key in ("endpoint", "path_params", "route", "router")})
    assert seen[1] == seen[0] and seen[0]["path_params"] == {"item_id": "7"}
