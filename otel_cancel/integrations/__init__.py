"""What connects otel-cancel to the frameworks it serves: ASGI, A2A, LangGraph, LangGraph
Server and OpenTelemetry's auto-instrumentation.

Each module is imported through its public path (``otel_cancel.asgi``, ``otel_cancel.a2a``,
...); they use the core and the store, and never each other's internals.
"""
