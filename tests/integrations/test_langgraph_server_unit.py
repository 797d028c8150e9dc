"""The LangGraph Server hooks without a server: the supported release, the hooked names, a run's context."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context

from otel_cancel._core.cancel_request import CancelRequest
from otel_cancel._core.labels import run_facts, with_labels
from otel_cancel._core.root import current_depth, current_root, random_root
from otel_cancel._core.signing import sign_root
from otel_cancel.exceptions import StoreError
from otel_cancel.integrations import langgraph_server
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

pytest.importorskip("langgraph_api")

# What `langgraph dev` sets before langgraph_api reads its configuration at import.
_INMEM_ENV = {
    "MIGRATIONS_PATH": "__inmem",
    "DATABASE_URI": ":memory:",
    "REDIS_URI": "fake",
    "LANGGRAPH_RUNTIME_EDITION": "inmem",
    "LANGSMITH_TRACING": "false",
    "OTEL_SDK_DISABLED": "true",
}


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **_INMEM_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_installed_langgraph_api_is_supported_and_has_every_hooked_name() -> None:
    """The installed langgraph-api is in the supported range and still has every name the hooks wrap."""
    assert langgraph_server.unsupported_reason() is None
    result = _python(
        """
        import importlib, json
        from otel_cancel.integrations.langgraph_server import HOOKED_NAMES, missing_names
        print(json.dumps({m: missing_names(importlib.import_module(m), n) for m, n in HOOKED_NAMES.items()}))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {name: [] for name in langgraph_server.HOOKED_NAMES}


