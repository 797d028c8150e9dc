"""The CLI's etcd gateway client against real etcd servers: the same flag as the gRPC store, TLS, auth, fail-over.

Each etcd here is started once per module (plain, with authentication, over TLS);
flags written through the gateway are read back through the gRPC store and
``etcdctl``, so the two transports are checked against each other.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from tls_pki import make_pki

from otel_cancel._core.records import CancelRequest
from otel_cancel._core.root_id import random_root
from otel_cancel.exceptions import ConfigurationError, StorePermissionError, StoreUnavailableError
from otel_cancel.store._keys import flag_key
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.store.etcd_gateway import EtcdGatewayClient, GatewayUnusableError
from otel_cancel.testing import EtcdServer, EtcdTls, find_etcdctl_binary, free_port, on_io_loop

pytestmark = pytest.mark.anyio
TTL = 321


def _etcdctl(server: EtcdServer, *args: str, user: str | None = None, tls: EtcdTls | None = None) -> str:
    command = [find_etcdctl_binary(), f"--endpoints={server.endpoint}", *args]
    if user:
        command.append(f"--user={user}")
    if tls is not None:
        command += [f"--cacert={tls.ca_cert}", f"--cert={tls.client_cert}", f"--key={tls.client_key}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def _stored(server: EtcdServer, key: str, **options: object) -> tuple[bytes, int]:
    """The raw value of ``key`` and the TTL its lease was granted with, read by etcdctl."""
    import base64

    found = json.loads(_etcdctl(server, "get", key, "-w", "json", **options))  # type: ignore[arg-type]
    kv = found["kvs"][0]
    lease = json.loads(_etcdctl(server, "lease", "timetolive", f"{kv['lease']:x}", "-w", "json", **options))  # type: ignore[arg-type]
    return base64.b64decode(kv["value"]), lease["granted-ttl"]


def _without_time(value: bytes) -> dict[str, object]:
    data = json.loads(value)
    assert isinstance(data.pop("requested_at"), int)
    return data


@pytest.fixture(scope="module")
def server() -> Iterator[EtcdServer]:
    with EtcdServer() as etcd:
        yield etcd


_OPEN: list[EtcdGatewayClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Every client a test opens is closed when it ends (its socket with it)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def _gateway(endpoints: list[str], prefix: str, **options: object) -> EtcdGatewayClient:
    client = EtcdGatewayClient(endpoints, prefix=prefix, **options)  # type: ignore[arg-type]
    _OPEN.append(client)
    return client


def _client(server: EtcdServer, prefix: str, **options: object) -> EtcdGatewayClient:
    return _gateway([server.endpoint], prefix, **options)


@on_io_loop
async def _grpc_create(server: EtcdServer, prefix: str, request: CancelRequest) -> tuple[CancelRequest, bool]:
    store = EtcdCancelStore([server.endpoint], prefix=prefix)
    try:
        return await store.create_flag(request, TTL)
    finally:
        await store.close()


@on_io_loop
async def _grpc_get(server: EtcdServer, prefix: str, root: str) -> CancelRequest | None:
    store = EtcdCancelStore([server.endpoint], prefix=prefix)
    try:
        return await store.get_flag(root)
    finally:
        await store.close()


async def test_a_new_flag_is_the_one_the_grpc_store_writes_byte_for_byte(server, prefix):
    """For the same request both transports store the same JSON (but the time) on a lease of the same TTL."""
    root = random_root()
    request = CancelRequest.new(root, "same input", "cli:someone@host")
    through_grpc, created_by_grpc = await _grpc_create(server, prefix + "grpc/", request)
    through_gateway, created_by_gateway = _client(server, prefix + "gateway/").create_flag(request, TTL)
    assert created_by_grpc and created_by_gateway
    grpc_value, grpc_ttl = _stored(server, flag_key(prefix + "grpc/", root))
    gateway_value, gateway_ttl = _stored(server, flag_key(prefix + "gateway/", root))
    assert _without_time(gateway_value) == _without_time(grpc_value)
    assert gateway_value == through_gateway.to_json() and grpc_value == through_grpc.to_json()
    assert gateway_ttl == grpc_ttl == TTL
    assert await _grpc_get(server, prefix + "gateway/", root) == through_gateway


async def test_an_existing_flag_is_kept_reported_and_the_spare_lease_revoked(server, prefix):
    """The first cancel wins, written by either transport; the second's lease is revoked, as the store does."""
    root = random_root()
    first, _ = await _grpc_create(server, prefix, CancelRequest.new(root, "first", "tests"))
    client = _client(server, prefix)
    leases_before = _etcdctl(server, "lease", "list").splitlines()[0]
    kept, created = client.create_flag(CancelRequest.new(root, "second", "cli"), TTL)
    assert (kept, created) == (first, False)
    assert _etcdctl(server, "lease", "list").splitlines()[0] == leases_before  # "found N leases"
    assert client.calls == 3  # lease, transaction, revoke


