"""Build and parse store keys. Keys are built only from validated roots."""

from __future__ import annotations

import functools
import re
from typing import Literal

from .._core.root_id import is_valid_root, validate_root
from ..exceptions import ConfigurationError, InvalidTaskIdError

_SEGMENT = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_TASK_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


LANGGRAPH_RUN_RECORD = "langgraph-run:{}"
"""The task-record name under which a LangGraph Server run records its root (``tasks/`` prefix)."""
LANGGRAPH_THREAD_RECORD = "langgraph-thread:{}"
"""The task-record name under which a LangGraph thread's latest run records its root."""


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if usable as a key prefix.

    Raises:
        ConfigurationError: it does not start and end with ``/`` or holds odd characters.
    """
    if not (prefix.startswith("/") and prefix.endswith("/")) or len(prefix) > 256:
        raise ConfigurationError(
            f"OTEL_CANCEL_PREFIX must start and end with '/' (like '/otel-cancel/'), got {prefix!r}"
        )
    if any(part in (".", "..") for part in prefix.split("/")) or not prefix.isprintable():
        raise ConfigurationError(f"OTEL_CANCEL_PREFIX must be a plain path, got {prefix!r}")
    return prefix


@functools.lru_cache(maxsize=256)
def key_segment(value: str) -> str:
    """``value`` made safe as one key segment (service and instance names).

    Cached: a process has one service and one instance, and names them in every receipt.
    """
    cleaned = "".join(c if _SEGMENT.fullmatch(c) else "_" for c in value)[:128]
    if cleaned in (".", ".."):
        # Harmless to etcd (keys are flat), but a key must read as a plain path, like the prefix.
        return cleaned.replace(".", "_")
    return cleaned or "_"


def flags_prefix(prefix: str) -> str:
    return f"{prefix}flags/"


def flag_key(prefix: str, root: str) -> str:
    return f"{prefix}flags/{validate_root(root)}"


def acks_prefix(prefix: str, root: str) -> str:
    return f"{prefix}acks/{validate_root(root)}/"


def receipt_key(prefix: str, root: str, service: str, instance: str) -> str:
    return f"{acks_prefix(prefix, root)}{key_segment(service)}/{key_segment(instance)}"


def root_of_flag_key(prefix: str, key: str) -> str | None:
    """The root a flag key names, or ``None`` when the key is not a valid flag key."""
    head = flags_prefix(prefix)
    if not key.startswith(head):
        return None
    root = key[len(head) :]
    return root if is_valid_root(root) else None


FLAG_KIND_ROOT = "root"
FLAG_KIND_BULK = "bulk"


def parse_flag_key(prefix: str, key: str) -> tuple[Literal["root", "bulk"], str] | None:
    """What a key under ``{prefix}flags/`` names, read once: a root's flag, a bulk cancel's, or neither.

    Returns:
        ``("root", root)``, ``("bulk", bulk_id)``, or ``None`` when the key is neither.
    """
    head = flags_prefix(prefix)
    if not key.startswith(head):
        return None
    name = key[len(head) :]
    if name.startswith("bulk/"):
        # Imported here: bulk cancelling loads OpenTelemetry's baggage, which `otel-cancel
        # status` never needs; a root's flag (every flag but a few) never gets here.
        from .._core.bulk import is_bulk_id

        bulk_id = name[5:]
        return ("bulk", bulk_id) if is_bulk_id(bulk_id) else None
    return ("root", name) if is_valid_root(name) else None


def validate_task_id(task_id: object) -> str:
    """Return ``task_id`` if it can name a key (UUIDs and similar ids).

    Raises:
        InvalidTaskIdError: it is empty, too long, holds a ``/`` or other odd characters, or is ``.``/``..``.
    """
    if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id) or task_id in (".", ".."):
        shown = task_id if isinstance(task_id, str) and len(task_id) <= 64 else f"{str(task_id)[:64]}..."
        raise InvalidTaskIdError(f"not a usable task id: {shown!r} (1-128 of A-Z a-z 0-9 . _ : @ -)")
    return task_id


def task_key(prefix: str, task_id: str) -> str:
    return f"{prefix}tasks/{validate_task_id(task_id)}"


def bulk_flag_key(prefix: str, bulk_id: str) -> str:
    from .._core.bulk import is_bulk_id

    if not is_bulk_id(bulk_id):
        raise ValueError(f"not a bulk flag id: {bulk_id!r}")
    return f"{prefix}flags/bulk/{bulk_id}"


def bulk_id_of_flag_key(prefix: str, key: str) -> str | None:
    """The id a bulk flag key names, or ``None`` when the key is not a bulk flag key."""
    from .._core.bulk import is_bulk_id

    head = f"{prefix}flags/bulk/"
    if not key.startswith(head):
        return None
    bulk_id = key[len(head) :]
    return bulk_id if is_bulk_id(bulk_id) else None


def live_prefix(prefix: str) -> str:
    return f"{prefix}live/"


def live_key(prefix: str, service: str, instance: str) -> str:
    return f"{live_prefix(prefix)}{key_segment(service)}/{key_segment(instance)}"
