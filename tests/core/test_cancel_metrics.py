"""otel_cancel.testing.CancelMetrics: a test reads otel-cancel's own metrics instead of counters on its objects."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from debug_service import EVENT_TIMEOUT, hold_scope

import otel_cancel
from otel_cancel._core.root import random_root
from otel_cancel.attributes import METRIC_FLAGS_APPLIED, METRIC_RECEIPTS, METRIC_REQUESTS, METRIC_SCOPES_ACTIVE
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytestmark = pytest.mark.anyio


async def test_each_cancelled_root_counts_one_flag_applied_and_one_receipt(cancel_metrics):
    """Two roots held and cancelled here: two flags applied, two receipts; cancelling one again counts nothing."""
    with configured(store=MemoryCancelStore(), service="svc", instance="one") as runtime:
        roots = [random_root(), random_root()]
        tasks = [await hold_scope(root) for root in roots]
        applied, receipts = cancel_metrics.total(METRIC_FLAGS_APPLIED), cancel_metrics.total(METRIC_RECEIPTS)
        for root in roots:
            assert (await otel_cancel.cancel(root, reason="test")).created
        for task in tasks:
            with pytest.raises(otel_cancel.Cancelled):
                await asyncio.wait_for(task, EVENT_TIMEOUT)
        for root in roots:
            assert await runtime.wait_receipt(root, EVENT_TIMEOUT)
        assert not (await otel_cancel.cancel(roots[0], reason="again")).created
        assert cancel_metrics.total(METRIC_FLAGS_APPLIED) - applied == len(roots)
        assert cancel_metrics.total(METRIC_RECEIPTS) - receipts == len(roots)


def test_a_process_with_a_meter_provider_of_its_own_is_told_to_pass_its_reader():
    """CancelMetrics() cannot install a second meter provider: it says so and how to pass a reader instead."""
    probe = (
        "from opentelemetry import metrics\n"
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
        "from otel_cancel._core import telemetry\n"
        "from otel_cancel.testing import CancelMetrics\n"
        "reader = InMemoryMetricReader()\n"
        "metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))\n"
        "try:\n"
        "    CancelMetrics()\n"
        "except RuntimeError as error:\n"
        "    print('REFUSED', error)\n"
        "telemetry.observe_flags_applied(lambda: 3)\n"
        "print('APPLIED', CancelMetrics(reader).total('otel_cancel.flags.applied'))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert "REFUSED this process already has an OpenTelemetry meter provider" in result.stdout
    assert "CancelMetrics(reader)" in result.stdout
    assert "APPLIED 3" in result.stdout


async def test_scopes_active_reports_the_scopes_live_now(cancel_metrics):
    """otel_cancel.scopes.active, read at collection, is the number of scopes live in the process at that moment."""
    with configured(store=MemoryCancelStore(), service="svc", instance="one"):
        tasks = [await hold_scope(random_root()) for _ in range(3)]
        assert cancel_metrics.total(METRIC_SCOPES_ACTIVE) == 3
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert cancel_metrics.total(METRIC_SCOPES_ACTIVE) == 0


async def test_cancel_current_counts_its_request_though_it_stops_its_own_caller(cancel_metrics):
    """cancel_current() inside the scope it cancels: the caller is stopped, and its flag still counts one request."""
    with configured(store=MemoryCancelStore(), service="svc", instance="one") as runtime:
        requests = cancel_metrics.total(METRIC_REQUESTS)
        with pytest.raises(otel_cancel.Cancelled):
            async with otel_cancel.scope():
                await otel_cancel.cancel_current("guardrail")
        store = runtime.watcher.submit(runtime.watcher.store()).result(EVENT_TIMEOUT)
        assert len((await store.list_flags()).flags) == 1
        assert cancel_metrics.total(METRIC_REQUESTS) - requests == 1