async def test_each_call_fails_over_to_the_next_endpoint(server, prefix):
    """A dead first endpoint: the flag is written through the second, which the client keeps using."""
    dead = f"127.0.0.1:{free_port()}"
    client = _gateway([dead, server.endpoint], prefix, timeout=1)
    root = random_root()
    _, created = client.create_flag(CancelRequest.new(root, "failed over", "tests"), TTL)
    assert created and client.endpoint == server.endpoint
    assert (await _grpc_get(server, prefix, root)).reason == "failed over"


def test_no_endpoint_reachable_is_one_store_unavailable_error(prefix):
    """Every endpoint refusing connections raises StoreUnavailableError naming the action, as the store does."""
    client = _gateway([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], prefix)
    with pytest.raises(StoreUnavailableError, match=r"^etcd unreachable while writing a cancel flag"):
        client.create_flag(CancelRequest.new(random_root(), "x", "tests"), TTL)


def test_an_endpoint_that_never_answers_times_out_within_the_deadline(prefix):
    """A listener that accepts and never answers costs one deadline per endpoint, then a clear error."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        client = _gateway([endpoint], prefix, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="did not answer in time while writing a cancel flag"):
            client.create_flag(CancelRequest.new(random_root(), "x", "tests"), TTL)
        assert time.monotonic() - started < 5


def test_an_answer_trickling_in_is_cut_off_at_the_call_deadline(prefix):
    """A server sending its answer a byte at a time, each inside the timeout, still ends the call at its deadline."""
    import threading

    done = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as trickling:

        def answer_a_byte_at_a_time() -> None:
            connection, _ = trickling.accept()
            with connection:
                connection.recv(65536)
                # A status line without end, a byte every 0.1 s: each recv gets its byte well within 0.5 s.
                for byte in b"HTTP/1.1 200 " + b"O" * 120:
                    if done.wait(0.1):
                        return
                    connection.sendall(bytes([byte]))

        thread = threading.Thread(target=answer_a_byte_at_a_time, daemon=True)
        thread.start()
        client = _gateway([f"127.0.0.1:{trickling.getsockname()[1]}"], prefix, timeout=0.5)
        started = time.monotonic()
        try:
            with pytest.raises(StoreUnavailableError, match="did not answer in time while writing a cancel flag"):
                client.create_flag(CancelRequest.new(random_root(), "x", "tests"), TTL)
            # The trickle lasts 12 s: a deadline granted again per read would take all of it.
            assert time.monotonic() - started < 5
        finally:
            done.set()
            thread.join(10)


def test_an_etcd_with_its_gateway_off_makes_the_gateway_unusable(prefix):
    """A client URL that answers but not with etcd's JSON API raises GatewayUnusableError, dead endpoints or not."""
    dead = f"127.0.0.1:{free_port()}"
    with EtcdServer(extra_args=["--enable-grpc-gateway=false"]) as no_gateway:
        for endpoints in ([no_gateway.endpoint], [no_gateway.endpoint, dead], [dead, no_gateway.endpoint]):
            client = _gateway(endpoints, prefix, timeout=1)
            with pytest.raises(GatewayUnusableError):  # the caller then takes the gRPC store
                client.create_flag(CancelRequest.new(random_root(), "x", "tests"), TTL)


def test_connection_options_are_checked_as_the_store_checks_them():
    """User without password, certificate without key, no endpoint: the store's ConfigurationErrors."""
    for options, message in (
        ({"username": "u"}, "set both OTEL_CANCEL_ETCD_USERNAME"),
        ({"cert": "/c.pem"}, "set both OTEL_CANCEL_ETCD_CERT"),
        ({"endpoints": []}, "at least one etcd endpoint"),
        ({"endpoints": ["no port"]}, "an etcd endpoint is host:port"),
    ):
        with pytest.raises(ConfigurationError, match=message):
            EtcdGatewayClient(**options)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=message):
            EtcdCancelStore(**options)  # type: ignore[arg-type]


