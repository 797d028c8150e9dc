"""`otel-cancel cancel ROOT...` through etcd's HTTP gateway, as a user runs it: same output, same flags, same errors.

A plain cancel (no --wait, no --all) takes the gateway; ``--wait`` takes the gRPC
store, so the two are compared on the same etcd. TLS and the client's own error
cases are in ``tests/store/test_etcd_gateway.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest
from conftest import cli
from otlp_receiver import OtlpReceiver

from otel_cancel._core.root import random_root
from otel_cancel.testing import EtcdServer, find_etcdctl_binary, free_port


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def _status(root: str, env: dict[str, str]) -> dict[str, object]:
    result = run("status", root, "--json", env=env)
    assert result.returncode == 0, result.stderr
    status: dict[str, object] = json.loads(result.stdout)
    return status


def test_a_plain_cancel_prints_exactly_what_the_grpc_path_prints(etcd_env):
    """Created, then already cancelled: the gateway's lines (JSON and text) are the gRPC path's, for the stored flag."""
    root = random_root()
    created = run("cancel", root, "--reason", "first", "--json", env=etcd_env)
    assert created.returncode == 0 and created.stderr == ""
    stored = _status(root, etcd_env)["flag"]
    assert json.loads(created.stdout) == {"created": True, "flag": stored}
    for extra in ((), ("--json",)):
        through_gateway = run("cancel", root, "--reason", "second", *extra, env=etcd_env)
        through_grpc = run("cancel", root, "--reason", "second", "--wait", "0.01", *extra, env=etcd_env)
        assert through_gateway.returncode == through_grpc.returncode == 0
        # --wait adds its summary after the flag's line.
        assert through_gateway.stdout.splitlines() == through_grpc.stdout.splitlines()[:1]
        if not extra:
            assert through_gateway.stdout.startswith(f"{root} was already cancelled at ")
            assert through_gateway.stdout.endswith("(reason: first)\n")


def test_several_roots_are_each_flagged_once_in_the_order_given(etcd_env):
    """`cancel A B A C` writes three flags and prints one line per root, in order."""
    a, b, c = (random_root() for _ in range(3))
    result = run("cancel", a, b, a, c, "--reason", "many", env=etcd_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"cancelled {root} (reason: many)" for root in (a, b, c)]
    for root in (a, b, c):
        assert _status(root, etcd_env)["cancelled"] is True


def test_a_dead_first_endpoint_fails_over_to_the_next(etcd_env):
    """With the first endpoint refusing connections the flag is written through the second, exit 0."""
    root = random_root()
    endpoints = f"127.0.0.1:{free_port()},{etcd_env['OTEL_CANCEL_ETCD_ENDPOINTS']}"
    result = run("cancel", root, env={**etcd_env, "OTEL_CANCEL_ETCD_ENDPOINTS": endpoints})
    assert result.returncode == 0, result.stderr
    assert _status(root, etcd_env)["cancelled"] is True


def test_with_the_gateway_turned_off_the_cancel_goes_through_grpc(prefix):
    """etcd started with --enable-grpc-gateway=false: the same cancel still writes its flag (the gRPC store)."""
    with EtcdServer(extra_args=["--enable-grpc-gateway=false"]) as etcd:
        env = {"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": prefix}
        root = random_root()
        result = run("cancel", root, "--json", env=env)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert json.loads(result.stdout)["created"] is True
        assert _status(root, env)["cancelled"] is True


def test_with_spans_exported_the_cancel_records_its_request_span(etcd_env):
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, cancel records `otel_cancel.request` in the root's trace (gRPC path)."""
    receiver = OtlpReceiver().start()
    try:
        root = random_root()
        result = run("cancel", root, env={**etcd_env, **receiver.env()})
        assert result.returncode == 0, result.stderr
        receiver.wait_for(
            lambda got: any(s.name == "otel_cancel.request" and s.trace_id == root for s in got.spans),
            what="the cancel's request span",
        )
    finally:
        receiver.stop()


