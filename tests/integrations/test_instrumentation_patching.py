"""The instrumentor patches through wrapt, undoes exactly that, and declares what it instruments."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import TypedDict

import pytest
import wrapt
from fastapi import FastAPI
from langgraph.graph import END, START, StateGraph
from langgraph.pregel import Pregel
from langgraph.pregel import _retry as pregel_retry
from langgraph.pregel import _runner as pregel_runner
from opentelemetry.instrumentation.dependencies import DependencyConflictError
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from starlette.applications import Starlette

import otel_cancel
from otel_cancel.asgi import CancelMiddleware
from otel_cancel.instrumentation import OtelCancelInstrumentor
from otel_cancel.integrations import instruments as _instruments
from otel_cancel.integrations import langgraph_server
from otel_cancel.integrations import patching as _patching
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import configured

_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
_INSTRUMENT = os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")

# Every attribute the instrumentor wraps, as (owner, name).
_PATCHED = (
    (Pregel, "astream"),
    (Pregel, "stream"),
    (pregel_runner, "arun_with_retry"),
    (pregel_runner, "run_with_retry"),
    (Starlette, "build_middleware_stack"),
    (FastAPI, "build_middleware_stack"),
)


def _stored(owner, name):
    return inspect.getattr_static(owner, name)


def _is_wrapped(owner, name) -> bool:
    return isinstance(_stored(owner, name), wrapt.FunctionWrapper)


@pytest.fixture
def runtime():
    with configured(store=MemoryCancelStore(), service="patching") as runtime:
        yield runtime


@pytest.fixture
def instrumentor(runtime):
    instrumentor = OtelCancelInstrumentor()
    yield instrumentor
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


class _State(TypedDict, total=False):
    root: str | None


def _root_seen_by_a_node() -> str | None:
    """Run a one-node graph outside any scope; the node reports the root it runs under."""

    def node(state: _State) -> _State:
        return {"root": otel_cancel.current_root()}

    graph = StateGraph(_State)
    graph.add_node("node", node)
    graph.add_edge(START, "node")
    graph.add_edge("node", END)
    return graph.compile().invoke({})["root"]


def _cancel_middleware_count(app: Starlette) -> int:
    app.build_middleware_stack()
    return sum(m.cls is CancelMiddleware for m in app.user_middleware)


# -- wrapt, undone exactly ---------------------------------------------------------------


def test_uninstrument_puts_back_the_very_functions_it_wrapped_twice_over(instrumentor):
    """Each wrapped attribute is a wrapt wrapper while on and the identical original after, over two cycles."""
    originals = {(owner, name): _stored(owner, name) for owner, name in _PATCHED}
    assert not any(_is_wrapped(owner, name) for owner, name in _PATCHED)
    for _cycle in range(2):
        instrumentor.instrument()
        assert [name for owner, name in _PATCHED if not _is_wrapped(owner, name)] == []
        instrumentor.uninstrument()
        assert all(_stored(owner, name) is originals[owner, name] for owner, name in _PATCHED)


def test_graph_runs_are_in_scopes_only_while_instrumented(instrumentor):
    """A node runs under a root while the instrumentor is on, and under none once it is undone; again after."""
    assert _root_seen_by_a_node() is None
    instrumentor.instrument()
    assert otel_cancel.validate_root(_root_seen_by_a_node())
    instrumentor.uninstrument()
    assert _root_seen_by_a_node() is None
    instrumentor.instrument()
    assert otel_cancel.validate_root(_root_seen_by_a_node())


def test_a_starlette_app_built_after_uninstrument_has_no_cancel_middleware(instrumentor):
    """Apps built while on get CancelMiddleware once; an app built after uninstrument gets none."""
    instrumentor.instrument()
    assert _cancel_middleware_count(Starlette()) == 1
    instrumentor.uninstrument()
    assert _cancel_middleware_count(Starlette()) == 0


def test_a_fastapi_app_gets_cancel_middleware_once_while_instrumented(instrumentor):
    """FastAPI builds its stack without Starlette's method: its own is wrapped too, and undone."""
    instrumentor.instrument()
    assert _cancel_middleware_count(FastAPI()) == 1
    instrumentor.uninstrument()
    assert _cancel_middleware_count(FastAPI()) == 0


def test_without_starlette_uninstrument_still_undoes_langgraph(instrumentor, monkeypatch):
    """In a process where Starlette cannot be imported, uninstrument still puts LangGraph's functions back."""
    monkeypatch.setitem(sys.modules, "starlette.applications", None)  # import raises ImportError
    instrumentor.instrument()
    assert _is_wrapped(Pregel, "astream")
    instrumentor.uninstrument()
    assert not any(_is_wrapped(owner, name) for owner, name in _PATCHED)


