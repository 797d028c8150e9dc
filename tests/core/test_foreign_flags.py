"""Values under the flags prefix that no parser accepts: a ValueError only, and the key still cancels its root."""

from __future__ import annotations

import pytest

from otel_cancel._core.records import CancelRequest
from otel_cancel._core.registry import CancelRegistry
from otel_cancel._core.root import random_root

UNKNOWN = "unknown (malformed flag)"
_DEPTH = 30_000
"""Deeper than any Python's JSON parser goes (3.13's takes 8,000), within the 64 KiB a flag may hold."""


def _foreign_values(root: str) -> list[bytes]:
    """Values that start the way a flag of ``root`` does, and that no flag parser accepts."""
    start = f'{{"root":"{root}",'
    return [
        (start + '"kind":[]}').encode(),
        (start + '"kind":{}}').encode(),
        (start + '"kind":7}').encode(),
        (start + '"x":' + "[" * _DEPTH + "]" * _DEPTH + "}").encode(),
    ]


def test_a_value_no_parser_accepts_raises_value_error_and_nothing_else():
    """A non-string kind or a deeply nested value is a ValueError, as every other malformed flag is."""
    root = random_root()
    for raw in _foreign_values(root):
        assert CancelRequest.starts_as_flag_of(raw, root)
        with pytest.raises(ValueError):
            CancelRequest.from_json(raw, root)


def test_a_bystander_refuses_the_root_of_an_unread_value_no_parser_accepts():
    """Kept unread, such a value refuses its root's scopes with an unknown reason and leaks no registration."""
    registry = CancelRegistry()
    for raw in _foreign_values(root := random_root()):
        registry.forget(root)
        assert registry.apply_unread(root, raw)
        registration, refused = registry.enter(root, 1, "late", task_mode=False)
        registry.exit(registration)
        assert refused is not None and refused.reason == UNKNOWN
        assert registry.live_scopes() == 0
        assert registry.is_cancelled(root) == refused


def test_an_unread_flag_whose_decoding_failed_still_cancels_its_root():
    """A decoder that raises does not drop the flag's bytes: the next scope for the root is still refused."""
    registry = CancelRegistry()
    flag = CancelRequest.new(random_root(), "r", "x")
    failures = [RuntimeError("decoder bug")]

    def decode(root: str, raw: bytes) -> CancelRequest:
        if failures:
            raise failures.pop()
        return CancelRequest.from_json(raw, root)

    registry.decode_flag = decode
    registry.apply_unread(flag.root, flag.to_json())
    with pytest.raises(RuntimeError):
        registry.is_cancelled(flag.root)
    assert registry.is_cancelled(flag.root) == flag
