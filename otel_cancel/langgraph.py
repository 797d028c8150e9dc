"""LangGraph runs in scopes: cancelling a root stops its graph runs, node by node.

With the instrumentor on (``opentelemetry-instrument``), or after calling
:func:`instrument_langgraph` yourself, every run of a compiled graph
(``ainvoke``, ``astream``, ``astream_events``, ``invoke``, ``stream``) executes in
a scope for the current root, and every node executes in a scope named after
the node. When the root is cancelled:

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

import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langgraph.pregel import Pregel
from langgraph.pregel import _runner as pregel_runner

from ._labels import current_labels, usable_labels
from ._scope import CancelScope, check

_originals: dict[str, Any] = {}


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


def _wrap_arun_with_retry(original: Any) -> Any:
    @functools.wraps(original)
    async def arun_with_retry(task: Any, *args: Any, **kwargs: Any) -> Any:
        async with _node_scope(task):
            return await original(task, *args, **kwargs)

    return arun_with_retry


def _wrap_run_with_retry(original: Any) -> Any:
    @functools.wraps(original)
    def run_with_retry(task: Any, *args: Any, **kwargs: Any) -> Any:
        with _node_scope(task):
            return original(task, *args, **kwargs)

    return run_with_retry


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


def _wrap_astream(original: Any) -> Any:
    @functools.wraps(original)
    async def astream(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with CancelScope(name=None, labels=_run_labels(self, args, kwargs)):
            async for chunk in original(self, *args, **kwargs):
                yield chunk

    return astream


def _wrap_stream(original: Any) -> Any:
    @functools.wraps(original)
    def stream(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        with CancelScope(name=None, labels=_run_labels(self, args, kwargs)):
            for chunk in original(self, *args, **kwargs):
                yield chunk
                check()  # a sync run stops at the next superstep boundary

    return stream


def instrument_langgraph() -> None:
    """Run every LangGraph graph run and node in scopes (idempotent)."""
    if _originals:
        return
    _originals["astream"] = Pregel.astream
    _originals["stream"] = Pregel.stream
    # The runner imports these by name; patching its module namespace is what takes effect.
    _originals["arun_with_retry"] = getattr(pregel_runner, "arun_with_retry")  # noqa: B009
    _originals["run_with_retry"] = getattr(pregel_runner, "run_with_retry")  # noqa: B009
    Pregel.astream = _wrap_astream(Pregel.astream)  # type: ignore[method-assign]
    Pregel.stream = _wrap_stream(Pregel.stream)  # type: ignore[method-assign]
    setattr(pregel_runner, "arun_with_retry", _wrap_arun_with_retry(_originals["arun_with_retry"]))  # noqa: B010
    setattr(pregel_runner, "run_with_retry", _wrap_run_with_retry(_originals["run_with_retry"]))  # noqa: B010


def uninstrument_langgraph() -> None:
    """Undo :func:`instrument_langgraph`."""
    if not _originals:
        return
    Pregel.astream = _originals.pop("astream")  # type: ignore[method-assign]
    Pregel.stream = _originals.pop("stream")  # type: ignore[method-assign]
    setattr(pregel_runner, "arun_with_retry", _originals.pop("arun_with_retry"))  # noqa: B010
    setattr(pregel_runner, "run_with_retry", _originals.pop("run_with_retry"))  # noqa: B010


__all__ = ("CancelCheckCallback", "instrument_langgraph", "uninstrument_langgraph")
