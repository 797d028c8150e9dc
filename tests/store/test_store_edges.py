"""The etcd store at its edges: IPv6 endpoints, bad TLS files, a create that timed out but committed,
and ``cancel --wait`` when the receipts cannot be read."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import aetcd.exceptions
import pytest
from conftest import cli
from debug_service import EVENT_TIMEOUT
from tls_pki import make_pki

from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest
from otel_cancel._core.root import random_root
from otel_cancel._core.settings import Settings
from otel_cancel.exceptions import ConfigurationError
from otel_cancel.store._aetcd_patches import PatchedEtcdClient
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import EtcdServer

pytestmark = pytest.mark.anyio


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args), env={**os.environ, **env}, capture_output=True, text=True, timeout=EVENT_TIMEOUT * 2
    )


@pytest.fixture(scope="module")
def dual_stack_etcd() -> Iterator[EtcdServer]:
    """An etcd whose client port listens on 127.0.0.1 and on [::1]."""
    server = EtcdServer()
    port = server.client_port
    server.extra_args = ["--listen-client-urls", f"http://127.0.0.1:{port},http://[::1]:{port}"]
    with server:
        yield server


def test_an_ipv6_endpoint_reaches_etcd(dual_stack_etcd, prefix):
    """`[::1]:port` is dialled as an IPv6 address: cancel and status go through it."""
    env = {"OTEL_CANCEL_ETCD_ENDPOINTS": f"[::1]:{dual_stack_etcd.client_port}", "OTEL_CANCEL_PREFIX": prefix}
    root = random_root()
    cancelled = _run("cancel", root, "--reason", "over v6", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    status = _run("status", root, env=env)
    assert status.returncode == 0 and "over v6" in status.stdout


@pytest.mark.parametrize(
    ("variable", "others"),
    [
        ("OTEL_CANCEL_ETCD_CA_CERT", {}),
        ("OTEL_CANCEL_ETCD_CERT", {"OTEL_CANCEL_ETCD_KEY": "KEYFILE"}),
    ],
)
def test_a_tls_file_that_holds_no_certificate_is_a_configuration_error_naming_its_variable(
    variable, others, tmp_path, etcd_env
):
    """A CA or certificate file that is not PEM exits 2 with one line naming the variable, no gRPC noise."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    env = {**etcd_env, variable: str(garbage), **{k: str(garbage) for k in others}}
    result = _run("list", env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("otel-cancel: ") and variable in lines[0], result.stderr
    with pytest.raises(ConfigurationError, match=variable):
        Settings.from_environment(env)


def test_an_encrypted_client_key_is_a_configuration_error_not_a_pass_phrase_prompt(tmp_path, etcd_env):
    """A key under a pass phrase: exit 2 with one line naming OTEL_CANCEL_ETCD_KEY; OpenSSL never prompts."""
    from cryptography.hazmat.primitives import serialization

    tls = make_pki(tmp_path)
    key = serialization.load_pem_private_key(Path(tls.client_key).read_bytes(), None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    env = {
        **etcd_env,
        "OTEL_CANCEL_ETCD_CA_CERT": tls.ca_cert,
        "OTEL_CANCEL_ETCD_CERT": str(tls.client_cert),
        "OTEL_CANCEL_ETCD_KEY": str(encrypted),
    }
    result = _run("list", env=env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line]
    assert len(lines) == 1 and "OTEL_CANCEL_ETCD_KEY" in lines[0] and "encrypted" in lines[0], result.stderr
    with pytest.raises(ConfigurationError, match="encrypted"):
        Settings.from_environment(env)


def test_a_ca_bundle_with_utf8_comments_serves_both_paths_to_etcd(tmp_path, prefix):
    """Bytes outside the PEM blocks (a bundle's UTF-8 comments), as gRPC and etcdctl accept: cancel and status work."""
    tls = make_pki(tmp_path, server_may_be_client=True)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# Autorité de certification interne\n".encode() + Path(tls.ca_cert).read_bytes())
    root = random_root()
    with EtcdServer(tls=tls) as etcd:
        env = {
            "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
            "OTEL_CANCEL_PREFIX": prefix,
            "OTEL_CANCEL_ETCD_CA_CERT": str(bundle),
            "OTEL_CANCEL_ETCD_CERT": str(tls.client_cert),
            "OTEL_CANCEL_ETCD_KEY": str(tls.client_key),
        }
        cancelled = _run("cancel", root, "--reason", "behind a commented bundle", env=env)  # the gateway path
        assert cancelled.returncode == 0, cancelled.stderr
        status = _run("status", root, env=env)  # the gRPC path
        assert status.returncode == 0 and "behind a commented bundle" in status.stdout, status.stderr


async def test_a_create_that_timed_out_after_committing_reports_that_it_created_the_flag(etcd, prefix):
    """The first attempt commits, then times out; the retry finds this call's own flag: created=True."""
    real_transaction = PatchedEtcdClient.transaction
    calls = []

    async def commit_then_time_out(self, *args, **kwargs):
        result = await real_transaction(self, *args, **kwargs)
        calls.append(result)
        if len(calls) == 1:
            raise aetcd.exceptions.ConnectionTimeoutError("deadline exceeded")
        return result

    async def create() -> tuple[CancelRequest, bool]:
        # The same etcd twice: the retry goes to "the next endpoint".
        store = EtcdCancelStore([etcd.endpoint, etcd.endpoint], prefix=prefix)
        try:
            with mock.patch.object(PatchedEtcdClient, "transaction", commit_then_time_out):
                return await store.create_flag(CancelRequest.new(root, "once", "tests"), 60)
        finally:
            await store.close()

    root = random_root()
    stored, created = await io_loop().call(create())
    assert len(calls) == 2 and calls[0][0] is True and calls[1][0] is False  # committed, then found
    assert created is True and stored.reason == "once"


def test_cancel_wait_that_cannot_read_receipts_says_the_flag_is_written_and_exits_3(private_etcd, prefix, spawn):
    """The flag is written, then etcd dies: `cancel --wait` says so in one line and exits 3, not 1."""
    env = {
        "OTEL_CANCEL_ETCD_ENDPOINTS": private_etcd.endpoint,
        "OTEL_CANCEL_PREFIX": prefix,
        "OTEL_CANCEL_ETCD_TIMEOUT_SECONDS": "0.5",
    }
    root = random_root()
    waiting = spawn(cli("cancel", root, "--wait", "60"), env=env, name="cancel-wait")
    waiting.wait_for_line(f"cancelled {root}", EVENT_TIMEOUT)
    private_etcd.kill()
    assert waiting.process.wait(EVENT_TIMEOUT) == 3
    reason = waiting.wait_for_line("otel-cancel: ", EVENT_TIMEOUT)
    assert f"the flag for {root} is written" in reason
