"""The exceptions otel-cancel raises, in one tree.

::

    OtelCancelError
     ├── Cancelled                 the work of a root was cancelled
     ├── InvalidRootError          a root that is not 32 lowercase hex digits (or is all zeros)
     ├── InvalidTaskIdError        a protocol task id that cannot name a store key
     ├── InvalidLabelError         a run label whose key or value is not allowed, or too many labels
     ├── ConfigurationError        bad settings; raised at start-up, never on a request
     └── StoreError                the cancel store failed
          ├── StoreUnavailableError     etcd could not be reached in time
          ├── StorePermissionError      etcd refused the credentials or the key
          └── RevisionCompactedError    a watch asked for history etcd has compacted

Client errors of the etcd library are translated into ``StoreError`` in exactly one
place, :mod:`otel_cancel.store.etcd`.
"""

from __future__ import annotations

from .attributes import KIND_EXPLICIT


class OtelCancelError(Exception):
    """Base class of every otel-cancel error."""


class Cancelled(OtelCancelError):
    """Work was stopped because its root was cancelled.

    Attributes:
        root: the cancelled root id.
        reason: why it was cancelled (free text given by the canceller, or ``deadline``).
        kind: what kind of cancel it was (one of :data:`otel_cancel.attributes.CANCEL_KINDS`:
            ``explicit``, ``deadline``, ``disconnect``, ``bulk``). Decide on it, not on ``reason``.
    """

    def __init__(self, root: str, reason: str, kind: str = KIND_EXPLICIT) -> None:
        super().__init__(f"root {root} was cancelled: {reason}")
        self.root = root
        self.reason = reason
        self.kind = kind

    def __reduce__(self) -> tuple[type[Cancelled], tuple[str, str, str]]:
        return (type(self), (self.root, self.reason, self.kind))


class InvalidRootError(OtelCancelError, ValueError):
    """A root id is not 32 lowercase hex digits, or is all zeros."""


class InvalidTaskIdError(OtelCancelError, ValueError):
    """A protocol task id (A2A) is empty, too long or holds characters a store key cannot."""


class InvalidLabelError(OtelCancelError, ValueError):
    """A run label's key or value is not allowed, or a run would carry too many labels."""


class ConfigurationError(OtelCancelError):
    """A setting is invalid; the message says which and what to do."""


class StoreError(OtelCancelError):
    """The cancel store failed."""


class StoreUnavailableError(StoreError):
    """The store could not be reached before the call's deadline."""


class StorePermissionError(StoreError):
    """The store refused the call (authentication or role permissions)."""


class RevisionCompactedError(StoreError):
    """A watch asked for a revision the store has compacted away.

    Attributes:
        compacted_revision: the oldest revision still available.
    """

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"revision compacted below {compacted_revision}")
        self.compacted_revision = compacted_revision
