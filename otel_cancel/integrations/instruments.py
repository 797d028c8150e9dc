"""The libraries otel-cancel instruments, each with the releases its integration supports.

:class:`~otel_cancel.integrations.instrumentation.OtelCancelInstrumentor` declares them as its
dependencies, any one of which is enough (pyproject's ``instruments-any`` extra, which
OpenTelemetry's loader reads, lists the same ranges); each integration is then switched
on only where its own library is installed in range.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

_log = logging.getLogger("otel_cancel.instrumentation")

INSTRUMENTS: Mapping[str, str] = {
    # CancelMiddleware inserted into every Starlette / FastAPI app (its middleware stack is wrapped).
    "starlette": "starlette>=0.40,<2",
    # Outgoing calls carry the root (through opentelemetry-instrumentation-httpx).
    "httpx": "httpx>=0.27",
    # Graph runs and nodes in scopes (LangGraph's runner is wrapped).
    "langgraph": "langgraph>=1.0,<2",
    # LangGraph Server's run creation and worker (otel_cancel.integrations.langgraph_server).
    "langgraph-server": "langgraph-api>=0.16,<0.17",
    # A2A apps get the middleware in the mode the protocol needs (otel_cancel.integrations.a2a).
    "a2a": "a2a-sdk>=1.3,<1.4",
}
"""Integration name -> the requirement its library must satisfy."""


def supported(integration: str) -> bool:
    """Whether the library ``integration`` instruments is installed in a release it supports.

    Logs one warning naming the package, the installed release and the supported range
    when the library is installed outside that range; nothing when it is not installed.

    Args:
        integration: A key of :data:`INSTRUMENTS`.
    """
    requirement = INSTRUMENTS[integration]
    conflict = get_dependency_conflicts([requirement])
    if conflict is None:
        return True
    if conflict.found:  # "<package> <version>": installed, out of range
        _log.warning(
            "otel-cancel: the %s integration is off: it supports %s and %s is installed; "
            "install a release in that range to switch it on",
            integration,
            requirement,
            conflict.found,
        )
    return False
