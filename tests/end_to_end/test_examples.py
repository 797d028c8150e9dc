"""The example chain and the demo, as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import httpx
import pytest
from conftest import cli

from otel_cancel.demo import ExampleChain
from otel_cancel.testing import wait_for_output

pytestmark = pytest.mark.anyio

_EMITTED = re.compile(r"model (\w+) emitted (\d+)/(\d+) tokens")


@pytest.fixture
def example_chain(etcd_env):
    chain = ExampleChain(etcd_env, replicas=2).start()
    yield chain
    chain.stop()


def _model_reports(chain: ExampleChain, role: str) -> list[tuple[int, int]]:
    reports = []
    for process in chain.processes:
        for line in process.lines:
            match = _EMITTED.search(line)
            if match and match.group(1) == role:
                reports.append((int(match.group(2)), int(match.group(3))))
    return reports


async def test_cancel_at_the_root_stops_the_sub_sub_agents_model(example_chain, etcd_env):
    """Cancelling the supervisor's run stops the sub-sub-agent's fake model before its last token."""
    url = f"{example_chain.urls['supervisor'][0]}/run"
    async with httpx.AsyncClient(timeout=60) as client, client.stream("POST", url, json={"prompt": "hi"}) as resp:
        root = resp.headers["otel-cancel-root"]
        tokens = 0
        before = []
        lines_iter = resp.aiter_lines()
        async for line in lines_iter:
            before.append(line)
            tokens += '"sub_sub_agent"' in line
            if tokens >= 5:
                result = subprocess.run(
                    cli("cancel", root), env={**os.environ, **etcd_env}, capture_output=True, timeout=60
                )
                assert result.returncode == 0
                break
        lines = [line async for line in lines_iter if line]
    logs = "\n".join(line for process in example_chain.processes for line in process.lines[-20:])
    assert tokens >= 5, f"the stream ended early: {before}\n{logs}"
    assert lines[-2:-1] == ["event: otel-cancel"], f"{lines}\n{logs}"
    await asyncio.to_thread(
        wait_for_output,
        lambda: bool(_model_reports(example_chain, "sub_sub_agent")),
        20,
        "the sub-sub-agent's model reported",
    )
    ((emitted, total),) = _model_reports(example_chain, "sub_sub_agent")
    assert 5 <= emitted < total


def test_demo_runs_both_scenarios_and_lists_all_three_depths():
    """`otel-cancel demo` exits 0 and shows every depth stopping, for the cancel and the guardrail."""
    env = {k: v for k, v in os.environ.items() if k != "OTEL_CANCEL_ETCD_ENDPOINTS"}
    result = subprocess.run(
        [sys.executable, "-m", "otel_cancel", "demo", "--json"], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scenarios = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [s["scenario"] for s in scenarios] == [
        "cancelled midway by the user",
        "tripped by the supervisor's guardrail",
    ]
    for scenario in scenarios:
        assert sorted(row["depth"] for row in scenario["stopped"]) == [0, 1, 2]
        assert {row["service"] for row in scenario["stopped"]} == {"supervisor", "sub-agent", "sub-sub-agent"}


def test_demo_a2a_cancels_with_cancel_task_on_the_other_replica_and_lists_all_three_depths():
    """`otel-cancel demo --a2a` exits 0: cancel-task on the replica not running the task stops every depth."""
    env = {k: v for k, v in os.environ.items() if k != "OTEL_CANCEL_ETCD_ENDPOINTS"}
    result = subprocess.run(
        [sys.executable, "-m", "otel_cancel", "demo", "--a2a", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (scenario,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert scenario["scenario"] == "A2A cancel-task sent to the supervisor replica not running the task"
    assert sorted(row["depth"] for row in scenario["stopped"]) == [0, 1, 2]
    assert {row["service"] for row in scenario["stopped"]} == {"supervisor", "sub-agent", "sub-sub-agent"}
    # The supervisor that stopped is the replica the stream ran on, not the one that got cancel-task.
    assert [row["instance"] for row in scenario["stopped"] if row["service"] == "supervisor"] == ["supervisor-0"]
