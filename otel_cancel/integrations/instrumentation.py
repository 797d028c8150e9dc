"""``OtelCancelInstrumentor``: turn otel-cancel on without code changes.

Registered under the ``opentelemetry_instrumentor`` entry point, so::

    opentelemetry-instrument uvicorn app:app

on an app that never imports otel_cancel gets:

- :class:`~otel_cancel.integrations.asgi.CancelMiddleware` on every Starlette / FastAPI app,
  placed right inside OpenTelemetry's ASGI middleware (added once, even when the
  app also adds it explicitly). FastAPI builds its middleware stack in a method of its
  own, which gets the same wrapper when ``fastapi`` is imported;
- outgoing baggage on httpx calls (the httpx instrumentation is switched on if
  it is installed and not yet on);
- the watcher started when the app starts serving (ASGI lifespan) or at the
  first request;
- LangGraph runs in scopes (when LangGraph is installed), and on LangGraph Server
  the root carried into its worker's runs (:mod:`otel_cancel.integrations.langgraph_server`);
- on apps that serve a2a-sdk routes, the middleware in the mode A2A needs
  (``run_in_scope=False``: the executor, wrapped in
  :class:`otel_cancel.integrations.a2a.CancellableAgentExecutor`, stops the work and reports
  it in the protocol).

Each integration switches on only where its library is installed in a release it
supports; :meth:`OtelCancelInstrumentor.instrumentation_dependencies` declares them all
(any one is enough for the instrumentor to load), and a library installed outside its
range is left alone with one warning. What it patches is wrapped with wrapt, and
``uninstrument()`` puts back the original functions.

``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=otel_cancel`` turns it off. A propagator
configuration that drops baggage is reported loudly at start-up. An invalid
``OTEL_CANCEL_*`` setting stops the process at start-up with one line naming the
variable (exit status 2): OpenTelemetry's loader would otherwise log the error and
let the service serve requests that can only fail.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection
from typing import Any

import wrapt
from opentelemetry.instrumentation.dependencies import DependencyConflictError, get_dependency_conflicts
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from .._core.process_state import configured_process_state, get_process_state
from ..exceptions import ConfigurationError
from .instruments import INSTRUMENTS, supported
from .patching import unwrap, wrap

_log = logging.getLogger("otel_cancel.instrumentation")


def _is_cancel_middleware(entry: Any) -> bool:
    from .asgi import CancelMiddleware

    cls = getattr(entry, "cls", None)
    # A subclass of the application's own counts: a second middleware would act once more.
    if isinstance(cls, type) and issubclass(cls, CancelMiddleware):
        return True
    return getattr(cls, "__name__", "") == "LangGraphServerCancelMiddleware"


def _is_otel_asgi_middleware(entry: Any) -> bool:
    cls = getattr(entry, "cls", None)
    return getattr(cls, "__module__", "").startswith("opentelemetry.instrumentation.asgi")


def _serves_a2a(app: Any) -> bool:
    try:
        from .a2a import is_a2a_app, warn_if_not_cancellable
    except ImportError:  # a2a-sdk is not installed
        return False
    if not is_a2a_app(app):
        return False
    warn_if_not_cancellable(app)
    return True


def _is_langgraph_server(app: Any) -> bool:
    try:
        from .langgraph_server import is_langgraph_server_app
    except ImportError:  # LangGraph is not installed
        return False
    return is_langgraph_server_app(app)


def _instrument_httpx() -> None:
    try:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    except ImportError:
        _log.warning(
            "otel-cancel: opentelemetry-instrumentation-httpx is not installed; "
            "outgoing httpx calls will not carry the root"
        )
        return
    instrumentor = HTTPXClientInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
        _switched_on.append(instrumentor)


_switched_on: list[Any] = []


def _stop_the_process(error: ConfigurationError) -> None:
    """End a process that ``opentelemetry-instrument`` is starting, with one line on stderr.

    The loader (``sitecustomize``) catches exceptions and carries on, and raising
    ``SystemExit`` there makes Python abort with a traceback; ``os._exit`` is the
    one clean way out before the application has started.
    """
    print(f"otel-cancel: {error}; the service does not start", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


class _MiddlewareInserter:
    """The wrapper of ``Starlette.build_middleware_stack``: puts the cancel middleware in every app, once.

    It goes right inside OpenTelemetry's ASGI middleware (so it sees the extracted
    context and the server span), or outermost among the app's own middleware when
    OpenTelemetry's is absent; an app that already has it (added explicitly) is left as it is.
    """

    def __init__(self, a2a_supported: bool) -> None:
        self.a2a_supported = a2a_supported

    def __call__(self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        from starlette.middleware import Middleware

        from .asgi import CancelMiddleware

        app = instance
        if not any(_is_cancel_middleware(m) for m in app.user_middleware):
            position = next(
                (i + 1 for i, m in enumerate(app.user_middleware) if _is_otel_asgi_middleware(m)),
                0,
            )
            if _is_langgraph_server(app):
                from .langgraph_server import LangGraphServerCancelMiddleware

                # Its worker stops runs itself; see LangGraphServerCancelMiddleware.
                middleware = Middleware(LangGraphServerCancelMiddleware)
            else:
                serves_a2a = self.a2a_supported and _serves_a2a(app)
                middleware = Middleware(CancelMiddleware, run_in_scope=not serves_a2a)
            app.user_middleware.insert(position, middleware)
        return wrapped(*args, **kwargs)


_FASTAPI_MODULE = "fastapi.applications"
_fastapi_hook: dict[str, Any] = {"registered": False, "inserter": None}
"""The post-import hook for FastAPI is registered once per process; it wraps with the inserter in use, if any."""


def _fastapi_class(module: Any = None) -> Any:
    """FastAPI's app class (of ``module``, else of the one imported), if it builds its middleware stack itself."""
    module = module if module is not None else sys.modules.get(_FASTAPI_MODULE)
    cls = getattr(module, "FastAPI", None)
    return cls if cls is not None and "build_middleware_stack" in vars(cls) else None


