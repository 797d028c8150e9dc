"""Nobody let in: etcd roles, expiring tokens, TLS (direct and through a sidecar), signed roots, safe keys.

The etcd users and roles are created with the exact ``etcdctl`` commands the
README gives. Certificates are made here, with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
from collections.abc import Iterator

import aetcd
import httpx
import pytest
from chain import Chain
from debug_service import EVENT_TIMEOUT, open_gated_stream, run_cli, state, until, write_flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tls_pki import make_pki

from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest, Receipt
from otel_cancel._core.root import is_valid_root, random_root
from otel_cancel._core.signing import sign_root
from otel_cancel.exceptions import InvalidRootError, StorePermissionError
from otel_cancel.store import DEFAULT_PREFIX
from otel_cancel.store._keys import receipt_key, root_of_flag_key
from otel_cancel.store.etcd import EtcdCancelStore, parse_endpoint
from otel_cancel.testing import EtcdServer, EtcdTls, ManagedProcess, find_etcd_binary, find_etcdctl_binary, free_port

pytestmark = pytest.mark.anyio

TOKEN_TTL_SECONDS = 2
SERVICE_ROLE, CANCELLER_ROLE = "otel-cancel-service", "otel-cancel-canceller"


# -- etcd authentication -----------------------------------------------------------------------


@dataclasses.dataclass
class AuthEtcd:
    """An etcd with authentication on, the two otel-cancel roles, and a user for each."""

    server: EtcdServer

    def etcdctl(self, *args: str, user: str = "root:root-password") -> str:
        command = [find_etcdctl_binary(), f"--endpoints={self.server.endpoint}", f"--user={user}", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=EVENT_TIMEOUT)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    def add_user(self, name: str, role: str) -> None:
        self.etcdctl("user", "add", name, f"--new-user-password={name}-password")
        self.etcdctl("user", "grant-role", name, role)

    def env(self, user: str) -> dict[str, str]:
        return {
            "OTEL_CANCEL_ETCD_ENDPOINTS": self.server.endpoint,
            "OTEL_CANCEL_ETCD_USERNAME": user,
            "OTEL_CANCEL_ETCD_PASSWORD": f"{user}-password",
            "OTEL_CANCEL_STARTUP_WAIT_SECONDS": str(EVENT_TIMEOUT),
        }


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[AuthEtcd]:
    """etcd with simple tokens that expire after TOKEN_TTL_SECONDS idle, set up as the README says."""
    server = EtcdServer(
        extra_args=["--auth-token", "simple", "--auth-token-ttl", str(TOKEN_TTL_SECONDS), "--log-level", "info"]
    )
    with server:
        etcd = AuthEtcd(server)
        flags, acks, live = f"{DEFAULT_PREFIX}flags/", f"{DEFAULT_PREFIX}acks/", f"{DEFAULT_PREFIX}live/"
        # The README's commands, in order (before `auth enable` no --user is needed; root works too).
        etcd.etcdctl("user", "add", "root", "--new-user-password=root-password")
        etcd.etcdctl("user", "grant-role", "root", "root")
        etcd.etcdctl("role", "add", SERVICE_ROLE)
        etcd.etcdctl("role", "grant-permission", SERVICE_ROLE, "read", flags, "--prefix=true")
        etcd.etcdctl("role", "grant-permission", SERVICE_ROLE, "write", acks, "--prefix=true")
        etcd.etcdctl("role", "grant-permission", SERVICE_ROLE, "write", live, "--prefix=true")
        etcd.etcdctl("role", "add", CANCELLER_ROLE)
        etcd.etcdctl("role", "grant-permission", CANCELLER_ROLE, "readwrite", flags, "--prefix=true")
        etcd.etcdctl("role", "grant-permission", CANCELLER_ROLE, "read", acks, "--prefix=true")
        etcd.etcdctl("role", "grant-permission", CANCELLER_ROLE, "read", live, "--prefix=true")
        etcd.add_user("service", SERVICE_ROLE)
        etcd.add_user("canceller", CANCELLER_ROLE)
        etcd.etcdctl("auth", "enable")
        yield etcd


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


async def test_with_etcd_auth_the_service_role_watches_and_acknowledges_but_cannot_cancel(auth_etcd, chain):
    """As `service` a process watches flags and writes receipts, is refused a flag clearly; `canceller` cancels."""
    chain.start(auth_etcd.env("service"), levels=("A",), replicas=1, module="debug_app")
    ((url, service),) = chain.levels[0]
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as client:
        before = await state(client, url, connected=True)
        assert before["connected"] is True
        root, stream = await open_gated_stream(client, url)

        refused = (await client.post(f"{url}/debug/cancel", params={"root": random_root()})).json()
        assert refused["error"] == "StorePermissionError", refused
        assert "lacks the permission" in refused["message"]

        as_service = await run_cli("cancel", root, env=auth_etcd.env("service"))
        assert as_service.returncode == 1
        line = _one_line(as_service.stderr)
        assert line.startswith("otel-cancel: etcd denied writing a cancel flag") and "lacks the permission" in line

        as_canceller = await run_cli(
            "cancel", root, "--wait", str(EVENT_TIMEOUT), "--expect", "1", "--json", env=auth_etcd.env("canceller")
        )
        assert as_canceller.returncode == 0, as_canceller.stderr
        receipts = [json.loads(line)["receipt"] for line in as_canceller.stdout.splitlines() if '"receipt"' in line]
        assert [r["service"] for r in receipts] == ["service-A"], "\n".join(service.lines[-20:])
        assert (await asyncio.wait_for(stream, EVENT_TIMEOUT))[-2] == "event: otel-cancel"
        after = await state(client, url)
    # The refused write cost the service nothing: same watch, no warning.
    assert after["connected"] is True and after["reconnects"] == before["reconnects"]
    assert not [line for line in service.lines if line.startswith(("WARNING", "ERROR"))]


async def test_an_expired_auth_token_is_renewed_and_the_watch_is_kept(auth_etcd, chain):
    """The service's token expires while it idles: the cancel still comes on its watch and its receipt is written."""
    auth_etcd.add_user("idle-service", SERVICE_ROLE)  # its own user: only its tokens count below
    since = auth_etcd.server.log_size()
    chain.start(auth_etcd.env("idle-service"), levels=("A",), replicas=1, module="debug_app")
    ((url, service),) = chain.levels[0]
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as client:
        before = await state(client, url, connected=True)
        root, stream = await open_gated_stream(client, url)  # the request path never talks to etcd
        # etcd deletes a simple token TOKEN_TTL_SECONDS after its last use: that is the event.
        await asyncio.to_thread(
            auth_etcd.server.wait_for_log,
            '"msg":"deleted a simple token","user-name":"idle-service"',
            since=since,
            timeout=EVENT_TIMEOUT,
        )
        result = await run_cli(
            "cancel", root, "--wait", str(EVENT_TIMEOUT), "--expect", "1", "--json", env=auth_etcd.env("canceller")
        )
        assert result.returncode == 0, result.stderr
        assert '"receipt"' in result.stdout
        assert (await asyncio.wait_for(stream, EVENT_TIMEOUT))[-2] == "event: otel-cancel"
        after = await state(client, url)
    assert after["reconnects"] == before["reconnects"] and after["listings"] == before["listings"]
    await until(lambda: any("auth token expired; authenticating again" in line for line in service.lines), "renewal")
    assert not [line for line in service.lines if line.startswith(("WARNING", "ERROR"))]


