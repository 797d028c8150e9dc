"""Edge safety, baggage handling and auto-instrumentation on real uvicorn processes."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from chain import SERVICES
from conftest import cli

from otel_cancel._core.root import random_root
from otel_cancel.testing import wait_for_output

pytestmark = pytest.mark.anyio


def _cancel(root: str, env: dict[str, str]) -> None:
    subprocess.run(cli("cancel", root), env={**os.environ, **env}, check=True, capture_output=True, timeout=60)


async def test_an_untrusted_edge_ignores_a_client_supplied_root_and_keeps_other_baggage(chain, etcd_env):
    """A client's otel_cancel.root is replaced at the edge; its other baggage entries travel on."""
    chain.start(etcd_env, levels=("A", "B"), replicas=1)
    victim = random_root()
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{chain.urls(0)[0]}/work",
            headers={"baggage": f"otel_cancel.root={victim},otel_cancel.depth=7,tenant=acme"},
        )
    assert response.status_code == 200
    root = response.headers["otel-cancel-root"]
    assert root != victim and response.json()["root"] == root
    assert "tenant=acme" in response.json()["baggage"] and victim not in response.json()["baggage"]
    # The user's attempt to ride on the victim's root stopped nothing: cancelling the victim leaves us alone.
    _cancel(victim, etcd_env)
    async with httpx.AsyncClient() as client:
        again = await client.get(f"{chain.urls(0)[0]}/work", headers={"baggage": f"otel_cancel.root={victim}"})
    assert again.status_code == 200


async def test_outgoing_calls_carry_root_depth_and_the_apps_own_baggage(chain, etcd_env):
    """A -> B: B sees A's root at depth 1, and A's other entries after ours."""
    chain.start(etcd_env, levels=("A", "B"), replicas=1, module="relay_app")
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{chain.urls(0)[0]}/relay", headers={"baggage": "tenant=acme"})
    assert response.status_code == 200, response.text
    body = response.json()
    root = response.headers["otel-cancel-root"]
    for flavour in ("async", "sync", "async_stream", "sync_stream"):
        seen = body[flavour]
        assert seen["root"] == root and seen["depth"] == "1", (flavour, seen)
        assert seen["baggage"].startswith(f"otel_cancel.root={root},otel_cancel.depth=1"), seen["baggage"]
        assert "tenant=acme" in seen["baggage"] and "app.key=set-by-app" in seen["baggage"]


@pytest.mark.parametrize(
    ("baggage_header", "adopted"),
    [
        ("otel_cancel.root=not-a-root", None),
        ("otel_cancel.root=" + "0" * 32, None),
        ("otel_cancel.root=" + "A" * 32, None),
        ("otel_cancel.root===;;;,,,", None),
        ("otel_cancel.root=%FF%FE%00" + "a" * 30, None),
        ("x=" + "y" * 9000 + ",otel_cancel.root=" + "b" * 32, None),
        ("otel_cancel.root=" + "a" * 32 + ",otel_cancel.depth=-1", "a" * 32),
        ("otel_cancel.root=" + "a" * 32 + ",otel_cancel.depth=99999999999", "a" * 32),
    ],
    ids=["not-hex", "zeros", "upper", "garbage", "escaped-bytes", "oversized", "negative-depth", "huge-depth"],
)
async def test_malformed_baggage_neither_crashes_nor_attaches_to_a_wrong_root(chain, etcd_env, baggage_header, adopted):
    """Bad incoming baggage on a trusted service: the request runs under a fresh, valid root (or its valid one)."""
    chain.start(etcd_env, levels=("B",), replicas=1, level_env={"B": {"OTEL_CANCEL_TRUST_INCOMING": "true"}})
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{chain.urls(0)[0]}/work", headers={"baggage": baggage_header})
        assert response.status_code == 200
        root = response.headers["otel-cancel-root"]
        if adopted is None:
            assert len(root) == 32 and root not in baggage_header.lower()
        else:
            assert root == adopted and "otel_cancel.depth=1" in response.json()["baggage"]
        assert (await client.get(f"{chain.urls(0)[0]}/healthz")).status_code == 200
    assert not [line for line in chain.processes()[0].lines if "Traceback" in line]


async def test_auto_instrumented_chain_that_never_imports_otel_cancel_stops_on_cancel(chain, etcd_env):
    """opentelemetry-instrument on plain Starlette apps: cancelling by the header's root stops all levels."""
    chain.start(etcd_env, module="chain_app", auto_instrument=True, replicas=1)
    async with httpx.AsyncClient(timeout=60) as client:
        request = client.build_request("GET", f"{chain.urls(0)[0]}/stream", params={"tokens": 100, "interval": 0.05})
        response = await client.send(request, stream=True)
        root = response.headers["otel-cancel-root"]
        await _wait(lambda: len(chain.lines("START", root)) == 3)
        _cancel(root, etcd_env)
        lines = [line async for line in response.aiter_lines() if line]
        await response.aclose()
    assert lines[-2] == "event: otel-cancel"
    await _wait(lambda: len(chain.lines("STOPPED", root)) == 3)
    assert not [line for p in chain.processes() for line in p.lines if "Traceback" in line]


async def test_the_instrumentor_can_be_disabled(chain, etcd_env):
    """OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=otel_cancel leaves the app without the middleware."""
    chain.start(
        {**etcd_env, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "otel_cancel"},
        levels=("A",),
        replicas=1,
        module="chain_app",
        auto_instrument=True,
    )
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{chain.urls(0)[0]}/work")
    assert response.status_code == 200 and "otel-cancel-root" not in response.headers


def test_doctor_reports_etcd_propagators_and_instrumentation(etcd_env):
    """`otel-cancel doctor` says what is on; a propagator list without baggage fails loudly."""
    env = {**os.environ, **etcd_env}
    ok = subprocess.run(cli("doctor"), env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK    etcd" in ok.stdout and "OK    propagators" in ok.stdout and "OK    instrumentation" in ok.stdout
    bad = subprocess.run(
        cli("doctor"), env={**env, "OTEL_PROPAGATORS": "tracecontext"}, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "drops baggage" in bad.stdout
    internal = subprocess.run(
        cli("doctor"), env={**env, "OTEL_SERVICE_NAME": "sub-agent"}, capture_output=True, text=True, timeout=60
    )
    assert "WARN  trust" in internal.stdout and "OTEL_CANCEL_TRUST_INCOMING=true" in internal.stdout


def test_start_up_warns_loudly_when_propagators_drop_baggage(etcd_env):
    """An instrumented service whose OTEL_PROPAGATORS lacks baggage logs an error at start-up."""
    code = "from opentelemetry.instrumentation.auto_instrumentation import initialize; initialize()"
    env = {
        **os.environ,
        **etcd_env,
        "OTEL_PROPAGATORS": "tracecontext",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "PYTHONPATH": SERVICES,
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "do not include 'baggage'" in result.stderr


async def _wait(predicate, timeout: float = 30) -> None:
    import asyncio

    await asyncio.to_thread(wait_for_output, predicate, timeout)
