"""Write cancel flags through etcd's HTTP/JSON gateway, with the standard library: the CLI's quick path.

It exists for start-up time. ``otel-cancel cancel ROOT`` should cost about what
``etcdctl put`` costs, and the gRPC store costs about 100 ms of imports (grpc,
protobuf, aetcd, asyncio) before its first byte. etcd serves the same v3 API as
JSON on its client URLs (its gRPC gateway: ``/v3/lease/grant``, ``/v3/kv/txn``,
``/v3/auth/authenticate``; keys and values in base64), which a socket reaches in
a few milliseconds. Even :mod:`http.client` costs about 20 ms of imports (it loads
``ssl`` and the e-mail parser whether used or not), so this module speaks the few
lines of HTTP/1.1 it needs itself, on one keep-alive connection, and loads ``ssl``
only for TLS.

What is decided is not decided here: the flag's key, value and the reading of
etcd's answer are :class:`~otel_cancel.store._flag_write.FlagCreation`'s, as for the
gRPC store, which this client mirrors call for call (a lease, then the
create-if-absent transaction, then, when the flag existed, revoking the unused
lease); the connection options are checked by
:func:`~otel_cancel.store._endpoints.check_connection`, the TLS files by
:mod:`otel_cancel.store._tls`, and an error status becomes a ``StoreError`` through
:mod:`otel_cancel.store._status`. Like the store it fails over to the next endpoint
when one cannot be reached, authenticates with user and password (and again, once,
when etcd rejects the token) and puts a deadline on every call.

What it does NOT do: watch, list, read receipts or keep leases alive. Everything
but writing flags (``cancel --wait``, ``--all``, ``status``...) uses the gRPC store.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..exceptions import StoreError, StoreUnavailableError
from . import DEFAULT_PREFIX
from ._endpoints import check_connection
from ._flag_write import ACTION as FLAG_ACTION
from ._flag_write import FlagCreation
from ._keys import validate_prefix
from ._status import (
    NOT_FOUND,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    store_error_for_os_error,
    store_error_for_status,
)
from ._tls import ssl_context

if TYPE_CHECKING:
    import ssl

    from .._core.cancel_request import CancelRequest

_T = TypeVar("_T")

_MAX_ANSWER_BYTES = 4 * 1024 * 1024
"""An answer larger than this is no answer to the calls made here."""
_MAX_LINE_BYTES = 65536


class GatewayUnusableError(StoreUnavailableError):
    """etcd's gateway cannot serve this client, though etcd may well be up.

    Either the client URL answers but not with etcd's JSON API (the gateway is
    turned off, ``--enable-grpc-gateway=false``), or the gateway cannot reach etcd's
    own gRPC service behind it: with mutual TLS the gateway connects to etcd as a
    client with the *server's* certificate, which etcd refuses when that
    certificate is not made for client use. The gRPC store works in both cases:
    the caller uses it instead.

    Attributes:
        attempted: raised by :meth:`EtcdGatewayClient.create_flag`, the flags its
            transactions put, as stamped. An endpoint may have committed one and lost
            its answer before the gateway turned out unusable: the flag the gRPC store
            then finds is this same cancel's when it is one of these.
    """

    attempted: tuple[CancelRequest, ...] = ()


class _GatewayError(Exception):
    """An error answer of the gateway: the gRPC status code and etcd's message."""

    def __init__(self, code: int, message: str, http_status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


class _ProtocolError(OSError):
    """The answer is not the HTTP/1.1 this client speaks (an ``OSError``: the endpoint is unusable)."""


def _field(answer: dict[str, Any], name: str) -> Any:
    """A field etcd's answer must hold; an answer without it is no etcd gateway's."""
    if name not in answer:
        raise _GatewayError(0, f"an answer without {name!r}", 200)
    return answer[name]


# binascii, not base64: the same codec, without base64's imports (struct) at start-up.
def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _from_b64(text: str) -> bytes:
    return binascii.a2b_base64(text)


class EtcdGatewayClient:
    """Writes cancel flags through etcd's JSON gateway (standard library only, synchronous).

    Args:
        endpoints: ``host:port`` strings; each call fails over between them.
        prefix: key prefix (default ``/otel-cancel/``).
        timeout: deadline of each call, in seconds.
        username: etcd user (with ``password``) when etcd authentication is on.
        password: the user's password.
        ca_cert: path of a PEM CA bundle; turns TLS on.
        cert: path of a PEM client certificate (mutual TLS).
        key: path of the client certificate's key.

    Raises:
        ConfigurationError: as :class:`~otel_cancel.store.etcd.EtcdCancelStore`.
    """

    def __init__(
        self,
        endpoints: Sequence[str] = ("127.0.0.1:2379",),
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 2.0,
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
        self._tls = ssl_context(ca_cert, cert, key)
        self._endpoint_index = 0
        self._connection: _Connection | None = None
        self._token: str | None = None
        self.calls = 0
        """How many calls this client has sent to etcd (authentication included)."""

    @property
    def endpoint(self) -> str:
        """The endpoint in use (or to be used next)."""
        host, port = self.endpoints[self._endpoint_index]
        return f"{host}:{port}"

    def create_flag(self, request: CancelRequest, ttl_seconds: int) -> tuple[CancelRequest, bool]:
        """Write ``request``'s flag unless one exists, as :meth:`EtcdCancelStore.create_flag` does.

        Returns:
            The flag now stored (the first cancel wins) and whether this call created it.

        Raises:
            GatewayUnusableError: the gateway cannot serve; the gRPC store can.
            StoreError: etcd could not be reached on any endpoint, or refused the write.
        """
        creation = FlagCreation(self.prefix, request)
        key = _b64(creation.key)

        def create() -> tuple[CancelRequest, bool]:
            lease = _field(self._post("/v3/lease/grant", {"TTL": ttl_seconds}), "ID")
            value = creation.stamp()
            # As the gRPC store: no revocation when the transaction fails (it may have
            # committed), but for a refusal, which applied nothing; an unused lease holds
            # nothing and expires with its TTL.
            try:
                answer = self._post(
                    "/v3/kv/txn",
                    {
                        "compare": [{"key": key, "result": "EQUAL", "target": "VERSION", "version": "0"}],
                        "success": [{"request_put": {"key": key, "value": _b64(value), "lease": lease}}],
                        "failure": [{"request_range": {"key": key}}],
                    },
                )
            except _GatewayError as error:
                if error.code == PERMISSION_DENIED:
                    self._revoke_quietly(lease)
                raise
            if answer.get("succeeded"):
                return creation.created(value)
            self._post("/v3/lease/revoke", {"ID": lease})
            responses = answer.get("responses") or [{}]
            kvs = responses[0].get("response_range", {}).get("kvs") or []
            return creation.found(_from_b64(kvs[0].get("value", "")) if kvs else None)

        try:
            return self._call(FLAG_ACTION, create)
        except GatewayUnusableError as error:
            error.attempted = creation.attempts
            raise

    def _revoke_quietly(self, lease: object) -> None:
        # Best effort: the refusal is what the caller must hear of.
        with contextlib.suppress(_GatewayError, OSError):
            self._post("/v3/lease/revoke", {"ID": lease})

    def close(self) -> None:
        """Close the connection (a later call opens another)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> EtcdGatewayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- calls ---------------------------------------------------------------------------

    def _call(self, action: str, operation: Callable[[], _T]) -> _T:
        """Run ``operation()`` with fail-over: each endpoint is tried once, from the one in use."""
        last_error: StoreUnavailableError | None = None
        unusable: GatewayUnusableError | None = None
        for _ in range(len(self.endpoints)):
            try:
                try:
                    return self._with_token(operation)
                except _GatewayError as error:
                    raise self._store_error(error, action) from None
                except OSError as error:
                    raise store_error_for_os_error(error, action) from None
            except StoreUnavailableError as error:
                last_error = error
                if isinstance(error, GatewayUnusableError):
                    unusable = error
                self.close()
                self._token = None  # a simple token is the member's own
                self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
        # An endpoint whose gateway could not serve may still serve gRPC: say so, so the
        # caller uses the gRPC store rather than report etcd unreachable.
        assert last_error is not None
        raise unusable or last_error

    def _with_token(self, operation: Callable[[], _T]) -> _T:
        # etcd forgets tokens (their TTL runs out, etcd restarts): when it rejects
        # ours, authenticate again and retry once, as the gRPC store does.
        fresh = self._token is None
        if self._username is not None and self._token is None:
            answer = self._post("/v3/auth/authenticate", {"name": self._username, "password": self._password})
            self._token = str(_field(answer, "token"))
        try:
            return operation()
        except _GatewayError as error:
            if fresh or self._token is None or error.code != UNAUTHENTICATED:
                raise
            self._token = None
            return self._with_token(operation)

    @staticmethod
    def _store_error(error: _GatewayError, action: str) -> StoreError:
        if error.code == 0 or (error.code == NOT_FOUND and error.message == "Not Found"):
            # No gRPC status, or no such route: not etcd's JSON API answering (the gateway
            # is off, or etcd is older than the /v3 paths).
            return GatewayUnusableError(f"etcd's gateway did not answer while {action}: {error.message}")
        if error.code == UNAVAILABLE and error.http_status == 503 and "connection error" in error.message:
            return GatewayUnusableError(f"etcd's gateway could not reach etcd while {action}: {error.message}")
        # As the gRPC store names a raw gRPC error: by its code, then etcd's description.
        detail = f"{_CODE_NAMES.get(error.code, str(error.code))} {error.message}"
        return store_error_for_status(error.code, error.message, detail, action)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._connection is None:
            self._connection = _Connection(self.endpoints[self._endpoint_index], self.timeout, self._tls)
        headers = {"Authorization": self._token} if self._token is not None else {}
        self.calls += 1
        status, payload = self._connection.post(path, json.dumps(body).encode(), headers)
        if not self._connection.reusable:
            self.close()  # the next call opens a new connection (a proxy in front of etcd may close each)
        try:
            answer = json.loads(payload) if payload else {}
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise _GatewayError(0, f"HTTP {status}, not etcd's JSON", status)
        if status != 200 or "error" in answer:
            code = answer.get("code")
            message = answer.get("message") or answer.get("error") or f"HTTP {status}"
            raise _GatewayError(code if isinstance(code, int) else 0, str(message), status)
        return answer


# The names gRPC gives its codes (grpc.StatusCode), for messages worded as the store words them.
_CODE_NAMES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


class _Connection:
    """One keep-alive HTTP/1.1 connection to an etcd endpoint: POST JSON, read the answer, within a deadline."""

    def __init__(self, endpoint: tuple[str, int], timeout: float, tls: ssl.SSLContext | None) -> None:
        host, port = endpoint
        self._host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        # The host as bytes: a str would load the IDNA codec, for names that are ASCII
        # already (parse_endpoint admits no other).
        sock = socket.create_connection((host.encode("ascii"), port), timeout=timeout)  # type: ignore[arg-type]
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock.settimeout(self._remaining())
                sock = tls.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        self._received = bytearray()  # what the server sent and no read has taken yet
        self.reusable = True
        """Whether another request may follow on this connection (the server did not say ``Connection: close``)."""

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the call's deadline passed")
        return left

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """Send one request; its status and body, all within one deadline."""
        self._deadline = time.monotonic() + self._timeout
        lines = [f"POST {path} HTTP/1.1", f"Host: {self._host_header}", "Content-Type: application/json"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        self._socket.settimeout(self._remaining())
        self._socket.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        status_line = self._line()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _ProtocolError(f"not an HTTP answer: {status_line[:80]!r}")
        length: int | None = None
        chunked = False
        while (line := self._line()) not in (b"\r\n", b"\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                self.reusable = False
        return int(parts[1]), self._chunked_body() if chunked else self._body(length)

    def _line(self) -> bytes:
        while (end := self._received.find(b"\n", 0, _MAX_LINE_BYTES)) < 0:
            if len(self._received) >= _MAX_LINE_BYTES:
                raise _ProtocolError("line too long")
            self._receive()
        return self._take(end + 1)

    def _body(self, length: int | None) -> bytes:
        if length is None or length > _MAX_ANSWER_BYTES:
            raise _ProtocolError("an answer without a usable Content-Length")
        return self._exactly(length)

    def _chunked_body(self) -> bytes:
        body = bytearray()
        while True:
            size_text = self._line().split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self._line() not in (b"\r\n", b"\n"):  # trailers, then the blank line
                    pass
                return bytes(body)
            if len(body) + size > _MAX_ANSWER_BYTES:
                raise _ProtocolError("answer too large")
            body += self._exactly(size)
            self._line()  # the line break after the chunk

    def _exactly(self, size: int) -> bytes:
        while len(self._received) < size:
            self._receive()
        return self._take(size)

    def _take(self, size: int) -> bytes:
        taken = bytes(self._received[:size])
        del self._received[:size]
        return taken

    def _receive(self) -> None:
        # A socket's timeout bounds one recv, not the answer: it is set to what is left
        # of the call's deadline before each, so a server trickling its answer a byte
        # at a time is cut off at the deadline instead of being granted it again per
        # byte (as a buffered reader's readline and read, each many recv calls, would).
        self._socket.settimeout(self._remaining())
        data = self._socket.recv(65536)
        if not data:
            raise _ProtocolError("connection closed mid-answer")
        self._received += data

    def close(self) -> None:
        self._socket.close()
