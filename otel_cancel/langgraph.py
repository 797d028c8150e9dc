"""LangGraph runs in scopes: cancelling a root stops its graph runs, node by node.

The public import path; the implementation lives in :mod:`otel_cancel.integrations.langgraph`.
"""

from .integrations.langgraph import (
    CancelCheckCallback,
    instrument_langgraph,
    uninstrument_langgraph,
)

__all__ = (
    "CancelCheckCallback",
    "instrument_langgraph",
    "uninstrument_langgraph",
)
