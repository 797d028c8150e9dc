"""This process's instance name: one identity across receipts, spans and metrics.

Receipts name the process that stopped work; spans and metrics name it by the
resource attribute ``service.instance.id`` (the SDK sets a random one unless
``OTEL_RESOURCE_ATTRIBUTES`` gives it). Unless ``OTEL_CANCEL_INSTANCE`` says
otherwise, receipts use the resource's id, so a ``status`` row and a dashboard
panel name the same process.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping

SERVICE_INSTANCE_ID = "service.instance.id"


def _from_tracer_provider() -> str | None:
    if "opentelemetry.trace" not in sys.modules and not os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"):
        # No code imported the API, so none set a provider (nor will the variable name
        # one): there is none to ask, and importing the API costs a CLI command its start.
        return None
    from opentelemetry import trace

    resource = getattr(trace.get_tracer_provider(), "resource", None)  # only the SDK's provider has one
    value = getattr(resource, "attributes", {}).get(SERVICE_INSTANCE_ID)
    return str(value) if value else None


def _from_resource_attributes(environ: Mapping[str, str]) -> str | None:
    # OTEL_RESOURCE_ATTRIBUTES is key=value pairs separated by commas (values may be %-encoded).
    for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = pair.partition("=")
        if key.strip() == SERVICE_INSTANCE_ID and value.strip():
            from urllib.parse import unquote  # only here: it costs a CLI command its start

            return unquote(value.strip())
    return None


def resource_instance_id(environ: Mapping[str, str]) -> str | None:
    """The ``service.instance.id`` this process's telemetry carries, when there is one."""
    return _from_tracer_provider() or _from_resource_attributes(environ)


def default_instance(environ: Mapping[str, str]) -> str:
    """The instance name when ``OTEL_CANCEL_INSTANCE`` is unset: the resource's id, else ``{hostname}-{pid}``."""
    return resource_instance_id(environ) or f"{socket.gethostname()}-{os.getpid()}"


def forked_instance(environ: Mapping[str, str], inherited: str) -> str:
    """The default instance name of a forked child whose parent had named itself ``inherited``.

    A child forked from a process that had set up otel-cancel (gunicorn ``--preload``)
    inherits its parent's tracer provider, and with it the parent's
    ``service.instance.id``, which its siblings share too: the resource's id names the
    child only when the SDK was set up again in it (a ``post_fork`` hook); otherwise
    ``{hostname}-{pid}``, so each child writes its own receipts and live-work record.
    """
    own = resource_instance_id(environ)
    return own if own and own != inherited else f"{socket.gethostname()}-{os.getpid()}"
