"""``level_app`` with otel-cancel wired by hand (no ``opentelemetry-instrument``, no SDK).

``CancelMiddleware`` around the app and the httpx instrumentation for outgoing
baggage, as in ``tests/services/explicit_app.py``: the lightest real set-up, so
the propagation benchmark measures otel-cancel and not span export.
"""

from __future__ import annotations

from level_app import app as level_app
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

from otel_cancel.asgi import CancelMiddleware

HTTPXClientInstrumentor().instrument()
app = CancelMiddleware(level_app)