def test_instrumenting_twice_wraps_once():
    """Calling instrument_langgraph twice leaves one otel-cancel wrapper on each function."""
    from otel_cancel.langgraph import instrument_langgraph, uninstrument_langgraph

    instrument_langgraph()
    instrument_langgraph()
    try:
        inner = _stored(Pregel, "astream").__wrapped__
        assert not isinstance(inner, wrapt.FunctionWrapper)
    finally:
        uninstrument_langgraph()
    assert not _is_wrapped(Pregel, "astream")


def test_a_wrapper_added_on_top_by_someone_else_is_kept_with_one_warning(caplog):
    """Undoing ours under another instrumentation's wrapper keeps both, logs one warning, and removes nothing."""

    class Target:
        def run(self):
            return "ran"

    original = _stored(Target, "run")

    def ours(wrapped, instance, args, kwargs):
        return "ours:" + wrapped(*args, **kwargs)

    def theirs(wrapped, instance, args, kwargs):
        return "theirs:" + wrapped(*args, **kwargs)

    _patching.wrap(Target, "run", ours)
    wrapt.wrap_function_wrapper(Target, "run", theirs)
    with caplog.at_level(logging.WARNING, "otel_cancel"):
        _patching.unwrap(Target, "run", ours)
    assert Target().run() == "theirs:ours:ran"
    assert [r.getMessage() for r in caplog.records if "wrapped by another instrumentation" in r.getMessage()] != []
    assert len(caplog.records) == 1
    Target.run = _stored(Target, "run").__wrapped__  # they undo theirs
    _patching.unwrap(Target, "run", ours)
    assert _stored(Target, "run") is original


def test_the_langgraph_names_wrapped_exist_where_they_are_wrapped():
    """LangGraph's runner still imports its node functions by name, and Pregel still has astream/stream."""
    assert pregel_runner.arun_with_retry is pregel_retry.arun_with_retry
    assert pregel_runner.run_with_retry is pregel_retry.run_with_retry
    assert inspect.iscoroutinefunction(pregel_retry.arun_with_retry)
    assert inspect.isasyncgenfunction(vars(Pregel)["astream"])
    assert inspect.isgeneratorfunction(vars(Pregel)["stream"])
    params = list(inspect.signature(pregel_retry.run_with_retry).parameters)
    assert params[0] == "task"


def test_the_starlette_names_wrapped_exist():
    """Starlette still builds its middleware stack in build_middleware_stack, from the user_middleware list."""
    assert inspect.isfunction(vars(Starlette)["build_middleware_stack"])
    assert Starlette().user_middleware == []


def test_the_fastapi_names_wrapped_exist():
    """FastAPI still builds its middleware stack in a build_middleware_stack of its own, from user_middleware."""
    assert inspect.isfunction(vars(FastAPI)["build_middleware_stack"])
    assert FastAPI().user_middleware == []


# -- declared dependencies ---------------------------------------------------------------


def _requirements(lines) -> dict[str, Requirement]:
    requirements = [Requirement(line) for line in lines]
    return {r.name: r for r in requirements}


def test_the_instrumentor_declares_each_instrumented_library_with_its_range():
    """instrumentation_dependencies names starlette, httpx, langgraph, langgraph-api and a2a-sdk with ranges."""
    declared = _requirements(OtelCancelInstrumentor().instrumentation_dependencies())
    assert sorted(declared) == ["a2a-sdk", "httpx", "langgraph", "langgraph-api", "starlette"]
    assert all(str(r.specifier) for r in declared.values())


def test_the_declared_ranges_are_those_pyproject_claims():
    """pyproject's instruments-any extra, the installed metadata and the other extras all state the same ranges."""
    extras = tomllib.loads(_PYPROJECT.read_text())["project"]["optional-dependencies"]
    declared = _requirements(OtelCancelInstrumentor().instrumentation_dependencies())
    assert {n: str(r) for n, r in _requirements(extras["instruments-any"]).items()} == {
        n: str(r) for n, r in declared.items()
    }
    installed = [
        line.split(";")[0]
        for line in importlib.metadata.requires("otel-cancel") or []
        if "instruments-any" in line.split(";", 1)[-1]
    ]
    assert {n: r.specifier for n, r in _requirements(installed).items()} == {
        n: r.specifier for n, r in declared.items()
    }, "reinstall the package (make .venv/.dev-installed): its metadata predates pyproject.toml"
    # Every other extra that names one of these libraries claims the same range; only
    # starlette's upper bound is the integration's own (it wraps Starlette's middleware stack).
    claimed = _requirements(
        line
        for name, lines in extras.items()
        if name != "instruments-any"
        for line in lines
        if "otel-cancel" not in line
    )
    for name in ("httpx", "langgraph", "langgraph-api", "a2a-sdk"):
        assert claimed[name].specifier == declared[name].specifier, name
    assert claimed["starlette"].specifier.contains("0.40") and declared["starlette"].specifier.contains("0.40")
    low, high = langgraph_server.SUPPORTED_LANGGRAPH_API
    assert declared["langgraph-api"].specifier == SpecifierSet(f">={low[0]}.{low[1]},<{high[0]}.{high[1]}")


