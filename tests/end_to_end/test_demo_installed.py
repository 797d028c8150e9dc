"""`pip install 'otel-cancel[demo]'`, then `otel-cancel demo`: the demo runs from an installed package.

The wheel built from this tree goes into a venv of its own (cached, see
install_envs), and the demo runs from a directory outside the repository, with
nothing of the source tree on its path.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from install_envs import build_wheel, temporary_directory, venv_with

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed_demo() -> Iterator[Path]:
    with temporary_directory() as directory:
        yield venv_with(build_wheel(Path(directory)), "demo", [])


def test_the_demo_runs_from_the_installed_package_and_says_how_to_look_afterwards(installed_demo, etcd, tmp_path):
    """The demo's JSON lines show both scenarios stopping at every depth, each with a status command that works."""
    bin_dir = installed_demo.parent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("OTEL_")}
    env["OTEL_CANCEL_ETCD_ENDPOINTS"] = etcd.endpoint
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        [str(bin_dir / "otel-cancel"), "demo", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON
    scenarios = [line for line in lines if "scenario" in line]
    assert len(scenarios) == 2
    assert all(sorted({row["depth"] for row in s["stopped"]}) == [0, 1, 2] for s in scenarios)
    for scenario in scenarios:
        assert scenario["etcd"] == etcd.endpoint and scenario["prefix"].startswith("/")
        command = scenario["status"]
        assert command.endswith(f"--prefix {scenario['prefix']}")
        status = subprocess.run([*command.split(), "--json"], env=env, capture_output=True, text=True, timeout=60)
        body = json.loads(status.stdout)
        assert body["root"] == scenario["root"] and body["cancelled"] is True and len(body["receipts"]) == 3
