"""What the store reports about flags: one change, a whole listing, one page of it.

Every backend produces these and the watcher reads them. They live apart from the
store's interface (:mod:`otel_cancel.store`) so that a command that only writes flags
does not define them at start-up.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class FlagEvent:
    """A change under ``{prefix}flags/``, as the store saw it.

    Attributes:
        kind: ``put`` (a flag was written) or ``delete`` (it expired or was removed).
        key: the full key.
        value: the raw value (empty for deletes); the watcher parses it.
        revision: the store revision of the change.
    """

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


@dataclasses.dataclass(frozen=True)
class FlagListing:
    """Every flag present at ``revision``."""

    flags: tuple[FlagEvent, ...]
    revision: int


@dataclasses.dataclass(frozen=True)
class FlagPage:
    """One page of a listing: some of the flags present at ``revision``.

    Every page of one listing carries the same revision, so together they are one
    consistent snapshot. Pages of a keys-only listing have empty values.
    """

    flags: tuple[FlagEvent, ...]
    revision: int
