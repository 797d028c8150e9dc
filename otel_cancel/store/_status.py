"""What an etcd error status means to otel-cancel: the :class:`~otel_cancel.exceptions.StoreError` for each gRPC code.

etcd answers a failed call with a gRPC status, over gRPC (the store, through
:mod:`otel_cancel.store._grpc_errors`) and in the JSON body of its HTTP gateway
(``{"code": 7, "message": ...}``, :mod:`otel_cancel.store.etcd_gateway`). Both
translate it here, by code number, so one table decides; this module imports no
gRPC, which keeps the CLI's gateway path light. Where one code covers several etcd
errors (``INVALID_ARGUMENT`` is both a wrong password and an empty key), etcd's own
error constant tells them apart: the exact description etcd's ``rpctypes`` gives it,
which etcd's Go client also matches to recognise its errors.

=======================================  ===========================================
gRPC status (etcd error)                 raised
=======================================  ===========================================
``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,  :class:`~otel_cancel.exceptions.StoreUnavailableError`
``CANCELLED`` (the channel closed)       (the store fails over to the next endpoint)
``PERMISSION_DENIED``                    :class:`~otel_cancel.exceptions.StorePermissionError` (role)
``UNAUTHENTICATED`` (invalid token),     :class:`~otel_cancel.exceptions.StorePermissionError` (credentials)
``INVALID_ARGUMENT`` (authentication
failed, user name is empty)
``OUT_OF_RANGE`` (revision compacted)    :class:`~otel_cancel.exceptions.RevisionCompactedError`
any other code                           :class:`~otel_cancel.exceptions.StoreError`
=======================================  ===========================================
"""

from __future__ import annotations

from ..exceptions import RevisionCompactedError, StoreError, StorePermissionError, StoreUnavailableError

# gRPC status codes (google.golang.org/grpc/codes), by number as the gateway reports them.
CANCELLED = 1
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
OUT_OF_RANGE = 11
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# etcd's error descriptions (go.etcd.io/etcd/api/v3rpc/rpctypes) for the errors that
# share a code with others.
ETCD_AUTH_FAILED = "etcdserver: authentication failed, invalid user ID or password"
ETCD_USER_EMPTY = "etcdserver: user name is empty"
ETCD_COMPACTED = "etcdserver: mvcc: required revision has been compacted"

_UNAVAILABLE_CODES = frozenset({UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED})


def store_error_for_status(code: int, details: str, detail: str, action: str) -> StoreError:
    """The :class:`~otel_cancel.exceptions.StoreError` that stands for an etcd status.

    Args:
        code: the gRPC status code, as a number.
        details: etcd's description of the error (compared with etcd's constants).
        detail: the error as the message shows it.
        action: what the store was doing, for the message ("writing a cancel flag").
    """
    if code in _UNAVAILABLE_CODES:
        return StoreUnavailableError(f"etcd unavailable while {action}: {detail}")
    if code == PERMISSION_DENIED:
        return StorePermissionError(f"etcd denied {action}: {detail}; the etcd role of this user lacks the permission")
    if code == UNAUTHENTICATED or (code == INVALID_ARGUMENT and details in (ETCD_AUTH_FAILED, ETCD_USER_EMPTY)):
        return StorePermissionError(
            f"etcd refused the credentials while {action}: {detail}; "
            "check OTEL_CANCEL_ETCD_USERNAME / OTEL_CANCEL_ETCD_PASSWORD"
        )
    if code == OUT_OF_RANGE and details == ETCD_COMPACTED:
        return RevisionCompactedError(0)  # a range names no compaction revision
    return StoreError(f"etcd failed while {action}: {detail}")


def store_error_for_os_error(error: OSError, action: str) -> StoreUnavailableError:
    """The error for a connection that failed below etcd's API: timed out, refused, reset."""
    if isinstance(error, TimeoutError):
        return StoreUnavailableError(f"etcd did not answer in time while {action}")
    return StoreUnavailableError(f"etcd unreachable while {action}: {error}")
