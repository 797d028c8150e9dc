"""A bulk cancel: one flag that selects many roots, which every process evaluates locally.

``cancel --all`` cannot list the roots it stops: work begun a moment before the call
may not be published yet, and a hop of such a run may still be on the wire. So it
writes one bulk flag, ``{prefix}flags/bulk/{id}``, with a selector (a service, labels,
or nothing: every run) and a cut-off (the time of the write). Each process's
watcher sees it next to ordinary flags and stops every live root that matches and
whose run began (``otel_cancel.started``, carried in baggage) at or before the
cut-off; it writes the ordinary flag of each such root, so its work stops in every
other process too. A hop that arrives later for a matching run is refused; a run
that began after the cut-off is untouched.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

from ..attributes import KIND_BULK
from .cancel_request import MAX_TEXT, CancelRequest, int_field, load_object, text_field
from .labels import validate_label, validate_labels

_BULK_ID_LENGTH = 16


@dataclasses.dataclass(frozen=True)
class BulkCancel:
    """The content of a bulk flag.

    Attributes:
        id: random hex id (the key's last segment).
        service: only runs with work in this service (``OTEL_SERVICE_NAME``), or ``None``.
        labels: only runs carrying all of these labels.
        reason: why (free text), copied onto each root it stops.
        requested_at: the cut-off: when the flag was written, epoch nanoseconds.
        requested_by: who wrote it.
    """

    id: str
    service: str | None
    labels: Mapping[str, str]
    reason: str
    requested_at: int
    requested_by: str

    @classmethod
    def new(cls, *, service: str | None, labels: Mapping[str, str], reason: str, requested_by: str) -> BulkCancel:
        """A bulk cancel made now (the store stamps the cut-off when it writes it)."""
        if service is not None and not service:
            raise ValueError("service must be a non-empty name or None")
        return cls(
            id=secrets.token_hex(_BULK_ID_LENGTH // 2),
            service=service[:MAX_TEXT] if service is not None else None,
            labels=validate_labels(labels),
            reason=reason[:MAX_TEXT],
            requested_at=time.time_ns(),
            requested_by=requested_by[:MAX_TEXT],
        )

    def selects(self, service: str, labels: Mapping[str, str], started_ms: int) -> bool:
        """Whether a run with work in ``service``, carrying ``labels``, begun at ``started_ms``, is selected."""
        if started_ms * 1_000_000 > self.requested_at:
            return False  # the run began after the call: untouched
        if self.service is not None and service != self.service:
            return False
        return all(labels.get(key) == value for key, value in self.labels.items())

    def request_for(self, root: str) -> CancelRequest:
        """The ordinary cancel request this bulk cancel makes for ``root``.

        Its requester names the bulk cancel (``cli:me@host (bulk 0123...)``): whichever
        process writes the root's flag first, ``status ROOT`` says where it came from.
        """
        by = f"{self.requested_by[: MAX_TEXT - 24]} (bulk {self.id})"
        return CancelRequest(root, self.reason, self.requested_at, by, KIND_BULK)

    def describe(self) -> str:
        """The selector in words (``service=S label tenant=T``, or ``everything``)."""
        parts = [f"service={self.service}"] if self.service is not None else []
        parts += [f"{key}={value}" for key, value in self.labels.items()]
        return " ".join(parts) or "everything"

    def to_json(self) -> bytes:
        """The bulk flag's value in etcd."""
        data: dict[str, Any] = dataclasses.asdict(self)
        data["labels"] = dict(self.labels)
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, expected_id: str | None = None) -> BulkCancel:
        """Parse a bulk flag's value.

        Raises:
            ValueError: the value is not a bulk flag, or names another id than its key.
        """
        data = load_object(raw)
        bulk_id = data.get("id")
        if not is_bulk_id(bulk_id):
            raise ValueError(f"bulk flag id must be {_BULK_ID_LENGTH} hex digits")
        if expected_id is not None and bulk_id != expected_id:
            raise ValueError(f"bulk flag {expected_id} names id {bulk_id!r}")
        service = data.get("service")
        labels = data.get("labels", {})
        if not isinstance(labels, dict):
            raise ValueError("labels must be an object")
        return cls(
            id=str(bulk_id),
            service=None if service is None else text_field(service, "service"),
            labels=dict(validate_label(key, value) for key, value in labels.items()),
            reason=text_field(data.get("reason", ""), "reason"),
            requested_at=int_field(data.get("requested_at"), "requested_at"),
            requested_by=text_field(data.get("requested_by", ""), "requested_by"),
        )


def is_bulk_id(value: object) -> bool:
    """Whether ``value`` can be a bulk flag id (16 lowercase hex digits)."""
    return isinstance(value, str) and len(value) == _BULK_ID_LENGTH and all(c in "0123456789abcdef" for c in value)


__all__ = ("BulkCancel", "is_bulk_id")
