"""Signed roots: an HMAC over the root, carried in baggage as ``otel_cancel.sig``.

With ``OTEL_CANCEL_SIGNING_KEY`` set, every root this process starts is signed,
and an internal service adopts an incoming root only when its signature
verifies; an unsigned or badly signed root is treated as untrusted (the request
starts its own root). The key is shared by every service of the system.
"""

from __future__ import annotations

import hashlib
import hmac

_SIGNATURE_HEX = 32


def sign_root(key: bytes, root: str) -> str:
    """The signature of ``root`` under ``key`` (32 hex digits)."""
    return hmac.new(key, f"otel_cancel.root={root}".encode(), hashlib.sha256).hexdigest()[:_SIGNATURE_HEX]


def verify_root(key: bytes, root: str, signature: object) -> bool:
    """Whether ``signature`` is the signature of ``root`` under ``key`` (constant time)."""
    if not isinstance(signature, str) or len(signature) != _SIGNATURE_HEX:
        return False
    return hmac.compare_digest(sign_root(key, root), signature)
