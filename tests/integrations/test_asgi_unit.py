"""CancelMiddleware's in-process logic (headers, CORS, idempotence). Propagation is tested on real processes."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Route

import otel_cancel
from otel_cancel.asgi import CancelMiddleware
from otel_cancel.exceptions import ConfigurationError
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio


async def _depth(request):
    return JSONResponse({"root": otel_cancel.current_root(), "depth": otel_cancel.current_depth()})


@pytest.fixture
def runtime():
    with configured(store=MemoryCancelStore(), service="unit") as runtime:
        yield runtime


async def test_every_response_carries_the_root_header(runtime):
    """The response header otel-cancel-root names the root the handler ran under."""
    app = CancelMiddleware(Starlette(routes=[Route("/", _depth)]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/")
    assert response.headers["otel-cancel-root"] == response.json()["root"]
    assert response.json()["depth"] == 0


async def test_cors_responses_expose_the_root_header(runtime):
    """With CORS, otel-cancel-root is listed in Access-Control-Expose-Headers so a browser can read it."""
    app = CancelMiddleware(
        Starlette(routes=[Route("/", _depth)], middleware=[Middleware(CORSMiddleware, allow_origins=["*"])])
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/", headers={"origin": "http://ui.example"})
    assert "otel-cancel-root" in response.headers["access-control-expose-headers"]


async def test_the_middleware_applied_twice_acts_once(runtime):
    """Two CancelMiddleware layers (explicit plus auto-instrumentation) give one root and one depth step."""
    app = CancelMiddleware(CancelMiddleware(Starlette(routes=[Route("/", _depth)]), trust_incoming=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/")
    assert response.json()["depth"] == 0 and response.headers["otel-cancel-root"] == response.json()["root"]


async def test_instrumented_starlette_gets_the_middleware_once(runtime):
    """The instrumentor inserts CancelMiddleware into Starlette apps exactly once, even if added explicitly."""
    from otel_cancel.instrumentation import OtelCancelInstrumentor

    instrumentor = OtelCancelInstrumentor()
    instrumentor.instrument()
    try:
        app = Starlette(routes=[Route("/", _depth)], middleware=[Middleware(CancelMiddleware)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.get("/")
        assert sum(m.cls is CancelMiddleware for m in app.user_middleware) == 1
        assert response.headers["otel-cancel-root"] == response.json()["root"]
    finally:
        instrumentor.uninstrument()


def test_an_invalid_on_disconnect_fails_at_configuration():
    """on_disconnect must be cancel or continue; anything else is a ConfigurationError at start-up."""
    with pytest.raises(ConfigurationError, match="on_disconnect"):
        CancelMiddleware(Starlette(), on_disconnect="maybe")
