"""What a root id is: 32 lowercase hex digits, not all zeros. No OpenTelemetry needed.

Kept apart from :mod:`otel_cancel._core.root` (which reads and writes roots in
OpenTelemetry contexts) so that what only checks or makes ids, like the CLI's
``cancel``, starts without importing OpenTelemetry.
"""

from __future__ import annotations

import os
import re

from ..exceptions import InvalidRootError

_ROOT_PATTERN = re.compile(r"[0-9a-f]{32}")
_ALL_ZEROS = "0" * 32
MAX_DEPTH = 1_000
"""Depths above this are treated as malformed input."""


def validate_root(value: object) -> str:
    """Return ``value`` if it is a valid root id, else raise.

    Args:
        value: the candidate root.

    Returns:
        The root, unchanged.

    Raises:
        InvalidRootError: ``value`` is not 32 lowercase hex digits, or is all zeros.
    """
    if not isinstance(value, str) or not _ROOT_PATTERN.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise InvalidRootError(f"a root is 32 lowercase hex digits, got {shown}")
    if value == _ALL_ZEROS:
        raise InvalidRootError("a root cannot be all zeros (that is the invalid trace id)")
    return value


def is_valid_root(value: object) -> bool:
    """Whether ``value`` is a valid root id."""
    # Asked on every hop: the checks of validate_root without building an exception.
    return isinstance(value, str) and _ROOT_PATTERN.fullmatch(value) is not None and value != _ALL_ZEROS


def random_root() -> str:
    """A fresh random root id."""
    while True:
        root = os.urandom(16).hex()  # what secrets.token_hex does, without importing secrets
        if root != _ALL_ZEROS:
            return root
