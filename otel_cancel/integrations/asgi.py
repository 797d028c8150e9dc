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
2. establishes the root (see :mod:`otel_cancel.integrations.incoming`: a new root at an edge,
   the caller's on a trusted internal service), rewrites the ``baggage`` header
   the inner app sees, and adds ``otel-cancel-root`` to the response;
3. runs the app in the server's own task (no task of its own: that would cost
   every request), inside a scope. When the root is cancelled: before the
   response starts the client gets ``409`` with
   ``{"error": "cancelled", "root", "reason"}``; mid-stream, a
   ``text/event-stream`` ends with a final ``otel-cancel`` event carrying that
   body and any other stream ends (truncated), but for one that declared its
   ``Content-Length``: it is left unfinished and the server closes the connection
   (a final message would make the server raise). The scope turns the cancellation
   into :class:`~otel_cancel.Cancelled`, which ends the response here, so the
   server never sees a bare ``CancelledError`` and logs no traceback; the app's
   outgoing httpx calls are cancelled with it;
4. enforces the run's deadline (``otel_cancel.deadline`` in baggage, narrowed by
   the ``otel-cancel-timeout`` request header and ``deadline_seconds``): a hop that
   arrives after it gets ``504`` and runs no handler; one that runs past it is
   stopped locally like a cancel (``504`` before the response starts, a final
   ``otel-cancel`` event or a truncated body after);
5. at an edge, when the client goes away from a stream before its end
   (``http.disconnect`` from ``receive`` or an ``OSError`` from ``send``), cancels
   the root, so the whole chain stops (``on_disconnect="continue"`` lets work
   outlive its caller). An internal service just stops its own work. Once a
   stream is under way, someone must wait in ``receive()`` to hear a client leave
   while nothing is sent: the app itself if it does (Starlette's streaming
   responses do), else a listener task of the middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator

from .. import attributes
from .._core import telemetry
from .._core.baggage_entries import entries_of
from .._core.cancel_request import CancelRequest
from .._core.deadline import DEADLINE_REASON, MAX_AHEAD_SECONDS, now_ms, parse_timeout, validate_deadline
from .._core.labels import run_facts, usable_labels, validate_label, with_labels
from .._core.process_state import ProcessState, get_process_state
from .._core.rate_limited_log import RateLimitedLogger
from .._core.registry import current_task
from .._core.root import with_root, without_root
from .._core.scope import cancel, request_scope
from .._core.startup_wait import wait_for_listing
from ..exceptions import Cancelled, ConfigurationError
from .incoming import establish_root
from .request_context import extract_request_baggage
from .upstream_logs import limit_client_input_logs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_log = logging.getLogger("otel_cancel.asgi")
_bad_input_log = RateLimitedLogger(_log)
_failure_log = RateLimitedLogger(_log)
"""For failures that every request could hit while they last (etcd refusing flags)."""
_APPLIED = "otel_cancel.applied"
_DISCONNECT_REASON = "client disconnected"
_ON_DISCONNECT = ("cancel", "continue")
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


def _on_start_serving(runtime: ProcessState) -> None:
    warn_if_propagators_drop_baggage()
    runtime.start_serving()


# What the middleware does with a request header, by lowercase name (see _kinds_of).
_PROPAGATED = 1
"""Read by the propagators (into the carrier), other than ``baggage``: a trace header (``traceparent``,
``b3``, ``uber-trace-id``...), so the caller continued its own trace."""
_PROPAGATED_BAGGAGE = 2
_TRACEPARENT = 4
"""A ``traceparent`` the propagators do not read: it still tells a continued trace."""
_TIMEOUT = 5
_BODY = 6
_CONTENT_LENGTH = 7


