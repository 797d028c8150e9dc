"""What a cancel flag, a receipt and a task record hold, (de)serialised in one place.

All are JSON objects in etcd. Parsing is strict: anything else under the prefix
(garbage, wrong JSON, a root that does not match its key) raises ``ValueError``,
which the watcher logs once and ignores.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from ._root_id import validate_root

MAX_VALUE_BYTES = 64 * 1024
"""Values larger than this under the prefix are not ours and are ignored."""
MAX_TEXT = 512
"""Reasons, requesters and node names are truncated to this many characters."""


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    return value[:MAX_TEXT]


def _int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an integer, got {type(value).__name__}")
    return value


def _load_object(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_VALUE_BYTES:
        raise ValueError(f"value of {len(raw)} bytes is larger than {MAX_VALUE_BYTES}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"value is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"value is JSON {type(data).__name__}, not an object")
    return data


@dataclasses.dataclass(frozen=True)
class CancelRequest:
    """The content of a cancel flag.

    Attributes:
        root: the cancelled root.
        reason: why (free text).
        requested_at: when the flag was written, epoch nanoseconds.
        requested_by: who wrote it (``service/instance`` or ``cli@host``).
    """

    root: str
    reason: str
    requested_at: int
    requested_by: str

    @classmethod
    def new(cls, root: str, reason: str, requested_by: str) -> CancelRequest:
        """A request for ``root`` made now."""
        validate_root(root)
        return cls(root, reason[:MAX_TEXT], time.time_ns(), requested_by[:MAX_TEXT])

    def to_json(self) -> bytes:
        """The flag's value in etcd."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, expected_root: str | None = None) -> CancelRequest:
        """Parse a flag's value.

        Raises:
            ValueError: the value is not a flag, or names another root than its key.
        """
        data = _load_object(raw)
        root = data.get("root")
        validate_root(root)
        if expected_root is not None and root != expected_root:
            raise ValueError(f"flag for {expected_root} names root {root!r}")
        return cls(
            root=str(root),
            reason=_text(data.get("reason", ""), "reason"),
            requested_at=_int(data.get("requested_at", 0), "requested_at"),
            requested_by=_text(data.get("requested_by", ""), "requested_by"),
        )


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
        data = dataclasses.asdict(self)
        data["interrupted"] = list(self.interrupted)
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Receipt:
        """Parse a receipt's value.

        Raises:
            ValueError: the value is not a receipt.
        """
        data = _load_object(raw)
        interrupted = data.get("interrupted", [])
        if not isinstance(interrupted, list):
            raise ValueError("interrupted must be a list")
        return cls(
            root=validate_root(data.get("root")),
            service=_text(data.get("service"), "service"),
            instance=_text(data.get("instance"), "instance"),
            depth=_int(data.get("depth", 0), "depth"),
            seen_at=_int(data.get("seen_at"), "seen_at"),
            stopped_at=_int(data.get("stopped_at"), "stopped_at"),
            requested_at=_int(data.get("requested_at", 0), "requested_at"),
            interrupted=tuple(_text(name, "interrupted") for name in interrupted[:100]),
            tasks=_int(data.get("tasks", 0), "tasks"),
            reason=_text(data.get("reason", ""), "reason"),
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
        data = _load_object(raw)
        task_id = _text(data.get("task_id"), "task_id")
        if expected_task_id is not None and task_id != expected_task_id:
            raise ValueError(f"record for task {expected_task_id!r} names task {task_id!r}")
        return cls(
            task_id=task_id,
            root=validate_root(data.get("root")),
            context_id=_text(data.get("context_id", ""), "context_id"),
            service=_text(data.get("service", ""), "service"),
            instance=_text(data.get("instance", ""), "instance"),
            started_at=_int(data.get("started_at", 0), "started_at"),
        )
