"""otel-cancel's own etcd calls never show up as traces of the user's service."""

from __future__ import annotations

import importlib.util

import httpx
import pytest
from otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.anyio


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.instrumentation.grpc") is None,
    reason="needs opentelemetry-instrumentation-grpc (the dev extra installs it)",
)
async def test_an_idle_instrumented_service_exports_no_spans_of_its_etcd_calls(chain, etcd_env):
    """With the gRPC instrumentation on, the watch, the watchdog's pings and listings record no spans."""
    receiver = OtlpReceiver().start()
    try:
        env = {**etcd_env, **receiver.env(), "OTEL_CANCEL_WATCHDOG_SECONDS": "0.1"}
        chain.start(env, levels=("A",), module="chain_app", auto_instrument=True, replicas=1)
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"{chain.urls(0)[0]}/work")
        root = response.headers["otel-cancel-root"]
        # The request's own trace arrives: export works and the gRPC instrumentation is loaded.
        receiver.wait_for(lambda r: any(s.trace_id == root for s in r.spans), what="the request's spans")

        def grpc_spans(received):
            return [s for s in received.spans if s.attributes.get("rpc.system") == "grpc" or "etcdserverpb" in s.name]

        # Dozens of watchdog pings happen in this window; none may be traced.
        with pytest.raises(TimeoutError):
            receiver.wait_for(lambda r: bool(grpc_spans(r)), timeout=3, what="gRPC spans")
        assert not grpc_spans(receiver.received)
    finally:
        receiver.stop()
