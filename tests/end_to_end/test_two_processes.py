"""The cancel path end to end: real etcd, two worker processes, the CLI in a third."""

from __future__ import annotations

import json
import subprocess

from conftest import cli, python_worker

from otel_cancel._core.root import random_root


def test_cli_cancel_stops_every_task_of_the_root_in_both_processes_and_no_other(spawn, etcd_env):
    """`otel-cancel cancel R` stops all R tasks in two processes, no S task, and both write receipts."""
    root_r, root_s = random_root(), random_root()
    workers = [
        spawn(
            python_worker("hold_scopes", f"{root_r}:3", f"{root_s}:2"),
            env={**etcd_env, "OTEL_SERVICE_NAME": "worker", "OTEL_CANCEL_INSTANCE": f"w{i}"},
            name=f"w{i}",
        )
        for i in range(2)
    ]
    for worker in workers:
        worker.wait_for_line("READY")

    result = subprocess.run(
        cli("cancel", root_r, "--reason", "test", "--json"),
        env=_env(etcd_env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    requested_at = json.loads(result.stdout)["flag"]["requested_at"]

    latencies = []
    for worker in workers:
        stopped = {worker.wait_for_line(f"STOPPED {root_r}") for _ in range(3)}
        assert len(stopped) == 3
        latencies += [(int(line.split()[3]) - requested_at) / 1e6 for line in stopped]
    print(f"flag written -> task stopped, ms: {sorted(round(x, 2) for x in latencies)}")

    status = _wait_for_receipts(root_r, etcd_env, expected=2)
    assert {r["instance"] for r in status["receipts"]} == {"w0", "w1"}
    assert all(r["tasks"] == 3 for r in status["receipts"])
    assert all(set(r["interrupted"].split(",")) == {"task-0", "task-1", "task-2"} for r in status["receipts"])
    # S was never touched: no S line in either worker, and S has no flag.
    for worker in workers:
        assert not [line for line in worker.lines if line.startswith(f"STOPPED {root_s}")]
    s_status = json.loads(
        subprocess.run(
            cli("status", root_s, "--json"), env=_env(etcd_env), capture_output=True, text=True, timeout=30
        ).stdout
    )
    assert s_status["cancelled"] is False and s_status["receipts"] == []


def test_flag_written_before_a_process_starts_is_applied_at_start_up(spawn, etcd_env):
    """A process started after the cancel refuses the root's scopes at once (listing at start-up)."""
    root = random_root()
    subprocess.run(cli("cancel", root), env=_env(etcd_env), check=True, capture_output=True, timeout=30)
    worker = spawn(python_worker("late_scope", root), env=etcd_env, name="late")
    assert worker.wait_for_line(lambda line: line.startswith(("REFUSED", "RAN"))) == f"REFUSED {root}"


def _env(extra: dict[str, str]) -> dict[str, str]:
    import os

    return {**os.environ, **extra}


def _wait_for_receipts(root: str, etcd_env: dict[str, str], expected: int, timeout: float = 20) -> dict:
    # Receipts are written asynchronously after the tasks stop; `cancel --wait
    # --expect` awaits them, then `status` reads them back.
    subprocess.run(
        cli("cancel", root, "--wait", str(timeout), "--expect", str(expected), "--json"),
        env=_env(etcd_env),
        check=True,
        capture_output=True,
        timeout=timeout + 10,
    )
    out = subprocess.run(cli("status", root, "--json"), env=_env(etcd_env), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert len(status["receipts"]) == expected, status
    return status


def test_status_draws_the_propagation_as_a_timeline(spawn, etcd_env):
    """`otel-cancel status ROOT` prints one bar per process that stopped, grouped by depth."""
    root = random_root()
    workers = [
        spawn(
            python_worker("hold_scopes", f"{root}:1"), env={**etcd_env, "OTEL_CANCEL_INSTANCE": f"p{i}"}, name=f"p{i}"
        )
        for i in range(2)
    ]
    for worker in workers:
        worker.wait_for_line("READY")
    _wait_for_receipts(root, etcd_env, expected=2)
    text = subprocess.run(cli("status", root), env=_env(etcd_env), capture_output=True, text=True, timeout=30).stdout
    timeline = text[text.index("flag written") :].splitlines()
    assert timeline[1] == "depth 0"
    bars = [line for line in timeline if "█" in line]
    assert len(bars) == 2 and {"p0", "p1"} == {bar.split("/")[1].split()[0] for bar in bars}
