"""Metrics count what their help text says: one cancel per root per process, no empty-label series."""

from __future__ import annotations

import json
import subprocess

from conftest import python_worker

from otel_cancel import attributes


def _points(roots: int) -> list[dict]:
    result = subprocess.run(
        python_worker("nested_scopes_metrics", str(roots)), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_a_root_stopped_in_nested_scopes_counts_once():
    """Three roots, each stopped in a request scope and a scope inside it: 3 cancellations, 3 latencies."""
    points = _points(3)
    cancellations = [p for p in points if p["name"] == attributes.METRIC_CANCELLATIONS]
    latencies = [p for p in points if p["name"] == attributes.METRIC_PROPAGATION_LATENCY]
    assert sum(p["value"] for p in cancellations) == 3
    assert sum(p["value"] for p in latencies) == 3


def test_labelled_counters_have_no_series_without_labels():
    """Counters labelled by reason or kind never carry a point without those labels."""
    points = _points(1)
    for name in (attributes.METRIC_CANCELLATIONS, attributes.METRIC_LATE_ARRIVALS):
        assert all(p["attributes"] for p in points if p["name"] == name), [p for p in points if p["name"] == name]
    assert any(p["name"] == attributes.METRIC_CANCELLATIONS for p in points)
