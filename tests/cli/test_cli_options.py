"""The CLI as people know it from kubectl and etcdctl: version, flags, help, completion, tables."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import time
from importlib.metadata import version

import pytest
from conftest import cli
from otlp_receiver import OtlpReceiver

from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import Receipt
from otel_cancel._core.root import random_root
from otel_cancel._core.settings import Settings
from otel_cancel.cli import build_parser
from otel_cancel.cli.table import StreamingTable, format_table
from otel_cancel.testing import free_port

_CONNECTION_VARIABLES = ("OTEL_CANCEL_ETCD_ENDPOINTS", "OTEL_CANCEL_PREFIX")


def run(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in _CONNECTION_VARIABLES and not k.startswith("OTEL_EXPORTER")}
    return subprocess.run(cli(*args), env={**base, **env}, capture_output=True, text=True, timeout=timeout)


def test_version_prints_the_installed_version():
    """`--version` prints the installed package version and exits 0."""
    result = run("--version", env={})
    assert result.returncode == 0
    assert result.stdout.strip() == f"otel-cancel {version('otel-cancel')}"


@pytest.mark.parametrize("placement", ["before", "after"])
def test_connection_flags_win_over_the_environment(placement, etcd, prefix):
    """`--endpoints` and `--prefix` reach etcd whether given before or after the command, over a wrong environment."""
    root = random_root()
    flags = ["--endpoints", etcd.endpoint, "--prefix", prefix]
    wrong_env = {"OTEL_CANCEL_ETCD_ENDPOINTS": f"127.0.0.1:{free_port()}", "OTEL_CANCEL_PREFIX": "/elsewhere/"}
    args = [*flags, "cancel", root] if placement == "before" else ["cancel", root, *flags]
    assert run(*args, env=wrong_env).returncode == 0
    status = run(
        "status", root, "--json", env={"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": prefix}
    )
    assert json.loads(status.stdout)["cancelled"] is True
    elsewhere = run("status", root, "--json", *flags[:2], env={"OTEL_CANCEL_PREFIX": "/elsewhere/"})
    assert json.loads(elsewhere.stdout)["cancelled"] is False


def test_an_invalid_flag_value_names_the_flag():
    """A bad `--prefix` exits 2 with one line naming the flag, not the variable it overrides."""
    result = run("--prefix", "no-slashes", "list", env={})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--prefix" in result.stderr and "OTEL_CANCEL_PREFIX" not in result.stderr


def test_an_unreachable_endpoint_given_as_a_flag_is_named():
    """With `--endpoints` unreachable the one-line error names that endpoint."""
    endpoint = f"127.0.0.1:{free_port()}"
    result = run("list", "--endpoints", endpoint, "--timeout", "0.5", env={})
    assert result.returncode == 1 and endpoint in result.stderr


@pytest.mark.parametrize("bad", ["-3", "2.5", "many"])
def test_expect_accepts_only_a_whole_non_negative_number(bad):
    """`--expect` refuses negative, fractional and non-numeric values with exit 2."""
    result = run("cancel", random_root(), "--wait", "1", "--expect", bad, env={})
    assert result.returncode == 2 and "--expect" in result.stderr


def test_expect_without_wait_is_a_usage_error():
    """`--expect N` counts receipts while `--wait` waits: alone it would be ignored, so it exits 2 instead."""
    result = run("cancel", random_root(), "--expect", "2", env={})
    assert result.returncode == 2 and "--wait" in result.stderr


def test_every_argument_has_help():
    """Every argument and option of every command carries help text."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name or 'otel-cancel'} {action.option_strings or action.dest} has no help"


