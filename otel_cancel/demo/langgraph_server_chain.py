"""Start the example agents as real ``langgraph dev`` deployments, chained by ``RemoteGraph``.

``examples/langgraph_server``: supervisor -> sub-agent -> sub-sub-agent, each its own
``langgraph dev`` server (in-memory runtime, offline: no LangSmith key, tracing and
analytics off) under ``opentelemetry-instrument`` with otel-cancel. The supervisor is
the edge (``OTEL_CANCEL_TRUST_INCOMING=false``), the others internal. Used by
``otel-cancel demo --langgraph-server`` and by the tests.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from ..store.embedded_etcd import free_port
from . import examples_dir
from .processes import ChildProcess

ROLES = ("supervisor", "sub_agent", "sub_sub_agent")


def langgraph_server_examples() -> Path:
    """``examples/langgraph_server``: a source checkout's, else the copy inside the wheel."""
    candidate = examples_dir() / "examples" / "langgraph_server"
    if not (candidate / "agent.py").is_file():
        raise FileNotFoundError(
            "the LangGraph Server agents are missing from this installation; "
            "reinstall with pip install 'otel-cancel[demo,langgraph-server]'"
        )
    return candidate


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


class Deployment:
    """One ``langgraph dev`` server serving one role's graph as ``agent``."""

    def __init__(
        self, role: str, env: Mapping[str, str], *, name: str | None = None, instrumented: bool = True
    ) -> None:
        self.role = role
        self.name = name or role
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # langgraph dev keeps its in-memory state under its working directory and reads
        # graph paths relative to it: run a temporary copy of the agents, never the checkout.
        self.workdir = tempfile.mkdtemp(prefix=f"otel-cancel-lgs-{self.name}-")
        shutil.copytree(
            langgraph_server_examples(),
            self.workdir,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", ".langgraph_api"),
        )
        config = Path(self.workdir) / role / "langgraph.json"
        # `--` ends opentelemetry-instrument's own options: without it, its argument
        # parser takes langgraph's `--config` for an ambiguous abbreviation of its own.
        launcher = [_bin("opentelemetry-instrument"), "--"] if instrumented else []
        command = [
            *launcher,
            _bin("langgraph"),
            "dev",
            "--no-browser",
            "--no-reload",
            # Several runs at once per deployment (the default runs one at a time).
            "--n-jobs-per-worker",
            "4",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--config",
            str(config),
        ]
        self.process = ChildProcess(
            ["env", "-C", str(config.parent), *command],
            env={
                "LANGSMITH_TRACING": "false",
                "LANGCHAIN_TRACING_V2": "false",
                "LANGSMITH_TRACING_V2": "false",
                "LANGGRAPH_CLI_NO_ANALYTICS": "1",
                "LANGSMITH_API_KEY": "",
                "LANGCHAIN_API_KEY": "",
                "NO_COLOR": "1",
                "OTEL_SERVICE_NAME": self.name,
                "OTEL_CANCEL_INSTANCE": self.name,
                "OTEL_TRACES_EXPORTER": "none",
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_LOGS_EXPORTER": "none",
                "OTEL_PROPAGATORS": "tracecontext,baggage",
                **env,
            },
            name=self.name,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        """Return once the server answers ``/ok``; raise with its last lines if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.process.poll() is not None:
                tail = "\n".join(self.process.lines[-30:])
                raise RuntimeError(f"{self.name} exited with {self.process.process.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/ok", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling a health endpoint: there is no event to await
        raise TimeoutError(f"{self.name} not ready after {timeout}s")

    def stop(self) -> None:
        """Stop the server (its process group) and remove its working directory."""
        self.process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class ServerChain:
    """The three deployments; :meth:`stop` stops every process started."""

    def __init__(self, env: Mapping[str, str], *, instrumented: bool = True, name_suffix: str = "") -> None:
        self.env = dict(env)
        self.instrumented = instrumented
        """``False``: plain ``langgraph dev``, without otel-cancel (LangGraph alone, for comparison)."""
        self.name_suffix = name_suffix
        self.deployments: list[Deployment] = []

    def start(self, timeout: float = 180) -> ServerChain:
        """Start the leaf first, so every level knows the next one's URL."""
        next_url = ""
        try:
            for index, role in reversed(list(enumerate(ROLES))):
                env = {
                    **self.env,
                    "NEXT_AGENT_URL": next_url,
                    "OTEL_CANCEL_TRUST_INCOMING": "false" if index == 0 else "true",
                }
                deployment = Deployment(role, env, name=role + self.name_suffix, instrumented=self.instrumented)
                self.deployments.insert(0, deployment)
                next_url = deployment.url
            for deployment in self.deployments:
                deployment.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def top(self) -> Deployment:
        return self.deployments[0]

    @property
    def leaf(self) -> Deployment:
        return self.deployments[-1]

    def lines(self, event: str, tag: str) -> list[tuple[str, list[str]]]:
        """``(role, fields)`` of every ``AGENT <event> <tag>`` line printed so far."""
        found = []
        for deployment in self.deployments:
            for line in list(deployment.process.lines):
                index = line.find(f"AGENT {event} {tag} ")
                if index >= 0:
                    fields = line[index:].split()
                    found.append((fields[3], fields[4:]))
        return found

    def stop(self) -> None:
        for deployment in self.deployments:
            deployment.stop()
