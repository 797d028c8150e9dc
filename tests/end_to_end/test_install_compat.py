"""otel-cancel installs beside the OpenTelemetry release sets people run, and a cancel works through each.

The wheel is built from this tree and installed (with the ``http`` and ``sdk``
extras, Starlette and uvicorn) into a venv pinned to the oldest release set
pyproject.toml claims, and into one with the newest release set on the package
index, built on the newest Python on the machine's PATH. Two auto-instrumented
services in that venv, edge and internal, carry a streamed request; the venv's own
CLI cancels it and both stop; its `watch` prints the flag.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from install_envs import (
    OLDEST,
    OLDEST_OTHERS,
    build_wheel,
    installed_version,
    newest_python,
    newest_release_set,
    pins,
    temporary_directory,
    venv_with,
)

from otel_cancel._core.root import random_root
from otel_cancel.testing import ManagedProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

_SERVICE_PACKAGES = ["starlette>=0.40", "uvicorn>=0.30"]


@pytest.fixture(scope="module")
def wheel() -> Iterator[Path]:
    with temporary_directory() as directory:
        yield build_wheel(Path(directory))


async def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def _venv(which: str, wheel: Path) -> Path:
    """The venv of the oldest claimed set (on this Python) or of the newest (on the newest Python here)."""
    if which == "oldest":
        others = [f"{name}=={version}" for name, version in OLDEST_OTHERS.items()]
        return venv_with(wheel, "http,sdk", [*pins(OLDEST, every_package=True), *others, *_SERVICE_PACKAGES])
    # The newest set on the newest Python here: what a new deployment runs.
    return venv_with(wheel, "http,sdk", _SERVICE_PACKAGES, newest_python())


@pytest.mark.parametrize("which", ["oldest", "newest"])
async def test_a_cancel_runs_beside_a_release_set(which, wheel, chain, etcd_env):
    """Beside the oldest claimed and the newest released OpenTelemetry, an instrumented chain stops on cancel."""
    python = _venv(which, wheel)
    if which == "oldest":
        assert installed_version(python, "opentelemetry-sdk") == OLDEST["api"]
        assert installed_version(python, "opentelemetry-instrumentation") == OLDEST["contrib"]
        for name, version in OLDEST_OTHERS.items():
            assert installed_version(python, name) == version
    chain.start(etcd_env, levels=("A", "B"), module="chain_app", auto_instrument=True, replicas=1, python=str(python))
    async with httpx.AsyncClient(timeout=60) as client:
        request = client.build_request("GET", f"{chain.urls(0)[0]}/stream", params={"tokens": 200, "interval": 0.05})
        response = await client.send(request, stream=True)
        root = response.headers["otel-cancel-root"]
        await _until(lambda: len(chain.lines("START", root)) == 2)
        otel_cancel = python.parent / "otel-cancel"
        subprocess.run(
            [str(otel_cancel), "cancel", root], env={**os.environ, **etcd_env}, check=True, capture_output=True
        )
        await response.aclose()
    await _until(lambda: len(chain.lines("STOPPED", root)) == 2)
    assert not [line for p in chain.processes() for line in p.lines if "Traceback" in line]


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_the_cli_watches_flags_on_each_sets_python(which, wheel, etcd_env):
    """The venv's `otel-cancel watch` (the etcd watch on the CLI's IO loop) prints the flag its `cancel` writes."""
    python = _venv(which, wheel)
    otel_cancel = str(python.parent / "otel-cancel")
    root = random_root()
    with ManagedProcess([otel_cancel, "watch", "--json"], env=etcd_env, name=f"watch-{which}") as watch:
        watch.wait_for_line(lambda line: "otel-cancel: watching" in line, timeout=60)
        env = {**os.environ, **etcd_env}
        subprocess.run([otel_cancel, "cancel", root], env=env, check=True, capture_output=True, timeout=60)
        assert json.loads(watch.wait_for_line(lambda line: root in line, timeout=30))["root"] == root


_RETRY_PROBE = """
import asyncio
from otel_cancel._core.retry import Backoff, retry_async, retry_sync
from otel_cancel.exceptions import StoreUnavailableError

backoff, waits, calls = Backoff(0.1, 5.0), [], []

async def record(seconds):
    waits.append(seconds)

async def fails_twice():
    calls.append(1)
    if len(calls) < 3:
        raise StoreUnavailableError(str(len(calls)))
    return "written"

async def main():
    assert await retry_async(fails_twice, backoff, retry_on=StoreUnavailableError, sleep=record) == "written"
    assert len(waits) == 2 and 0 <= waits[0] <= 0.1 and 0 <= waits[1] <= 0.2, waits
    try:
        await retry_async(fails_twice, backoff, retry_on=OSError, failed_with=OSError("x"), give_up_after=0)
    except OSError as error:
        assert str(error) == "x"
    else:
        raise AssertionError("did not give up")

asyncio.run(main())
attempts = []
def fails():
    attempts.append(1)
    raise RuntimeError(str(len(attempts)))
try:
    retry_sync(fails, backoff, retry_on=RuntimeError, max_attempts=3, sleep=waits.append)
except RuntimeError as error:
    assert str(error) == "3"
else:
    raise AssertionError("did not give up")
print("retried")
"""


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_retries_run_on_the_tenacity_release_of_each_set(which, wheel):
    """Retrying (jittered waits, give-up, the last error raised) works on the oldest and the newest tenacity."""
    python = _venv(which, wheel)
    result = subprocess.run([str(python), "-c", _RETRY_PROBE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "retried", result.stderr[-2000:]


def test_the_bare_package_installs_beside_the_newest_sdk_release(wheel):
    """`pip install otel-cancel opentelemetry-sdk==<newest>` resolves (checked with pip's dry run)."""
    newest = newest_release_set()
    if newest is None:
        pytest.skip("the package index cannot be asked for the newest OpenTelemetry release")
    python = _venv("oldest", wheel)
    result = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            str(wheel),
            f"opentelemetry-sdk=={newest['api']}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"opentelemetry-sdk-{newest['api']}" in result.stdout
