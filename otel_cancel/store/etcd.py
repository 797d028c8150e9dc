"""The etcd cancel store (through ``aetcd``, asyncio gRPC).

Every call runs inside :func:`~otel_cancel.store._grpc_errors.raising_store_errors`,
which maps the client's errors on their gRPC status codes to
:class:`~otel_cancel.exceptions.StoreError` subclasses raised from the gRPC error;
nothing above this module sees an ``aetcd`` or ``grpc`` exception. What aetcd lacks
(TLS, token renewal, refused watches) lives in :mod:`otel_cancel.store._aetcd_patches`,
the one module that touches aetcd's internals. Every call carries a deadline (the
client's ``timeout``), so a hung etcd never hangs a caller.

The client is created lazily, on the event loop of the first call, because a gRPC
aio channel belongs to the loop that created it. Inside services that loop is the
process's IO loop (:mod:`otel_cancel._core.io_loop`). When a call finds an endpoint
unavailable the client is dropped and the next call uses the next endpoint
(fail-over across ``OTEL_CANCEL_ETCD_ENDPOINTS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aetcd.exceptions
import aetcd.rpc
import grpc

from .._core.bulk import BulkCancel
from .._core.io_loop import io_loop
from .._core.records import CancelRequest, LiveRecord, Receipt, TaskRecord
from ..exceptions import StoreError, StorePermissionError, StoreUnavailableError
from . import DEFAULT_PREFIX, LIST_PAGE_SIZE, FlagEvent, FlagListing, FlagPage
from ._aetcd_patches import PatchedEtcdClient
from ._endpoints import check_connection
from ._endpoints import parse_endpoint as parse_endpoint
from ._flag_write import ACTION as FLAG_ACTION
from ._flag_write import FlagCreation
from ._grpc_errors import is_lease_not_found, is_permission_denied, is_rejected_token, raising_store_errors
from ._keys import (
    acks_prefix,
    bulk_flag_key,
    flag_key,
    flags_prefix,
    live_key,
    live_prefix,
    receipt_key,
    task_key,
    validate_prefix,
)
from ._tls import read_credentials

_log = logging.getLogger("otel_cancel.store")

DEFAULT_TIMEOUT_SECONDS = 2.0
_MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``: receipts written together go in transactions of at most this many puts."""
_FLAG_LEASES_REMEMBERED = 4096
"""How many flags' lease ids a store remembers, newest first, to put receipts on them."""

# gRPC shares a subchannel (the TCP connection and its reconnect backoff) between all
# channels of a process with the same target and arguments. After etcd went away, a
# new channel would then inherit a sibling's backoff and fail fast with the old
# "connection refused" although etcd is back. Each channel gets its own subchannel, and
# reconnect backoff is capped (gRPC's default grows to two minutes).
_CHANNEL_OPTIONS = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2000,
}


class _MessageTooLargeError(Exception):
    """A response was larger than gRPC's receive limit (a page of oversized values)."""


