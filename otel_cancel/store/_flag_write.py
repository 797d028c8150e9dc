"""Writing a cancel flag, whatever carries it to etcd: the key, the value, and what etcd's answer means.

A flag is created if absent, on a lease of the flag TTL, in one transaction
(compare: the key's version is 0; success: put the flag on the lease; failure: read
the flag there). The gRPC store (:mod:`otel_cancel.store.etcd`) and the CLI's HTTP
gateway client (:mod:`otel_cancel.store.etcd_gateway`) both write flags through
:class:`FlagCreation`, so the stamping, the JSON and the reading of an existing flag
are decided here once; each of them only speaks its wire format.
"""

from __future__ import annotations

import dataclasses
import time

from .._core.cancel_request import CancelRequest
from ._keys import flag_key

ACTION = "writing a cancel flag"
"""What the store was doing, as error messages say it."""


class FlagCreation:
    """One create-if-absent write of ``request``'s flag, over as many attempts as it takes.

    An attempt can time out after etcd committed it (the leader froze before
    answering); the next attempt, on another endpoint, then finds a flag. When that
    flag is one an earlier attempt wrote, this write created it.

    Args:
        prefix: the store's key prefix.
        request: the cancel to write; its ``requested_at`` is replaced by each attempt's.
    """

    def __init__(self, prefix: str, request: CancelRequest) -> None:
        self.request = request
        self.key = flag_key(prefix, request.root).encode()
        self._attempted: dict[bytes, CancelRequest] = {}

    def stamp(self) -> bytes:
        """The value one attempt puts, stamped now.

        Called once the lease is granted, right before the transaction, so latencies
        measure flag written -> work stopped.
        """
        stamped = dataclasses.replace(self.request, requested_at=time.time_ns())
        value = stamped.to_json()
        self._attempted[value] = stamped
        return value

    @property
    def attempts(self) -> tuple[CancelRequest, ...]:
        """The flag each attempt so far put, as stamped: any of them may be stored, its answer lost."""
        return tuple(self._attempted.values())

    def created(self, value: bytes) -> tuple[CancelRequest, bool]:
        """The result when the transaction put ``value`` (the flag did not exist)."""
        return self._attempted[value], True

    def found(self, existing: bytes | None) -> tuple[CancelRequest, bool]:
        """The result when the flag existed: the flag kept (the first cancel wins) and whether this write made it.

        Args:
            existing: the flag's value read by the failed transaction (``None``: it
                expired between the compare and the read).
        """
        if existing is None:
            return self.request, False
        if existing in self._attempted:
            return self._attempted[existing], True
        try:
            return CancelRequest.from_json(existing, self.request.root), False
        except ValueError:
            import logging  # only here: logging costs the CLI's start-up time

            logging.getLogger("otel_cancel.store").warning(
                "otel-cancel: flag for %s holds a malformed value; keeping it", self.request.root
            )
            # Not this write's request: nobody knows who wrote that flag, or when.
            return CancelRequest.of_malformed_flag(self.request.root), False
