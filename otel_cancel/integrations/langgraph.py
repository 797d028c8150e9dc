"""LangGraph runs in scopes: cancelling a root stops its graph runs, node by node.

With the instrumentor on (``opentelemetry-instrument``), or after calling
:func:`instrument_langgraph` yourself, every run of a compiled graph
(``ainvoke``, ``astream``, ``astream_events``, ``invoke``, ``stream``) executes in
a scope for the current root, and every node executes in a scope named after
the node. An async run executes in one task of its own for its whole life, so a
caller may take its items however it likes (one per task, as
``asyncio.wait_for(anext(stream), t)`` does on Python 3.11): every step keeps the
run's root. When the root is cancelled:

- every in-flight async node task is cancelled directly (not only the task that
  consumes the run), and LangGraph sees a framework cancellation, not a node
  error, so retry policies do not retry it; the run raises
  :class:`~otel_cancel.Cancelled`;
- the interrupted node names go into the receipt and onto the
  ``otel_cancel.cancelled`` span (``otel_cancel.node``);
- the checkpointer keeps the last completed superstep (a cancelled superstep
  writes nothing), so the same ``thread_id`` resumes from there;
- sync nodes, which run in threads, stop at their next :func:`otel_cancel.check`;
  :class:`CancelCheckCallback` does that between the tokens of a streaming model.

A node that wants to stop the whole run everywhere (a guardrail) calls
``await otel_cancel.cancel_current(reason=...)``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langgraph.pregel import Pregel
from langgraph.pregel import _runner as pregel_runner

from .._core.labels import current_labels, usable_labels
from .._core.scope import CancelScope, check
from .one_task_stream import OneTaskStream
from .patching import Wrapper, unwrap, wrap

run_scope_bound: contextvars.ContextVar[bool] = contextvars.ContextVar("otel_cancel_run_scope_bound", default=False)
"""True where a host already runs the graph in a scope bound to the task that owns the
run for its whole life (LangGraph Server's worker, :mod:`otel_cancel.integrations.langgraph_server`).
The host may iterate ``astream`` one item per short-lived task, so a run-level scope
here would bind to the wrong task; node scopes still apply."""


class CancelCheckCallback(BaseCallbackHandler):
    """A LangChain callback that stops a streaming model between tokens once its root is cancelled.

    ``model.astream(messages, config={"callbacks": [CancelCheckCallback()]})``: for
    sync code and threads, where ``task.cancel()`` cannot reach the token loop.
    """

    raise_error = True  # let Cancelled out of the callback manager

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        # Any signature: LangChain passes chunk, run_id and tags as keywords.
        check()


def _node_scope(task: Any) -> CancelScope:
    # convert=False: the node task ends with CancelledError, which LangGraph treats as
    # a framework cancellation (no retry); the run's own scope raises Cancelled.
    return CancelScope(name=str(getattr(task, "name", "node")), convert=False)


def _task_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("task")


async def _arun_with_retry(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    async with _node_scope(_task_of(args, kwargs)):
        return await wrapped(*args, **kwargs)


def _run_with_retry(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with _node_scope(_task_of(args, kwargs)):
        return wrapped(*args, **kwargs)


def _run_labels(graph: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
    """The run's LangGraph ids, from its config: ``thread_id``, ``run_id``, ``assistant_id``, ``graph``.

    A subgraph run inside a node keeps the outer run's ``graph`` label.
    """
    config = kwargs.get("config", args[1] if len(args) > 1 else None)
    config = config if isinstance(config, dict) else {}
    configurable = config.get("configurable")
    configurable = configurable if isinstance(configurable, dict) else {}
    graph_name = None if "graph" in current_labels() else configurable.get("graph_id") or getattr(graph, "name", None)
    return usable_labels(
        {
            "thread_id": configurable.get("thread_id"),
            "run_id": config.get("run_id") or configurable.get("run_id"),
            "assistant_id": configurable.get("assistant_id"),
            "graph": graph_name,
        }
    )


def _astream(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> AsyncIterator[Any]:
    if run_scope_bound.get():
        return wrapped(*args, **kwargs)  # type: ignore[no-any-return]

    async def run() -> AsyncIterator[Any]:
        async with (
            CancelScope(name=None, labels=_run_labels(instance, args, kwargs)),
            contextlib.aclosing(wrapped(*args, **kwargs)) as chunks,
        ):
            async for chunk in chunks:
                yield chunk

    # The whole run in one task, whoever takes its items: a caller may take each in a task
    # of its own (asyncio.wait_for(anext(...)) on Python 3.11, LangGraph's own
    # stream_events v3), and the run's scope, root and context must stay in one.
    return OneTaskStream(run, name=f"otel-cancel graph run {getattr(instance, 'name', '')}")


def _stream(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[Any]:
    with CancelScope(name=None, labels=_run_labels(instance, args, kwargs)):
        for chunk in wrapped(*args, **kwargs):
            yield chunk
            check()  # a sync run stops at the next superstep boundary


# What is wrapped, in order. The runner imports the two node functions by name from
# langgraph.pregel._retry, so its own module namespace is where a wrapper takes effect.
# tests/test_instrumentation_patching.py fails when LangGraph renames any of them.
_PATCHED: tuple[tuple[Any, str, Wrapper], ...] = (
    (Pregel, "astream", _astream),
    (Pregel, "stream", _stream),
    (pregel_runner, "arun_with_retry", _arun_with_retry),
    (pregel_runner, "run_with_retry", _run_with_retry),
)


def instrument_langgraph() -> None:
    """Run every LangGraph graph run and node in scopes (idempotent)."""
    for owner, name, wrapper in _PATCHED:
        wrap(owner, name, wrapper)


def uninstrument_langgraph() -> None:
    """Undo :func:`instrument_langgraph`: the original LangGraph functions are back."""
    for owner, name, wrapper in reversed(_PATCHED):
        unwrap(owner, name, wrapper)


__all__ = ("CancelCheckCallback", "instrument_langgraph", "uninstrument_langgraph")