class _RequestHeaders:
    """What the middleware needs from the request headers, read in one pass."""

    # A request without any of these headers (most have none but the baggage): each
    # field is set on the instance only when a header gives it.
    carrier: dict[str, list[str]] = {}  # noqa: RUF012 - replaced, never changed
    """The headers the propagators read (name -> values), for ``propagate.extract``; the
    ``baggage`` headers as one value, joined by commas."""
    baggage: tuple[bytes, ...] = ()
    """The raw ``baggage`` headers."""
    continued = False
    """Whether the request carries a trace header (the caller continued its trace and chose its id)."""
    baggage_item: object = None
    """The (last) ``baggage`` header's own item in the headers, to find it again without a search by name."""
    timeouts: tuple[bytes, ...] = ()
    has_body = False

    def __init__(self, headers: Any, kinds: Mapping[bytes, int]) -> None:
        carrier: dict[str, list[str]] | None = None
        for item in headers:
            key, value = item
            kind = kinds.get(key.lower())
            if kind is None:
                continue  # most headers: nothing to do
            if kind <= _PROPAGATED_BAGGAGE:
                if carrier is None:
                    carrier = self.carrier = {}
                if kind == _PROPAGATED_BAGGAGE:
                    if self.baggage_item is None:
                        self.baggage = (value,)
                        carrier["baggage"] = [value.decode("latin-1")]
                    else:
                        # Another baggage header. HTTP reads repeated fields as one list joined
                        # by commas; OpenTelemetry's propagator would read the first alone, and
                        # the context and the header passed on would disagree.
                        self.baggage += (value,)
                        carrier["baggage"][0] += "," + value.decode("latin-1")
                    self.baggage_item = item
                else:
                    carrier.setdefault(key.lower().decode("latin-1"), []).append(value.decode("latin-1"))
                    # Whatever trace header the propagators read (not only a traceparent: b3,
                    # jaeger...), the caller chose its trace id: an edge must not make it the root.
                    self.continued = True
            elif kind == _TRACEPARENT:
                self.continued = True
            elif kind == _TIMEOUT:
                self.timeouts += (value,)
            elif kind == _BODY or value.strip() not in (b"", b"0"):
                self.has_body = True


_TIMEOUT_HEADER = attributes.HEADER_TIMEOUT.encode()
_ROOT_HEADER = attributes.HEADER_ROOT.encode()
_header_kinds: tuple[object, Mapping[bytes, int]] = (None, {})


def _kinds_of(textmap: object) -> Mapping[bytes, int]:
    """What the middleware does with each request header it reads, for the global propagator (cached per propagator)."""
    global _header_kinds
    cached_for, kinds = _header_kinds
    if cached_for is not textmap:
        names = getattr(textmap, "fields", ())
        fields = {name.lower().encode("latin-1") for name in names} | {b"baggage"}
        built = {b"traceparent": _TRACEPARENT, _TIMEOUT_HEADER: _TIMEOUT}
        built.update({b"transfer-encoding": _BODY, b"content-length": _CONTENT_LENGTH})
        # The propagators' own headers first: they take precedence over the rest.
        built.update((name, _PROPAGATED) for name in fields)
        built[b"baggage"] = _PROPAGATED_BAGGAGE
        kinds = built  # a plain dict: read for every header of every request, and never changed
        _header_kinds = (textmap, kinds)
    return kinds


