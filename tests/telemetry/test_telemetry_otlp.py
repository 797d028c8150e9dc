"""Spans and metrics really leave the processes over OTLP, and land where Jaeger needs them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import httpx
import pytest
from conftest import cli
from otlp_receiver import OtlpReceiver

from otel_cancel import attributes
from otel_cancel.testing import wait_for_output

pytestmark = pytest.mark.anyio

STATUS_ERROR = 2


@pytest.fixture
def receiver():
    started = OtlpReceiver().start()
    yield started
    started.stop()


def _spans(received, name, trace_id):
    return [s for s in received.spans if s.name == name and s.trace_id == trace_id]


async def test_a_cancel_in_the_chain_shows_up_as_one_trace_with_every_stop(chain, receiver, etcd_env):
    """The trace holds the request span and one otel_cancel.cancelled span per stopped process, under its work span."""
    env = {**etcd_env, **receiver.env()}
    chain.start(env, module="chain_app", auto_instrument=True, replicas=1)
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.send(
            client.build_request("GET", f"{chain.urls(0)[0]}/stream", params={"tokens": 100}), stream=True
        )
        root = response.headers["otel-cancel-root"]
        await asyncio.to_thread(wait_for_output, lambda: len(chain.lines("START", root)) == 3, 30)
        result = subprocess.run(
            cli("cancel", root, "--reason", "traced"),
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        [line async for line in response.aiter_lines()]
        await response.aclose()
        # A late hop for the same root, straight to C: refused, and recorded too.
        late = await client.get(f"{chain.urls(2)[0]}/work", headers={"baggage": f"otel_cancel.root={root}"})
        assert late.status_code == 409

    def complete(received):
        return (
            len(_spans(received, attributes.SPAN_CANCELLED, root)) == 3
            and _spans(received, attributes.SPAN_REQUEST, root)
            and [
                s for s in received.spans if s.name == attributes.SPAN_REFUSED and s.attributes[attributes.ROOT] == root
            ]
        )

    await asyncio.to_thread(receiver.wait_for, complete, 30, "the cancel's spans")
    received = receiver.received
    (request_span,) = _spans(received, attributes.SPAN_REQUEST, root)
    assert request_span.attributes[attributes.ROOT] == root and request_span.attributes[attributes.REASON] == "traced"
    by_id = {s.span_id: s for s in received.spans}
    stops = _spans(received, attributes.SPAN_CANCELLED, root)
    assert {s.service for s in stops} == {"service-A", "service-B", "service-C"}
    for stop in stops:
        parent = by_id.get(stop.parent_span_id)
        assert parent is not None and parent.service == stop.service and parent.trace_id == root
        if stop.attributes.get(attributes.BEFORE_FLAG):
            # Its caller hung up before this hop saw the flag: the work span had already ended
            # (not as an error); the stop is still in the trace, under it.
            assert parent.status_code != STATUS_ERROR
        else:
            assert parent.status_code == STATUS_ERROR and "cancelled" in parent.status_message
        assert stop.attributes[attributes.REASON] == "traced"
        assert stop.attributes[attributes.KIND] == attributes.KIND_EXPLICIT
        assert stop.attributes[attributes.LATENCY_MS] >= 0
    # The edge's work is stopped by the flag itself: nobody hangs up on it first.
    (edge_stop,) = [s for s in stops if s.service == "service-A"]
    assert not edge_stop.attributes.get(attributes.BEFORE_FLAG)
    assert sorted(s.attributes[attributes.DEPTH] for s in stops) == [0, 1, 2]

    documented = {
        attributes.METRIC_CANCELLATIONS,
        attributes.METRIC_PROPAGATION_LATENCY,
        attributes.METRIC_SCOPES_ACTIVE,
        attributes.METRIC_LATE_ARRIVALS,
        attributes.METRIC_WATCH_RECONNECTS,
        attributes.METRIC_WATCH_CONNECTED,
    }
    await asyncio.to_thread(
        receiver.wait_for, lambda r: documented <= r.metrics.get("service-C", set()), 30, "the documented metrics"
    )


async def test_a_one_second_deadline_stops_every_level_at_about_one_second(chain, receiver, etcd_env):
    """The edge sets a 1 s budget; the leaf would run 5 s; every level stops after 1 s with reason deadline."""
    env = {**etcd_env, **receiver.env()}
    chain.start(env, module="chain_app", auto_instrument=True, replicas=1)
    async with httpx.AsyncClient(timeout=60) as client:
        started = time.monotonic()
        response = await client.send(
            client.build_request(
                "GET",
                f"{chain.urls(0)[0]}/stream",
                params={"tokens": 100, "interval": 0.05},
                headers={"otel-cancel-timeout": "1s"},
            ),
            stream=True,
        )
        root = response.headers["otel-cancel-root"]
        lines = [line async for line in response.aiter_lines() if line]
        elapsed = time.monotonic() - started
    assert lines[-2] == "event: otel-cancel" and '"error": "deadline_exceeded"' in lines[-1]
    await asyncio.to_thread(wait_for_output, lambda: len(chain.lines("STOPPED", root)) == 3, 10)
    # Stopped by the budget, not by finishing: after 1 s, long before the 5 s of work.
    assert 1.0 <= elapsed < 4.0, elapsed
    await asyncio.to_thread(
        receiver.wait_for, lambda r: len(_spans(r, attributes.SPAN_CANCELLED, root)) == 3, 30, "deadline spans"
    )
    stops = _spans(receiver.received, attributes.SPAN_CANCELLED, root)
    assert {s.attributes[attributes.REASON] for s in stops} == {"deadline"}
    assert {s.attributes[attributes.KIND] for s in stops} == {attributes.KIND_DEADLINE}
    print("deadline stop lateness by service (ms):", {s.service: s.attributes[attributes.LATENCY_MS] for s in stops})
