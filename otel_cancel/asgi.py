"""``CancelMiddleware``: every HTTP request runs in a scope for its root.

Pure ASGI, for any framework (Starlette, FastAPI, plain ASGI)::

    from otel_cancel.asgi import CancelMiddleware

    app = CancelMiddleware(app)                      # plain ASGI
    app.add_middleware(CancelMiddleware)             # Starlette / FastAPI

Under ``opentelemetry-instrument`` the instrumentor adds it for Starlette and
FastAPI apps, right inside OpenTelemetry's own ASGI middleware.

Per request it:

1. takes the context OpenTelemetry's ASGI middleware extracted (or extracts it
   itself when that middleware is absent: never twice);
2. establishes the root (see :mod:`otel_cancel._incoming`: a new root at an edge,
   the caller's on a trusted internal service), rewrites the ``baggage`` header
   the inner app sees, and adds ``otel-cancel-root`` to the response;
3. runs the app in a child task inside a scope. When the root is cancelled:
   before the response starts the client gets ``409`` with
   ``{"error": "cancelled", "root", "reason"}``; mid-stream, a
   ``text/event-stream`` ends with a final ``otel-cancel`` event carrying that
   body and any other stream ends (truncated). The child task absorbs the
   cancellation, so the server never sees a bare ``CancelledError`` and logs no
   traceback; the app's outgoing httpx calls are cancelled with it;
4. enforces the run's deadline (``otel_cancel.deadline`` in baggage, narrowed by
   the ``otel-cancel-timeout`` request header and ``deadline_seconds``): a hop that
   arrives after it gets ``504`` and runs no handler; one that runs past it is
   stopped locally like a cancel (``504`` before the response starts, a final
   ``otel-cancel`` event or a truncated body after);
5. at an edge, when the client goes away from an unfinished response
   (``http.disconnect`` from ``receive`` or an ``OSError`` from ``send``), cancels
   the root, so the whole chain stops (``on_disconnect="continue"`` lets work
   outlive its caller). An internal service just stops its own work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.textmap import Getter

from . import attributes, telemetry
from ._deadline import DEADLINE_REASON, MAX_AHEAD_SECONDS, now_ms, parse_timeout, validate_deadline
from ._incoming import establish_root
from ._labels import usable_labels, validate_label, with_labels
from ._logging import RateLimitedLogger
from ._root import with_root
from ._runtime import get_runtime
from ._scope import cancel, scope
from ._upstream_logs import limit_client_input_logs
from .exceptions import Cancelled, ConfigurationError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_log = logging.getLogger("otel_cancel.asgi")
_bad_input_log = RateLimitedLogger(_log)
_APPLIED = "otel_cancel.applied"
_DISCONNECT_REASON = "client disconnected"
_ON_DISCONNECT = ("cancel", "continue")
_baggage_propagator = W3CBaggagePropagator()
_propagator_warning_given = False


def warn_if_propagators_drop_baggage() -> bool:
    """Log an error (once) when the global propagator does not carry baggage; return whether it does."""
    global _propagator_warning_given
    carries = "baggage" in propagate.get_global_textmap().fields
    if not carries and not _propagator_warning_given:
        _propagator_warning_given = True
        _log.error(
            "otel-cancel: the configured propagators (OTEL_PROPAGATORS) do not include 'baggage': "
            "roots will not cross HTTP hops and downstream work will not be cancelled; "
            "set OTEL_PROPAGATORS=tracecontext,baggage"
        )
    return carries


_started_serving = False


def _on_start_serving() -> None:
    global _started_serving
    if _started_serving:
        return
    _started_serving = True
    get_runtime().start()
    warn_if_propagators_drop_baggage()
    from .instrumentation import run_start_hooks

    run_start_hooks()


class _Getter(Getter[Scope]):
    """Reads ASGI headers for ``propagate.extract`` when OpenTelemetry's ASGI middleware is absent."""

    def get(self, carrier: Scope, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier.get("headers", []) if k.lower() == name]
        return values or None

    def keys(self, carrier: Scope) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier.get("headers", [])]


_getter = _Getter()


