"""How an etcd client error becomes a :class:`~otel_cancel.exceptions.StoreError`: one mapping on gRPC status codes.

etcd answers every failed call with a gRPC status, and its code says what kind of
failure it was; :func:`store_error_for` finds the status behind a client error and
maps it with :func:`~otel_cancel.store._status.store_error_for_status` (the table is
there, free of gRPC, shared with the CLI's HTTP gateway client), and
:func:`raising_store_errors` raises the result *from* the client error, so the
gRPC status stays on ``__cause__`` for whoever debugs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aetcd.exceptions
import grpc

from ..exceptions import RevisionCompactedError, StoreError, StorePermissionError, StoreUnavailableError
from ._aetcd_patches import WatchRefusedError
from ._status import ETCD_AUTH_FAILED as ETCD_AUTH_FAILED
from ._status import ETCD_COMPACTED as ETCD_COMPACTED
from ._status import ETCD_USER_EMPTY as ETCD_USER_EMPTY
from ._status import store_error_for_os_error, store_error_for_status

# aetcd turns a gRPC error into one of these (chaining the gRPC error). When one comes
# without that cause, the code aetcd saw is the one its class stands for.
_AETCD_ERROR_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (aetcd.exceptions.ConnectionFailedError, grpc.StatusCode.UNAVAILABLE),
    (aetcd.exceptions.ConnectionTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (aetcd.exceptions.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (aetcd.exceptions.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (aetcd.exceptions.PreconditionFailedError, grpc.StatusCode.FAILED_PRECONDITION),
    (aetcd.exceptions.InternalError, grpc.StatusCode.INTERNAL),
)


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status (code, details) behind a client error, or ``None`` when there is none.

    It is the error's own status, or the status of an error in its ``__cause__`` chain
    (aetcd raises its exceptions from the gRPC error; the store raises its own from
    aetcd's). An aetcd exception without that cause stands for the code of its class.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, grpc.aio.AioRpcError):
            return current.code(), current.details() or ""
        current = current.__cause__
    for cls, code in _AETCD_ERROR_CODES:
        if isinstance(error, cls):
            return code, str(error)
    return None


def status_code(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC status code behind a client error (see :func:`grpc_status`)."""
    status = grpc_status(error)
    return None if status is None else status[0]


def is_lease_not_found(error: BaseException) -> bool:
    """Whether etcd refused a put because its lease no longer exists (``NOT_FOUND``: etcd's only one)."""
    return bool(status_code(error) == grpc.StatusCode.NOT_FOUND)


def is_permission_denied(error: BaseException) -> bool:
    """Whether etcd refused a call because the user's role lacks the permission."""
    return bool(status_code(error) == grpc.StatusCode.PERMISSION_DENIED)


def is_rejected_token(error: BaseException) -> bool:
    """Whether etcd rejected the call's auth token (expired, or etcd restarted): ``UNAUTHENTICATED``."""
    return bool(status_code(error) == grpc.StatusCode.UNAUTHENTICATED)


def store_error_for(error: BaseException, action: str) -> StoreError | None:
    """The :class:`~otel_cancel.exceptions.StoreError` that stands for a client error.

    Args:
        error: what the etcd client (aetcd, gRPC, the socket) raised.
        action: what the store was doing, for the message ("writing a receipt").

    Returns:
        The error to raise (from ``error``), or ``None`` when ``error`` is not a
        client error (a bug, to propagate as it is).
    """
    if isinstance(error, StoreError):
        return error
    if isinstance(error, aetcd.exceptions.RevisionCompactedError):  # from a watch response, not a status
        return RevisionCompactedError(error.compacted_revision)
    if isinstance(error, WatchRefusedError):  # a watch response's cancel reason, not a status
        return StorePermissionError(
            f"etcd refused {action}: {error}; the etcd role of this user must be allowed to read the flags prefix "
            "(or the watch stream's auth token expired)"
        )
    if isinstance(error, aetcd.exceptions.WatchTimeoutError):
        return StoreUnavailableError(f"etcd did not answer in time while {action}")
    status = grpc_status(error)
    if status is not None:
        code, details = status
        # aetcd's message is etcd's description; a raw gRPC error is named by its code too.
        detail = f"{code.name} {details}" if isinstance(error, grpc.aio.AioRpcError) else str(error)
        return store_error_for_status(int(code.value[0]), details, detail, action)
    if isinstance(error, aetcd.exceptions.ClientError):
        return StoreError(f"etcd failed while {action}: {error}")
    if isinstance(error, OSError):
        return store_error_for_os_error(error, action)
    return None


@contextlib.contextmanager
def raising_store_errors(action: str) -> Iterator[None]:
    """Raise every etcd client error inside as its :func:`store_error_for`, chained to it."""
    try:
        yield
    except StoreError:
        raise
    except Exception as error:
        translated = store_error_for(error, action)
        if translated is None:
            raise
        raise translated from error
