"""Every dashboard query works against a real Prometheus that scrapes real services directly.

Two auto-instrumented services (edge A, internal B) export their metrics with
``OTEL_METRICS_EXPORTER=prometheus``; Debian's Prometheus server (unpacked by
``.ci/install-system-deps``) scrapes them every second. After two rounds of real
cancels (one by the CLI, one by a client leaving the edge), a late hop and a
malformed baggage, each dashboard query is evaluated through Prometheus's HTTP
API and must return the series its panel shows, labelled by service and, per
instance, by the same ids the receipts carry. The span-metrics panels need the
collector's spanmetrics connector, and the bulk-cancel panel counts what the
CLI requests (the CLI exports over OTLP only): both are left out here (no collector binary is
available from the package registries); tests/telemetry/test_deploy_assets.py checks their
names against the collector's configuration.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import cli
from system_tools import system_tool

from otel_cancel.testing import ManagedProcess, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "otel-cancel.json"
# Windows long enough that two rounds of cancels a few seconds apart keep every rate above zero.
VARIABLES = {"__rate_interval": "5m", "__range": "10m", "service": ".*"}
SERVICES = {"service-A", "service-B"}


def _substitute(expr: str) -> str:
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", lambda m: VARIABLES[m.group(1) or m.group(2)], expr)


def dashboard_queries() -> list[tuple[dict[str, Any], str]]:
    """``(panel, expression)`` for every Prometheus target, and the service variable as Grafana runs it."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        found.append(({"id": f"${variable['name']}", "title": "variable"}, f"group by ({match[2]}) ({match[1]})"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((panel, _substitute(target["expr"])))
    return found