class CancelMiddleware:
    """Run each HTTP request, streaming body included, in a scope for its root.

    Args:
        app: the ASGI app to wrap.
        trust_incoming: adopt incoming roots (an internal service); default from
            ``OTEL_CANCEL_TRUST_INCOMING`` (``false``: an edge).
        deadline_seconds: a time budget for every request at this hop; it narrows
            (never widens) a deadline that arrived with the request.
        on_disconnect: ``cancel`` (default) or ``continue``, when the client leaves a
            streamed response before its end; default from ``OTEL_CANCEL_ON_DISCONNECT``.
        run_in_scope: run each request in a scope (the default). ``False`` is for apps
            that stop cancelled work themselves and report it in their own protocol
            (A2A servers with :class:`otel_cancel.integrations.a2a.CancellableAgentExecutor`): the
            middleware then establishes the root, depth and deadline and answers with
            ``otel-cancel-root``, but refuses no request (no 409 or 504) and stops none;
            the app's own scopes do, and a late hop is refused there.
        label_headers: request headers to turn into run labels, ``{header: label}``
            (``{"x-tenant-id": "tenant"}``), for the runs that start here (at an edge, or
            an internal request that brought no root); an adopted run keeps the labels it
            came with. Default from ``OTEL_CANCEL_LABEL_HEADERS``. A value that is not a
            valid label is ignored (one rate-limited log line).
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
            _on_start_serving(get_process_state())
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http" or _APPLIED in scope:
            if scope["type"] == "websocket" and _APPLIED not in scope:
                await self._websocket(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        runtime = get_process_state()
        settings = runtime.settings
        trusted = settings.trust_incoming if self._trust_incoming is None else self._trust_incoming
        if not runtime.serving:
            _on_start_serving(runtime)
        if not runtime.watcher.listed.is_set():
            await wait_for_listing(runtime)

        raw_headers = scope.get("headers", [])
        textmap = propagate.get_global_textmap()
        headers = _RequestHeaders(raw_headers, _kinds_of(textmap))
        current = otel_context.get_current()
        request_baggage = None
        # An empty context has no span: the common plain service is told without asking for one.
        if headers.carrier:
            if not current or not trace.get_current_span(current).get_span_context().is_valid:
                # No OpenTelemetry ASGI middleware in front (it would have extracted the
                # context already): extract it ourselves, once; establishing the root sets
                # the whole baggage, so the header's entries are set on the context there.
                current, request_baggage = extract_request_baggage(textmap, headers.carrier, current)
            elif len(headers.baggage) > 1 and "baggage" in textmap.fields:
                # OpenTelemetry's middleware read the first baggage header alone: read them all.
                current = W3CBaggagePropagator().extract(headers.carrier, current)
        incoming = establish_root(
            current,
            raw_headers,
            trusted=trusted,
            signing_key=settings.signing_key,
            baggage_header=b",".join(headers.baggage),
            continued=headers.continued,
            entries=request_baggage,
        )
        context, deadline_ms = incoming.context, None
        if attributes.BAGGAGE_DEADLINE in entries_of(context) or headers.timeouts or self._deadline_seconds is not None:
            context, deadline_ms = self._narrow_deadline(context, incoming.root, incoming.depth, headers)
        if (self._label_headers is not None or settings.label_headers) and not incoming.adopted:
            # A run is labelled where it starts: an adopted one has its labels already.
            context = self._labelled(context, raw_headers, settings.label_headers)
        if self._run_in_scope and deadline_ms is not None and deadline_ms <= now_ms():
            # The budget ran out before this hop: do no work.
            telemetry.late_arrival(incoming.root, DEADLINE_REASON, attributes.KIND_DEADLINE, context)
            await _send_json(send, 504, _deadline_body(incoming.root, deadline_ms), incoming.root)
            return
        inner_scope = dict(scope)
        inner_scope[_APPLIED] = True
        forwarded = None
        if incoming.kept_entries and context is incoming.context and len(headers.baggage) == 1:
            # The common trusted hop: only the depth changed; the header keeps the rest as it came.
            forwarded = _with_depth(headers.baggage[0], incoming.root, incoming.depth, incoming.kept_entries)
        if forwarded is None:
            inner_scope["headers"] = _rewrite_baggage(raw_headers, headers.carrier.get("baggage"), context)
        else:
            # The one baggage header (the item the headers were read from) takes the new depth.
            inner_headers = list(raw_headers)
            at = inner_headers.index(headers.baggage_item)
            inner_headers[at] = (inner_headers[at][0], forwarded)
            inner_scope["headers"] = inner_headers
        request = _CancellableRequest(
            inner_scope,
            receive,
            send,
            incoming.root,
            not trusted,  # an edge
            self._on_disconnect or settings.on_disconnect,
            deadline_ms,
            not headers.has_body,  # the body is received (there is none)
        )
        token = otel_context.attach(context)
        request.task = current_task()
        # The app runs here, in the server's own task: no task and no coroutine of ours per request.
        try:
            if self._run_in_scope:
                started_ms, labels = run_facts(context)
                name = f"{scope.get('method', 'HTTP')} {scope.get('path', '')}"
                cancel_scope = request_scope(name, incoming.root, incoming.depth, started_ms, labels, deadline_ms)
                # What ``async with cancel_scope`` does, without its two coroutines.
                cancel_scope.enter_task(runtime)
                try:
                    await self.app(inner_scope, request.receive, request.send)
                except BaseException as exc:
                    departure = request.departure()
                    if departure is None or isinstance(exc, (Cancelled, asyncio.CancelledError)):
                        cancel_scope.leave_task(exc)
                    else:
                        # The app raised what its caller's leaving made it raise (an OSError
                        # from send, Starlette's ClientDisconnect): its work was cut short by
                        # the root's cancel all the same, as when it returns (departure()).
                        cancel_scope.leave_task(departure)
                    raise
                cancel_scope.leave_task(request.departure())
            else:
                await self.app(inner_scope, request.receive, request.send)
        except Cancelled as error:
            await request.end_quietly(error)
        except asyncio.CancelledError:
            if not request.owns_cancellation():
                raise  # the server cancelled us (shutdown), or someone besides us did too
            # Stopped here because the caller left: nobody is listening any more.
            await request.end_quietly(None)
        finally:
            request.stop_listening()
            otel_context.detach(token)
            if len(inner_scope) > len(scope) + 1:  # the app added keys (a router: route, endpoint, path_params)
                _copy_back(inner_scope, scope)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A websocket runs in no scope of ours, but at an edge without the client's ``otel_cancel.*`` baggage.

        OpenTelemetry's ASGI middleware in front extracts the client's baggage for a
        websocket too: left in place, a scope, a LangGraph run or an httpx call in the
        handler would adopt or forward a root the client chose (someone else's run).
        """
        trusted = get_process_state().settings.trust_incoming if self._trust_incoming is None else self._trust_incoming
        current = otel_context.get_current()
        if trusted or entries_of(current).keys().isdisjoint(attributes.BAGGAGE_KEYS):
            await self.app(scope, receive, send)
            return
        if attributes.BAGGAGE_ROOT in entries_of(current):
            telemetry.baggage_rejected("untrusted")
        token = otel_context.attach(without_root(current))
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)

    def _narrow_deadline(
        self, context: otel_context.Context, root: str, depth: int, headers: _RequestHeaders
    ) -> tuple[otel_context.Context, int | None]:
        """The request's deadline: the incoming one, narrowed by the header and this hop's budget.

        Called only when one of the three is there (the common request has none).
        """
        raw = entries_of(context).get(attributes.BAGGAGE_DEADLINE)
        deadline_ms = validate_deadline(raw)
        if raw is not None and deadline_ms is None:
            context = baggage.remove_baggage(attributes.BAGGAGE_DEADLINE, context)
        budgets = [self._deadline_seconds] if self._deadline_seconds else []
        for value in headers.timeouts:
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
        self, context: otel_context.Context, raw_headers: Any, configured: tuple[tuple[str, str], ...]
    ) -> otel_context.Context:
        """``context`` with the labels a run started here takes from request headers."""
        wanted = self._label_headers
        if wanted is None:
            if not configured:
                return context
            wanted = tuple((header.encode("latin-1"), label) for header, label in configured)
        found: dict[str, object] = {}
        for key, value in raw_headers:
            name = key.lower()
            for header, label in wanted:
                if name == header:
                    found[label] = value.decode("latin-1")
        labels = usable_labels(found)
        return with_labels(labels, context) if labels else context


