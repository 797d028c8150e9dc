"""Plain ASGI streams that never listen for the client themselves, behind CancelMiddleware.

``/internal/...`` trusts its caller (an internal hop), ``/edge/...`` does not (an edge).
``GET .../silent`` sends one event, then waits an hour without sending or receiving:
only CancelMiddleware can notice the client leaving. ``GET .../ticks`` sends an event
every 50 ms. Each prints ``START <root> <LEVEL>`` when it starts, ``STOPPED <root>
<LEVEL> <exception>`` when its work is interrupted and ``DONE`` when it finishes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from lifespan import answer_lifespan

from otel_cancel import current_root
from otel_cancel.asgi import CancelMiddleware

LEVEL = os.environ.get("LEVEL", "?")


def _log(event: str, root: str | None, detail: str = "") -> None:
    print(f"{event} {root} {LEVEL} {detail}".rstrip(), flush=True)


async def _stream(scope: Any, receive: Any, send: Any) -> None:
    root = current_root()
    silent = scope["path"].endswith("/silent")
    _log("START", root)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    try:
        await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
        if silent:
            await asyncio.sleep(3600)
        else:
            for index in range(1200):
                await asyncio.sleep(0.05)
                await send({"type": "http.response.body", "body": b"data: %d\n\n" % index, "more_body": True})
    except BaseException as error:
        _log("STOPPED", root, type(error).__name__)
        raise
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    _log("DONE", root)


_internal = CancelMiddleware(_stream, trust_incoming=True)
_edge = CancelMiddleware(_stream, trust_incoming=False)


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    await (_internal if scope["path"].startswith("/internal/") else _edge)(scope, receive, send)
