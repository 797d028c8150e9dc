"""One process state, replaced whole by configure() and reset() (the A2A task table and start hooks with it)."""

from __future__ import annotations

from otel_cancel._core import process_state
from otel_cancel.store.memory import MemoryCancelStore


def test_configure_replaces_every_piece_of_process_state():
    """A new configuration starts with its own registry, watcher and protocol task table: nothing survives."""
    old = process_state.configure(store=MemoryCancelStore(), service="one")
    old.running_tasks["task-1"] = object()
    try:
        new = process_state.configure(store=MemoryCancelStore(), service="two")
        assert process_state.get_process_state() is new
        assert new.registry is not old.registry and new.watcher is not old.watcher
        assert new.running_tasks == {}
        process_state.reset()
        assert process_state.configured_process_state() is None
    finally:
        process_state.reset()


def test_start_hooks_not_yet_run_follow_the_configuration_and_run_once():
    """The instrumentor's deferred hooks survive a configure() before serving, and run once when serving starts."""
    ran: list[str] = []
    first = process_state.configure(store=MemoryCancelStore())
    first.start_hooks.append(lambda: ran.append("httpx"))
    try:
        second = process_state.configure(store=MemoryCancelStore())
        second.start_serving()
        second.start_serving()
        assert ran == ["httpx"]
        third = process_state.configure(store=MemoryCancelStore())
        assert third.start_hooks == []  # already run: nothing is carried again
    finally:
        process_state.reset()