class Prometheus:
    """A Prometheus server scraping ``targets`` every second, on loopback, with its data in ``directory``."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        self.port = free_port()
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: services\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.process = ManagedProcess(
            [
                system_tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            name="prometheus",
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def diagnosis(self) -> str:
        """The scrape targets' state and the server's last log lines, for a failure message."""
        try:
            targets = httpx.get(f"{self.url}/api/v1/targets", timeout=5).text
        except httpx.HTTPError as error:
            targets = f"(no answer: {error})"
        return f"targets: {targets[:2000]}; log: {self.process.lines[-5:]}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    async def until(self, expr: str, holds: Callable[[list[dict[str, Any]]], bool], timeout: float = 60) -> None:
        """Wait until the result of ``expr`` satisfies ``holds``; fail with the last result and the targets."""
        last: object = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        last = self.query(expr)
                        if holds(last):
                            return
                    except (httpx.HTTPError, ValueError) as error:
                        last = error  # not listening, or not ready (a plain-text 503)
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise AssertionError(f"{expr} never held; last {last}; {self.diagnosis()}") from None


def _total(result: list[dict[str, Any]]) -> float:
    return sum(float(series["value"][1]) for series in result)


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


async def _cancel_round(chain, env: dict[str, str], client: httpx.AsyncClient) -> list[str]:
    """One cancel by the CLI, one by a client leaving the edge, a late hop and a malformed baggage; the roots."""
    roots = []
    for how in ("cli", "disconnect"):
        request = client.build_request("GET", f"{chain.urls(0)[0]}/stream", params={"tokens": 400, "interval": 0.05})
        response = await client.send(request, stream=True)
        root = response.headers["otel-cancel-root"]
        async with asyncio.timeout(30):
            while len(chain.lines("START", root)) < 2:
                await asyncio.sleep(0.05)
        if how == "cli":
            subprocess.run(cli("cancel", root), env={**os.environ, **env}, check=True, capture_output=True)
        await response.aclose()  # the client leaves: at the edge this cancels the root (if not already)
        async with asyncio.timeout(30):
            while len(chain.lines("STOPPED", root)) < 2:
                await asyncio.sleep(0.05)
        roots.append(root)
    late = await client.get(f"{chain.urls(1)[0]}/work", headers={"baggage": f"otel_cancel.root={roots[0]}"})
    assert late.status_code == 409
    malformed = await client.get(f"{chain.urls(1)[0]}/work", headers={"baggage": "otel_cancel.root=not-a-root"})
    assert malformed.status_code == 200
    return roots


def _receipts(roots: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    receipts = []
    for root in roots:
        status = subprocess.run(
            cli("status", root, "--json"), env={**os.environ, **env}, capture_output=True, text=True, check=True
        )
        receipts += json.loads(status.stdout)["receipts"]
    return receipts


async def test_every_dashboard_query_returns_its_series_from_a_direct_scrape(chain, etcd_env, prometheus_dir):
    """Each panel's query, run by Prometheus on directly scraped services, returns series labelled as it shows them."""
    metrics_ports = {"A": free_port(), "B": free_port()}
    env = {**etcd_env, "OTEL_METRICS_EXPORTER": "prometheus", "OTEL_CANCEL_WATCHDOG_SECONDS": "1"}
    level_env = {
        level: {"OTEL_EXPORTER_PROMETHEUS_PORT": str(port), "OTEL_CANCEL_INSTANCE": ""}
        for level, port in metrics_ports.items()
    }
    chain.start(env, levels=("A", "B"), module="chain_app", auto_instrument=True, replicas=1, level_env=level_env)
    prometheus = Prometheus(prometheus_dir, [f"127.0.0.1:{p}" for p in metrics_ports.values()])
    try:
        await prometheus.until("sum(up)", lambda r: _total(r) == 2)
        roots = []
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(2):  # two rounds, so every counter has grown between two scrapes
                roots += await _cancel_round(chain, env, client)
                # Prometheus has scraped every receipt the processes report (status is the source of truth).
                written = len(_receipts(roots, env))
                await prometheus.until("sum(otel_cancel_receipts_total)", lambda r, n=written: _total(r) == n)
        instances = {r["instance"] for r in _receipts(roots, env)}
        assert len(instances) == 2  # one per process: the ids its telemetry carries (see below)

        checked = 0
        for panel, expr in dashboard_queries():
            if "traces_span_metrics" in expr:
                continue  # needs the collector's spanmetrics connector
            if "otel_cancel_bulk_cancels_total" in expr:
                continue  # counted by the canceller (the CLI), which only the collector path collects
            result = prometheus.query(expr)
            where = f"panel {panel['id']} {panel['title']!r}: {expr}"
            assert result, f"no series for {where}"
            for series in result:
                labels = series["metric"]
                if "service_name" in labels or "service_name" in expr.split("(")[0] + expr[: expr.find("(")]:
                    assert labels.get("service_name") in SERVICES, (where, labels)
                if "service_instance_id" in labels:
                    assert labels["service_instance_id"] in instances, (where, labels, instances)
            grouped_by_service = re.match(
                r"\s*(sum|max|histogram_quantile\([^,]+,\s*sum) by \(([^)]*service_name)", expr
            )
            if grouped_by_service:
                assert all(s["metric"].get("service_name") in SERVICES for s in result), where
            checked += 1
        assert checked >= 14

        # The panels that count cancels show real counts, one per root per process (nested scopes count once).
        by_reason = prometheus.query(_substitute(_panel_expr(7)))
        assert {s["metric"]["service_name"] for s in by_reason} == SERVICES
        late = prometheus.query(_substitute(_panel_expr(11)))
        assert {s["metric"]["service_name"] for s in late} == {"service-B"}
        per_instance = prometheus.query(_substitute(_panel_expr(13)))
        assert {s["metric"]["service_instance_id"] for s in per_instance} == instances
        cancellations = prometheus.query("sum(otel_cancel_cancellations_total)")
        # Each process that reported stopping a root counted that root once.
        assert _total(cancellations) == len(_receipts(roots, env))
        # Every replica applies every flag, held work or not: the slowest has applied them all,
        # and the flags-applied panel shows each instance.
        await prometheus.until("min(otel_cancel_flags_applied_total)", lambda r: _total(r) >= len(roots))
        applied = prometheus.query(_substitute(_panel_expr(24)))
        assert {s["metric"]["service_instance_id"] for s in applied} == instances
    finally:
        prometheus.process.stop()


def _panel_expr(panel_id: int) -> str:
    dashboard = json.loads(DASHBOARD.read_text())
    [panel] = [p for p in dashboard["panels"] if p["id"] == panel_id]
    return str(panel["targets"][0]["expr"])


def test_the_collector_image_version_is_the_same_everywhere():
    """The collector's README, the compose file and the Kubernetes manifest name one image version."""
    root = DASHBOARD.parent.parent
    files = [root / "collector" / "README.md", root / "deploy" / "docker-compose.yaml"]
    files += [root / "deploy" / "k8s" / "otel-collector.yaml"]
    versions = {
        match for path in files for match in re.findall(r"opentelemetry-collector-contrib:([\w.]+)", path.read_text())
    }
    assert len(versions) == 1, versions