def _wrap_fastapi(module: Any) -> None:
    inserter, cls = _fastapi_hook["inserter"], _fastapi_class(module)
    if inserter is not None and cls is not None:
        wrap(cls, "build_middleware_stack", inserter)


class OtelCancelInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """The otel-cancel instrumentor (see the module docstring)."""

    _middleware_inserter: _MiddlewareInserter | None = None
    _loaded_by_opentelemetry = False

    def instrument(self, **kwargs: Any) -> Any:
        """Switch otel-cancel on (see :meth:`BaseInstrumentor.instrument`).

        It needs any one of :meth:`instrumentation_dependencies` installed in range (the
        base class would require them all); each integration then checks its own.
        """
        # OpenTelemetry's loader (opentelemetry-instrument) passes skip_dep_check: it has
        # already checked the instruments-any extra. Note here whose call this is.
        self._loaded_by_opentelemetry = bool(kwargs.get("skip_dep_check"))
        if not self._loaded_by_opentelemetry and not self.is_instrumented_by_opentelemetry:
            conflict = get_dependency_conflicts((), self.instrumentation_dependencies())
            if conflict is not None:
                if kwargs.get("raise_exception_on_conflict"):
                    raise DependencyConflictError(conflict)
                _log.error("otel-cancel: %s", conflict)
                return None
            kwargs["skip_dep_check"] = True  # checked here, "any of" rather than "all of"
        return super().instrument(**kwargs)

    def instrumentation_dependencies(self) -> Collection[str]:
        """The libraries otel-cancel instruments and the releases it supports, any one of which is enough.

        Each integration is switched on only where its own library is installed in its
        range (one warning when it is installed outside it).
        """
        return tuple(INSTRUMENTS.values())

    def _instrument(self, **kwargs: Any) -> None:
        from .asgi import warn_if_propagators_drop_baggage
        from .upstream_logs import limit_client_input_logs

        try:
            get_process_state()  # fail fast on invalid OTEL_CANCEL_* settings
        except ConfigurationError as error:
            if not self._loaded_by_opentelemetry:
                raise  # instrument() called by the application: the error is its to handle
            _stop_the_process(error)
        warn_if_propagators_drop_baggage()
        limit_client_input_logs()
        if supported("starlette"):
            self._instrument_starlette(a2a_supported=supported("a2a"))
        if supported("httpx"):
            # httpx is switched on when the app starts serving, not now: under
            # opentelemetry-instrument its own instrumentor may still be about to run.
            get_process_state().start_hooks.append(_instrument_httpx)
        self._instrument_langgraph()

    def _uninstrument(self, **kwargs: Any) -> None:
        runtime = configured_process_state()
        if runtime is not None:
            # Only the hook this instrumentor added: others' stay.
            while _instrument_httpx in runtime.start_hooks:
                runtime.start_hooks.remove(_instrument_httpx)
        while _switched_on:
            _switched_on.pop().uninstrument()
        if self._middleware_inserter is not None:
            from starlette.applications import Starlette

            unwrap(Starlette, "build_middleware_stack", self._middleware_inserter)
            fastapi = _fastapi_class()
            if fastapi is not None:
                unwrap(fastapi, "build_middleware_stack", self._middleware_inserter)
            self._middleware_inserter = _fastapi_hook["inserter"] = None
        # Each undone on its own: one that cannot be imported does not keep the other wrapped.
        try:
            from .langgraph_server import uninstrument_langgraph_server
        except ImportError:  # LangGraph is not installed
            pass
        else:
            uninstrument_langgraph_server()
        try:
            from .langgraph import uninstrument_langgraph
        except ImportError:
            pass
        else:
            uninstrument_langgraph()

    def _instrument_starlette(self, a2a_supported: bool) -> None:
        try:
            from starlette.applications import Starlette
        except ImportError:
            return
        if self._middleware_inserter is not None:
            return
        self._middleware_inserter = _fastapi_hook["inserter"] = _MiddlewareInserter(a2a_supported)
        wrap(Starlette, "build_middleware_stack", self._middleware_inserter)
        # FastAPI replaces Starlette's method without calling it: its own is wrapped too, once
        # the application imports FastAPI (importing it here would slow every other service).
        if not _fastapi_hook["registered"]:
            _fastapi_hook["registered"] = True
            wrapt.register_post_import_hook(_wrap_fastapi, _FASTAPI_MODULE)
        elif _FASTAPI_MODULE in sys.modules:
            _wrap_fastapi(sys.modules[_FASTAPI_MODULE])

    @staticmethod
    def _instrument_langgraph() -> None:
        # Two integrations, each checked against its own range: one left off does not
        # take the other with it.
        if supported("langgraph"):
            try:
                from .langgraph import instrument_langgraph
            except ImportError:
                pass
            else:
                instrument_langgraph()
        if supported("langgraph-server"):
            try:
                from .langgraph_server import instrument_langgraph_server
            except ImportError:
                return
            # Hooks LangGraph Server's internals when langgraph_api is imported.
            instrument_langgraph_server()