async def test_a_watch_that_etcd_refuses_raises_instead_of_waiting_forever(auth_etcd):
    """A second watch on a stream whose token expired is refused by etcd: StorePermissionError, not silence."""
    auth_etcd.add_user("watch-only", SERVICE_ROLE)
    since = auth_etcd.server.log_size()

    async def scenario() -> None:
        store = EtcdCancelStore(
            [auth_etcd.server.endpoint], prefix=DEFAULT_PREFIX, username="watch-only", password="watch-only-password"
        )
        try:
            start = (await store.list_flags()).revision + 1
            first = asyncio.create_task(anext(aiter(store.watch_flags(start))))  # opens the stream, then waits
            await asyncio.to_thread(
                auth_etcd.server.wait_for_log,
                '"msg":"deleted a simple token","user-name":"watch-only"',
                since=since,
                timeout=EVENT_TIMEOUT,
            )
            with pytest.raises(StorePermissionError, match="refused watching"):
                await asyncio.wait_for(anext(aiter(store.watch_flags(start))), EVENT_TIMEOUT)
            assert not first.done()  # the first watch is untouched
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
        finally:
            await store.close()

    await io_loop().call(scenario())  # where the library makes its etcd calls


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> EtcdTls:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(pki: EtcdTls) -> Iterator[EtcdServer]:
    """etcd serving clients over mutual TLS only."""
    with EtcdServer(tls=pki) as server:
        yield server


