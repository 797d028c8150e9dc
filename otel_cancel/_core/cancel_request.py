"""What a cancel flag holds, (de)serialised in one place, and the JSON field rules every record follows.

A flag is a JSON object in etcd. Parsing is strict: anything else under the prefix
(garbage, wrong JSON, a root that does not match its key) raises ``ValueError``,
which the watcher logs once and ignores. The other records (receipts, task and
live-work records, :mod:`otel_cancel._core.records`) follow the same field rules;
the flag lives apart from them because a plain ``otel-cancel cancel`` writes flags
and nothing else, and every record class defined at import costs it start-up time.
"""

from __future__ import annotations

import dataclasses
import json
import time
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
MALFORMED_FLAG_REASON = "unknown (malformed flag)"
"""The reason of a flag whose value does not decode: its root is cancelled all the same."""

COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def text_field(value: object, field: str) -> str:
    """``value`` as a record's text field, cut to :data:`MAX_TEXT` characters.

    Raises:
        ValueError: it is not a string.
    """
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    return value[:MAX_TEXT]


def int_field(value: object, field: str) -> int:
    """``value`` as a record's integer field.

    Raises:
        ValueError: it is not an integer (``bool`` is not one).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an integer, got {type(value).__name__}")
    return value


def load_object(raw: bytes) -> dict[str, Any]:
    """A stored value parsed as a JSON object.

    Raises:
        ValueError: it is too large, not JSON, nested too deeply, or not an object.
    """
    if len(raw) > MAX_VALUE_BYTES:
        raise ValueError(f"value of {len(raw)} bytes is larger than {MAX_VALUE_BYTES}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"value is not JSON: {error}") from None
    except RecursionError:
        # A few kilobytes of brackets exhaust the parser's stack: bad input, whose callers
        # (the watcher, a refusal) expect a ValueError like any other.
        raise ValueError("value is JSON nested too deeply") from None
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

    @classmethod
    def of_malformed_flag(cls, root: str) -> CancelRequest:
        """What a flag whose value does not decode stands for: its key still says ``root`` is cancelled."""
        return cls(root, MALFORMED_FLAG_REASON, 0, "")

    @classmethod
    def of_flag(cls, root: str, raw: bytes) -> CancelRequest:
        """The request the value of ``root``'s flag holds, or :meth:`of_malformed_flag` when it does not decode."""
        try:
            return cls.from_json(raw, root)
        except ValueError:
            return cls.of_malformed_flag(root)

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
        return COMPACT_JSON.encode(data).encode()

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
            ValueError: the value is not a flag, or names another root than its key. Nothing
                else: every process decodes every flag, and one foreign value must not end
                its watcher.
        """
        data = load_object(raw)
        root = data.get("root")
        validate_root(root)
        if expected_root is not None and root != expected_root:
            raise ValueError(f"flag for {expected_root} names root {root!r}")
        kind = data.get("kind", KIND_EXPLICIT)
        if not isinstance(kind, str):
            # Checked before the set lookup below, which raises TypeError for a list or an object.
            raise ValueError(f"kind must be a string, got {type(kind).__name__}")
        return cls(
            root=str(root),
            reason=text_field(data.get("reason", ""), "reason"),
            requested_at=int_field(data.get("requested_at", 0), "requested_at"),
            requested_by=text_field(data.get("requested_by", ""), "requested_by"),
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