def test_requested_by_names_the_user_without_user_variable(etcd_env):
    """Without $USER (a container, cron) the flag's requested_by still names the account, not 'unknown'."""
    env = {k: v for k, v in os.environ.items() if k not in ("USER", "LOGNAME", "LNAME", "USERNAME")}
    root = random_root()
    subprocess.run(cli("cancel", root), env={**env, **etcd_env}, check=True, capture_output=True, timeout=30)
    status = json.loads(run("status", root, "--json", env=etcd_env).stdout)
    assert status["flag"]["requested_by"].startswith(f"cli:{pwd.getpwuid(os.getuid()).pw_name}@")
    assert status["flag"]["kind"] == "explicit"  # what the CLI writes, whatever its reason says


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_and_flags():
    """The bash completion script, sourced by a real bash, completes command names and a command's flags."""
    script = run("completion", "bash", env={}).stdout

    def complete(*words: str) -> set[str]:
        program = (
            f"{script}\nCOMP_WORDS=(otel-cancel {' '.join(words)}); COMP_CWORD={len(words)}; "
            '_otel_cancel; echo "${COMPREPLY[@]}"'
        )
        return set(subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True).stdout.split())

    assert complete("ca") == {"cancel"}
    assert {"--wait", "--expect"} <= complete("cancel", "--")
    assert "--endpoints" in complete("status", "--e")


def test_cancel_exits_quickly_when_the_collector_is_down(etcd_env):
    """With the OTLP collector down, cancel writes the flag, says so in one line and does not wait on retries."""
    anchor_started = time.monotonic()
    assert run("cancel", random_root(), env=etcd_env).returncode == 0
    anchor = time.monotonic() - anchor_started
    root = random_root()
    env = {**etcd_env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    result = run("cancel", root, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0 and f"cancelled {root}" in result.stdout
    assert result.stderr.count("\n") == 1 and "could not export telemetry" in result.stderr
    # The exporters' own default retries take 10 s and more; one second of export deadline is what we allow.
    assert elapsed - anchor < 4, (anchor, elapsed)


def test_an_export_timeout_no_deadline_can_be_is_taken_as_unset(etcd_env):
    """OTEL_EXPORTER_OTLP_TIMEOUT of inf, nan, 0, below 0 or beyond what a thread waits: exit 0, no traceback."""
    receiver = OtlpReceiver().start()
    try:
        for value in ("inf", "nan", "0", "-5", "1e10"):
            root = random_root()
            result = run("cancel", root, env={**etcd_env, **receiver.env(), "OTEL_EXPORTER_OTLP_TIMEOUT": value})
            assert (result.returncode, result.stdout, result.stderr) == (
                0,
                f"cancelled {root} (reason: cancelled by operator)\n",
                "",
            ), value
    finally:
        receiver.stop()


def test_streamed_rows_line_up_with_their_header():
    """Rows printed one at a time keep the columns of the header when names differ in length."""
    table = StreamingTable(("service", "instance", "depth"), {"service": 16, "instance": 20})
    lines = [
        table.header(),
        table.row({"service": "sub-sub-agent", "instance": "a-1", "depth": 2}),
        table.row({"service": "edge", "instance": "host-1234", "depth": 0}),
    ]
    starts = {line.index(value) for line, value in zip(lines[1:], ("a-1", "host-1234"), strict=True)}
    assert starts == {lines[0].index("INSTANCE")}


def test_whole_tables_size_columns_to_the_widest_cell():
    """A whole table pads every cell of a column to the widest one."""
    text = format_table([{"a": "x", "b": "1"}, {"a": "longer", "b": "2"}], ("a", "b"))
    assert len({line.index(value) for line, value in zip(text.splitlines(), ("B", "1", "2"), strict=True)}) == 1


def test_cancel_wait_prints_aligned_receipts(etcd_env):
    """`cancel --wait` prints receipts of differently named processes in aligned columns."""
    root = random_root()
    settings = Settings.from_environment(etcd_env)
    store = settings.create_store()
    now = time.time_ns()
    receipts = [
        Receipt(root, "supervisor", "host-a-101", 0, now, now, now, ("answer",)),
        Receipt(root, "sub-sub-agent", "h-2", 2, now, now, now, ("model", "tools")),
    ]

    async def write() -> None:
        for receipt in receipts:
            await store.put_receipt(receipt, 60)
        await store.close()

    io_loop().run(write())
    result = run("cancel", root, "--wait", "5", "--expect", "2", env=etcd_env)
    lines = [line for line in result.stdout.splitlines() if "SERVICE" in line or "host-a-101" in line or "h-2" in line]
    assert len(lines) == 3
    for header in ("INSTANCE", "DEPTH", "INTERRUPTED"):
        column = lines[0].index(header)
        assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines[1:]), result.stdout