def _tls_env(tls_etcd: EtcdServer, pki: EtcdTls, prefix: str) -> dict[str, str]:
    return {
        "OTEL_CANCEL_ETCD_ENDPOINTS": tls_etcd.endpoint,
        "OTEL_CANCEL_PREFIX": prefix,
        "OTEL_CANCEL_ETCD_CA_CERT": pki.ca_cert,
        "OTEL_CANCEL_ETCD_CERT": pki.client_cert,
        "OTEL_CANCEL_ETCD_KEY": pki.client_key,
        "OTEL_CANCEL_STARTUP_WAIT_SECONDS": str(EVENT_TIMEOUT),
    }


async def _cancel_end_to_end(chain: Chain, service_env: dict[str, str], cli_env: dict[str, str]) -> None:
    """A held stream of the service stops on a CLI cancel, and the CLI sees its receipt."""
    chain.start(service_env, levels=("A",), replicas=1, module="debug_app")
    ((url, _),) = chain.levels[0]
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as client:
        assert (await state(client, url, connected=True))["connected"] is True
        root, stream = await open_gated_stream(client, url)
        result = await run_cli("cancel", root, "--wait", str(EVENT_TIMEOUT), "--expect", "1", "--json", env=cli_env)
        assert result.returncode == 0, result.stderr
        assert '"receipt"' in result.stdout
        assert (await asyncio.wait_for(stream, EVENT_TIMEOUT))[-2] == "event: otel-cancel"


async def test_services_and_the_cli_reach_etcd_directly_over_mutual_tls(tls_etcd, pki, prefix, chain):
    """With OTEL_CANCEL_ETCD_CA_CERT/_CERT/_KEY a cancel goes end to end over mutual TLS; no client cert, no entry."""
    env = _tls_env(tls_etcd, pki, prefix)
    await _cancel_end_to_end(chain, env, env)
    without_cert = {k: v for k, v in env.items() if k not in ("OTEL_CANCEL_ETCD_CERT", "OTEL_CANCEL_ETCD_KEY")}
    refused = await run_cli("status", random_root(), env={**without_cert, "OTEL_CANCEL_ETCD_TIMEOUT_SECONDS": "1"})
    assert refused.returncode == 1
    assert _one_line(refused.stderr).startswith("otel-cancel: etcd")


async def test_a_grpc_proxy_sidecar_terminates_tls_for_a_service_that_speaks_plain_grpc(tls_etcd, pki, prefix, chain):
    """`etcd grpc-proxy` on loopback holds the TLS client certificate; the service talks plain gRPC to it."""
    sidecar = f"127.0.0.1:{free_port()}"
    proxy = ManagedProcess(
        [
            find_etcd_binary(),
            "grpc-proxy",
            "start",
            f"--endpoints={tls_etcd.client_url}",
            f"--cacert={pki.ca_cert}",
            f"--cert={pki.client_cert}",
            f"--key={pki.client_key}",
            f"--listen-addr={sidecar}",
        ],
        name="grpc-proxy",
    )
    try:
        plain = {
            "OTEL_CANCEL_ETCD_ENDPOINTS": sidecar,
            "OTEL_CANCEL_PREFIX": prefix,
            "OTEL_CANCEL_STARTUP_WAIT_SECONDS": str(EVENT_TIMEOUT),
        }
        # The service goes through the sidecar, the CLI straight to etcd over TLS: one etcd, two paths.
        await _cancel_end_to_end(chain, plain, _tls_env(tls_etcd, pki, prefix))
    finally:
        proxy.stop()


# -- signed roots -------------------------------------------------------------------------------


