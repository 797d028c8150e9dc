"""A small synchronous etcd client over etcd's JSON gateway, for one-shot commands.

``otel-cancel cancel`` should start about as fast as ``etcdctl put``, and the gRPC
client behind :class:`~otel_cancel.store.etcd.EtcdCancelStore` costs about 100 ms of
imports (grpc, protobuf, aetcd) before its first byte. etcd serves the same v3 API as
JSON over HTTP on its client port (its gRPC gateway), which the standard library
reaches in a few milliseconds. Even ``http.client`` (with the email parser it imports)
and ``ssl`` would double that start on a loaded machine, so the client speaks the few
lines of HTTP/1.1 it needs over a socket itself, and loads ``ssl`` only for TLS. It
covers what that command needs: write a
flag (create-if-absent on a TTL lease, as the store does) and read receipts, with
TLS, mutual TLS, user/password authentication, fail-over across endpoints and a
deadline on every call. Its errors are the store's (:class:`StoreError` and its
subclasses), worded the same way. Services keep the gRPC store: they watch.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._request import CancelRequest, Receipt
from ..exceptions import ConfigurationError, StoreError, StorePermissionError, StoreUnavailableError
from . import DEFAULT_PREFIX
from ._endpoints import parse_endpoint
from ._keys import acks_prefix, flag_key, validate_prefix

if TYPE_CHECKING:
    import ssl


def _warn(message: str, *args: object) -> None:
    import logging  # only on this rare path: logging is a noticeable part of a command's start

    logging.getLogger("otel_cancel.store").warning(message, *args)


_MAX_ANSWER_BYTES = 16 * 1024 * 1024

# gRPC status codes, as the gateway reports them in its JSON errors.
_INVALID_ARGUMENT = 3
_DEADLINE_EXCEEDED = 4
_PERMISSION_DENIED = 7
_UNAVAILABLE = 14
_UNAUTHENTICATED = 16


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's prefix range)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdGatewayUnusableError(StoreUnavailableError):
    """The gateway answered but could not reach etcd's own gRPC service behind it.

    With mutual TLS, etcd's gateway connects to etcd as a client with the server's
    certificate, which a PKI whose server certificates do not allow client use
    refuses. The gRPC client works there: callers fall back to it.
    """


class _GatewayError(Exception):
    """An error answer of the gateway: its gRPC code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class EtcdGatewayClient:
    """Write flags and read receipts through etcd's JSON gateway (standard library only).

    Args:
        endpoints: ``host:port`` strings; each call fails over between them.
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
        timeout: float = 2.0,
        username: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        if not endpoints:
            raise ConfigurationError("at least one etcd endpoint is needed (OTEL_CANCEL_ETCD_ENDPOINTS)")
        self.endpoints = tuple(parse_endpoint(e) for e in endpoints)
        self.prefix = validate_prefix(prefix)
        self.timeout = timeout
        self._username = username or None
        self._password = password or None
        self._tls: ssl.SSLContext | None = None
        if ca_cert or cert:
            import ssl

            try:
                self._tls = ssl.create_default_context(cafile=ca_cert)
                if cert:
                    self._tls.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as error:
                raise ConfigurationError(f"cannot use the etcd TLS files: {error}") from None
        self._endpoint_index = 0
        self._connection: _Connection | None = None
        self._token: str | None = None
        self.calls = 0
        """How many etcd calls this client has made."""

    # -- what the CLI needs ---------------------------------------------------------------

    def create_flag(self, request: CancelRequest, ttl_seconds: int) -> tuple[CancelRequest, bool]:
        """Write the flag for ``request.root`` unless one exists (the first cancel wins).

        Returns:
            The flag now stored and whether this call created it.
        """
        key = flag_key(self.prefix, request.root).encode()
        action = "writing a cancel flag"
        lease = self._call(action, "/v3/lease/grant", {"TTL": ttl_seconds})["ID"]
        # Stamped when it is written, so latencies measure flag written -> work stopped.
        stamped = CancelRequest(request.root, request.reason, time.time_ns(), request.requested_by)
        # A failed call is not revoked after: the transaction may have committed before its
        # answer was lost, and revoking the lease would delete the flag just written. An
        # unused lease holds nothing and expires with its TTL.
        answer = self._call(
            action,
            "/v3/kv/txn",
            {
                "compare": [{"key": _b64(key), "result": "EQUAL", "target": "VERSION", "version": "0"}],
                "success": [{"request_put": {"key": _b64(key), "value": _b64(stamped.to_json()), "lease": lease}}],
                "failure": [{"request_range": {"key": _b64(key)}}],
            },
        )
        if answer.get("succeeded"):
            return stamped, True
        responses = answer.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs") or []
        if not kvs:
            self._revoke_quietly(lease)
            return request, False
        try:
            existing = CancelRequest.from_json(base64.b64decode(kvs[0].get("value", "")), request.root)
        except ValueError:
            _warn("otel-cancel: flag for %s holds a malformed value; keeping it", request.root)
            self._revoke_quietly(lease)
            return request, False
        if existing == stamped:
            # Our own write, committed by an attempt whose answer was lost (then retried,
            # perhaps on another endpoint): this call did create it, on this lease.
            return existing, True
        self._revoke_quietly(lease)
        return existing, False

    def list_receipts(self, root: str) -> list[Receipt]:
        """Every well-formed receipt for ``root`` (malformed ones are logged and skipped)."""
        start = acks_prefix(self.prefix, root).encode()
        answer = self._call(
            "reading receipts", "/v3/kv/range", {"key": _b64(start), "range_end": _b64(_range_end(start))}
        )
        receipts = []
        for kv in answer.get("kvs") or []:
            try:
                receipts.append(Receipt.from_json(base64.b64decode(kv.get("value", ""))))
            except ValueError as error:
                _warn("otel-cancel: ignoring a malformed receipt for %s: %s", root, error)
        return receipts

    def close(self) -> None:
        """Close the connection (the client reconnects if used again)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- calls ----------------------------------------------------------------------------

    def _revoke_quietly(self, lease: str) -> None:
        with contextlib.suppress(StoreError):  # else it expires by itself, with its TTL
            self._call("revoking an unused lease", "/v3/lease/revoke", {"ID": lease})

    def _call(self, action: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One call with fail-over: each endpoint is tried once, from the one in use."""
        last_error: StoreUnavailableError | None = None
        for _ in range(len(self.endpoints)):
            try:
                return self._authenticated_call(action, path, body)
            except StoreUnavailableError as error:
                last_error = error
                self.close()
                self._token = None
                self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
        assert last_error is not None
        raise last_error

    def _authenticated_call(self, action: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._username is not None and self._token is None:
            self._token = self._translated(
                action, "/v3/auth/authenticate", {"name": self._username, "password": self._password}
            )["token"]
        try:
            return self._translated(action, path, body)
        except StorePermissionError as error:
            if self._token is None or "invalid auth token" not in str(error):
                raise
            self._token = None  # expired between the two calls: authenticate again, once
            return self._authenticated_call(action, path, body)

    def _translated(self, action: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """``_post``, with every failure turned into a ``StoreError`` worded as the gRPC store words it."""
        try:
            return self._post(path, body)
        except _GatewayError as error:
            message, code = str(error), error.code
            if code == _PERMISSION_DENIED or "permission denied" in message:
                raise StorePermissionError(
                    f"etcd denied {action}: {message}; the etcd role of this user lacks the permission"
                ) from None
            if "invalid auth token" in message or "user name is empty" in message:
                raise StorePermissionError(f"etcd auth token rejected while {action}: {message}") from None
            if code == _UNAUTHENTICATED or (code == _INVALID_ARGUMENT and "authentication failed" in message):
                raise StorePermissionError(
                    f"etcd refused the credentials while {action}: {message}; "
                    "check OTEL_CANCEL_ETCD_USERNAME / OTEL_CANCEL_ETCD_PASSWORD"
                ) from None
            if code == _UNAVAILABLE and message.startswith("connection error"):
                raise EtcdGatewayUnusableError(
                    f"etcd's gateway could not reach etcd while {action}: {message}"
                ) from None
            if code in (_UNAVAILABLE, _DEADLINE_EXCEEDED):
                raise StoreUnavailableError(f"etcd unavailable while {action}: {message}") from None
            raise StoreError(f"etcd failed while {action}: {message}") from None
        except TimeoutError:
            raise StoreUnavailableError(f"etcd did not answer in time while {action}") from None
        except (OSError, _ProtocolError) as error:
            raise StoreUnavailableError(f"etcd unreachable while {action}: {error}") from None

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._connection is None:
            self._connection = _Connection(self.endpoints[self._endpoint_index], self.timeout, self._tls)
        headers = {"Authorization": self._token} if self._token is not None else {}
        self.calls += 1
        status, payload = self._connection.post(path, json.dumps(body).encode(), headers)
        try:
            answer = json.loads(payload) if payload else {}
        except ValueError:
            raise _GatewayError(0, f"HTTP {status}: not a JSON answer") from None
        if not isinstance(answer, dict):
            raise _GatewayError(0, f"HTTP {status}: unexpected answer")
        if status != 200 or "error" in answer:
            code = answer.get("code", 0)
            message = answer.get("message") or answer.get("error") or f"HTTP {status}"
            raise _GatewayError(code if isinstance(code, int) else 0, str(message))
        return answer


class _ProtocolError(Exception):
    """The server's answer is not the HTTP/1.1 this client speaks."""


class _Connection:
    """One keep-alive HTTP/1.1 connection to an etcd endpoint: POST JSON, read the answer."""

    def __init__(self, endpoint: tuple[str, int], timeout: float, tls: ssl.SSLContext | None) -> None:
        host, port = endpoint
        self._host = f"[{host}]" if ":" in host else host
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        self._socket = sock
        self._reader = sock.makefile("rb")

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        lines = [f"POST {path} HTTP/1.1", f"Host: {self._host}", "Content-Type: application/json"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        self._socket.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        status_line = self._reader.readline(65537)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _ProtocolError(f"unexpected status line {status_line[:80]!r}")
        length: int | None = None
        chunked = False
        while True:
            line = self._reader.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        return int(parts[1]), self._read_body(length, chunked)

    def _read_body(self, length: int | None, chunked: bool) -> bytes:
        if chunked:
            body = b""
            while True:
                size = int(self._reader.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self._reader.readline(1024)  # the blank line after the last chunk
                    return body
                if len(body) + size > _MAX_ANSWER_BYTES:
                    raise _ProtocolError("answer too large")
                body += self._read_exactly(size)
                self._reader.readline(1024)
        if length is None or length > _MAX_ANSWER_BYTES:
            raise _ProtocolError("answer without a usable Content-Length")
        return self._read_exactly(length)

    def _read_exactly(self, size: int) -> bytes:
        data = self._reader.read(size)
        if len(data) != size:
            raise _ProtocolError("connection closed mid-answer")
        return data

    def close(self) -> None:
        self._reader.close()
        self._socket.close()