def test_an_integration_whose_library_is_out_of_range_is_skipped_with_one_warning(instrumentor, monkeypatch, caplog):
    """LangGraph outside its range: one warning naming package, release and range; the others still switch on."""
    monkeypatch.setitem(_instruments.INSTRUMENTS, "langgraph", "langgraph<1")
    with caplog.at_level(logging.WARNING, "otel_cancel"):
        instrumentor.instrument()
    lines = [r.getMessage() for r in caplog.records if "integration is off" in r.getMessage()]
    assert len(lines) == 1
    assert "langgraph<1" in lines[0] and f"langgraph {importlib.metadata.version('langgraph')}" in lines[0]
    assert instrumentor.is_instrumented_by_opentelemetry
    assert not _is_wrapped(Pregel, "astream") and not _is_wrapped(pregel_runner, "arun_with_retry")
    assert _cancel_middleware_count(Starlette()) == 1
    assert langgraph_server._state["enabled"]  # LangGraph Server's hooks are checked on their own range


def test_with_no_instrumented_library_in_range_the_instrumentor_does_not_switch_on(instrumentor, monkeypatch, caplog):
    """Every library out of range: instrument() logs the conflict and changes nothing, or raises when asked to."""
    for name, requirement in list(_instruments.INSTRUMENTS.items()):
        monkeypatch.setitem(_instruments.INSTRUMENTS, name, f"{Requirement(requirement).name}<0.0.1")
    with caplog.at_level(logging.ERROR, "otel_cancel"):
        assert instrumentor.instrument() is None
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert [r for r in caplog.records if r.levelno == logging.ERROR and "starlette" in r.getMessage()]
    assert not any(_is_wrapped(owner, name) for owner, name in _PATCHED)
    with pytest.raises(DependencyConflictError):
        instrumentor.instrument(raise_exception_on_conflict=True)


_PROBE = """
import inspect, json, wrapt
from langgraph.pregel import Pregel
from starlette.applications import Starlette
from otel_cancel.instrumentation import OtelCancelInstrumentor
wrapped = lambda owner, name: isinstance(inspect.getattr_static(owner, name), wrapt.FunctionWrapper)
print(json.dumps({
    "instrumented": OtelCancelInstrumentor().is_instrumented_by_opentelemetry,
    "starlette": wrapped(Starlette, "build_middleware_stack"),
    "langgraph": wrapped(Pregel, "astream"),
}))
"""


def _run_under_opentelemetry_instrument(pythonpath: str | None = None) -> tuple[dict[str, bool], str]:
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [_INSTRUMENT, sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_opentelemetry_instrument_loads_the_instrumentor_in_a_real_process():
    """Under opentelemetry-instrument, the loader reads the declared extra and switches every integration on."""
    report, stderr = _run_under_opentelemetry_instrument()
    assert report == {"instrumented": True, "starlette": True, "langgraph": True}
    assert "integration is off" not in stderr


def test_opentelemetry_instrument_with_langgraph_out_of_range_switches_the_rest_on(tmp_path):
    """A process whose metadata says LangGraph 0.5.0: one warning for it, the instrumentor and Starlette still on."""
    # Distribution metadata found first on the path is what importlib.metadata (and so
    # OpenTelemetry's loader and the instrumentor) reads as the installed release.
    shadow = tmp_path / "langgraph-0.5.0.dist-info"
    shadow.mkdir()
    (shadow / "METADATA").write_text("Metadata-Version: 2.1\nName: langgraph\nVersion: 0.5.0\n")
    report, stderr = _run_under_opentelemetry_instrument(pythonpath=str(tmp_path))
    assert report == {"instrumented": True, "starlette": True, "langgraph": False}
    lines = [line for line in stderr.splitlines() if "integration is off" in line]
    assert len(lines) == 1 and "langgraph>=1.0,<2" in lines[0] and "langgraph 0.5.0" in lines[0], stderr


def test_an_app_with_a_subclass_of_cancel_middleware_gets_no_second_one(instrumentor):
    """The application added its own subclass of CancelMiddleware: the instrumentor adds none."""

    class Tuned(CancelMiddleware):
        pass

    instrumentor.instrument()
    app = Starlette()
    app.add_middleware(Tuned)
    app.build_middleware_stack()
    assert [m.cls for m in app.user_middleware] == [Tuned]


def test_uninstrument_removes_only_its_own_start_hook(instrumentor, runtime):
    """Start hooks someone else registered survive uninstrument; the instrumentor's own is gone."""

    def other() -> None:
        pass

    instrumentor.instrument()
    runtime.start_hooks.append(other)
    instrumentor.uninstrument()
    assert runtime.start_hooks == [other]