def test_hooks_wrap_on_import_and_unwrap_on_uninstrument() -> None:
    """Instrumenting wraps the names when langgraph_api is imported; uninstrumenting restores the originals."""
    result = _python(
        """
        import json, wrapt
        from otel_cancel.integrations import langgraph_server
        assert langgraph_server.instrument_langgraph_server()
        import langgraph_api.api.runs, langgraph_api.models.run, langgraph_api.worker
        names = [
            (langgraph_api.worker, "stream_run"),
            (langgraph_api.models.run, "create_valid_run"),
            (langgraph_api.models.run, "inject_current_trace_context"),
            (langgraph_api.api.runs, "create_valid_run"),
        ]
        wrapped = [isinstance(getattr(m, n), wrapt.FunctionWrapper) for m, n in names]
        langgraph_server.uninstrument_langgraph_server()
        restored = [not isinstance(getattr(m, n), wrapt.FunctionWrapper) for m, n in names]
        print(json.dumps([wrapped, restored]))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [[True] * 4, [True] * 4]


def test_unknown_release_logs_one_warning_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a langgraph-api release the hooks do not know, one warning is logged and nothing is hooked."""
    monkeypatch.setattr(langgraph_server.importlib.metadata, "version", lambda name: "0.99.1")
    with caplog.at_level(logging.WARNING, logger="otel_cancel.langgraph_server"):
        assert langgraph_server.instrument_langgraph_server() is False
    assert [r.getMessage() for r in caplog.records if "0.99.1" in r.getMessage()] != []
    assert len(caplog.records) == 1
    assert langgraph_server._patched == [] and langgraph_server._state["enabled"] is False


def test_supported_range_bounds() -> None:
    """Releases outside the supported range (and unparsable ones) are refused with a sentence that names the range."""
    assert langgraph_server.unsupported_reason("0.16.0") is None
    assert "not a release otel-cancel knows (>=0.16,<0.17)" in (langgraph_server.unsupported_reason("0.17.0") or "")
    assert langgraph_server.unsupported_reason("0.15.9") is not None
    assert langgraph_server.unsupported_reason("banana") is not None


def _warning_on_import(module: object, caplog: pytest.LogCaptureFixture) -> str:
    """The warning ``module``'s import gives with the hooks on; asserts it turned every hook off."""
    langgraph_server._state["enabled"] = True
    try:
        with caplog.at_level(logging.WARNING, logger="otel_cancel.langgraph_server"):
            langgraph_server._on_import(module)
        assert langgraph_server._state["enabled"] is False
        return caplog.records[0].getMessage()
    finally:
        langgraph_server._state["enabled"] = False


def test_a_module_missing_a_hooked_name_unhooks_everything(caplog: pytest.LogCaptureFixture) -> None:
    """A hooked module that lacks a name (a renamed internal) turns every hook off with one warning."""

    class RenamedWorker:
        __name__ = "langgraph_api.worker"

    assert "has no stream_run" in _warning_on_import(RenamedWorker(), caplog)


def test_a_transport_missing_the_hooked_method_unhooks_everything(caplog: pytest.LogCaptureFixture) -> None:
    """The loopback hook checks the method it wraps (ASGITransport.handle_async_request), not just the class."""

    class ASGITransport:
        pass

    class RenamedTransport:
        __name__ = "langgraph_api.asgi_transport"

    RenamedTransport.ASGITransport = ASGITransport  # type: ignore[attr-defined]
    assert "has no ASGITransport.handle_async_request" in _warning_on_import(RenamedTransport(), caplog)


def test_a_run_without_a_thread_is_recorded_without_a_context_id() -> None:
    """A stateless run's ids give its run id and no thread id (never the text "None")."""
    run_id = "1ef0a7c2-6d1b-6c3e-8f00-000000000001"
    assert langgraph_server._run_ids({"run_id": run_id, "thread_id": None}) == (run_id, "")
    assert langgraph_server._run_ids({"run_id": run_id, "thread_id": "None"}) == (run_id, "")


def test_run_context_restores_the_stored_root_depth_and_deadline() -> None:
    """A run executes under the root, depth and deadline stored with it; a malformed one gives no root."""
    root = "4bf92f3577b34da6a3ce929d0e0e4736"
    stored = {"otel_cancel.root": root, "otel_cancel.depth": "2", "otel_cancel.deadline": "9999999999999"}
    with configured(store=MemoryCancelStore()):
        context = langgraph_server.run_context({langgraph_server.CONFIG_KEY: stored})
        assert current_root(context) == root and current_depth(context) == 2
        assert baggage.get_baggage("otel_cancel.deadline", context) is None  # too far ahead: dropped
        bad = langgraph_server.run_context({langgraph_server.CONFIG_KEY: {"otel_cancel.root": "x" * 32}})
        assert current_root(bad) is None
        assert current_root(langgraph_server.run_context({})) is None
        # A root left in the worker's own context never leaks into a run stored without one.
        leaked = baggage.set_baggage("otel_cancel.root", root, otel_context.get_current())
        assert current_root(langgraph_server.run_context({}, leaked)) is None


def test_run_context_keeps_the_labels_and_start_stored_with_the_run() -> None:
    """A run carries the labels and root start it was created with; malformed ones are dropped, not fatal."""
    root = "4bf92f3577b34da6a3ce929d0e0e4736"
    stored = {
        "otel_cancel.root": root,
        "otel_cancel.depth": "1",
        "otel_cancel.started": "1700000000000",
        "otel_cancel.labels": "tenant=acme;bad key=x",
    }
    with configured(store=MemoryCancelStore()):
        context = langgraph_server.run_context({langgraph_server.CONFIG_KEY: stored})
        assert run_facts(context) == (1700000000000, {"tenant": "acme"})
        garbled = {**stored, "otel_cancel.started": "soon", "otel_cancel.labels": "=;;"}
        started, labels = run_facts(langgraph_server.run_context({langgraph_server.CONFIG_KEY: garbled}))
        assert started is not None and started > 1700000000000 and labels == {}


def test_a_runs_ids_fill_only_the_room_its_carried_labels_leave() -> None:
    """A run arriving with 15 labels gets one LangGraph id more (never an error), and its own ids win a clash."""
    carried = {f"k{i}": "v" for i in range(15)} | {"thread_id": "upstream"}
    run = {"thread_id": "t-1", "run_id": "r-1", "assistant_id": "a-1"}
    token = otel_context.attach(with_labels(dict(list(carried.items())[:15])))
    try:
        assert list(langgraph_server._run_labels(run, {"graph_id": "g"})) == ["thread_id"]
    finally:
        otel_context.detach(token)
    token = otel_context.attach(with_labels(dict(list(carried.items())[1:])))
    try:
        assert langgraph_server._run_labels(run, {})["thread_id"] == "t-1"
    finally:
        otel_context.detach(token)


@pytest.mark.anyio
async def test_a_relay_that_cannot_write_the_flag_logs_one_line_and_ends_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the store refusing flags, relaying LangGraph's own cancel of three runs logs one line, no traceback."""
    from langgraph_api.asyncio import ValueEvent  # type: ignore[import-untyped]
    from langgraph_api.errors import UserInterrupt  # type: ignore[import-untyped]

    class RefusingStore(MemoryCancelStore):
        async def create_flag(self, request: CancelRequest, ttl_seconds: int) -> tuple[CancelRequest, bool]:
            raise StoreError("etcd unavailable")

    with configured(store=RefusingStore()), caplog.at_level(logging.WARNING):
        for _ in range(3):
            done = ValueEvent()
            relay = asyncio.create_task(
                langgraph_server._relay_langgraph_cancel(done, random_root(), UserInterrupt, None)
            )
            done.set(UserInterrupt("interrupt requested"))
            await asyncio.wait_for(relay, 5)
    lines = [r.getMessage() for r in caplog.records if "flag could not be written" in r.getMessage()]
    assert len(lines) == 1 and "etcd unavailable" in lines[0]


@pytest.mark.anyio
async def test_a_clients_metadata_root_is_dropped_even_when_it_is_the_only_entry() -> None:
    """Run creation with no current root (a cron run) never keeps a client's otel_cancel_root in the metadata."""

    async def create(conn: object, thread_id: object, payload: dict[str, object]) -> dict[str, object]:
        return payload

    smuggled = {langgraph_server.METADATA_ROOT: "f" * 32}
    for metadata in (smuggled, {**smuggled, "user": "u-1"}):
        run = await langgraph_server._create_valid_run(create, None, (None, None, {"metadata": dict(metadata)}), {})
        assert langgraph_server.METADATA_ROOT not in run["metadata"]


def test_run_context_checks_the_signature_when_a_key_is_set() -> None:
    """With a signing key, a stored root whose signature does not verify is not adopted."""
    root = "4bf92f3577b34da6a3ce929d0e0e4736"
    key = b"k" * 32
    with configured(store=MemoryCancelStore(), signing_key=key):
        good = {"otel_cancel.root": root, "otel_cancel.sig": sign_root(key, root)}
        assert current_root(langgraph_server.run_context({langgraph_server.CONFIG_KEY: good})) == root
        forged = {"otel_cancel.root": root, "otel_cancel.sig": "0" * len(sign_root(key, root))}
        assert current_root(langgraph_server.run_context({langgraph_server.CONFIG_KEY: forged})) is None


def test_opentelemetry_instrument_passes_a_config_option_through_after_a_double_dash() -> None:
    """`opentelemetry-instrument -- langgraph dev --config X` works; without `--` the option is taken as its own."""
    instrument = os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")
    env = {**os.environ, "OTEL_SDK_DISABLED": "true", "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "otel_cancel"}
    show_argv = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "--config", "langgraph.json"]
    clash = subprocess.run([instrument, *show_argv], env=env, capture_output=True, text=True, timeout=60)
    assert clash.returncode == 2 and "ambiguous option: --config" in clash.stderr
    passed = subprocess.run([instrument, "--", *show_argv], env=env, capture_output=True, text=True, timeout=60)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.strip().splitlines()[-1] == "['--config', 'langgraph.json']"


def test_a_run_executes_in_its_roots_trace() -> None:
    """The worker's context for a run has a parent span in the root's trace (its stop spans land there)."""
    from opentelemetry import trace

    root = "4bf92f3577b34da6a3ce929d0e0e4736"
    with configured(store=MemoryCancelStore()):
        context = langgraph_server.run_context({langgraph_server.CONFIG_KEY: {"otel_cancel.root": root}})
    assert trace.format_trace_id(trace.get_current_span(context).get_span_context().trace_id) == root
