"""``otel-cancel cancel/status --thread ID | --run ID``: find a LangGraph Server run's root.

LangGraph users know their ``thread_id`` and ``run_id``, not a trace id. Every run
created on a LangGraph Server under otel-cancel records its root under those ids in the
store as soon as it exists, still queued or running
(:mod:`otel_cancel.integrations.langgraph_server`), so these options work from any machine
that reaches etcd, whichever replica or deployment runs the run. A thread resolves to
the root of its latest run.
"""

from __future__ import annotations

import argparse

from ..exceptions import InvalidTaskIdError
from ..store import CancelStore
from ..store._keys import LANGGRAPH_RUN_RECORD, LANGGRAPH_THREAD_RECORD


class UnknownLangGraphIdError(LookupError):
    """No run under otel-cancel is known by this thread or run id."""


def _langgraph_id(value: str) -> str:
    import uuid  # only when --thread/--run is given: uuid costs every command start-up time

    try:
        return str(uuid.UUID(value))
    except ValueError:
        shown = value if len(value) <= 64 else value[:61] + "..."
        raise argparse.ArgumentTypeError(f"a LangGraph thread or run id is a UUID, got {shown!r}") from None


def add_langgraph_id_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--thread`` and ``--run`` (alternatives to ROOT) to a command's parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--thread", type=_langgraph_id, metavar="THREAD_ID", help="the root of this LangGraph thread's latest run"
    )
    group.add_argument("--run", type=_langgraph_id, metavar="RUN_ID", help="the root of this LangGraph run")


def _roots_given(args: argparse.Namespace) -> int:
    # A command takes one ROOT (`root`) or several (`roots`); count either.
    roots = getattr(args, "roots", None)
    return len(roots) if roots else int(bool(getattr(args, "root", None)))


def check_one_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """ROOT, or ``--thread``, or ``--run``, not two of them (a usage error, exit 2, otherwise)."""
    by_id = [name for name in ("thread", "run") if getattr(args, name, None)]
    if getattr(args, "all_runs", False) and not by_id:
        return  # `cancel --all` selects its runs itself
    if len(by_id) + bool(_roots_given(args)) + bool(getattr(args, "all_runs", False)) != 1:
        parser.error(f"{args.command}: give ROOT, --thread THREAD_ID or --run RUN_ID (one of them)")


async def resolve_root(store: CancelStore, args: argparse.Namespace) -> None:
    """Set the command's root (``args.root``, or ``args.roots`` where it takes several) from ``--thread``/``--run``.

    Raises:
        UnknownLangGraphIdError: no run under otel-cancel was recorded with that id
            (or its record expired with the flags' TTL).
    """
    if not (getattr(args, "thread", None) or getattr(args, "run", None)):
        return
    kind, value = ("run", args.run) if getattr(args, "run", None) else ("thread", args.thread)
    name = (LANGGRAPH_RUN_RECORD if kind == "run" else LANGGRAPH_THREAD_RECORD).format(value)
    try:
        record = await store.get_task(name)
    except InvalidTaskIdError:  # cannot happen for a UUID; kept for a clear message
        record = None
    if record is None:
        raise UnknownLangGraphIdError(
            f"no LangGraph {kind} {value} is known to otel-cancel "
            "(not created on a LangGraph Server with otel-cancel, or its record expired)"
        )
    if isinstance(getattr(args, "roots", None), list):
        args.roots.append(record.root)
    else:
        args.root = record.root
