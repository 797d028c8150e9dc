"""`otel-cancel doctor` names what the services of this environment lack, and how to add it."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import cli

from otel_cancel.cli import doctor


def test_a_starlette_environment_without_its_instrumentation_is_told_which_extra_to_install(monkeypatch):
    """Starlette present but opentelemetry-instrumentation-starlette missing: a warning naming it and [http]."""
    monkeypatch.setattr(doctor, "_installed", lambda name: name != "opentelemetry-instrumentation-starlette")
    checks = {c.name: c for c in doctor._check_service_kinds()}
    starlette = checks["Starlette/FastAPI"]
    assert starlette.status == "warn"
    assert "opentelemetry-instrumentation-starlette" in starlette.detail and "otel-cancel[http]" in starlette.detail


def test_a_fastapi_environment_without_its_instrumentation_is_told_which_extra_to_install(monkeypatch):
    """FastAPI present but opentelemetry-instrumentation-fastapi missing: a warning naming it and [http]."""
    monkeypatch.setattr(doctor, "_installed", lambda name: name != "opentelemetry-instrumentation-fastapi")
    checks = {c.name: c for c in doctor._check_service_kinds()}
    assert checks["Starlette/FastAPI"].status == "ok"
    assert checks["FastAPI"].status == "warn" and "otel-cancel[http]" in checks["FastAPI"].detail


def test_an_environment_without_the_sdk_is_told_its_telemetry_is_a_no_op(monkeypatch):
    """Without the SDK the doctor says spans and metrics are no-ops and names the [sdk] extra."""
    monkeypatch.setattr(doctor, "_installed", lambda name: not name.startswith("opentelemetry-sdk"))
    sdk = {c.name: c for c in doctor._check_service_kinds()}["sdk"]
    assert sdk.status == "warn" and "no-ops" in sdk.detail and "otel-cancel[sdk]" in sdk.detail


def test_the_dev_environment_has_every_kind_of_service_complete(etcd_env):
    """In this environment (every extra installed) each kind of service and the SDK report ok, as JSON too."""
    result = subprocess.run(
        cli("doctor", "--json"), env={**os.environ, **etcd_env}, capture_output=True, text=True, timeout=60
    )
    checks = {c["name"]: c["status"] for c in json.loads(result.stdout)["checks"]}
    assert {checks[name] for name in ("Starlette/FastAPI", "FastAPI", "LangGraph", "A2A", "sdk")} == {"ok"}
