"""etcd's errors become StoreErrors by gRPC status code, with the gRPC error chained as the cause."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import aetcd.exceptions
import grpc
import pytest
from debug_service import EVENT_TIMEOUT

from otel_cancel._core.records import CancelRequest
from otel_cancel._core.root import random_root
from otel_cancel.exceptions import RevisionCompactedError, StoreError, StorePermissionError, StoreUnavailableError
from otel_cancel.store._aetcd_patches import WatchRefusedError
from otel_cancel.store._grpc_errors import (
    ETCD_AUTH_FAILED,
    ETCD_COMPACTED,
    ETCD_USER_EMPTY,
    grpc_status,
    raising_store_errors,
    store_error_for,
)
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import EtcdServer, find_etcdctl_binary, free_port, on_io_loop

pytestmark = pytest.mark.anyio

StatusCode = grpc.StatusCode


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A real gRPC error, as grpc.aio raises it for a call that ended with this status."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def _as_aetcd_raises_it(rpc_error: grpc.aio.AioRpcError, cls: type[Exception]) -> Exception:
    """The aetcd exception for ``rpc_error``, chained to it the way aetcd's client raises it."""
    try:
        raise cls(rpc_error.details()) from rpc_error
    except cls as error:
        return error


# One row per status code (and, where etcd shares a code between errors, per etcd error).
_MAPPING = [
    (StatusCode.UNAVAILABLE, "etcdserver: no leader", StoreUnavailableError, "etcd unavailable while"),
    (StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", StoreUnavailableError, "etcd unavailable while"),
    (StatusCode.CANCELLED, "Channel closed", StoreUnavailableError, "etcd unavailable while"),
    (StatusCode.PERMISSION_DENIED, "etcdserver: permission denied", StorePermissionError, "lacks the permission"),
    (StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token", StorePermissionError, "refused the credentials"),
    (StatusCode.INVALID_ARGUMENT, ETCD_AUTH_FAILED, StorePermissionError, "OTEL_CANCEL_ETCD_PASSWORD"),
    (StatusCode.INVALID_ARGUMENT, ETCD_USER_EMPTY, StorePermissionError, "OTEL_CANCEL_ETCD_USERNAME"),
    (StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided", StoreError, "etcd failed while"),
    (StatusCode.OUT_OF_RANGE, ETCD_COMPACTED, RevisionCompactedError, "compacted"),
    (StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision", StoreError, "failed"),
    (StatusCode.NOT_FOUND, "etcdserver: requested lease not found", StoreError, "lease not found"),
    (StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded", StoreError, "etcd failed while"),
    (StatusCode.INTERNAL, "etcdserver: corrupt cluster", StoreError, "etcd failed while"),
    (StatusCode.UNKNOWN, "something else", StoreError, "etcd failed while"),
]


@pytest.mark.parametrize(("code", "details", "expected", "message"), _MAPPING)
def test_a_grpc_error_maps_on_its_status_code(code, details, expected, message):
    """A raw gRPC error becomes the StoreError its code stands for, exactly that type, with a clear message."""
    error = store_error_for(_rpc_error(code, details), "doing a thing")
    assert type(error) is expected
    assert message in str(error) and ("doing a thing" in str(error) or expected is RevisionCompactedError)


@pytest.mark.parametrize(("code", "details", "expected", "message"), _MAPPING)
def test_an_aetcd_error_maps_on_the_status_code_of_its_grpc_cause(code, details, expected, message):
    """aetcd wraps the gRPC error (any of its classes): the mapping reads the code of the cause, not the class."""
    error = store_error_for(_as_aetcd_raises_it(_rpc_error(code, details), aetcd.exceptions.ClientError), "doing")
    assert type(error) is expected and message in str(error)


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (aetcd.exceptions.ConnectionFailedError, StoreUnavailableError),
        (aetcd.exceptions.ConnectionTimeoutError, StoreUnavailableError),
        (aetcd.exceptions.UnauthenticatedError, StorePermissionError),
        (aetcd.exceptions.WatchTimeoutError, StoreUnavailableError),
        (aetcd.exceptions.ClientError, StoreError),
    ],
)
def test_an_aetcd_error_without_a_grpc_cause_maps_on_the_code_its_class_stands_for(cls, expected):
    """aetcd raises some errors itself (a watch that timed out): its class stands for the code."""
    assert type(store_error_for(cls("deadline exceeded"), "doing")) is expected


def test_watch_responses_and_socket_errors_map_too():
    """A refused or compacted watch (a response, not a status) and plain timeouts or socket errors are mapped."""
    assert type(store_error_for(WatchRefusedError("etcdserver: permission denied"), "w")) is StorePermissionError
    compacted = store_error_for(aetcd.exceptions.RevisionCompactedError(42), "w")
    assert isinstance(compacted, RevisionCompactedError) and compacted.compacted_revision == 42
    assert type(store_error_for(TimeoutError(), "w")) is StoreUnavailableError
    assert type(store_error_for(ConnectionRefusedError(), "w")) is StoreUnavailableError
    assert store_error_for(ValueError("a bug"), "w") is None


def test_the_store_error_is_raised_from_the_grpc_error():
    """raising_store_errors chains the client error as __cause__ (never ``from None``): the gRPC status stays."""
    rpc_error = _rpc_error(StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")
    wrapped = _as_aetcd_raises_it(rpc_error, aetcd.exceptions.ClientError)
    with pytest.raises(StorePermissionError) as raised, raising_store_errors("writing a cancel flag"):
        raise wrapped
    assert raised.value.__cause__ is wrapped and wrapped.__cause__ is rpc_error
    assert grpc_status(raised.value) == (StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")


def test_errors_that_are_not_client_errors_pass_through_unchanged():
    """A bug inside a store call is not disguised as an etcd failure."""
    with pytest.raises(KeyError), raising_store_errors("doing"):
        raise KeyError("bug")


# -- against a real etcd ----------------------------------------------------------------------------


@on_io_loop
async def test_an_unreachable_etcd_arrives_as_unavailable_with_the_grpc_cause():
    """Nobody listens on the endpoint: StoreUnavailableError whose cause chain holds gRPC's UNAVAILABLE."""
    store = EtcdCancelStore([f"127.0.0.1:{free_port()}"], timeout=1.0)
    try:
        with pytest.raises(StoreUnavailableError) as raised:
            await store.get_flag(random_root())
    finally:
        await store.close()
    assert raised.value.__cause__ is not None
    assert grpc_status(raised.value) is not None
    assert grpc_status(raised.value)[0] in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED)


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[EtcdServer]:
    """etcd with authentication on: ``root``, and ``nobody``, a user with no role."""
    with EtcdServer() as server:

        def etcdctl(*args: str) -> None:
            command = [find_etcdctl_binary(), f"--endpoints={server.endpoint}", "--user=root:root-password", *args]
            result = subprocess.run(command, capture_output=True, text=True, timeout=EVENT_TIMEOUT)
            assert result.returncode == 0, (args, result.stderr)

        etcdctl("user", "add", "root", "--new-user-password=root-password")
        etcdctl("user", "grant-role", "root", "root")
        etcdctl("user", "add", "nobody", "--new-user-password=nobody-password")
        etcdctl("auth", "enable")
        yield server


@on_io_loop
async def test_a_role_without_the_permission_arrives_as_permission_error_with_the_grpc_cause(auth_etcd, prefix):
    """etcd's PERMISSION_DENIED: StorePermissionError, the same message as before, the gRPC status on the cause."""
    store = EtcdCancelStore([auth_etcd.endpoint], prefix=prefix, username="nobody", password="nobody-password")
    try:
        with pytest.raises(
            StorePermissionError, match=r"etcd denied writing a cancel flag: .*lacks the permission"
        ) as raised:
            await store.create_flag(CancelRequest.new(random_root(), "t", "tests"), 60)
    finally:
        await store.close()
    assert raised.value.__cause__ is not None
    assert grpc_status(raised.value) == (StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")


@on_io_loop
async def test_wrong_credentials_arrive_as_permission_error_with_the_grpc_cause(auth_etcd, prefix):
    """etcd's "authentication failed" (INVALID_ARGUMENT) is a refusal of the credentials, chained to the status."""
    store = EtcdCancelStore([auth_etcd.endpoint], prefix=prefix, username="nobody", password="wrong")
    try:
        with pytest.raises(StorePermissionError, match="refused the credentials") as raised:
            await store.get_flag(random_root())
    finally:
        await store.close()
    assert isinstance(raised.value.__cause__, grpc.aio.AioRpcError)
    assert grpc_status(raised.value) == (StatusCode.INVALID_ARGUMENT, ETCD_AUTH_FAILED)


@on_io_loop
async def test_no_credentials_on_an_etcd_with_auth_arrive_as_permission_error(auth_etcd, prefix):
    """etcd's "user name is empty" (INVALID_ARGUMENT): the credentials are missing, said so, cause chained."""
    store = EtcdCancelStore([auth_etcd.endpoint], prefix=prefix)
    try:
        with pytest.raises(StorePermissionError, match="OTEL_CANCEL_ETCD_USERNAME") as raised:
            await store.get_flag(random_root())
    finally:
        await store.close()
    assert grpc_status(raised.value) == (StatusCode.INVALID_ARGUMENT, ETCD_USER_EMPTY)


@on_io_loop
async def test_a_listing_whose_revision_was_compacted_arrives_as_revision_compacted(auth_etcd, prefix):
    """Compacted between two pages (etcd's OUT_OF_RANGE "compacted"): RevisionCompactedError, cause chained."""
    store = EtcdCancelStore([auth_etcd.endpoint], prefix=prefix, username="root", password="root-password")
    pages = store.list_flag_pages(page_size=1)
    try:
        for _ in range(2):
            await store.create_flag(CancelRequest.new(random_root(), "t", "tests"), 60)
        first = await anext(pages)
        await store.create_flag(CancelRequest.new(random_root(), "t", "tests"), 60)
        client = store._connection()
        await client.compact((await store.list_flags()).revision)
        assert first.revision < (await store.list_flags()).revision
        with pytest.raises(RevisionCompactedError) as raised:
            await anext(pages)
    finally:
        await pages.aclose()
        await store.close()
    assert grpc_status(raised.value) == (StatusCode.OUT_OF_RANGE, ETCD_COMPACTED)