def _prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that covers every key starting with ``prefix`` (etcd's rule)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _range_call(request: Any, timeout: float) -> Any:
    """An operation for :meth:`EtcdCancelStore._call` running one raw ``Range`` (aetcd has no paging)."""

    async def run(client: PatchedEtcdClient) -> Any:
        try:
            return await client.kvstub.Range(request, timeout=timeout, metadata=client.metadata)
        except grpc.aio.AioRpcError as error:
            # gRPC's own receive limit (its message says so): retry with smaller pages.
            # Every other status is mapped with the store's other errors.
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (error.details() or ""):
                raise _MessageTooLargeError(error.details()) from error
            raise

    return run


class EtcdCancelStore:
    """A :class:`~otel_cancel.store.CancelStore` on etcd v3.

    Args:
        endpoints: ``host:port`` strings; the client fails over between them.
        prefix: key prefix (default ``/otel-cancel/``).
        timeout: deadline of each call, in seconds.
        username: etcd user (with ``password``) when etcd authentication is on.
        password: the user's password.
        ca_cert: path of a PEM CA bundle; turns TLS on.
        cert: path of a PEM client certificate (mutual TLS).
        key: path of the client certificate's key.
    """

    def __init__(
        self,
        endpoints: Sequence[str] = ("127.0.0.1:2379",),
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        username: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        self.endpoints = check_connection(
            endpoints, timeout=timeout, username=username, password=password, cert=cert, key=key
        )
        self.prefix = validate_prefix(prefix)
        self.timeout = timeout
        self._username = username or None
        self._password = password or None
        self._credentials = read_credentials(ca_cert, cert, key)
        self._client: PatchedEtcdClient | None = None
        self._endpoint_index = 0
        self._receipts_on_own_lease = False
        # The lease of every flag this store listed, saw in the watch or wrote, by the flag's
        # key (as it came: a bystander never parses a key twice): a receipt joins its flag's
        # lease with one put, instead of reading the flag first.
        self._flag_leases: OrderedDict[str, int] = OrderedDict()

    @property
    def endpoint(self) -> str:
        """The endpoint in use (or to be used next)."""
        host, port = self.endpoints[self._endpoint_index]
        return f"{host}:{port}"

    def _connection(self) -> PatchedEtcdClient:
        if self._client is None:
            # Pin gRPC's poller to the process IO loop before the first channel exists
            # (see otel_cancel._core.io_loop), whatever loop this store is used from.
            io_loop().start()
            host, port = self.endpoints[self._endpoint_index]
            self._client = PatchedEtcdClient(
                host=host,
                port=port,
                username=self._username,
                password=self._password,
                # aetcd types the timeout as int but hands it to gRPC, which takes floats.
                timeout=self.timeout,
                credentials=self._credentials,
                connect_wait_timeout=self.timeout,
                options=_CHANNEL_OPTIONS,
            )
        return self._client

    async def _drop_connection(self, rotate: bool) -> None:
        client, self._client = self._client, None
        if rotate:
            self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), self.timeout)

    async def _call(self, action: str, operation: Any) -> Any:
        """Run ``operation(client)`` with fail-over: each endpoint is tried once."""
        last_error: StoreError | None = None
        for _ in range(len(self.endpoints)):
            try:
                with raising_store_errors(action):
                    return await asyncio.wait_for(self._renewing_token(operation), self.timeout * 2)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # this task is being cancelled: let it be
                # Nobody cancelled this task: grpc.aio cancels every call of a channel
                # that is closed, and another call on this store closed it (it failed,
                # or failed over). For this call that is a failure, not a cancellation;
                # raising CancelledError would silently end the caller (the watcher's
                # loop, a receipt write). Retry on the next connection.
                last_error = StoreUnavailableError(f"the etcd connection was closed while {action}")
            except StoreUnavailableError as error:
                last_error = error
                await self._drop_connection(rotate=True)
            # A StorePermissionError (the role lacks the permission, wrong credentials)
            # propagates and keeps the connection: dropping it would also end the watch
            # stream that shares it, for nothing.
        assert last_error is not None
        raise last_error

    async def _renewing_token(self, operation: Any) -> Any:
        # etcd forgets auth tokens (their TTL runs out while the process is idle, or
        # etcd restarted) and aetcd authenticates only when it connects. When etcd
        # rejects the token, authenticate again on the same channel and retry once,
        # rather than reconnect: the watch stream on that channel keeps running.
        client = self._connection()
        await client.connect()
        token = client.metadata
        try:
            return await operation(client)
        except Exception as error:
            if token is None or not is_rejected_token(error):
                raise
            _log.info("otel-cancel: the etcd auth token expired; authenticating again")
            await client.renew_token(token)
            return await operation(client)

    # -- CancelStore ---------------------------------------------------------------

    async def create_flag(self, request: CancelRequest, ttl_seconds: int) -> tuple[CancelRequest, bool]:
        # The key, the value and the reading of the answer are FlagCreation's (shared
        # with the CLI's gateway client); this method speaks gRPC.
        creation = FlagCreation(self.prefix, request)
        key = creation.key

        async def create(client: PatchedEtcdClient) -> tuple[CancelRequest, bool]:
            lease = await client.lease(ttl_seconds)
            value = creation.stamp()
            # No revocation when the transaction fails otherwise: it may have committed (a
            # deadline that ran out after the leader applied it), and revoking the lease
            # would delete the flag. An unused lease holds nothing and expires with its TTL.
            try:
                created, responses = await client.transaction(
                    compare=[client.transactions.version(key) == 0],
                    success=[client.transactions.put(key, value, lease=lease.id)],
                    failure=[client.transactions.get(key)],
                )
            except (aetcd.exceptions.ClientError, grpc.aio.AioRpcError) as error:
                if is_permission_denied(error):
                    # Refused before anything was applied: the lease holds nothing, and a
                    # process without the canceller role (an edge cancelling on every client
                    # that leaves) would otherwise leave one behind per call, for its TTL.
                    with contextlib.suppress(Exception):
                        await client.revoke_lease(lease.id)
                raise
            if created:
                self._remember_flag_lease(key.decode(), lease.id)
                return creation.created(value)
            await client.revoke_lease(lease.id)
            return creation.found(responses[0][0][0] if responses and responses[0] else None)

        result: tuple[CancelRequest, bool] = await self._call(FLAG_ACTION, create)
        return result

    async def get_flag(self, root: str) -> CancelRequest | None:
        key = flag_key(self.prefix, root).encode()

        async def get(client: PatchedEtcdClient) -> Any:
            return await client.get(key)

        found = await self._call("reading a cancel flag", get)
        return None if found is None else CancelRequest.of_flag(root, found.value)

    async def list_flags(self) -> FlagListing:
        flags: list[FlagEvent] = []
        revision = 0
        async for page in self.list_flag_pages():
            flags.extend(page.flags)
            revision = page.revision
        return FlagListing(tuple(flags), revision)

    async def list_flag_pages(
        self, *, keys_only: bool = False, page_size: int = LIST_PAGE_SIZE, values_for_first: int | None = None
    ) -> AsyncIterator[FlagPage]:
        # One range per page, each bounded by ``limit`` (an unpaginated range over many
        # flags passes gRPC's 4 MiB message limit and fails for good). Every page after
        # the first reads at the first page's revision: one consistent snapshot.
        head = flags_prefix(self.prefix).encode()
        end = _prefix_end(head)
        start = head
        revision = 0
        listed = 0
        with_values = 0 if keys_only else values_for_first
        while True:
            values = with_values is None or listed < with_values
            limit = page_size if with_values is None or not values else min(page_size, with_values - listed)
            request = aetcd.rpc.RangeRequest(
                key=start, range_end=end, limit=limit, revision=revision, keys_only=not values
            )
            try:
                response = await self._call("listing cancel flags", _range_call(request, self.timeout))
            except _MessageTooLargeError:
                if page_size == 1:
                    raise StoreError("a single value under the flags prefix is larger than gRPC accepts") from None
                # Values of foreign size (etcd takes up to 1.5 MiB each): smaller pages.
                page_size = max(1, page_size // 4)
                continue
            if revision == 0:
                revision = int(response.header.revision)
                # A listing is the store's whole view: forget leases of flags gone since.
                self._flag_leases.clear()
            kvs = response.kvs
            flags = tuple(
                FlagEvent("put", kv.key.decode("utf-8", "replace"), kv.value if values else b"", kv.mod_revision)
                for kv in kvs
            )
            for kv, flag in zip(kvs, flags, strict=True):
                # Keys-only ranges carry the lease too: receipts join it with one put.
                self._note_flag_lease(flag.key, kv.lease)
            listed += len(flags)
            yield FlagPage(flags, revision)
            if not response.more or not kvs:
                return
            start = kvs[-1].key + b"\0"  # the next key after the last one listed

    async def watch_flags(self, start_revision: int) -> AsyncIterator[FlagEvent]:
        async def open_watch(client: PatchedEtcdClient) -> Any:
            return await client.watch_prefix(flags_prefix(self.prefix).encode(), start_revision=start_revision)

        watch = await self._call("watching cancel flags", open_watch)
        try:
            with raising_store_errors("watching cancel flags"):
                async for event in watch:
                    kv = event.kv
                    key = kv.key.decode("utf-8", "replace")
                    is_put = event.kind == "PUT"
                    self._note_flag_lease(key, kv.lease if is_put else 0)
                    yield FlagEvent("put" if is_put else "delete", key, kv.value, kv.mod_revision)
            raise StoreUnavailableError("the etcd watch stream ended")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), self.timeout)

    def _remember_flag_lease(self, key: str, lease_id: int) -> None:
        leases = self._flag_leases
        leases[key] = lease_id
        leases.move_to_end(key)
        if len(leases) > _FLAG_LEASES_REMEMBERED:
            leases.popitem(last=False)

    def _note_flag_lease(self, key: str, lease_id: int) -> None:
        """Remember (or, with ``lease_id`` 0: a delete, a flag with no lease, forget) the lease of the flag at ``key``.

        The key is not parsed: only a receipt's own flag key is ever looked up, and the
        watcher judges the key (a foreign key here costs one slot of a bounded memory).
        """
        if lease_id:
            self._remember_flag_lease(key, lease_id)
        else:
            self._flag_leases.pop(key, None)

    async def put_receipt(self, receipt: Receipt, ttl_seconds: int) -> None:
        flag = flag_key(self.prefix, receipt.root).encode()
        key = receipt_key(self.prefix, receipt.root, receipt.service, receipt.instance).encode()
        value = receipt.to_json()

        async def put_on_flag_lease(client: PatchedEtcdClient, lease_id: int) -> bool:
            """Put the receipt on the flag's lease: whether it worked (else the caller grants one)."""
            try:
                await client.put(key, value, lease=lease_id)
                return True
            except (aetcd.exceptions.ClientError, grpc.aio.AioRpcError) as error:
                if is_permission_denied(error):
                    # etcd lets a key join a lease only when the user may write every
                    # key already on it: a service whose role may not write flags (the
                    # README's least-privilege roles) cannot share the flag's lease.
                    # Its receipts get leases of their own, with the configured TTL.
                    self._receipts_on_own_lease = True
                    return False
                if is_lease_not_found(error):
                    return False  # the flag expired or was removed since
                raise

        async def put(client: PatchedEtcdClient) -> None:
            if not self._receipts_on_own_lease:
                # The watch event (or listing) that brought the flag carried its lease:
                # one call. Only a flag this store never saw costs a read first.
                lease_id = self._flag_leases.get(flag_key(self.prefix, receipt.root))
                if lease_id is None:
                    found = await client.get(flag)
                    lease_id = found.lease if found is not None and found.lease else None
                if lease_id is not None and await put_on_flag_lease(client, lease_id):
                    return
            lease_id = (await client.lease(ttl_seconds)).id
            await client.put(key, value, lease=lease_id)

        await self._call("writing a receipt", put)

    async def put_receipts(self, receipts: Sequence[Receipt], ttl_seconds: int) -> None:
        # Receipts whose flags' leases are known go in one transaction, each put on its
        # own flag's lease (etcd caps the operations of a transaction). Anything else,
        # or a transaction that fails (a lease expired meanwhile, a role that may not
        # join leases), goes one by one, where each case is handled.
        batch = [(r, self._flag_leases.get(flag_key(self.prefix, r.root))) for r in receipts]
        alone = [r for r, lease in batch if lease is None or self._receipts_on_own_lease]
        together: list[tuple[Receipt, int]] = [
            (r, lease) for r, lease in batch if lease is not None and not self._receipts_on_own_lease
        ]
        if len(together) == 1:
            alone.append(together.pop()[0])
        for start in range(0, len(together), _MAX_TXN_OPS):
            chunk = together[start : start + _MAX_TXN_OPS]

            async def put_all(client: PatchedEtcdClient, chunk: list[tuple[Receipt, int]] = chunk) -> None:
                puts = [
                    client.transactions.put(
                        receipt_key(self.prefix, r.root, r.service, r.instance).encode(), r.to_json(), lease=lease
                    )
                    for r, lease in chunk
                ]
                await client.transaction(compare=[], success=puts, failure=[])

            try:
                await self._call("writing receipts", put_all)
            except StorePermissionError:
                alone.extend(r for r, _ in chunk)
            except StoreError as error:
                if not is_lease_not_found(error):
                    raise
                alone.extend(r for r, _ in chunk)
        for receipt in alone:
            await self.put_receipt(receipt, ttl_seconds)

    async def list_receipts(self, root: str) -> list[Receipt]:
        async def list_prefix(client: PatchedEtcdClient) -> Any:
            return await client.get_prefix(acks_prefix(self.prefix, root).encode())

        receipts = []
        for kv in await self._call("reading receipts", list_prefix):
            try:
                receipts.append(Receipt.from_json(kv.value))
            except ValueError as error:
                _log.warning("otel-cancel: ignoring malformed receipt %r: %s", kv.key, error)
        return receipts

    async def put_task(self, record: TaskRecord, ttl_seconds: int) -> int:
        key = task_key(self.prefix, record.task_id).encode()

        async def put(client: PatchedEtcdClient) -> int:
            # One lease per record: deleting the record is revoking its lease.
            lease = await client.lease(ttl_seconds)
            try:
                response = await client.put(key, record.to_json(), lease=lease.id, prev_kv=True)
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.revoke_lease(lease.id)
                raise
            replaced = response.prev_kv
            if replaced is not None and replaced.lease:
                with contextlib.suppress(aetcd.exceptions.ClientError):
                    await client.revoke_lease(replaced.lease)  # holds nothing any more
            return int(response.header.revision)

        revision: int = await self._call("writing a task record", put)
        return revision

    async def get_task(self, task_id: str) -> TaskRecord | None:
        key = task_key(self.prefix, task_id).encode()

        async def get(client: PatchedEtcdClient) -> Any:
            return await client.get(key)

        found = await self._call("reading a task record", get)
        if found is None:
            return None
        try:
            return TaskRecord.from_json(found.value, task_id)
        except ValueError as error:
            _log.warning("otel-cancel: ignoring malformed task record %r: %s", key, error)
            return None

    async def delete_task(self, task_id: str, revision: int) -> bool:
        key = task_key(self.prefix, task_id).encode()

        async def delete(client: PatchedEtcdClient) -> bool:
            found = await client.get(key)
            if found is None or found.mod_revision != revision:
                return False
            if not found.lease:
                deleted, _ = await client.transaction(
                    compare=[client.transactions.mod(key) == revision],
                    success=[client.transactions.delete(key)],
                    failure=[],
                )
                return bool(deleted)
            # Revoking the record's lease deletes the record, and nothing else: a later
            # write of the same key moved it to a lease of its own.
            await client.revoke_lease(found.lease)
            return True

        result: bool = await self._call("deleting a task record", delete)
        return result

    async def create_bulk(self, bulk: BulkCancel, ttl_seconds: int) -> BulkCancel:
        key = bulk_flag_key(self.prefix, bulk.id).encode()

        async def put(client: PatchedEtcdClient) -> BulkCancel:
            lease = await client.lease(ttl_seconds)
            # The cut-off is the moment of the write: work begun before it is selected.
            stamped = dataclasses.replace(bulk, requested_at=time.time_ns())
            try:
                await client.put(key, stamped.to_json(), lease=lease.id)
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.revoke_lease(lease.id)
                raise
            return stamped

        result: BulkCancel = await self._call("writing a bulk cancel", put)
        return result

    async def get_bulk(self, bulk_id: str) -> BulkCancel | None:
        key = bulk_flag_key(self.prefix, bulk_id).encode()

        async def get(client: PatchedEtcdClient) -> Any:
            return await client.get(key)

        found = await self._call("reading a bulk cancel", get)
        return None if found is None else BulkCancel.from_json(found.value, bulk_id)

    async def grant_lease(self, ttl_seconds: int) -> int:
        async def grant(client: PatchedEtcdClient) -> int:
            return int((await client.lease(ttl_seconds)).id)

        lease_id: int = await self._call("granting a lease", grant)
        return lease_id

    async def keep_lease_alive(self, lease_id: int) -> bool:
        async def refresh(client: PatchedEtcdClient) -> bool:
            reply = await client.refresh_lease(lease_id)
            return reply is not None and int(reply.TTL) > 0

        alive: bool = await self._call("keeping a lease alive", refresh)
        return alive

    async def revoke_lease(self, lease_id: int) -> None:
        async def revoke(client: PatchedEtcdClient) -> None:
            with contextlib.suppress(aetcd.exceptions.ClientError):  # already gone
                await client.revoke_lease(lease_id)

        await self._call("revoking a lease", revoke)

    async def put_live(self, record: LiveRecord, lease_id: int) -> None:
        key = live_key(self.prefix, record.service, record.instance).encode()

        async def put(client: PatchedEtcdClient) -> None:
            await client.put(key, record.to_json(), lease=lease_id)

        await self._call("publishing live work", put)

    async def list_live(self) -> list[LiveRecord]:
        async def list_prefix(client: PatchedEtcdClient) -> Any:
            return await client.get_prefix(live_prefix(self.prefix).encode())

        records = []
        for kv in await self._call("reading live work", list_prefix):
            try:
                records.append(LiveRecord.from_json(kv.value))
            except ValueError as error:
                _log.warning("otel-cancel: ignoring malformed live record %r: %s", kv.key, error)
        return records

    async def ping(self) -> None:
        async def status(client: PatchedEtcdClient) -> None:
            response = await client.maintenancestub.Status(
                aetcd.rpc.StatusRequest(), timeout=self.timeout, metadata=client.metadata
            )
            if not response.leader:
                # A member cut off from its peers still answers, and would serve a watch
                # that never sees another flag: move on to a member that has a leader.
                raise StoreUnavailableError(f"the etcd member at {self.endpoint} has no leader")

        await self._call("checking etcd", status)

    async def close(self) -> None:
        await self._drop_connection(rotate=False)