# -- authentication ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server() -> Iterator[EtcdServer]:
    """etcd with authentication on, a `canceller` that may write flags and a `reader` that may not."""
    with EtcdServer(extra_args=["--auth-token", "simple"]) as etcd:
        _etcdctl(etcd, "user", "add", "root", "--new-user-password=root-password")
        _etcdctl(etcd, "user", "grant-role", "root", "root")
        for role, permission in (("canceller", "readwrite"), ("reader", "read")):
            _etcdctl(etcd, "role", "add", role)
            _etcdctl(etcd, "role", "grant-permission", role, permission, "/", "--prefix=true")
            _etcdctl(etcd, "user", "add", role, f"--new-user-password={role}-password")
            _etcdctl(etcd, "user", "grant-role", role, role)
        _etcdctl(etcd, "auth", "enable")
        yield etcd


def test_with_the_right_password_the_flag_is_written(auth_server, prefix):
    """The client authenticates, writes the flag with its token, and a token etcd rejects is renewed once."""
    client = _client(auth_server, prefix, username="canceller", password="canceller-password")
    _, created = client.create_flag(CancelRequest.new(random_root(), "authenticated", "tests"), TTL)
    assert created
    client._token = "a-token-etcd-does-not-know"  # as after an etcd restart or the token's TTL
    _, created = client.create_flag(CancelRequest.new(random_root(), "renewed", "tests"), TTL)
    assert created


def test_a_wrong_password_is_refused_credentials_as_the_store_words_it(auth_server, prefix):
    """A wrong password raises StorePermissionError telling to check the user and password variables."""
    client = _client(auth_server, prefix, username="canceller", password="wrong")
    with pytest.raises(StorePermissionError) as refused:
        client.create_flag(CancelRequest.new(random_root(), "x", "tests"), TTL)
    assert str(refused.value).startswith("etcd refused the credentials while writing a cancel flag")
    assert "authentication failed" in str(refused.value) and "OTEL_CANCEL_ETCD_PASSWORD" in str(refused.value)


def test_a_role_that_may_not_write_flags_is_denied(auth_server, prefix):
    """A user whose role only reads gets the store's "lacks the permission" error, not a credentials one."""
    client = _client(auth_server, prefix, username="reader", password="reader-password")
    with pytest.raises(StorePermissionError, match=r"^etcd denied writing a cancel flag: .*lacks the permission"):
        client.create_flag(CancelRequest.new(random_root(), "x", "tests"), TTL)


def _leases(server: EtcdServer) -> int:
    listed = _etcdctl(server, "lease", "list", user="root:root-password")
    return int(listed.split()[1])  # "found N leases"


@on_io_loop
async def _grpc_create_as_reader(server: EtcdServer, prefix: str) -> None:
    store = EtcdCancelStore([server.endpoint], prefix=prefix, username="reader", password="reader-password")
    try:
        await store.create_flag(CancelRequest.new(random_root(), "refused", "tests"), TTL)
    finally:
        await store.close()


async def test_a_refused_flag_leaves_no_lease_behind_on_either_path(auth_server, prefix):
    """Denied: each path revokes the lease it granted (a process refused at every disconnect would leak one a call)."""
    before = _leases(auth_server)
    client = _client(auth_server, prefix, username="reader", password="reader-password")
    for _ in range(3):
        with pytest.raises(StorePermissionError):
            client.create_flag(CancelRequest.new(random_root(), "refused", "tests"), TTL)
        with pytest.raises(StorePermissionError):
            await _grpc_create_as_reader(auth_server, prefix)
    assert _leases(auth_server) == before


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory) -> Iterator[EtcdServer]:
    """etcd over mutual TLS whose server certificate also allows client use (its gateway can reach it)."""
    with EtcdServer(tls=make_pki(tmp_path_factory.mktemp("pki"), server_may_be_client=True)) as etcd:
        yield etcd


def _tls_options(tls: EtcdTls, *, with_client_cert: bool = True) -> dict[str, object]:
    options: dict[str, object] = {"ca_cert": tls.ca_cert}
    if with_client_cert:
        options.update(cert=tls.client_cert, key=tls.client_key)
    return options


