"""The otel-cancel CLI as a user runs it: a subprocess against a real etcd."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import cli

from otel_cancel._core.root import random_root
from otel_cancel.testing import free_port


def run(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "bad_root",
    ["abc", "g" * 32, "0" * 32, "A" * 32, "a" * 33, "../../" + "a" * 26, ""],
    ids=["too-short", "not-hex", "all-zeros", "uppercase", "too-long", "path", "empty"],
)
def test_bad_roots_exit_2_with_one_line(bad_root, etcd_env):
    """A root that is not 32 lowercase hex digits (or all zeros) exits 2 with a one-line message."""
    for command in ("cancel", "status"):
        result = run(command, bad_root, env=etcd_env)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("otel-cancel: ")
        assert "Traceback" not in result.stderr


def test_unreachable_etcd_exits_non_zero_with_one_clear_line():
    """With etcd unreachable the CLI exits 1 with one line naming the endpoint, no traceback."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {"OTEL_CANCEL_ETCD_ENDPOINTS": endpoint, "OTEL_CANCEL_ETCD_TIMEOUT_SECONDS": "0.5"}
    for args in (("cancel", random_root()), ("list",), ("status", random_root())):
        result = run(*args, env=env)
        assert result.returncode == 1, result
        assert result.stderr.count("\n") == 1 and endpoint in result.stderr
        assert "Traceback" not in result.stderr


def test_invalid_configuration_exits_2():
    """An invalid OTEL_CANCEL_* value exits 2 and names the variable."""
    result = run("list", env={"OTEL_CANCEL_PREFIX": "no-slashes"})
    assert result.returncode == 2 and "OTEL_CANCEL_PREFIX" in result.stderr


def test_cancelling_twice_exits_0_and_says_already_cancelled(etcd_env):
    """The second cancel keeps the first flag, exits 0 and says it was already cancelled."""
    root = random_root()
    first = run("cancel", root, "--reason", "first", env=etcd_env)
    second = run("cancel", root, "--reason", "second", env=etcd_env)
    assert first.returncode == second.returncode == 0
    assert "already cancelled" in second.stdout and "first" in second.stdout
    status = json.loads(run("status", root, "--json", env=etcd_env).stdout)
    assert status["flag"]["reason"] == "first"


def test_list_shows_cancelled_roots_as_json(etcd_env):
    """`list --json` returns every flag under the prefix."""
    roots = {random_root() for _ in range(2)}
    for root in roots:
        run("cancel", root, env=etcd_env)
    listed = json.loads(run("list", "--json", env=etcd_env).stdout)
    assert {flag["root"] for flag in listed["flags"]} == roots


def test_watch_prints_cancels_as_they_happen(spawn, etcd_env):
    """`watch` prints each cancel as a line while it runs."""
    watcher = spawn(cli("watch", "--json"), env=etcd_env, name="watch")
    watcher.wait_for_line(lambda line: "otel-cancel: watching" in line)
    before = random_root()
    run("cancel", before, env=etcd_env)
    first = json.loads(watcher.wait_for_line(lambda line: before in line))
    assert {k: first[k] for k in ("event", "root", "reason", "replayed")} == {
        "event": "cancelled",
        "root": before,
        "reason": "cancelled by operator",
        "replayed": False,
    }
    assert first["time"].endswith("Z") and first["requested_at"] > 0
    after = random_root()
    run("cancel", after, "--reason", "later", env=etcd_env)
    assert json.loads(watcher.wait_for_line(lambda line: after in line))["reason"] == "later"


def test_status_of_a_malformed_flag_says_the_root_is_cancelled(etcd, etcd_env):
    """A flag a foreign writer left malformed: `status` (and `--json`) show the root cancelled, no traceback."""
    from otel_cancel.testing import find_etcdctl_binary

    root = random_root()
    key = f"{etcd_env['OTEL_CANCEL_PREFIX']}flags/{root}"
    put = [find_etcdctl_binary(), f"--endpoints={etcd.endpoint}", "put", key, "not json"]
    subprocess.run(put, check=True, capture_output=True, timeout=30)
    text = run("status", root, env=etcd_env)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == f"{root} cancelled (reason: unknown (malformed flag))"
    as_json = run("status", root, "--json", env=etcd_env)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["cancelled"] is True
    # A cancel finds it there: not this caller's own request, nobody knows whose.
    again = run("cancel", root, "--reason", "mine", env=etcd_env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"{root} was already cancelled (reason: unknown (malformed flag))"


def test_status_of_a_root_nobody_cancelled(etcd_env):
    """`status` of an uncancelled root says so and exits 0."""
    result = run("status", random_root(), env=etcd_env)
    assert result.returncode == 0 and "is not cancelled" in result.stdout
