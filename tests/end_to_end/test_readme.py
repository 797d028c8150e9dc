"""Every code block in the README runs as written.

The blocks are read from README.md itself, so an edit to the README is what gets
tested. Each block is recognised by what it does and run that way: Python is
served or imported, shell lines are run by bash (long-running servers in the
background, stopped afterwards). A block that no runner recognises fails the test,
so a new block cannot slip in untested. Two kinds are not executed, and say why:
``text`` blocks (synopses, trees) and the TLS sidecar commands, which need
certificates a reader brings. The A2A block is an excerpt: it runs with the
example agent's executor, task store and card in place of the reader's.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from install_envs import build_wheel, temporary_directory, venv_with

from otel_cancel.store.embedded_etcd import find_etcdctl_binary
from otel_cancel.testing import ManagedProcess, free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
README_ROOT = "4bf92f3577b34da6a3ce929d0e0e4736"


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of README.md, indentation removed."""
    pattern = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
    blocks = []
    for match in pattern.finditer((ROOT / "README.md").read_text()):
        indent = len(match[1])
        code = "\n".join(line[indent:] for line in match[3].splitlines())
        blocks.append((match[2], code))
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = code.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def block(kind: str) -> str:
    """The one block whose code contains ``kind`` (fails when there is none or more than one)."""
    found = [code for _, code in readme_blocks() if kind in code]
    assert len(found) == 1, f"{len(found)} README blocks contain {kind!r}"
    return found[0]


RECOGNISED = {
    "install": "pip install 'otel-cancel[",
    "make": "make demo",
    "app": "app = Starlette(",
    "cancel": f"otel-cancel cancel {README_ROOT}",
    "services": "opentelemetry-instrument uvicorn app:app",
    "a2a": "CancellableRequestHandler(handler)",
    "roles": "etcdctl role add otel-cancel-service",
    "sidecar": "etcd grpc-proxy start",
    "fleet": "otel-cancel ps --service billing",
    "labels": "otel_cancel.labelled(",
    "cancel_many": "otel_cancel.cancel_many(",
    "langgraph_server": "opentelemetry-instrument -- langgraph dev",
}


def test_every_code_block_is_run_by_a_test_here():
    """Each sh or python block of the README is one this module runs (text blocks are synopses)."""
    for language, code in readme_blocks():
        if language == "text":
            continue
        assert language in ("sh", "python"), f"a README block has no language: {code[:60]!r}"
        assert any(marker in code for marker in RECOGNISED.values()), f"no test runs this README block: {code[:80]!r}"