class CancelMiddleware:
    """Run each HTTP request, streaming body included, in a scope for its root.

    Args:
        app: the ASGI app to wrap.
        trust_incoming: adopt incoming roots (an internal service); default from
            ``OTEL_CANCEL_TRUST_INCOMING`` (``false``: an edge).
        deadline_seconds: a time budget for every request at this hop; it narrows
            (never widens) a deadline that arrived with the request.
        on_disconnect: ``cancel`` (default) or ``continue``, when the client leaves an
            unfinished response; default from ``OTEL_CANCEL_ON_DISCONNECT``.
        run_in_scope: run each request in a scope (the default). ``False`` is for apps
            that stop cancelled work themselves and report it in their own protocol
            (A2A servers with :class:`otel_cancel.a2a.CancellableAgentExecutor`): the
            middleware then establishes the root, depth and deadline and answers with
            ``otel-cancel-root``, but refuses no request (no 409 or 504) and stops none;
            the app's own scopes do, and a late hop is refused there.
        label_headers: request headers to turn into run labels, ``{header: label}``
            (``{"x-tenant-id": "tenant"}``); default from ``OTEL_CANCEL_LABEL_HEADERS``.
            A value that is not a valid label is ignored (one rate-limited log line).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        trust_incoming: bool | None = None,
        on_disconnect: str | None = None,
        deadline_seconds: float | None = None,
        run_in_scope: bool = True,
        label_headers: Mapping[str, str] | None = None,
    ) -> None:
        if on_disconnect is not None and on_disconnect not in _ON_DISCONNECT:
            raise ConfigurationError(f"on_disconnect must be 'cancel' or 'continue', got {on_disconnect!r}")
        if deadline_seconds is not None and not 0 < deadline_seconds <= MAX_AHEAD_SECONDS:
            raise ConfigurationError(f"deadline_seconds must be in (0, {MAX_AHEAD_SECONDS}], got {deadline_seconds}")
        self.app = app
        limit_client_input_logs()  # OpenTelemetry's warnings about hostile baggage headers
        self._deadline_seconds = deadline_seconds
        self._trust_incoming = trust_incoming
        self._on_disconnect = on_disconnect
        self._run_in_scope = run_in_scope
        self._label_headers: tuple[tuple[bytes, str], ...] | None = None
        if label_headers is not None:
            self._label_headers = tuple(
                (header.lower().encode("latin-1"), validate_label(label, "x")[0])
                for header, label in label_headers.items()
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # The process starts serving: start the watcher now, not at the first request.
            _on_start_serving()
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http" or scope.get(_APPLIED):
            await self.app(scope, receive, send)
            return
        runtime = get_runtime()
        settings = runtime.settings
        trusted = settings.trust_incoming if self._trust_incoming is None else self._trust_incoming
        on_disconnect = self._on_disconnect or settings.on_disconnect
        _on_start_serving()
        await runtime.ensure_listed()

        current = otel_context.get_current()
        if not trace.get_current_span(current).get_span_context().is_valid:
            # No OpenTelemetry ASGI middleware in front: extract the context ourselves.
            current = propagate.extract(scope, getter=_getter)
        incoming = establish_root(current, scope.get("headers", []), trusted=trusted, signing_key=settings.signing_key)
        context, deadline_ms = self._narrow_deadline(incoming.context, incoming.root, incoming.depth, scope)
        context = self._labelled(context, scope, settings.label_headers)
        if self._run_in_scope and deadline_ms is not None and deadline_ms <= now_ms():
            # The budget ran out before this hop: do no work.
            telemetry.late_arrival(incoming.root, DEADLINE_REASON, attributes.KIND_DEADLINE, context)
            await _send_json(send, 504, _deadline_body(incoming.root, deadline_ms), incoming.root)
            return
        inner_scope = dict(scope)
        inner_scope[_APPLIED] = True
        inner_scope["headers"] = _rewrite_baggage(scope.get("headers", []), context)
        token = otel_context.attach(context)
        try:
            request = _CancellableRequest(
                self.app,
                inner_scope,
                receive,
                send,
                incoming.root,
                edge=not trusted,
                on_disconnect=on_disconnect,
                deadline_ms=deadline_ms,
                run_in_scope=self._run_in_scope,
            )
            await request.run()
        finally:
            otel_context.detach(token)

    def _narrow_deadline(
        self, context: otel_context.Context, root: str, depth: int, scope: Scope
    ) -> tuple[otel_context.Context, int | None]:
        """The request's deadline: the incoming one, narrowed by the header and this hop's budget."""
        raw = baggage.get_baggage(attributes.BAGGAGE_DEADLINE, context)
        deadline_ms = validate_deadline(raw)
        if raw is not None and deadline_ms is None:
            context = baggage.remove_baggage(attributes.BAGGAGE_DEADLINE, context)
        budgets = [self._deadline_seconds] if self._deadline_seconds else []
        for key, value in scope.get("headers", []):
            if key.lower() == attributes.HEADER_TIMEOUT.encode():
                try:
                    budgets.append(parse_timeout(value.decode("latin-1")))
                except ValueError as error:
                    _bad_input_log.warning(
                        "timeout", "otel-cancel: ignoring the %s header: %s", attributes.HEADER_TIMEOUT, error
                    )
        start = now_ms()
        for seconds in budgets:
            candidate = start + int(seconds * 1000)
            deadline_ms = candidate if deadline_ms is None else min(deadline_ms, candidate)
        if deadline_ms is None:
            return context, None
        return with_root(root, depth, context, extra={attributes.BAGGAGE_DEADLINE: str(deadline_ms)}), deadline_ms

    def _labelled(
        self, context: otel_context.Context, scope: Scope, configured: tuple[tuple[str, str], ...]
    ) -> otel_context.Context:
        """``context`` with the labels this edge takes from request headers."""
        wanted = self._label_headers
        if wanted is None:
            if not configured:
                return context
            wanted = tuple((header.encode("latin-1"), label) for header, label in configured)
        found: dict[str, object] = {}
        for key, value in scope.get("headers", []):
            name = key.lower()
            for header, label in wanted:
                if name == header:
                    found[label] = value.decode("latin-1")
        labels = usable_labels(found)
        return with_labels(labels, context) if labels else context


def _deadline_body(root: str, deadline_ms: int | None) -> bytes:
    return json.dumps({"error": "deadline_exceeded", "root": root, "deadline": deadline_ms}).encode()


async def _send_json(send: Send, status: int, body: bytes, root: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (attributes.HEADER_ROOT.encode(), root.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _rewrite_baggage(headers: Any, context: otel_context.Context) -> list[tuple[bytes, bytes]]:
    """The headers with one ``baggage`` header that carries the established root."""
    carrier: dict[str, str] = {}
    _baggage_propagator.inject(carrier, context)
    rewritten = [(k, v) for k, v in headers if k.lower() != b"baggage"]
    if "baggage" in carrier:
        rewritten.append((b"baggage", carrier["baggage"].encode("latin-1")))
    return rewritten


def _has_body(scope: Scope) -> bool:
    for key, value in scope.get("headers", []):
        name = key.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


class _CancellableRequest:
    """The state of one request: response started or finished, stream kind, client gone."""

    def __init__(
        self,
        app: ASGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        root: str,
        *,
        edge: bool,
        on_disconnect: str,
        deadline_ms: int | None = None,
        run_in_scope: bool = True,
    ) -> None:
        self.deadline_ms = deadline_ms
        self.run_in_scope = run_in_scope
        self.app = app
        self.scope = scope
        self._receive = receive
        self._send = send
        self.root = root
        self.edge = edge
        self.on_disconnect = on_disconnect
        self.response_started = False
        self.response_complete = False
        self.event_stream = False
        self.streaming = False
        self.body_received = not _has_body(scope)
        self.client_gone = False
        self._child: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._disconnect_cancel: asyncio.Task[Any] | None = None

    async def run(self) -> None:
        self._child = asyncio.create_task(self._run_app(), name=f"otel-cancel request {self.root}")
        try:
            await asyncio.wait({self._child})
        except asyncio.CancelledError:
            # The server cancelled us (shutdown): stop the app too, then propagate.
            self._child.cancel()
            await asyncio.gather(self._child, return_exceptions=True)
            raise
        finally:
            if self._listener is not None:
                self._listener.cancel()
        if self._child.cancelled():
            # Stopped locally because the caller left: nobody is listening any more.
            await self._end_quietly(None)
            return
        error = self._child.exception()
        if isinstance(error, Cancelled):
            await self._end_quietly(error)
            return
        if error is not None:
            raise error

    async def _run_app(self) -> None:
        if not self.run_in_scope:
            await self.app(self.scope, self.receive, self.send)
            return
        name = f"{self.scope.get('method', 'HTTP')} {self.scope.get('path', '')}"
        async with scope(name=name):
            await self.app(self.scope, self.receive, self.send)

    # -- what the app sees --------------------------------------------------------------

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.body_received = True
            self._listen_for_disconnect()
        elif message["type"] == "http.disconnect":
            self._client_left()
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            message = self._decorate_response_start(message)
            self.response_started = True
        elif message["type"] == "http.response.body":
            if message.get("more_body", False):
                self.streaming = True
            else:
                self.response_complete = True
        try:
            await self._send(message)
        except OSError:
            self._client_left()
            raise
        if self.streaming:
            self._listen_for_disconnect()

    def _decorate_response_start(self, message: Message) -> Message:
        headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != attributes.HEADER_ROOT.encode()]
        headers.append((attributes.HEADER_ROOT.encode(), self.root.encode()))
        for index, (key, value) in enumerate(headers):
            name = key.lower()
            if name == b"content-type" and value.split(b";")[0].strip().lower() == b"text/event-stream":
                self.event_stream = True
            if name == b"access-control-expose-headers" and attributes.HEADER_ROOT.encode() not in value.lower():
                headers[index] = (key, value + b", " + attributes.HEADER_ROOT.encode())
        is_cors = any(k.lower() == b"access-control-allow-origin" for k, _ in headers)
        if is_cors and not any(k.lower() == b"access-control-expose-headers" for k, _ in headers):
            headers.append((b"access-control-expose-headers", attributes.HEADER_ROOT.encode()))
        return {**message, "headers": headers}

    # -- the client going away ------------------------------------------------------------

    def _listen_for_disconnect(self) -> None:
        # Once a streaming response is under way and the request body is consumed, the
        # next message from the server can only be http.disconnect: wait for it, so a
        # client that leaves is noticed even while the app is not sending. Only for
        # streams: a one-shot response ends at once, and every receive() under
        # OpenTelemetry's ASGI middleware costs a span.
        if self._listener is None and self.streaming and self.body_received and not self.response_complete:
            self._listener = asyncio.get_running_loop().create_task(self._await_disconnect())

    async def _await_disconnect(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self._client_left()
                    return

    def _client_left(self) -> None:
        if self.client_gone or self.response_complete:
            return
        self.client_gone = True
        if self.on_disconnect != "cancel":
            return
        if self.edge:
            # The user left: stop the whole chain, in every service, through the flag.
            self._disconnect_cancel = asyncio.get_running_loop().create_task(self._cancel_root())
        elif self._child is not None and not self._child.done():
            # The calling service left; its own scope stops it anyway. Stop ours now.
            self._child.cancel(f"otel_cancel: root={self.root}; reason={_DISCONNECT_REASON}")

    async def _cancel_root(self) -> None:
        try:
            await cancel(self.root, reason=_DISCONNECT_REASON)
        except Exception as error:  # the flag failed: at least stop the work here
            _log.warning("otel-cancel: could not cancel %s after the client left: %s", self.root, error)
            if self._child is not None and not self._child.done():
                self._child.cancel(f"otel_cancel: root={self.root}; reason={_DISCONNECT_REASON}")

    # -- ending a cancelled response ------------------------------------------------------

    async def _end_quietly(self, error: Cancelled | None) -> None:
        reason = error.reason if error else _DISCONNECT_REASON
        body = json.dumps({"error": "cancelled", "root": self.root, "reason": reason}).encode()
        status = 409
        if reason == DEADLINE_REASON:
            status, body = 504, _deadline_body(self.root, self.deadline_ms)
        # The client may be gone already: nothing to tell it then.
        with contextlib.suppress(OSError):
            if self.client_gone:
                return
            if not self.response_started:
                await _send_json(self._send, status, body, self.root)
            elif not self.response_complete:
                final = b""
                if self.event_stream:
                    final = b"event: " + attributes.SSE_EVENT_CANCELLED.encode() + b"\ndata: " + body + b"\n\n"
                await self._send({"type": "http.response.body", "body": final, "more_body": False})
            self.response_complete = True