def _copy_back(inner_scope: Scope, scope: Scope) -> None:
    """Give the server's ``scope`` what the app wrote into the copy it ran with.

    Middleware outside reads what the router wrote once the app has returned
    (OpenTelemetry's ASGI middleware takes ``scope["route"]`` for its metrics' target);
    the headers stay the request's own.
    """
    for key, value in inner_scope.items():
        if key != "headers" and key != _APPLIED and scope.get(key, _ABSENT) is not value:
            scope[key] = value


_ABSENT = object()


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
                (_ROOT_HEADER, root.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _rewrite_baggage(
    headers: Any, incoming: list[str] | None, context: otel_context.Context
) -> list[tuple[bytes, bytes]]:
    """The headers with one ``baggage`` header that carries the established root.

    The ``otel_cancel.*`` entries come from ``context`` and go first; every other entry
    the incoming header carried and OpenTelemetry accepted into ``context`` follows as
    it arrived (no decoding and encoding again).
    """
    entries = baggage.get_all(context)
    parts = []
    for key in attributes.BAGGAGE_KEYS:
        value = entries.get(key)
        if value is not None:
            text = str(value)
            # Roots, depths, deadlines and signatures are hex or digits; anything else is
            # quoted the way OpenTelemetry's propagator quotes it.
            parts.append(f"{key}={text}" if text.isalnum() else f"{key}={quote_plus(text)}")
    if incoming and len(parts) < len(entries):  # entries of the caller's own besides ours
        for header in incoming:
            for entry in header.split(","):
                name = entry.split("=", 1)[0].split(";", 1)[0].strip()
                if "%" in name or "+" in name:
                    name = unquote_plus(name)
                if name in entries and not name.startswith(_OUR_PREFIX):
                    parts.append(entry.strip())
        if len(parts) > len(entries):
            parts = _each_name_once(parts)
    rewritten = [(key, value) for key, value in headers if key.lower() != b"baggage"]
    if parts:
        try:
            encoded = ",".join(parts).encode("ascii")  # what nearly every header is
        except UnicodeEncodeError:
            encoded = _quoted_beyond_ascii(parts).encode("latin-1")
        rewritten.append((b"baggage", encoded))
    return rewritten


def _each_name_once(parts: list[str]) -> list[str]:
    """``parts`` with a name given more than once (in one header, or in several) kept once.

    As OpenTelemetry reads it: the last value, in the place of the first.
    """
    kept: dict[str, str] = {}
    for part in parts:
        name = part.split("=", 1)[0].split(";", 1)[0].strip()
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        kept[name] = part
    return list(kept.values())


def _quoted_beyond_ascii(parts: list[str]) -> str:
    """The header of ``parts`` with our members quoted where they hold more than ASCII.

    A letter such as ``中`` passes ``str.isalnum()`` and was written as it is; a baggage
    value must be ASCII. The caller's own members are kept as they came (Latin-1, as read).
    """
    members = []
    for part in parts:
        if part.startswith(_OUR_PREFIX) and not part.isascii():
            key, text = part.split("=", 1)
            part = f"{key}={quote_plus(text)}"
        members.append(part)
    return ",".join(members)


_OUR_PREFIX = "otel_cancel."
_ROOT_MEMBER = attributes.BAGGAGE_ROOT.encode() + b"="
_DEPTH_MEMBER = attributes.BAGGAGE_DEPTH.encode() + b"="


def _with_depth(header: bytes, root: str, depth: int, entries: int) -> bytes | None:
    """``header`` with its depth member replaced by ``depth``, when nothing else changed; else ``None``.

    For a trusted hop whose root was adopted with the incoming baggage kept in place
    (``entries`` entries, the root and depth leading, ours before the caller's): when the
    one header has as many members as the baggage has entries, OpenTelemetry took every
    member as it came (none malformed, repeated or in excess), so the header already
    says what :func:`_rewrite_baggage` would rebuild, but for the depth.
    """
    if header.count(b",") + 1 != entries:
        return None
    lead = _ROOT_MEMBER + root.encode() + b"," + _DEPTH_MEMBER
    if not header.startswith(lead):
        return None
    rest = header.find(b",", len(lead))
    return lead + str(depth).encode() + (header[rest:] if rest >= 0 else b"")


class _CancellableRequest:
    """One request: it runs in the server's own task, in a scope, and ends quietly when stopped.

    There is no child task: the scope converts the cancel that stops the request into
    :class:`~otel_cancel.Cancelled`, caught by the middleware, so the server never sees
    a bare ``CancelledError``. A stop of our own that is not a flag (the caller left an
    internal hop) is a tagged ``task.cancel()`` of this task, which the middleware
    recognises (:meth:`owns_cancellation`) and swallows with ``Task.uncancel()``.
    """

    # The state a request starts with, as class attributes: a request sets on itself only
    # what it was given and what changes while it runs (most of these never do).
    response_started = False
    response_complete = False
    streaming = False
    client_gone = False
    stopped_locally = False
    _start_headers: list[tuple[bytes, bytes]] = []  # noqa: RUF012 - replaced, never changed
    _receiving = 0
    """How many of the app's receive() calls are waiting: while one is, the app hears the disconnect itself."""
    task: asyncio.Task[Any] | None = None
    _next_turn: asyncio.Handle | None = None
    """What this request decided to do a loop turn later (start listening, or stop locally): dropped when it ends."""
    _listener: asyncio.Task[None] | None = None
    _disconnect_cancel: asyncio.Task[Any] | None = None

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        root: str,
        edge: bool,
        on_disconnect: str,
        deadline_ms: int | None,
        body_received: bool,
    ) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.root = root
        self.edge = edge
        self.on_disconnect = on_disconnect
        self.deadline_ms = deadline_ms
        self.body_received = body_received

    def owns_cancellation(self) -> bool:
        """Whether the task's cancellation is this request's own local stop alone (then undone here)."""
        task = self.task
        return self.stopped_locally and task is not None and task.uncancel() == 0

    def stop_listening(self) -> None:
        """The request is over: no listener, and no stop still to come (a local stop scheduled as the app ended)."""
        if self._next_turn is not None:
            self._next_turn.cancel()
        if self._listener is not None:
            self._listener.cancel()

    # -- what the app sees --------------------------------------------------------------

    async def receive(self) -> Message:
        self._receiving += 1
        try:
            message = await self._receive()
        finally:
            self._receiving -= 1
        kind = message["type"]
        if kind == "http.request":
            if not message.get("more_body", False):
                self.body_received = True
                if self.streaming:
                    self._listen_soon()
        elif kind == "http.disconnect":
            self._client_left()
        return message

    async def send(self, message: Message) -> None:
        if self.streaming:
            # A chunk of a stream under way (the most frequent send): only its end changes the state.
            if not message.get("more_body", False) and message["type"] == "http.response.body":
                self.response_complete = True
        else:
            # Before a stream is under way: note what ``message`` starts or ends (in line:
            # every response sends two of these).
            kind = message["type"]
            if kind == "http.response.start":
                message = self._decorate_response_start(message)
                self.response_started = True
            elif kind == "http.response.body":
                if not message.get("more_body", False):
                    self.response_complete = True
                else:
                    self.streaming = True
                    # An app already waiting in receive() hears the client itself (Starlette's
                    # streaming responses): nothing to decide a loop turn later.
                    if self.body_received and not self._receiving:
                        self._listen_soon()
        try:
            await self._send(message)
        except OSError:
            self._client_left()
            raise

    def _decorate_response_start(self, message: Message) -> Message:
        headers: list[tuple[bytes, bytes]] = []
        expose_index = -1
        is_cors = False
        for key, value in message.get("headers", ()):
            name = key.lower()
            if name == _ROOT_HEADER:
                continue
            if name == b"access-control-expose-headers":
                expose_index = len(headers)
            elif name == b"access-control-allow-origin":
                is_cors = True
            headers.append((key, value))
        if expose_index >= 0:
            key, value = headers[expose_index]
            if _ROOT_HEADER not in value.lower():
                headers[expose_index] = (key, value + b", " + _ROOT_HEADER)
        elif is_cors:
            headers.append((b"access-control-expose-headers", _ROOT_HEADER))
        headers.append((_ROOT_HEADER, self.root.encode()))
        self._start_headers = headers
        return {**message, "headers": headers}

    def _is_event_stream(self) -> bool:
        # Asked only when a stream must end early, not for every response.
        for key, value in self._start_headers:
            if key.lower() == b"content-type" and value.split(b";")[0].strip().lower() == b"text/event-stream":
                return True
        return False

    def _declares_length(self) -> bool:
        # Asked only when a response must end early, like _is_event_stream.
        return any(key.lower() == b"content-length" for key, _ in self._start_headers)

    # -- the client going away ------------------------------------------------------------

    def _listen_soon(self) -> None:
        # Once a streaming response is under way and the request body is consumed, the
        # next message from the server can only be http.disconnect, and someone must
        # wait for it so that a client who leaves is noticed even while nothing is
        # sent. Decided one loop turn later: an app that listens itself (Starlette's
        # StreamingResponse starts its listener next to its sender) is then waiting in
        # receive(), and a second listener would only cost (under OpenTelemetry's ASGI
        # middleware, two spans per stream). One-shot responses never get one.
        if self._next_turn is None and self._listener is None:
            self._next_turn = asyncio.get_running_loop().call_soon(self._listen_unless_the_app_does)

    def _listen_unless_the_app_does(self) -> None:
        if self._receiving or self.response_complete or self.client_gone or self._listener is not None:
            return
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
        else:
            # The calling service left; its own scope stops it anyway. Stop ours now.
            self._stop_locally()

    def _stop_locally(self) -> None:
        # Made a loop turn later, never from inside the request's task: the app hears of the
        # disconnect from its own receive() or send() and may then return (or raise) without
        # awaiting again, and a cancel of the running task would stay pending and reach the
        # server. The stop is dropped if the request is over by then (see stop_listening).
        task = self.task
        if task is not None and not task.done() and not self.stopped_locally:
            if self._next_turn is not None:
                self._next_turn.cancel()  # no listener to start: the caller is gone
            self._next_turn = asyncio.get_running_loop().call_soon(self._stop_now)

    def _stop_now(self) -> None:
        task = self.task
        if task is not None and not task.done() and not self.stopped_locally:
            self.stopped_locally = True
            task.cancel(self._disconnect_stop().tag())

    async def _cancel_root(self) -> None:
        try:
            await cancel(self.root, reason=_DISCONNECT_REASON)
        except Exception as error:  # the flag failed: at least stop the work here
            # One line a minute: while etcd refuses writes, every client that leaves gets here.
            _failure_log.warning(
                "disconnect_flag", "otel-cancel: could not cancel %s after the client left: %s", self.root, error
            )
            self._stop_locally()

    # -- ending a cancelled response ------------------------------------------------------

    def departure(self) -> Cancelled | None:
        """What ended the app's work, when the app returned after its caller left an unfinished response.

        An app that listens for the disconnect itself (Starlette's streaming responses) stops
        and returns normally: its work was cut short by the root's cancel all the same (the
        flag an edge writes for it, or the calling service's own stop), so its scope reports a
        stop and owes the root its receipt. ``None`` when the caller stayed, or when work may
        outlive it (``on_disconnect="continue"``).
        """
        if not self.client_gone or self.response_complete or self.on_disconnect != "cancel":
            return None
        return self._disconnect_stop().error()

    def _disconnect_stop(self) -> CancelRequest:
        """The local stop of this hop's work when its caller left (no flag: the caller's own scope stops it)."""
        return CancelRequest(self.root, _DISCONNECT_REASON, time.time_ns(), "", attributes.KIND_DISCONNECT)

    async def end_quietly(self, error: Cancelled | None) -> None:
        stop = error if error is not None else self._disconnect_stop().error()
        # Chosen by the kind of the cancel, never by its free-text reason.
        if stop.kind == attributes.KIND_DEADLINE:
            status, body = 504, _deadline_body(self.root, self.deadline_ms)
        else:
            status = 409
            body = json.dumps({"error": "cancelled", "root": self.root, "reason": stop.reason}).encode()
        # The client may be gone already: nothing to tell it then.
        with contextlib.suppress(OSError):
            if self.client_gone:
                return
            if not self.response_started:
                await _send_json(self._send, status, body, self.root)
            elif not self.response_complete:
                if self._declares_length():
                    # A body shorter than its Content-Length cannot end cleanly (the server
                    # raises on a final message): left unfinished, the server closes the
                    # connection, which is how the client learns the body was cut.
                    return
                final = b""
                if self._is_event_stream():
                    final = b"event: " + attributes.SSE_EVENT_CANCELLED.encode() + b"\ndata: " + body + b"\n\n"
                await self._send({"type": "http.response.body", "body": final, "more_body": False})
            self.response_complete = True