def test_a_root_given_twice_records_one_request_span(etcd_env):
    """`cancel A A` with spans exported writes one flag and records one `otel_cancel.request` span for it."""
    receiver = OtlpReceiver().start()
    try:
        root = random_root()
        result = run("cancel", root, root, env={**etcd_env, **receiver.env()})
        assert result.returncode == 0 and result.stdout.splitlines() == [
            f"cancelled {root} (reason: cancelled by operator)"
        ]
        # The command flushed its spans before it exited: all of them are in.
        receiver.wait_for(lambda got: any(s.trace_id == root for s in got.spans), what="the cancel's request span")
        spans = [s for s in receiver.received.spans if s.name == "otel_cancel.request" and s.trace_id == root]
        assert len(spans) == 1
    finally:
        receiver.stop()


_NOT_ETCDS_JSON = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n\r\n404 page not found\n"
)
"""What a client URL answers the JSON gateway's paths with when etcd's gateway is off."""


class GatewayFront:
    """A loopback front for a real etcd: gRPC passes straight through, the gateway's HTTP is answered as a test says.

    ``answer(path, forward)`` gives the raw HTTP answer to one POST of the gateway
    client (``forward()`` is etcd's own), or ``None`` to close the connection
    without one (an answer lost on the way).
    """

    def __init__(self, etcd: EtcdServer, answer: Callable[[str, Callable[[], bytes]], bytes | None]) -> None:
        self._etcd = etcd
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> GatewayFront:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        received = b""
        with contextlib.suppress(OSError):
            while len(received) < 5:  # "POST " (the gateway client) or "PRI *" (gRPC's HTTP/2 preface)
                data = client.recv(65536)
                if not data:
                    return
                received += data
            if received.startswith(b"POST "):
                self._serve_http(client, received)
            else:
                self._pipe(client, received)
        client.close()

    def _pipe(self, client: socket.socket, received: bytes) -> None:
        host, port = self._etcd.endpoint.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        self._sockets.append(upstream)
        upstream.sendall(received)

        def copy(source: socket.socket, target: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    target.sendall(data)
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)

        threading.Thread(target=copy, args=(upstream, client), daemon=True).start()
        copy(client, upstream)

    def _serve_http(self, client: socket.socket, received: bytes) -> None:
        while True:
            while b"\r\n\r\n" not in received:
                data = client.recv(65536)
                if not data:
                    return
                received += data
            head, _, received = received.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split()[1]
            length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
            while len(received) < length:
                received += client.recv(65536)
            body, received = received[:length], received[length:]

            def forward(path: str = path, body: bytes = body) -> bytes:
                connection = http.client.HTTPConnection(self._etcd.endpoint, timeout=10)
                try:
                    connection.request("POST", path, body, {"Content-Type": "application/json"})
                    answer = connection.getresponse()
                    payload = answer.read()
                finally:
                    connection.close()
                head = f"HTTP/1.1 {answer.status} {answer.reason}\r\nContent-Type: application/json\r\n"
                return (head + f"Content-Length: {len(payload)}\r\n\r\n").encode("latin-1") + payload

            answer = self._answer(path, forward)
            if answer is None:
                return
            client.sendall(answer)


