"""Checks of the observability and deployment assets.

Nothing here starts a container. Each file is checked by the tool or schema that
would read it, and against the telemetry names the library really emits:

- ``collector/otelcol.yaml``: every component is defined and used, connectors
  join two pipelines;
- ``dashboards/``: the dashboard parses, every data source it names is
  provisioned, every PromQL expression passes ``promtool`` and queries only
  series the library (``otel_cancel.attributes.METRIC_NAMES``) or the
  collector's spanmetrics connector produces;
- ``deploy/docker-compose.yaml``: valid against the vendored compose-spec schema;
- ``deploy/k8s/``: the kustomization, rendered here, passes
  ``kubernetes-validate --strict``.

System tool: ``promtool`` (Debian package ``prometheus``), unpacked into ``.tools/``
by ``.ci/install-system-deps``. Python: ``jsonschema``, ``kubernetes-validate``.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from system_tools import system_tool

from otel_cancel import attributes

ROOT = Path(__file__).resolve().parents[2]
COLLECTOR_CONFIG = ROOT / "collector" / "otelcol.yaml"
DASHBOARDS = ROOT / "dashboards"
DATASOURCES = DASHBOARDS / "provisioning" / "datasources" / "datasources.yaml"
DASHBOARD_PROVIDERS = DASHBOARDS / "provisioning" / "dashboards" / "dashboards.yaml"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yaml"
COMPOSE_SCHEMA = DEPLOY / "compose-spec.schema.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
KUSTOMIZE_DIR = DEPLOY / "k8s"

KUBERNETES_VERSION = "1.31.0"
"""Kubernetes API version the manifests are validated against."""

AGENTS = {
    # service: (AGENT_ROLE, NEXT_AGENT_URL, OTEL_CANCEL_TRUST_INCOMING)
    "supervisor": ("supervisor", "http://sub-agent:8000", "false"),
    "sub-agent": ("sub_agent", "http://sub-sub-agent:8000", "true"),
    "sub-sub-agent": ("sub_sub_agent", "", "true"),
}
"""The example chain: the supervisor is the edge, the two others are internal."""

AGENT_COMMAND = [
    "opentelemetry-instrument",
    "uvicorn",
    "examples.chain.app:app",
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
]

K8S_COPIES = {
    "otelcol.yaml": COLLECTOR_CONFIG,
    "prometheus.yml": PROMETHEUS_CONFIG,
    "datasources.yaml": DATASOURCES,
    "dashboards.yaml": DASHBOARD_PROVIDERS,
    "otel-cancel.json": DASHBOARDS / "otel-cancel.json",
}
"""deploy/k8s/files/NAME must equal its original (kustomize reads no file outside its directory)."""


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------
# Metric names: what the collector's prometheus exporter makes of them.
# --------------------------------------------------------------------------

PACKAGE = ROOT / "otel_cancel"

_INSTRUMENT_KINDS = {
    "create_counter": "counter",
    "create_observable_counter": "counter",
    "create_up_down_counter": "up_down_counter",
    "create_observable_up_down_counter": "up_down_counter",
    "create_histogram": "histogram",
    "create_gauge": "gauge",
    "create_observable_gauge": "gauge",
}
"""OTel meter methods and the kind of instrument each creates."""


def _constant(node: ast.expr | None) -> str:
    """The string a name or unit argument holds: a literal or an ``attributes.X`` constant."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "attributes":
        value = getattr(attributes, node.attr)
        assert isinstance(value, str)
        return value
    raise AssertionError(f"cannot read an instrument argument: {ast.unparse(node) if node else None}")


