"""Plain ASGI responses that end early behind CancelMiddleware, for how the server sees their end.

``GET /internal/returns`` (a trusted hop) sends one event, then returns as soon as its own
``receive()`` says the caller left, inside a wrapper that awaits once more after it (as a
logging middleware or the server's own clean-up does): it prints ``RETURNED <root>``, then
``AFTER <root>`` or ``OUTER <root> <exception>``. ``GET /edge/fixed`` (an edge) declares
``Content-Length: 100``, sends 10 bytes and waits; a deadline stops it (``STOPPED <root>``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from lifespan import answer_lifespan

from otel_cancel import current_root
from otel_cancel.asgi import CancelMiddleware


async def _returns_when_the_caller_leaves(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass
    print(f"RETURNED {current_root()}", flush=True)


async def _fixed_length(scope: Any, receive: Any, send: Any) -> None:
    root = current_root()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
    await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
    try:
        await asyncio.sleep(3600)
    except BaseException as error:
        print(f"STOPPED {root} {type(error).__name__}", flush=True)
        raise


_internal = CancelMiddleware(_returns_when_the_caller_leaves, trust_incoming=True)
_edge = CancelMiddleware(_fixed_length, trust_incoming=False)


async def _awaiting_after(scope: Any, receive: Any, send: Any) -> None:
    root = dict(scope["headers"]).get(b"baggage", b"").split(b",")[0].split(b"=")[-1].decode()
    try:
        await _internal(scope, receive, send)
        await asyncio.sleep(0)
    except BaseException as error:
        print(f"OUTER {root} {type(error).__name__}", flush=True)
        raise
    print(f"AFTER {root}", flush=True)


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    await (_awaiting_after if scope["path"].startswith("/internal/") else _edge)(scope, receive, send)
