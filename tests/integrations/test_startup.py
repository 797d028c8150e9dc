"""A service with an invalid OTEL_CANCEL_* setting does not serve, under opentelemetry-instrument too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from chain import SERVICES

from otel_cancel.exceptions import ConfigurationError
from otel_cancel.instrumentation import OtelCancelInstrumentor
from otel_cancel.testing import free_port

_INSTRUMENT = os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OTEL_CANCEL_PREFIX", "no-slashes"), ("OTEL_CANCEL_TRUST_INCOMING", "maybe"), ("OTEL_CANCEL_TTL_SECONDS", "-1")],
)
def test_an_auto_instrumented_service_with_an_invalid_setting_stops_at_start_up(variable, value):
    """opentelemetry-instrument uvicorn exits 2 before serving, with one line that names the variable."""
    env = {
        **os.environ,
        variable: value,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "PYTHONPATH": SERVICES,
    }
    command = [_INSTRUMENT, sys.executable, "-m", "uvicorn", "chain_app:app", "--port", str(free_port())]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"otel-cancel: {variable}")
    assert "Uvicorn running" not in result.stdout + result.stderr


def test_instrument_called_by_the_application_raises_the_configuration_error(monkeypatch):
    """An application calling instrument() itself gets ConfigurationError, its process is not ended."""
    monkeypatch.setenv("OTEL_CANCEL_PREFIX", "no-slashes")
    with pytest.raises(ConfigurationError, match="OTEL_CANCEL_PREFIX"):
        OtelCancelInstrumentor().instrument()