def emitted_instruments() -> dict[str, tuple[str, str]]:
    """Kind and unit of every instrument the package creates, read from its source.

    The kind and unit decide the Prometheus name, so they are taken from the
    ``meter.create_*`` calls themselves rather than written down a second time.
    """
    instruments: dict[str, tuple[str, str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _INSTRUMENT_KINDS
            ):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            name = _constant(node.args[0] if node.args else keywords.get("name"))
            unit = _constant(keywords["unit"]) if "unit" in keywords else ""
            instruments[name] = (_INSTRUMENT_KINDS[node.func.attr], unit)
    return instruments


_UNIT_WORDS = {"ms": "milliseconds", "s": "seconds", "By": "bytes"}


def prometheus_series(name: str, kind: str, unit: str) -> set[str]:
    """The series the collector's prometheus exporter exposes for one OTel metric.

    Mirrors the exporter's default naming (``add_metric_suffixes``): characters
    other than ``[a-zA-Z0-9_:]`` become ``_``, the unit (without ``{...}``
    annotations) is spelled out and appended, a gauge with unit ``1`` gets
    ``_ratio``, monotonic counters get ``_total``, histograms expose
    ``_bucket``, ``_sum`` and ``_count``.
    """
    base = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    unit = re.sub(r"\{[^}]*\}", "", unit)
    if unit == "1":
        suffix = "ratio" if kind == "gauge" else ""
    elif unit:
        suffix = _UNIT_WORDS[unit]
    else:
        suffix = ""
    if suffix and suffix not in base.split("_"):
        base = f"{base}_{suffix}"
    if kind == "counter":
        return {f"{base}_total"}
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def _collector() -> dict[str, Any]:
    config: dict[str, Any] = _load_yaml(COLLECTOR_CONFIG)
    return config


def spanmetrics_series() -> set[str]:
    """Series of the spanmetrics connector, named from its configured namespace and unit."""
    spanmetrics = _collector()["connectors"]["spanmetrics"] or {}
    namespace = spanmetrics.get("namespace", "traces.span.metrics")
    unit = spanmetrics.get("histogram", {}).get("unit", "ms")
    return prometheus_series(f"{namespace}.calls", "counter", "") | prometheus_series(
        f"{namespace}.duration", "histogram", unit
    )


def allowed_series() -> set[str]:
    """Every series name a dashboard may query."""
    # target_info: the resource attributes, which a direct scrape of a service exposes only there.
    series = set(spanmetrics_series()) | {"target_info"}
    instruments = emitted_instruments()
    for name in attributes.METRIC_NAMES:
        series |= prometheus_series(name, *instruments[name])
    return series


def _label(attribute: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", attribute)


FORBIDDEN_LABELS = {_label(attributes.ROOT)}
"""One series per run would grow Prometheus without bound: the root is never a label."""


def allowed_labels() -> set[str]:
    """Labels the series carry: resource attributes, metric attributes, spanmetrics dimensions."""
    spanmetrics = _collector()["connectors"]["spanmetrics"] or {}
    dimensions = {_label(d["name"]) for d in spanmetrics.get("dimensions", [])}
    metric_attributes = {
        _label(a) for a in (attributes.REASON, attributes.KIND, attributes.DEPTH, attributes.NODE, attributes.OUTCOME)
    }
    resource = {"service_name", "service_instance_id", "job", "instance"}
    return resource | metric_attributes | dimensions | {"le", "span_name", "span_kind", "status_code"}


ALLOWED_LABEL_VALUES = {
    _label(attributes.KIND): {attributes.KIND_EXPLICIT, attributes.KIND_DEADLINE},
    "span_name": {attributes.SPAN_REQUEST, attributes.SPAN_CANCELLED, attributes.SPAN_REFUSED},
}
"""Labels with a closed set of values: an exact matcher must use one of them."""


# --------------------------------------------------------------------------
# PromQL: a small lexer, enough to tell metric names from labels and functions.
# --------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<number>[0-9][0-9a-zA-Z_.]*|\.[0-9]+)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){}\[\],@])
    """,
    re.VERBOSE,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}
"""Aggregation operators: reserved words, followed by ``(`` or by ``by (...)``/``without (...)``."""
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"} | _GROUPING | _AGGREGATIONS


def promql_names(expr: str) -> tuple[set[str], set[str], list[tuple[str, str, str]]]:
    """Metric names, label names and label matchers ``(label, op, value)`` of a PromQL expression."""
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[position : position + 20]!r} in {expr!r}")
        assert match.lastgroup is not None
        if match.lastgroup not in ("space", "comment"):
            tokens.append((match.lastgroup, match.group()))
        position = match.end()

    metrics: set[str] = set()
    labels: set[str] = set()
    matchers: list[tuple[str, str, str]] = []
    braces = brackets = 0
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if text in "{}[]" and kind == "op":
            braces += {"{": 1, "}": -1}.get(text, 0)
            brackets += {"[": 1, "]": -1}.get(text, 0)
        elif kind == "ident" and braces:
            # A label matcher: name, operator, quoted value.
            operator, value = tokens[i + 1][1], tokens[i + 2][1][1:-1]
            if text == "__name__" and operator in ("=", "=~"):
                metrics.update(value.split("|") if operator == "=~" else {value})
            else:
                labels.add(text)
                matchers.append((text, operator, value))
            i += 3
            continue
        elif kind == "ident" and text.lower() in _GROUPING and following == "(":
            i += 2
            while tokens[i][1] != ")":
                if tokens[i][0] == "ident":
                    labels.add(tokens[i][1])
                i += 1
        elif kind == "ident" and not brackets and following != "(" and text.lower() not in _KEYWORDS:
            metrics.add(text)
        i += 1
    return metrics, labels, matchers


# --------------------------------------------------------------------------
# Dashboards and the PromQL they hold.
# --------------------------------------------------------------------------

GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
"""Concrete values for Grafana's interval variables, so promtool sees plain PromQL."""


def _datasources() -> list[dict[str, Any]]:
    datasources: list[dict[str, Any]] = _load_yaml(DATASOURCES)["datasources"]
    return datasources


def _provisioned_types() -> dict[str, str]:
    return {d["uid"]: d["type"] for d in _datasources()}


def _dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def _dashboard(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return dashboard


def _panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in container.get("panels", []):
        yield panel
        yield from _panels(panel)  # rows hold their panels when collapsed


def _substitute(expr: str, variables: dict[str, str], source: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise AssertionError(f"{source}: unknown Grafana variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", replace, expr)


def _label_values_to_promql(query: str) -> str | None:
    """``label_values(metric, label)`` as the PromQL Grafana runs for it; ``None`` without a metric."""
    match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query)
    if match is None:
        if re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", query):
            return None
        return query  # query_result(...) and plain PromQL are not used; let promtool judge them
    return f"group by ({match.group(2)}) ({match.group(1)})"


def promql_expressions() -> list[tuple[str, str]]:
    """``(source, expression)`` for every PromQL query in the dashboards and data sources.

    Grafana variables are replaced by concrete values first: the interval
    variables by durations, each template variable by its "All" value.
    """
    types = _provisioned_types()
    found: list[tuple[str, str]] = []
    for path in _dashboard_files():
        dashboard = _dashboard(path)
        variables = dict(GRAFANA_BUILTINS)
        for variable in dashboard.get("templating", {}).get("list", []):
            variables[variable["name"]] = variable.get("allValue") or "value"
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") != "query" or types.get(_uid(variable.get("datasource"))) != "prometheus":
                continue
            query = variable["query"]
            query = query.get("query", "") if isinstance(query, dict) else query
            promql = _label_values_to_promql(query)
            if promql is not None:
                source = f"{path.name} variable {variable['name']}"
                found.append((source, _substitute(promql, variables, source)))
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                uid = _uid(target.get("datasource")) or _uid(panel.get("datasource"))
                if types.get(uid) == "prometheus" and target.get("expr"):
                    source = f"{path.name} panel {panel['id']} ({panel.get('title')!r}) target {target['refId']}"
                    found.append((source, _substitute(target["expr"], variables, source)))
    # Queries in the data source provisioning (Jaeger's links back to metrics).
    # "$$" escapes "$" in Grafana provisioning files; $__tags becomes matchers.
    for datasource in _datasources():
        for query in datasource.get("jsonData", {}).get("tracesToMetrics", {}).get("queries", []):
            source = f"{DATASOURCES.name} {datasource['uid']} query {query['name']!r}"
            text = query["query"].replace("$$", "$")
            found.append((source, _substitute(text, {"__tags": 'service_name="supervisor"'}, source)))
    return found


def _uid(datasource: Any) -> str:
    """The uid of a ``{"type": ..., "uid": ...}`` data source reference; ``""`` for anything else."""
    if isinstance(datasource, dict):
        uid = datasource.get("uid")
        return uid if isinstance(uid, str) else ""
    return ""


def _promtool() -> str:
    return system_tool("promtool")


# --------------------------------------------------------------------------
# Kubernetes: render the kustomization the way kustomize does for what we use.
# --------------------------------------------------------------------------

_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "generatorOptions", "configMapGenerator"}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize directory`` outputs, for the fields this repository uses.

    Supported: ``namespace``, ``resources`` (files), ``configMapGenerator``
    (``files``, ``literals``) with ``disableNameSuffixHash``. Anything else fails,
    so the rendering never silently differs from kustomize's.
    """
    kustomization = _load_yaml(directory / "kustomization.yaml")
    unsupported = set(kustomization) - _KUSTOMIZATION_FIELDS
    assert not unsupported, f"render_kustomization does not implement {sorted(unsupported)}; extend it"
    if kustomization.get("configMapGenerator"):
        assert kustomization.get("generatorOptions") == {"disableNameSuffixHash": True}, (
            "render_kustomization does not compute kustomize's name hashes: keep disableNameSuffixHash: true"
        )

    def inside(relative: str) -> Path:
        path = (directory / relative).resolve()
        # kustomize's load restrictor: nothing outside the kustomization's directory.
        assert path.is_relative_to(directory.resolve()), f"{relative} is outside {directory}"
        assert path.is_file(), f"{relative} is not a file in {directory}"
        return path

    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        text = inside(resource).read_text(encoding="utf-8")
        documents.extend(d for d in yaml.safe_load_all(text) if d)
    for generator in kustomization.get("configMapGenerator", []):
        assert set(generator) <= {"name", "files", "literals"}, f"unsupported generator fields in {generator}"
        data: dict[str, str] = {}
        for entry in generator.get("files", []):
            key, _, relative = entry.rpartition("=")
            path = inside(relative)
            data[key or path.name] = path.read_text(encoding="utf-8")
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        documents.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
        )
    namespace = kustomization.get("namespace")
    for document in documents:
        if namespace and document["kind"] not in _CLUSTER_SCOPED:
            document["metadata"]["namespace"] = namespace
    return documents


def _k8s_documents() -> list[dict[str, Any]]:
    return render_kustomization(KUSTOMIZE_DIR)


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for document in _k8s_documents():
        if document["kind"] == kind and document["metadata"]["name"] == name:
            return document
    raise AssertionError(f"no {kind} {name} in {KUSTOMIZE_DIR}")


def _workloads(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# ==========================================================================
# Collector
# ==========================================================================


def _pipeline_components(config: dict[str, Any]) -> dict[str, set[str]]:
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for pipeline in config["service"]["pipelines"].values():
        for section in used:
            used[section] |= set(pipeline.get(section, []))
    return used


def test_collector_pipelines_use_only_defined_components() -> None:
    """Every receiver, processor and exporter a pipeline names is defined (connectors count as both ends)."""
    config = _collector()
    connectors = set(config.get("connectors") or {})
    for section, names in _pipeline_components(config).items():
        defined = set(config.get(section) or {})
        if section in ("receivers", "exporters"):
            defined |= connectors
        assert names <= defined, f"{section} used but not defined: {sorted(names - defined)}"
    extensions = set(config["service"].get("extensions", []))
    assert extensions <= set(config.get("extensions") or {}), "service.extensions names an undefined extension"


def test_collector_defines_no_unused_component() -> None:
    """Every defined receiver, processor, exporter, connector and extension is used by the service."""
    config = _collector()
    used = _pipeline_components(config)
    for section in ("receivers", "processors", "exporters"):
        unused = set(config.get(section) or {}) - used[section]
        assert not unused, f"{section} defined but unused: {sorted(unused)}"
    for connector in config.get("connectors") or {}:
        assert connector in used["exporters"] or connector in used["receivers"], f"connector {connector} is unused"
    unused_extensions = set(config.get("extensions") or {}) - set(config["service"].get("extensions", []))
    assert not unused_extensions, f"extensions defined but not enabled: {sorted(unused_extensions)}"


def test_collector_connectors_join_two_pipelines() -> None:
    """Each connector is an exporter of one pipeline and a receiver of another (spanmetrics: traces to metrics)."""
    config = _collector()
    pipelines = config["service"]["pipelines"]
    for connector in config.get("connectors") or {}:
        exporting = {name for name, p in pipelines.items() if connector in p.get("exporters", [])}
        receiving = {name for name, p in pipelines.items() if connector in p.get("receivers", [])}
        assert exporting and receiving, f"connector {connector}: exported by {exporting}, received by {receiving}"
        assert exporting != receiving or len(exporting) > 1, f"connector {connector} loops on one pipeline"
    assert "spanmetrics" in pipelines["traces"]["exporters"]
    assert "spanmetrics" in pipelines["metrics"]["receivers"]


def test_collector_exports_as_the_deployment_expects() -> None:
    """OTLP in on 4317/4318, traces to jaeger:4317 (insecure), metrics on :8889 with resource labels."""
    config = _collector()
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    jaeger = config["exporters"]["otlp/jaeger"]
    assert jaeger["endpoint"] == "jaeger:4317"
    assert jaeger["tls"]["insecure"] is True
    prometheus = config["exporters"]["prometheus"]
    assert prometheus["endpoint"] == "0.0.0.0:8889"
    assert prometheus["resource_to_telemetry_conversion"]["enabled"] is True
    pipelines = config["service"]["pipelines"]
    assert "otlp/jaeger" in pipelines["traces"]["exporters"]
    assert "prometheus" in pipelines["metrics"]["exporters"]
    for pipeline in pipelines.values():
        assert pipeline["processors"][-1] == "batch", "batch runs last, just before the exporters"


def test_spanmetrics_never_labels_the_root() -> None:
    """The root id is not a spanmetrics dimension (one series per run would never end)."""
    spanmetrics = _collector()["connectors"]["spanmetrics"] or {}
    assert attributes.ROOT not in {d["name"] for d in spanmetrics.get("dimensions", [])}


# ==========================================================================
# Dashboards
# ==========================================================================


def test_prometheus_series_naming_follows_the_exporter() -> None:
    """OTel names map to Prometheus names as the collector's prometheus exporter does."""
    assert prometheus_series("otel_cancel.cancellations", "counter", "{cancellation}") == {
        "otel_cancel_cancellations_total"
    }
    assert prometheus_series("otel_cancel.propagation.latency", "histogram", "ms") == {
        "otel_cancel_propagation_latency_milliseconds_bucket",
        "otel_cancel_propagation_latency_milliseconds_sum",
        "otel_cancel_propagation_latency_milliseconds_count",
    }
    assert prometheus_series("otel_cancel.scopes.active", "up_down_counter", "{scope}") == {"otel_cancel_scopes_active"}
    assert prometheus_series("otel_cancel.watch.connected", "gauge", "") == {"otel_cancel_watch_connected"}
    assert prometheus_series("otel_cancel.watch.connected", "gauge", "1") == {"otel_cancel_watch_connected_ratio"}
    assert prometheus_series("http.duration", "histogram", "s") >= {"http_duration_seconds_bucket"}
    assert "traces_span_metrics_calls_total" in spanmetrics_series()
    assert "traces_span_metrics_duration_milliseconds_bucket" in spanmetrics_series()


def test_metric_names_match_the_instruments_the_code_creates() -> None:
    """METRIC_NAMES lists exactly the instruments the package creates, so each one's kind and unit are known."""
    assert set(emitted_instruments()) == set(attributes.METRIC_NAMES)


def test_promql_lexer_tells_metrics_from_labels_and_functions() -> None:
    """The PromQL reader finds metric names and labels, not functions, keywords or durations."""
    metrics, labels, matchers = promql_names(
        'sum by (service_name) (rate(foo_total{a="b", __name__="x"}[5m])) '
        "/ on (c) group_left (d) bar offset 5m and vector(0) > bool 0.99 "
        "or count(baz) without (e) or topk(3, max_over_time(qux[10m:1m]))"
    )
    assert metrics == {"foo_total", "x", "bar", "baz", "qux"}
    assert labels == {"service_name", "a", "c", "d", "e"}
    assert matchers == [("a", "=", "b")]


def test_dashboards_parse_with_stable_identity() -> None:
    """Each dashboard is JSON with a uid, a modern schemaVersion and unique panel ids."""
    files = _dashboard_files()
    assert [f.name for f in files] == ["otel-cancel.json"]
    for path in files:
        dashboard = _dashboard(path)
        assert dashboard["uid"] == path.stem
        assert 36 <= dashboard["schemaVersion"] <= 41
        ids = [panel["id"] for panel in _panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"


def test_dashboard_data_sources_are_provisioned() -> None:
    """Every panel, query, variable and data link names a data source uid that provisioning defines."""
    types = _provisioned_types()
    assert types == {"prometheus": "prometheus", "jaeger": "jaeger"}
    for path in _dashboard_files():
        dashboard = _dashboard(path)
        for variable in dashboard.get("templating", {}).get("list", []):
            if "datasource" in variable:
                assert _uid(variable["datasource"]) in types, f"{path.name} variable {variable['name']}"
        for panel in _panels(dashboard):
            where = f"{path.name} panel {panel['id']} ({panel.get('title')!r})"
            if panel["type"] == "row":
                continue
            datasource = panel.get("datasource")
            assert isinstance(datasource, dict), f"{where}: data source {datasource!r} is not a uid reference"
            assert _uid(datasource) in types, f"{where}: data source {datasource!r} is not provisioned"
            assert datasource["type"] == types[datasource["uid"]], f"{where}: type does not match provisioning"
            for target in panel.get("targets", []):
                if "datasource" in target:
                    assert _uid(target["datasource"]) in types, f"{where} target {target['refId']}"
            for link in panel.get("fieldConfig", {}).get("defaults", {}).get("links", []):
                if "internal" in link:
                    assert link["internal"]["datasourceUid"] in types, f"{where}: link {link['title']!r}"
    for datasource in _datasources():
        for destination in datasource.get("jsonData", {}).get("exemplarTraceIdDestinations", []):
            assert destination["datasourceUid"] in types
        traces_to_metrics = datasource.get("jsonData", {}).get("tracesToMetrics")
        if traces_to_metrics:
            assert traces_to_metrics["datasourceUid"] in types


def test_dashboard_leads_from_a_cancel_to_its_trace() -> None:
    """A Jaeger query for the otel_cancel.cancelled span, or a link to one, is on the dashboard."""
    dashboard = _dashboard(DASHBOARDS / "otel-cancel.json")
    jaeger_queries = [
        target
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        if _uid(target.get("datasource") or panel.get("datasource")) == "jaeger"
    ]
    jaeger_links = [
        link["internal"]["query"]
        for panel in _panels(dashboard)
        for link in panel.get("fieldConfig", {}).get("defaults", {}).get("links", [])
        if link.get("internal", {}).get("datasourceUid") == "jaeger"
    ]
    operations = {q.get("operation") for q in jaeger_queries + jaeger_links}
    assert attributes.SPAN_CANCELLED in operations
    exemplars = [t for p in _panels(dashboard) for t in p.get("targets", []) if t.get("exemplar")]
    assert exemplars, "no query shows exemplars (the trace-id links to Jaeger)"


def test_dashboard_has_a_service_variable() -> None:
    """The dashboard filters by a multi-value `service` variable drawn from service_name."""
    dashboard = _dashboard(DASHBOARDS / "otel-cancel.json")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    service = variables["service"]
    assert service["multi"] and service["includeAll"]
    assert "service_name" in json.dumps(service["query"])


def test_promql_expressions_pass_promtool(tmp_path: Path) -> None:
    """Every PromQL expression (variables substituted) parses and type-checks with promtool."""
    promtool = _promtool()
    expressions = promql_expressions()
    assert len(expressions) >= 10
    rules = [
        {"record": f"otel_cancel_dashboard:expr_{index}", "expr": expr} for index, (_, expr) in enumerate(expressions)
    ]
    rules_file = tmp_path / "dashboard-exprs.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=30, check=False
    )
    legend = "\n".join(f"  expr_{index}: {source}: {expr}" for index, (source, expr) in enumerate(expressions))
    assert result.returncode == 0, f"promtool rejected an expression:\n{result.stdout}{result.stderr}\n{legend}"
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_dashboards_query_only_series_the_code_emits() -> None:
    """Every metric name in every expression comes from METRIC_NAMES or the spanmetrics connector."""
    allowed = allowed_series()
    for source, expr in promql_expressions():
        metrics, _, _ = promql_names(expr)
        assert metrics, f"{source}: no metric in {expr!r}"
        unknown = metrics - allowed
        assert not unknown, f"{source}: {sorted(unknown)} is not emitted; allowed: {sorted(allowed)}"


def test_dashboards_use_only_labels_the_series_carry() -> None:
    """Labels come from resource and metric attributes; closed-set labels use known values; never the root."""
    allowed = allowed_labels()
    for source, expr in promql_expressions():
        _, labels, matchers = promql_names(expr)
        assert not labels & FORBIDDEN_LABELS, f"{source}: the root id is never a label"
        unknown = labels - allowed
        assert not unknown, f"{source}: unknown labels {sorted(unknown)}; allowed: {sorted(allowed)}"
        for label, operator, value in matchers:
            if label in ALLOWED_LABEL_VALUES and operator in ("=", "!="):
                assert value in ALLOWED_LABEL_VALUES[label], f"{source}: {label}={value!r} never occurs"


def test_grafana_loads_dashboards_from_the_mounted_path() -> None:
    """The dashboard provider reads /var/lib/grafana/dashboards, where compose and Kubernetes mount them."""
    providers = _load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_config_passes_promtool_and_scrapes_the_collector() -> None:
    """prometheus.yml passes `promtool check config` and scrapes the collector's prometheus exporter port."""
    result = subprocess.run(
        [_promtool(), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    port = _collector()["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    targets = [
        t
        for job in _load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
        for c in job["static_configs"]
        for t in c["targets"]
    ]
    assert f"otel-collector:{port}" in targets


# ==========================================================================
# docker compose
# ==========================================================================


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = _load_yaml(COMPOSE)
    return compose


def test_compose_file_matches_the_compose_spec_schema() -> None:
    """deploy/docker-compose.yaml is valid against the vendored compose-spec JSON schema."""
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(_compose()), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)


def test_compose_schema_rejects_an_unknown_service_key() -> None:
    """The vendored schema is strict: a misspelt service key is an error, not silently ignored."""
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    compose = _compose()
    compose["services"]["etcd"]["healthchek"] = {}
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(compose))


@pytest.mark.parametrize("service", sorted(AGENTS))
def test_compose_agents_run_replicated_with_their_role(service: str) -> None:
    """Each agent: two replicas, built from deploy/Dockerfile, its role, next hop and trust setting."""
    definition = _compose()["services"][service]
    role, next_url, trust = AGENTS[service]
    assert definition["deploy"]["replicas"] == 2
    assert definition["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert definition["command"] == AGENT_COMMAND
    environment = definition["environment"]
    assert environment["AGENT_ROLE"] == role
    assert environment["NEXT_AGENT_URL"] == next_url
    assert environment["OTEL_SERVICE_NAME"] == service
    assert environment["OTEL_CANCEL_TRUST_INCOMING"] == trust
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert environment["OTEL_PROPAGATORS"] == "tracecontext,baggage"
    assert environment["OTEL_CANCEL_ETCD_ENDPOINTS"] == "etcd:2379"
    assert "/healthz" in " ".join(definition["healthcheck"]["test"])


def test_compose_runs_the_whole_stack_from_files_that_exist() -> None:
    """etcd, collector, Jaeger, Prometheus and Grafana are there, and every bind mount's source exists."""
    services = _compose()["services"]
    assert {"etcd", "otel-collector", "jaeger", "prometheus", "grafana"} <= set(services)
    assert re.fullmatch(r"quay\.io/coreos/etcd:v3\.5\.\d+", services["etcd"]["image"])
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    volumes = set(_compose().get("volumes") or {})
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source in volumes:
                continue
            assert (DEPLOY / source).exists(), f"{name}: mount source {source} does not exist"
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    assert 'pip install ".[examples]"' in dockerfile


# ==========================================================================
# Kubernetes
# ==========================================================================


def _document_id(document: dict[str, Any]) -> str:
    return f"{document['kind']}/{document['metadata']['name']}"


@pytest.mark.parametrize("document", _k8s_documents(), ids=_document_id)
def test_k8s_manifest_passes_strict_validation(document: dict[str, Any]) -> None:
    """The rendered document validates strictly (no unknown fields) against the Kubernetes schema."""
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        pytest.fail(f"{_document_id(document)}: {path}: {error.message}")
    except kubernetes_validate.SchemaNotFoundError as error:
        pytest.fail(error.message)


@pytest.mark.parametrize("copy_name", sorted(K8S_COPIES))
def test_k8s_file_copies_equal_their_originals(copy_name: str) -> None:
    """deploy/k8s/files holds byte-identical copies of the collector, Prometheus and Grafana files."""
    copy = KUSTOMIZE_DIR / "files" / copy_name
    assert copy.read_bytes() == K8S_COPIES[copy_name].read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from {K8S_COPIES[copy_name].relative_to(ROOT)}: copy the original over it"
    )


def test_k8s_everything_lives_in_the_otel_cancel_namespace() -> None:
    """The namespace exists and every namespaced object is in it."""
    documents = _k8s_documents()
    assert [d["metadata"]["name"] for d in documents if d["kind"] == "Namespace"] == ["otel-cancel"]
    for document in documents:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "otel-cancel", _document_id(document)


def test_k8s_containers_have_probes_and_resources() -> None:
    """Every container declares a readiness probe and resource requests and limits."""
    for workload in _workloads(_k8s_documents()):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{_document_id(workload)} container {container['name']}"
            assert "readinessProbe" in container, f"{where}: no readiness probe"
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
            assert {"cpu", "memory"} <= set(resources.get("limits", {})), f"{where}: limits"


def test_k8s_references_resolve() -> None:
    """Every Service selects a workload's pods, and every ConfigMap a pod uses is in the rendering."""
    documents = _k8s_documents()
    workloads = _workloads(documents)
    config_maps = {d["metadata"]["name"] for d in documents if d["kind"] == "ConfigMap"}
    for service in (d for d in documents if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads), (
            f"{_document_id(service)} selects no pods"
        )
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        used = {v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
        for container in pod["containers"]:
            used |= {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
        assert used <= config_maps, f"{_document_id(workload)}: missing ConfigMaps {sorted(used - config_maps)}"


def test_k8s_etcd_is_a_three_member_cluster_found_through_its_headless_service() -> None:
    """etcd: 3 replicas, a headless Service, and an initial cluster naming each member by its pod DNS name."""
    statefulset = _k8s("StatefulSet", "etcd")
    replicas = statefulset["spec"]["replicas"]
    assert replicas == 3
    service_name = statefulset["spec"]["serviceName"]
    service = _k8s("Service", service_name)
    assert service["spec"]["clusterIP"] == "None"
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    arguments = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    members = dict(m.split("=", 1) for m in arguments["initial-cluster"].split(","))
    expected = {f"{statefulset['metadata']['name']}-{i}" for i in range(replicas)}
    assert set(members) == expected
    for member, url in members.items():
        assert url.startswith(f"http://{member}.{service_name}."), url
        assert url.endswith(":2380"), url
    assert arguments["name"] == "$(POD_NAME)"


@pytest.mark.parametrize("service", sorted(AGENTS))
def test_k8s_agents_run_replicated_with_their_role(service: str) -> None:
    """Each agent: a Deployment with 2 replicas, probes on /healthz, shared ConfigMap, its role and trust."""
    deployment = _k8s("Deployment", service)
    _k8s("Service", service)
    role, next_url, trust = AGENTS[service]
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"] == AGENT_COMMAND
    assert {"configMapRef": {"name": "otel-cancel-config"}} in container["envFrom"]
    environment = _env(container)
    assert environment["AGENT_ROLE"] == role
    assert environment["NEXT_AGENT_URL"] == next_url
    assert environment["OTEL_SERVICE_NAME"] == service
    assert environment["OTEL_CANCEL_TRUST_INCOMING"] == trust


def test_k8s_shared_agent_config_points_at_the_cluster() -> None:
    """otel-cancel-config: every etcd member, the collector over OTLP gRPC, W3C trace context and baggage."""
    data = _k8s("ConfigMap", "otel-cancel-config")["data"]
    replicas = _k8s("StatefulSet", "etcd")["spec"]["replicas"]
    assert data["OTEL_CANCEL_ETCD_ENDPOINTS"].split(",") == [f"etcd-{i}.etcd:2379" for i in range(replicas)]
    assert data["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert data["OTEL_PROPAGATORS"] == "tracecontext,baggage"
    assert "OTEL_CANCEL_TRUST_INCOMING" not in data, "trust is decided per Deployment, never shared"
