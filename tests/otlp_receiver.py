"""A test OTLP receiver on loopback (gRPC), built on opentelemetry-proto.

Services export to it with ``OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:<port>``;
tests read the spans and metric names it received and await them with timeouts.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from otel_cancel.testing import free_port


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]
    status_code: int
    status_message: str
    start_ns: int
    end_ns: int


@dataclass
class Received:
    spans: list[ReceivedSpan] = field(default_factory=list)
    metrics: dict[str, set[str]] = field(default_factory=dict)  # service -> metric names
    instances: dict[str, set[str]] = field(default_factory=dict)  # service -> service.instance.id values


def _value(any_value) -> object:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """Collects OTLP spans and metrics in memory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received = Received()
        self._changed = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def Export(self, request, context):
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self._take_spans(request)
            return trace_service_pb2.ExportTraceServiceResponse()
        self._take_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def _service(self, resource) -> str:
        for attribute in resource.attributes:
            if attribute.key == "service.name":
                return str(_value(attribute.value))
        return "?"

    def _note_instance(self, service: str, resource) -> None:
        for attribute in resource.attributes:
            if attribute.key == "service.instance.id":
                self.received.instances.setdefault(service, set()).add(str(_value(attribute.value)))

    def _take_spans(self, request) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            service = self._service(resource_spans.resource)
            with self._changed:
                self._note_instance(service, resource_spans.resource)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                            status_message=span.status.message,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self._changed:
            self.received.spans.extend(spans)
            self._changed.notify_all()

    def _take_metrics(self, request) -> None:
        with self._changed:
            for resource_metrics in request.resource_metrics:
                self._note_instance(self._service(resource_metrics.resource), resource_metrics.resource)
                names = self.received.metrics.setdefault(self._service(resource_metrics.resource), set())
                for scope_metrics in resource_metrics.scope_metrics:
                    names.update(metric.name for metric in scope_metrics.metrics)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[Received], bool], timeout: float = 30.0, what: str = "telemetry") -> None:
        """Block until ``predicate(received)`` holds, re-checked on every export."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.received), timeout):
                # Say what did arrive, so a failure tells which part was missing.
                seen = sorted(
                    Counter((s.service, s.name) for s in self.received.spans if "otel_cancel" in s.name).items()
                )
                raise TimeoutError(f"{what} not received within {timeout}s; otel_cancel spans received: {seen}")

    def env(self) -> dict[str, str]:
        """Environment that makes an instrumented service export here, quickly."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
        }
