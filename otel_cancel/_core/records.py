"""What a cancel flag, a receipt, a task record and a live-work record hold, (de)serialised in one place.

All are JSON objects in etcd. Parsing is strict: anything else under the prefix
(garbage, wrong JSON, a root that does not match its key) raises ``ValueError``,
which the watcher logs once and ignores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Mapping
from typing import Any

from ..attributes import CANCEL_KINDS, KIND_EXPLICIT
from ..exceptions import Cancelled
from .root_id import validate_root

MAX_VALUE_BYTES = 64 * 1024
"""Values larger than this under the prefix are not ours and are ignored."""
MAX_TEXT = 512
"""Reasons, requesters and node names are truncated to this many characters."""

# One compact encoder for the records written per flag (a flag, its receipts): json.dumps
# with separators builds a new JSONEncoder on every call, a quarter of a receipt's encoding.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


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

    Also what a local stop (a deadline passing, a caller leaving) is described by, though
    no flag is written for those.

    Attributes:
        root: the cancelled root.
        reason: why (free text, shown to people; never decided on).
        requested_at: when the flag was written, epoch nanoseconds.
        requested_by: who wrote it (``service/instance`` or ``cli@host``).
        kind: what kind of cancel this is (:data:`otel_cancel.attributes.CANCEL_KINDS`);
            what code decides on (a 504 for a deadline, a 409 otherwise).
    """

    root: str
    reason: str
    requested_at: int
    requested_by: str
    kind: str = KIND_EXPLICIT

    @classmethod
    def new(cls, root: str, reason: str, requested_by: str, kind: str = KIND_EXPLICIT) -> CancelRequest:
        """A request for ``root`` made now."""
        validate_root(root)
        return cls(root, reason[:MAX_TEXT], time.time_ns(), requested_by[:MAX_TEXT], kind)

    def error(self) -> Cancelled:
        """The :class:`~otel_cancel.Cancelled` that work stopped by this request raises."""
        return Cancelled(self.root, self.reason, self.kind)

    def tag(self) -> str:
        """The message of the ``task.cancel()`` that delivers this request (see :func:`read_tag`)."""
        return f"{_TAG}root={self.root}; kind={self.kind}; reason={self.reason}"

    def to_json(self) -> bytes:
        """The flag's value in etcd (``root`` first: see :meth:`starts_as_flag_of`)."""
        # A plain dict, not dataclasses.asdict (which deep-copies every field).
        data = {
            "root": self.root,
            "reason": self.reason,
            "requested_at": self.requested_at,
            "requested_by": self.requested_by,
            "kind": self.kind,
        }
        return _COMPACT.encode(data).encode()

    @staticmethod
    def starts_as_flag_of(raw: bytes, root: str) -> bool:
        """Whether ``raw`` begins the way :meth:`to_json` writes a flag of ``root`` (a cheap check, not a parse).

        A watcher that holds no work for ``root`` keeps such a value unread until it is needed.
        """
        return raw.startswith(b'{"root":"') and raw[9:41] == root.encode() and raw[41:43] == b'",'

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
        kind = data.get("kind", KIND_EXPLICIT)
        return cls(
            root=str(root),
            reason=_text(data.get("reason", ""), "reason"),
            requested_at=_int(data.get("requested_at", 0), "requested_at"),
            requested_by=_text(data.get("requested_by", ""), "requested_by"),
            # A kind this release does not know (a newer writer's) is an explicit cancel here.
            kind=kind if kind in CANCEL_KINDS else KIND_EXPLICIT,
        )


_TAG = "otel_cancel: "


def read_tag(message: object) -> tuple[str, str] | None:
    """The root and kind of a cancellation otel-cancel delivered, from its message; else ``None``.

    ``CancelledError.args[0]`` carries the message given to ``task.cancel()`` (anyio tags its
    cancellations the same way and recognises its own).
    """
    if not isinstance(message, str) or not message.startswith(_TAG):
        return None
    fields = dict(part.partition("=")[::2] for part in message[len(_TAG) :].split("; ", 2))
    root, kind = fields.get("root", ""), fields.get("kind", "")
    if kind not in CANCEL_KINDS:
        return None
    return root, kind


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
        return _COMPACT.encode(data).encode()

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
            depth=_int(data.get("depth", 0), "depth"),
            started_at=_int(data.get("started_at", 0), "started_at"),
            run_started_ms=_int(data.get("run_started_ms", 0), "run_started_ms"),
            scopes=tuple(_text(name, "scope") for name in scopes[:MAX_LIVE_SCOPES]),
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
        data = _load_object(raw)
        roots = data.get("roots", [])
        if not isinstance(roots, list):
            raise ValueError("roots must be a list")
        entries = []
        for item in roots:
            with contextlib.suppress(ValueError):
                entries.append(LiveEntry.from_dict(item))
        return cls(
            service=_text(data.get("service"), "service"),
            instance=_text(data.get("instance"), "instance"),
            published_at=_int(data.get("published_at", 0), "published_at"),
            roots=tuple(entries),
            truncated=_int(data.get("truncated", 0), "truncated"),
        )
