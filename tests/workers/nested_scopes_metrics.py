"""Cancel roots whose work runs in nested scopes; print the process's metric points as JSON.

Args: the number of roots. Each root's work is a request scope with a scope inside
it (the README's pattern); all are cancelled, then the in-memory reader is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

import otel_cancel  # noqa: E402 - after the provider, like an instrumented process
from otel_cancel.store.memory import MemoryCancelStore  # noqa: E402
from otel_cancel.testing import configured  # noqa: E402


async def nested(ready: asyncio.Future[str]) -> None:
    # A scope inside a scope (as a handler's scope inside the request's): one statement, still nested.
    async with otel_cancel.scope(name="request") as outer, otel_cancel.scope(name="answer"):
        ready.set_result(outer.root)
        await asyncio.Event().wait()


async def main(count: int) -> None:
    loop = asyncio.get_running_loop()
    with configured(store=MemoryCancelStore(), service="svc", instance="one"):
        for _ in range(count):
            ready: asyncio.Future[str] = loop.create_future()
            task = asyncio.create_task(nested(ready))
            root = await asyncio.wait_for(ready, 5)
            await otel_cancel.cancel(root, reason="user: stop")
            with contextlib.suppress(otel_cancel.Cancelled):
                await asyncio.wait_for(task, 5)
    points = []
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else []:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count  # histogram: how many values were recorded
                    points.append({"name": metric.name, "attributes": dict(point.attributes), "value": value})
    print(json.dumps(points), flush=True)


asyncio.run(main(int(sys.argv[1])))