def test_a_gateway_lost_after_some_flags_leaves_the_other_roots_to_grpc(etcd, prefix):
    """The gateway stops serving after the first flag: the next roots are cancelled through gRPC, exit 0."""
    flags_written = []

    def first_flag_only(path: str, forward: Callable[[], bytes]) -> bytes | None:
        if flags_written:
            return _NOT_ETCDS_JSON
        answer = forward()
        if path == "/v3/kv/txn":
            flags_written.append(answer)
        return answer

    a, b, c = (random_root() for _ in range(3))
    with GatewayFront(etcd, first_flag_only) as front:
        env = {"OTEL_CANCEL_ETCD_ENDPOINTS": front.endpoint, "OTEL_CANCEL_PREFIX": prefix}
        result = run("cancel", a, b, c, "--reason", "mid-list", env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines() == [f"cancelled {root} (reason: mid-list)" for root in (a, b, c)]
    assert len(flags_written) == 1  # the first through the gateway, the others through gRPC
    for root in (a, b, c):
        assert _status(root, {"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": prefix})["cancelled"]


def test_a_flag_the_gateway_stored_but_never_heard_back_about_is_reported_as_created(etcd, prefix):
    """One endpoint stores the flag and loses the answer, the next has no gateway: the gRPC path says `created`."""

    def lose_the_transactions_answer(path: str, forward: Callable[[], bytes]) -> bytes | None:
        answer = forward()
        return None if path == "/v3/kv/txn" else answer

    root = random_root()
    with (
        GatewayFront(etcd, lose_the_transactions_answer) as lossy,
        GatewayFront(etcd, lambda path, forward: _NOT_ETCDS_JSON) as gateway_off,
    ):
        env = {"OTEL_CANCEL_ETCD_ENDPOINTS": f"{lossy.endpoint},{gateway_off.endpoint}", "OTEL_CANCEL_PREFIX": prefix}
        result = run("cancel", root, "--json", env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    stored = _status(root, {"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": prefix})["flag"]
    assert json.loads(result.stdout) == {"created": True, "flag": stored}


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[EtcdServer]:
    """etcd with authentication on and a user `canceller` that may write under every prefix."""
    with EtcdServer() as etcd:

        def etcdctl(*args: str) -> None:
            command = [find_etcdctl_binary(), f"--endpoints={etcd.endpoint}", "--user=root:root-password", *args]
            subprocess.run(command, check=True, capture_output=True, timeout=30)

        subprocess.run(
            [find_etcdctl_binary(), f"--endpoints={etcd.endpoint}", "user", "add", "root:root-password"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        etcdctl("user", "grant-role", "root", "root")
        etcdctl("role", "add", "canceller")
        etcdctl("role", "grant-permission", "canceller", "readwrite", "/", "--prefix=true")
        etcdctl("user", "add", "canceller:canceller-password")
        etcdctl("user", "grant-role", "canceller", "canceller")
        etcdctl("auth", "enable")
        yield etcd


def test_with_etcd_auth_the_right_password_cancels_and_a_wrong_one_is_one_line(auth_etcd, prefix):
    """etcd user and password: exit 0 with the right password; exit 1, one line, no traceback, with a wrong one."""
    env = {
        "OTEL_CANCEL_ETCD_ENDPOINTS": auth_etcd.endpoint,
        "OTEL_CANCEL_PREFIX": prefix,
        "OTEL_CANCEL_ETCD_USERNAME": "canceller",
        "OTEL_CANCEL_ETCD_PASSWORD": "canceller-password",
    }
    root = random_root()
    allowed = run("cancel", root, env=env)
    assert allowed.returncode == 0 and allowed.stdout == f"cancelled {root} (reason: cancelled by operator)\n"
    assert _status(root, env)["cancelled"] is True
    refused = run("cancel", random_root(), env={**env, "OTEL_CANCEL_ETCD_PASSWORD": "wrong"})
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("otel-cancel: etcd refused the credentials while writing a cancel flag")
    assert "OTEL_CANCEL_ETCD_PASSWORD" in refused.stderr and auth_etcd.endpoint in refused.stderr


def test_a_refused_root_does_not_hide_the_flags_written_for_the_others(auth_etcd, prefix):
    """etcd refuses one root's flag: both paths print every flag they wrote, in order, then one error line, exit 1."""
    # A user that may write the flags of roots beginning with 0-7, not those beginning with 8-f.
    admin = [find_etcdctl_binary(), f"--endpoints={auth_etcd.endpoint}", "--user=root:root-password"]
    for command in (
        ("role", "add", "lower-half"),
        ("role", "grant-permission", "lower-half", "readwrite", f"{prefix}flags/0", f"{prefix}flags/8"),
        ("user", "add", "lower-half:lower-half-password"),
        ("user", "grant-role", "lower-half", "lower-half"),
    ):
        subprocess.run([*admin, *command], check=True, capture_output=True, timeout=30)
    env = {
        "OTEL_CANCEL_ETCD_ENDPOINTS": auth_etcd.endpoint,
        "OTEL_CANCEL_PREFIX": prefix,
        "OTEL_CANCEL_ETCD_USERNAME": "lower-half",
        "OTEL_CANCEL_ETCD_PASSWORD": "lower-half-password",
    }
    receiver = OtlpReceiver().start()  # exported spans: the gRPC path
    try:
        for path_env in ({}, receiver.env()):
            refused, first, second = "9" + random_root()[1:], "1" + random_root()[1:], "2" + random_root()[1:]
            result = run("cancel", first, refused, second, "--reason", "half", env={**env, **path_env})
            assert result.returncode == 1, result.stderr
            assert result.stdout.splitlines() == [f"cancelled {root} (reason: half)" for root in (first, second)]
            assert result.stderr.count("\n") == 1 and result.stderr.startswith("otel-cancel: etcd denied writing")
    finally:
        receiver.stop()
