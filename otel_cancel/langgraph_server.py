"""LangGraph Server (``langgraph dev``, ``langgraph up``, LangGraph Platform): the root reaches every run.

The public import path; the implementation lives in :mod:`otel_cancel.integrations.langgraph_server`.
"""

from .integrations.langgraph_server import (
    CONFIG_KEY,
    METADATA_ROOT,
    SUPPORTED_LANGGRAPH_API,
    LangGraphServerCancelMiddleware,
    instrument_langgraph_server,
    is_langgraph_server_app,
    run_context,
    uninstrument_langgraph_server,
)

__all__ = (
    "CONFIG_KEY",
    "METADATA_ROOT",
    "SUPPORTED_LANGGRAPH_API",
    "LangGraphServerCancelMiddleware",
    "instrument_langgraph_server",
    "is_langgraph_server_app",
    "run_context",
    "uninstrument_langgraph_server",
)
