"""The CLI's own telemetry: the ``otel_cancel.request`` span and counter, exported over OTLP.

Set up only when the environment asks for OTLP export and the SDK is installed.
A CLI must not hang on a collector that is down: each export gets a short
deadline (``OTEL_EXPORTER_OTLP_TIMEOUT`` when set to a positive number of seconds,
at most a day; else one second), traces and metrics are flushed side by side, and
export failures become one line on stderr instead of the exporter's log of every retry.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

# Above this, the cancel (already written) would wait on a collector that does not answer.
_DEFAULT_EXPORT_TIMEOUT_SECONDS = 1.0
_LONGEST_EXPORT_TIMEOUT_SECONDS = 86400.0
_EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp", "opentelemetry.sdk.trace.export", "opentelemetry.sdk.metrics")


def _report_export_failures_in_one_line() -> None:
    """Collapse the exporters' failure logs into one line on stderr."""
    # logging is imported here, when telemetry is exported: it costs every command start-up time.
    import logging

    class OneLineReport(logging.Handler):
        def __init__(self) -> None:
            super().__init__(level=logging.WARNING)
            self.reported = False

        def emit(self, record: logging.LogRecord) -> None:
            if self.reported:
                return
            self.reported = True
            endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "the default OTLP endpoint")
            print(
                f"otel-cancel: could not export telemetry to {endpoint} (the cancel itself is done)",
                file=sys.stderr,
                flush=True,
            )

    report = OneLineReport()
    for name in _EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(report)
        logger.propagate = False


class CliTelemetry:
    """The tracer and meter providers of one CLI run; :meth:`shutdown` flushes both."""

    def __init__(self, tracer_provider: Any, meter_provider: Any, timeout_seconds: float) -> None:
        self._providers = (tracer_provider, meter_provider)
        self._timeout_ms = timeout_seconds * 1000

    def shutdown(self) -> None:
        """Flush and close both providers side by side, each within the export deadline."""
        import threading

        tracer_provider, meter_provider = self._providers
        threads = [
            # Its exporter already holds the deadline (TracerProvider.shutdown takes none).
            threading.Thread(target=tracer_provider.shutdown, daemon=True),
            threading.Thread(target=meter_provider.shutdown, kwargs={"timeout_millis": self._timeout_ms}, daemon=True),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            # A little over the deadline: an exporter that overruns it is left behind (daemon thread).
            thread.join(self._timeout_ms / 1000 + 0.5)


def _export_timeout() -> float:
    raw = os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    try:
        # The OpenTelemetry variable is in seconds in the Python exporters.
        timeout = float(raw) if raw else _DEFAULT_EXPORT_TIMEOUT_SECONDS
    except ValueError:
        return _DEFAULT_EXPORT_TIMEOUT_SECONDS
    # float() also reads "inf", "nan" and numbers no deadline can be: waiting on them
    # would raise (inf, nan) or fail the exporter's thread (0 and below) after the
    # cancel was written. Such a value counts as unset; a finite one past what a
    # thread can wait for (about 292 years) is held to a day.
    if not math.isfinite(timeout) or timeout <= 0:
        return _DEFAULT_EXPORT_TIMEOUT_SECONDS
    return min(timeout, _LONGEST_EXPORT_TIMEOUT_SECONDS)


def export_if_configured() -> CliTelemetry | None:
    """Set up OTLP span and metric export when the environment asks for it and the SDK is installed."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "")
    if exporter.strip().lower() != "otlp":
        return None
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return None
    _report_export_failures_in_one_line()
    timeout = _export_timeout()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "otel-cancel-cli"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(timeout=timeout)))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(timeout=timeout), export_timeout_millis=timeout * 1000)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)
    return CliTelemetry(tracer_provider, meter_provider, timeout)