async def test_a_signed_root_is_adopted_and_a_forged_one_starts_its_own_root(chain, etcd_env, etcd, prefix):
    """With a shared key B adopts A's signed root; roots forged for B are replaced, cancelling them stops nothing."""
    key = {"OTEL_CANCEL_SIGNING_KEY": random_root()}
    chain.start(
        {**etcd_env, **key, "OTEL_CANCEL_STARTUP_WAIT_SECONDS": str(EVENT_TIMEOUT)},
        levels=("A", "B"),
        replicas=1,
        module="debug_app",
    )
    (edge,), (internal,) = chain.urls(0), chain.urls(1)
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as client:
        signed_root, signed = await open_gated_stream(client, edge)
        await until(lambda: len(chain.lines("START", signed_root)) == 2, "B adopted the signed root")

        forged = {}
        signatures = {
            "unsigned": lambda claimed: None,
            "signed with another key": lambda claimed: sign_root(b"not-the-key", claimed),
            "the signature of another root": lambda claimed: sign_root(
                key["OTEL_CANCEL_SIGNING_KEY"].encode(), signed_root
            ),
        }
        for kind, signature in signatures.items():
            claimed = random_root()
            entries = [f"otel_cancel.root={claimed}", "otel_cancel.depth=1"]
            if (sig := signature(claimed)) is not None:
                entries.append(f"otel_cancel.sig={sig}")
            given_root, stream = await open_gated_stream(client, internal, headers={"baggage": ",".join(entries)})
            assert given_root != claimed, kind
            forged[claimed] = (given_root, stream)
        await until(lambda: all(chain.lines("START", r) for r, _ in forged.values()), "the forged requests ran")

        await write_flags([etcd.endpoint], prefix, list(forged), "forged")
        # Written after the forged flags: once it has stopped B's work, B has applied those too.
        await write_flags([etcd.endpoint], prefix, [signed_root], "real")
        assert (await asyncio.wait_for(signed, EVENT_TIMEOUT))[-2] == "event: otel-cancel"
        await until(lambda: len(chain.lines("STOPPED", signed_root)) == 2, "the signed run stopped at both levels")
        assert not any(stream.done() for _, stream in forged.values())
        await client.post(f"{internal}/debug/release")
        for _, stream in forged.values():
            assert (await asyncio.wait_for(stream, EVENT_TIMEOUT))[-1] == "data: B-2"
        await until(lambda: all(chain.lines("DONE", r) for r, _ in forged.values()), "the forged requests finished")
        assert not any(chain.lines("STOPPED", r) for r, _ in forged.values())


# -- keys ----------------------------------------------------------------------------------------

hostile_text = st.one_of(
    st.sampled_from(["..", "../..", "/", "//", "../flags/x", "a/../../b", "\x00", "\n", " ", "%2e%2e", "", "*"]),
    st.text(max_size=300),
)


@given(root=hostile_text.filter(lambda text: not is_valid_root(text)))
def test_keys_are_built_only_from_valid_roots(root):
    """Every store key function refuses anything but a valid root, before a key exists."""
    from otel_cancel.store._keys import acks_prefix, flag_key

    for build in (
        lambda: flag_key("/p/", root),
        lambda: acks_prefix("/p/", root),
        lambda: CancelRequest.new(root, "", ""),
    ):
        with pytest.raises(InvalidRootError):
            build()
    assert root_of_flag_key("/p/", f"/p/flags/{root}") is None


@pytest.fixture(scope="module")
def keys_etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(service=hostile_text, instance=hostile_text)
def test_hostile_service_and_instance_names_write_only_their_receipt_key_under_the_prefix(keys_etcd, service, instance):
    """Whatever the service and instance names, a receipt lands at exactly one key under {prefix}acks/{root}/."""
    prefix, root = "/hostile/", random_root()

    async def write_and_list() -> list[bytes]:
        store = EtcdCancelStore([keys_etcd.endpoint], prefix=prefix)
        try:
            await store.put_receipt(Receipt(root, service, instance, 0, 1, 2, 0), 60)
            assert [r.root for r in await store.list_receipts(root)] == [root]
        finally:
            await store.close()
        host, port = parse_endpoint(keys_etcd.endpoint)
        async with aetcd.Client(host, port) as client:
            keys = [kv.key for kv in await client.get_all()]
            await client.delete_prefix(prefix.encode())
        return keys

    keys = io_loop().submit(write_and_list()).result(EVENT_TIMEOUT)
    expected = receipt_key(prefix, root, service, instance)
    assert [key.decode() for key in keys] == [expected]
    assert expected.startswith(f"{prefix}acks/{root}/")
    segments = expected.removeprefix(f"{prefix}acks/{root}/").split("/")
    assert len(segments) == 2 and all(segment and segment not in (".", "..") for segment in segments)