def test_the_two_commands_name_real_make_targets():
    """`make demo` and `make test` exist (dry run: running them here would run this suite inside itself)."""
    for command in shell_commands(block(RECOGNISED["make"])):
        result = subprocess.run([*shlex.split(command), "-n"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_each_install_line_resolves():
    """Every `pip install 'otel-cancel[...]'` line resolves (pip's dry run, with the wheel built from this tree)."""
    with temporary_directory() as directory:
        wheel = build_wheel(Path(directory))
        python = venv_with(wheel, "http,sdk", ["starlette>=0.40", "uvicorn>=0.30"])
        for command in shell_commands(block(RECOGNISED["install"])):
            words = [w.replace("otel-cancel[", f"{wheel}[") for w in shlex.split(command)]
            assert words[:2] == ["pip", "install"]
            result = subprocess.run(
                [str(python), "-m", *words[:2], "--dry-run", "--quiet", *words[2:]],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, (command, result.stderr[-2000:])


def test_the_langgraph_server_line_hands_its_options_to_langgraph_dev(tmp_path):
    """The LangGraph Server line, run as written (`langgraph` a stub printing its arguments), reaches langgraph."""
    stub = tmp_path / "langgraph"
    stub.write_text(f"#!{sys.executable}\nimport sys\nprint('LANGGRAPH', sys.argv[1:])\n")
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    (command,) = shell_commands(block(RECOGNISED["langgraph_server"]))
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "LANGGRAPH ['dev', '--config', 'langgraph.json']" in result.stdout


@pytest.fixture
def servers() -> Iterator[list[ManagedProcess]]:
    started: list[ManagedProcess] = []
    yield started
    for process in started:
        process.stop()


async def test_the_thirty_seconds_app_served_as_the_services_block_says_stops_on_the_cancel_block(
    tmp_path, etcd_env, servers
):
    """app.py under the Services commands serves; the cancel and status lines (for its root) stop it and report."""
    (tmp_path / "app.py").write_text(block(RECOGNISED["app"]))
    env = {
        **os.environ,
        **etcd_env,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    ports = []
    for command in shell_commands(block(RECOGNISED["services"])):
        port = free_port()
        ports.append(port)
        # As written, with uvicorn's port from its environment (two servers cannot share 8000).
        process = ManagedProcess(
            ["bash", "-c", f"cd {shlex.quote(str(tmp_path))} && exec env {command}"],
            env={**env, "UVICORN_PORT": str(port)},
        )
        servers.append(process)
    for process in servers:
        process.wait_for_line(lambda line: "Uvicorn running on" in line, timeout=60)
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.send(client.build_request("GET", f"http://127.0.0.1:{ports[0]}/answer"), stream=True)
        root = response.headers["otel-cancel-root"]
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        outputs = []
        for command in shell_commands(block(RECOGNISED["cancel"])):
            command = command.replace(README_ROOT, root)
            result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, (command, result.stderr)
            outputs.append(result.stdout)
        async with asyncio.timeout(30):
            rest = [line async for line in lines]
        await response.aclose()
    assert "event: otel-cancel" in rest  # the stream ended cancelled, long before its 1000 tokens
    assert f"cancelled {root}" in outputs[0] and "1 process(es) reported stopped work" in outputs[0]
    assert f"{root} cancelled at" in outputs[1] and "answer" in outputs[1]


def test_the_a2a_excerpt_builds_routes_with_a_real_executor():
    """The A2A block, given the example chain's executor, task store and card for its own, builds JSON-RPC routes."""
    code = block(RECOGNISED["a2a"])
    # The excerpt's free names are the reader's: bind them to the example agent's, then run it as written.
    program = (
        "from a2a.server.tasks import InMemoryTaskStore\n"
        "from examples.a2a_chain.app import CARD as card, ChainAgentExecutor as MyExecutor\n"
        "task_store = InMemoryTaskStore()\n"
        f"{code}\n"
        "assert routes, 'no routes'\n"
        "print(len(routes))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) >= 1


def test_the_etcd_roles_block_sets_up_auth_on_a_real_etcd(private_etcd):
    """The etcdctl lines of the Security section run as written against an etcd of the test's own."""
    env = {
        **os.environ,
        "PATH": f"{Path(find_etcdctl_binary()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "ETCDCTL_API": "3",
        "ETCDCTL_ENDPOINTS": private_etcd.endpoint,
        "ROOT_PASSWORD": "root-secret",
        "SERVICE_PASSWORD": "service-secret",
        "CANCELLER_PASSWORD": "canceller-secret",
    }
    for command in shell_commands(block(RECOGNISED["roles"])):
        result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)
    # Auth is on now: the service user may read flags, and may not write them.
    read = subprocess.run(
        ["bash", "-c", "etcdctl --user service:service-secret get --prefix /otel-cancel/flags/"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    write = subprocess.run(
        ["bash", "-c", "etcdctl --user service:service-secret put /otel-cancel/flags/x y"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert read.returncode == 0 and write.returncode != 0 and "permission denied" in write.stderr


def test_the_fleet_commands_run_against_a_real_etcd(etcd_env):
    """The ps and cancel-many lines run as written (ROOT_A and ROOT_B stand for two real roots)."""
    from otel_cancel._core.root import random_root

    env = {**os.environ, **etcd_env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in shell_commands(block(RECOGNISED["fleet"])):
        command = command.replace("ROOT_A", random_root()).replace("ROOT_B", random_root())
        result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)


def test_the_labels_and_cancel_many_fragments_run_in_a_coroutine():
    """The two Python fragments (statements of a coroutine) run as written on a configured runtime."""
    body = "\n".join(block(RECOGNISED[name]) for name in ("labels", "cancel_many"))
    program = (
        "import asyncio\n"
        "import otel_cancel\n"
        "from otel_cancel._core.root import random_root\n"
        "from otel_cancel.store.memory import MemoryCancelStore\n"
        "from otel_cancel.testing import configured\n\n"
        "async def fragment():\n"
        "    root_a, root_b = random_root(), random_root()\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "\nwith configured(store=MemoryCancelStore(), service='svc', instance='one'):\n"
        "    asyncio.run(fragment())\n"
        "print('ran')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ran"), result.stderr[-2000:]