async def test_over_mutual_tls_the_flag_is_written_with_the_client_certificate(mtls_server, prefix):
    """With the CA and the client pair the gateway writes the flag over TLS; the gRPC store reads it."""
    root = random_root()
    client = _client(mtls_server, prefix, **_tls_options(mtls_server.tls))
    stored, created = client.create_flag(CancelRequest.new(root, "over tls", "tests"), TTL)
    value, ttl = _stored(mtls_server, flag_key(prefix, root), tls=mtls_server.tls)
    assert created and value == stored.to_json() and ttl == TTL


def test_certificates_without_key_identifiers_serve_as_they_do_for_grpc(tmp_path, prefix):
    """A PKI without key identifiers (gRPC accepts it; Python 3.13's strict default would not): the flag is written."""
    tls = make_pki(tmp_path, server_may_be_client=True, key_identifiers=False)
    with EtcdServer(tls=tls) as etcd:
        client = _client(etcd, prefix, **_tls_options(tls))
        _, created = client.create_flag(CancelRequest.new(random_root(), "home-made pki", "tests"), TTL)
    assert created


def test_without_the_client_certificate_mutual_tls_refuses_with_one_error(mtls_server, prefix):
    """No client certificate: etcd ends the handshake, a StoreUnavailableError (exit 1 in the CLI)."""
    client = _client(mtls_server, prefix, timeout=1, **_tls_options(mtls_server.tls, with_client_cert=False))
    with pytest.raises(StoreUnavailableError, match="while writing a cancel flag"):
        client.create_flag(CancelRequest.new(random_root(), "x", "tests"), TTL)


def test_a_certificate_the_ca_did_not_sign_is_not_trusted(mtls_server, prefix, tmp_path):
    """etcd's certificate is verified against OTEL_CANCEL_ETCD_CA_CERT: another CA fails the call."""
    other = make_pki(tmp_path)
    options = {"ca_cert": other.ca_cert, "cert": other.client_cert, "key": other.client_key}
    client = _client(mtls_server, prefix, timeout=1, **options)
    with pytest.raises(StoreUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
        client.create_flag(CancelRequest.new(random_root(), "x", "tests"), TTL)


def test_when_the_gateway_cannot_reach_etcd_the_cli_cancels_through_grpc(tmp_path, prefix):
    """Server certificate for server use only: the gateway is unusable, and the CLI's cancel falls back to gRPC."""
    tls = make_pki(tmp_path)
    with EtcdServer(tls=tls) as etcd:
        client = _client(etcd, prefix, timeout=1, **_tls_options(tls))
        with pytest.raises(GatewayUnusableError, match="could not reach etcd"):
            client.create_flag(CancelRequest.new(random_root(), "x", "tests"), TTL)
        root = random_root()
        env = {
            "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
            "OTEL_CANCEL_PREFIX": prefix,
            "OTEL_CANCEL_ETCD_CA_CERT": tls.ca_cert,
            "OTEL_CANCEL_ETCD_CERT": str(tls.client_cert),
            "OTEL_CANCEL_ETCD_KEY": str(tls.client_key),
        }
        result = subprocess.run(
            [sys.executable, "-m", "otel_cancel", "cancel", root, "--json"],
            env={**__import__("os").environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["created"] is True and result.stderr == ""
        value, _ = _stored(etcd, flag_key(prefix, root), tls=tls)
        assert json.loads(value)["root"] == root


def test_a_proxy_that_closes_each_connection_gets_a_new_one_per_call(server, prefix):
    """An HTTP proxy in front of etcd that answers `Connection: close`: each call opens a new connection."""
    import http.server
    import threading
    import urllib.request

    class ClosingProxy(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            forwarded = urllib.request.Request(f"http://{server.endpoint}{self.path}", data=body, method="POST")
            with urllib.request.urlopen(forwarded, timeout=10) as answer:
                payload = answer.read()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), ClosingProxy) as proxy:
        thread = threading.Thread(target=proxy.serve_forever, daemon=True)
        thread.start()
        try:
            client = _gateway([f"127.0.0.1:{proxy.server_address[1]}"], prefix, timeout=2)
            _, created = client.create_flag(CancelRequest.new(random_root(), "through a proxy", "tests"), TTL)
            assert created
        finally:
            proxy.shutdown()
            thread.join(10)
