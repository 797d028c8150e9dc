"""What a receipt, a task record and a live-work record hold, (de)serialised in one place.

All are JSON objects in etcd, parsed as strictly as a flag
(:mod:`otel_cancel._core.cancel_request`, whose field rules they share and whose
:class:`CancelRequest` is named here too): anything else raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

from .cancel_request import COMPACT_JSON, int_field, load_object, text_field
from .cancel_request import MAX_TEXT as MAX_TEXT
from .cancel_request import MAX_VALUE_BYTES as MAX_VALUE_BYTES
from .cancel_request import CancelRequest as CancelRequest
from .cancel_request import read_tag as read_tag
from .root_id import validate_root


@dataclasses.dataclass(frozen=True)
class Receipt:
    """What one process reports after its work for a root stopped.

    Attributes:
        root: the cancelled root.
        service: ``OTEL_SERVICE_NAME`` of the process.
        instance: the process (``hostname-pid`` unless configured).
        depth: hops from the root of the stopped work.
        seen_at: when this process saw the flag, epoch nanoseconds.
        stopped_at: when the last of its work for the root stopped, epoch nanoseconds.
        requested_at: when the flag was written, epoch nanoseconds (copied from the flag).
        interrupted: names of what was interrupted (LangGraph nodes, scope names).
        tasks: how many tasks or threads were stopped.
        reason: the flag's reason.
    """

    root: str
    service: str
    instance: str
    depth: int
    seen_at: int
    stopped_at: int
    requested_at: int
    interrupted: tuple[str, ...] = ()
    tasks: int = 0
    reason: str = ""

    @property
    def latency_ms(self) -> float:
        """Flag written to work stopped, in milliseconds."""
        return max(0, self.stopped_at - self.requested_at) / 1e6

    def to_json(self) -> bytes:
        """The receipt's value in etcd."""
        # A plain dict, not dataclasses.asdict (which deep-copies every field): a process
        # writes one receipt per flag that stopped its work, up to thousands a second.
        data = {
            "root": self.root,
            "service": self.service,
            "instance": self.instance,
            "depth": self.depth,
            "seen_at": self.seen_at,
            "stopped_at": self.stopped_at,
            "requested_at": self.requested_at,
            "interrupted": list(self.interrupted),
            "tasks": self.tasks,
            "reason": self.reason,
        }
        return COMPACT_JSON.encode(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Receipt:
        """Parse a receipt's value.

        Raises:
            ValueError: the value is not a receipt.
        """
        data = load_object(raw)
        interrupted = data.get("interrupted", [])
        if not isinstance(interrupted, list):
            raise ValueError("interrupted must be a list")
        return cls(
            root=validate_root(data.get("root")),
            service=text_field(data.get("service"), "service"),
            instance=text_field(data.get("instance"), "instance"),
            depth=int_field(data.get("depth", 0), "depth"),
            seen_at=int_field(data.get("seen_at"), "seen_at"),
            stopped_at=int_field(data.get("stopped_at"), "stopped_at"),
            requested_at=int_field(data.get("requested_at", 0), "requested_at"),
            interrupted=tuple(text_field(name, "interrupted") for name in interrupted[:100]),
            tasks=int_field(data.get("tasks", 0), "tasks"),
            reason=text_field(data.get("reason", ""), "reason"),
        )


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """Which root a protocol task (an A2A task) belongs to, and where it runs.

    Written by the process that runs the task, so that a cancel for the task that
    lands on any replica can cancel the task's root.

    Attributes:
        task_id: the protocol's task id.
        root: the root the task's work runs under.
        context_id: the protocol's context id (empty when there is none).
        service: ``OTEL_SERVICE_NAME`` of the process running the task.
        instance: that process.
        started_at: when the task started there, epoch nanoseconds.
    """

    task_id: str
    root: str
    context_id: str
    service: str
    instance: str
    started_at: int

    def to_json(self) -> bytes:
        """The record's value in etcd."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, expected_task_id: str | None = None) -> TaskRecord:
        """Parse a task record.

        Raises:
            ValueError: the value is not a task record, or names another task than its key.
        """
        data = load_object(raw)
        task_id = text_field(data.get("task_id"), "task_id")
        if expected_task_id is not None and task_id != expected_task_id:
            raise ValueError(f"record for task {expected_task_id!r} names task {task_id!r}")
        return cls(
            task_id=task_id,
            root=validate_root(data.get("root")),
            context_id=text_field(data.get("context_id", ""), "context_id"),
            service=text_field(data.get("service", ""), "service"),
            instance=text_field(data.get("instance", ""), "instance"),
            started_at=int_field(data.get("started_at", 0), "started_at"),
        )


MAX_LIVE_SCOPES = 8
"""Scope names a live-work entry keeps per root."""


@dataclasses.dataclass(frozen=True)
class LiveEntry:
    """One root's live work in one process.

    Attributes:
        root: the root.
        depth: hops from the root (the smallest, when several scopes hold it).
        started_at: when the root's work began in this process, epoch nanoseconds.
        run_started_ms: when the run began at its root, epoch milliseconds.
        scopes: names of the scopes live for it (LangGraph nodes, handlers).
        labels: the run's labels.
    """

    root: str
    depth: int
    started_at: int
    run_started_ms: int
    scopes: tuple[str, ...]
    labels: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "depth": self.depth,
            "started_at": self.started_at,
            "run_started_ms": self.run_started_ms,
            "scopes": list(self.scopes),
            "labels": dict(self.labels),
        }

    @functools.cached_property
    def encoded(self) -> str:
        """The entry as JSON text, encoded once (a record's size is counted from it, then it is written)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: object) -> LiveEntry:
        if not isinstance(data, dict):
            raise ValueError("a live root is an object")
        scopes = data.get("scopes", [])
        labels = data.get("labels", {})
        if not isinstance(scopes, list) or not isinstance(labels, dict):
            raise ValueError("scopes must be a list and labels an object")
        # Imported here: labels load OpenTelemetry, and a flag (this module's other
        # records) is read and written without it (the CLI's quick cancel).
        from .labels import validate_label

        return cls(
            root=validate_root(data.get("root")),
            depth=int_field(data.get("depth", 0), "depth"),
            started_at=int_field(data.get("started_at", 0), "started_at"),
            run_started_ms=int_field(data.get("run_started_ms", 0), "run_started_ms"),
            scopes=tuple(text_field(name, "scope") for name in scopes[:MAX_LIVE_SCOPES]),
            labels=dict(validate_label(key, value) for key, value in list(labels.items())[:16]),
        )


@dataclasses.dataclass(frozen=True)
class LiveRecord:
    """Everything one process holds work for, as published.

    Attributes:
        service: ``OTEL_SERVICE_NAME`` of the process.
        instance: the process (as in receipts).
        published_at: when this record was written, epoch nanoseconds.
        roots: one entry per root.
        truncated: roots left out to keep the record small.
    """

    service: str
    instance: str
    published_at: int
    roots: tuple[LiveEntry, ...]
    truncated: int = 0

    def to_json(self) -> bytes:
        # What json.dumps of the whole record gives, from each entry's own (cached) text.
        head = json.dumps(
            {"service": self.service, "instance": self.instance, "published_at": self.published_at},
            separators=(",", ":"),
        )
        roots = ",".join(entry.encoded for entry in self.roots)
        return f'{head[:-1]},"roots":[{roots}],"truncated":{self.truncated}}}'.encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LiveRecord:
        """Parse a live record; entries that are not well formed are skipped.

        Raises:
            ValueError: the value is not a live record.
        """
        data = load_object(raw)
        roots = data.get("roots", [])
        if not isinstance(roots, list):
            raise ValueError("roots must be a list")
        entries = []
        for item in roots:
            with contextlib.suppress(ValueError):
                entries.append(LiveEntry.from_dict(item))
        return cls(
            service=text_field(data.get("service"), "service"),
            instance=text_field(data.get("instance"), "instance"),
            published_at=int_field(data.get("published_at", 0), "published_at"),
            roots=tuple(entries),
            truncated=int_field(data.get("truncated", 0), "truncated"),
        )
