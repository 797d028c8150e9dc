"""chain_app wired by hand: CancelMiddleware and httpx instrumentation, no opentelemetry-instrument."""

from __future__ import annotations

from chain_app import app as chain_app
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

from otel_cancel.asgi import CancelMiddleware

HTTPXClientInstrumentor().instrument()
app = CancelMiddleware(chain_app)
