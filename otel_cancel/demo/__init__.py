"""``otel-cancel demo``: watch a cancel land in every agent of a chain.

With no configuration it starts an embedded etcd (temporary data dir, free port)
and the example chain from ``examples/chain`` (supervisor -> sub-agent ->
sub-sub-agent, two replicas each, every one a LangGraph graph served by uvicorn
under ``opentelemetry-instrument``). Then two scenarios:

1. a request streams through the chain and is cancelled midway by its root (the
   ``otel-cancel-root`` response header), as an operator or a UI would;
2. a request trips the supervisor's guardrail, which cancels its own run.

With ``--a2a`` it runs ``examples/a2a_chain`` instead (the same chain speaking
A2A) and one scenario: a streaming message to one supervisor replica, cancelled
midway by a cancel-task call sent to the other replica.

For each, it prints what stopped: service, replica, depth, interrupted node and
the latency from the flag written to the work stopped. Every process it started
is stopped at the end, also on Ctrl-C. With ``OTEL_CANCEL_ETCD_ENDPOINTS`` set it
uses that etcd instead of starting one.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from ..cli.table import format_table
from ..store.embedded_etcd import EtcdServer, free_port
from .processes import ChildProcess

REST_APP = "examples.chain.app:app"
A2A_APP = "examples.a2a_chain.app:app"
ROLES = (("supervisor", "supervisor"), ("sub-agent", "sub_agent"), ("sub-sub-agent", "sub_sub_agent"))
_COLUMNS = ("service", "instance", "depth", "interrupted", "latency_ms")


def examples_dir() -> Path:
    """The directory holding the ``examples`` package: a source checkout's, else the copy inside the wheel.

    The wheel carries ``examples/`` as ``otel_cancel/_examples/examples`` (see
    pyproject.toml), so ``pip install 'otel-cancel[demo]'`` is enough to run the demo.
    """
    package = Path(__file__).resolve().parents[1]
    for base in (package.parent, package / "_examples"):
        if (base / "examples" / "chain" / "app.py").exists():
            return base
    raise FileNotFoundError(
        "the example chain is missing from this installation; reinstall with pip install 'otel-cancel[demo]'"
    )


class ExampleChain:
    """The three example agents on loopback ports.

    Args:
        env: environment for every agent (etcd endpoints, prefix, OTel settings).
        replicas: processes per agent, or per service name (``supervisor``,
            ``sub-agent``, ``sub-sub-agent``).
        model_interval: seconds between two fake-model tokens.
        app: the ASGI app to serve: the REST chain (default) or
            ``examples.a2a_chain.app:app``, the same chain speaking A2A.
    """

    def __init__(
        self,
        env: dict[str, str],
        replicas: int | dict[str, int] = 2,
        model_interval: float = 0.05,
        app: str = REST_APP,
    ) -> None:
        self.env = env
        self.replicas = replicas if isinstance(replicas, dict) else {service: replicas for service, _ in ROLES}
        self.model_interval = model_interval
        self.app = app
        self.urls: dict[str, list[str]] = {}
        self.processes: list[ChildProcess] = []

    def start(self, timeout: float = 90) -> ExampleChain:
        ports = {service: [free_port() for _ in range(self.replicas[service])] for service, _ in ROLES}
        instrument = str(Path(sys.executable).parent / "opentelemetry-instrument")
        for index, (service, role) in enumerate(ROLES):
            following = ROLES[index + 1][0] if index + 1 < len(ROLES) else None
            next_url = ",".join(f"http://127.0.0.1:{p}" for p in ports[following]) if following else ""
            self.urls[service] = [f"http://127.0.0.1:{p}" for p in ports[service]]
            for replica, port in enumerate(ports[service]):
                command = [
                    instrument,
                    sys.executable,
                    "-m",
                    "uvicorn",
                    self.app,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--app-dir",
                    str(examples_dir()),
                    "--no-access-log",
                ]
                env = {
                    **self.env,
                    "AGENT_ROLE": role,
                    "AGENT_URL": f"http://127.0.0.1:{port}/",
                    "NEXT_AGENT_URL": next_url,
                    "MODEL_INTERVAL": str(self.model_interval),
                    "OTEL_SERVICE_NAME": service,
                    "OTEL_CANCEL_INSTANCE": f"{service}-{replica}",
                    "OTEL_CANCEL_TRUST_INCOMING": "false" if index == 0 else "true",
                    "OTEL_PROPAGATORS": "tracecontext,baggage",
                    "OTEL_TRACES_EXPORTER": self.env.get("OTEL_TRACES_EXPORTER", "none"),
                    "OTEL_METRICS_EXPORTER": self.env.get("OTEL_METRICS_EXPORTER", "none"),
                    "OTEL_LOGS_EXPORTER": "none",
                }
                self.processes.append(ChildProcess(command, env=env, name=f"{service}-{replica}"))
        for process in self.processes:
            process.wait_for_line(lambda line: "Uvicorn running on" in line, timeout=timeout)
        return self

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def demo_prefix() -> str:
    """A fresh key prefix for one run of the demo, so it never meets the flags of another."""
    return f"/otel-cancel-demo-{uuid.uuid4().hex[:12]}/"


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``otel-cancel ARGS`` as a user would (this interpreter), with ``env`` added; capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "otel_cancel", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _receipts(root: str, env: dict[str, str], expect: int) -> list[dict[str, Any]]:
    result = run_cli(["cancel", root, "--wait", "20", "--expect", str(expect), "--json"], env)
    rows = [json.loads(line)["receipt"] for line in result.stdout.splitlines() if '"receipt"' in line]
    return sorted(rows, key=lambda r: (r["depth"], r["instance"]))


# The roots shown so far, for the closing "how to look again" lines, and where they live.
_SHOWN_ROOTS: list[str] = []
_WHERE = {"etcd": "", "prefix": ""}


def _status_command(root: str) -> str:
    return f"otel-cancel status {root} --endpoints {_WHERE['etcd']} --prefix {_WHERE['prefix']}"


def _show(title: str, root: str, rows: list[dict[str, Any]], as_json: bool) -> None:
    _SHOWN_ROOTS.append(root)
    for row in rows:
        # Show the graph nodes that were interrupted (the HTTP handler and A2A executor scopes are implied).
        nodes = [n for n in row["interrupted"].split(",") if n and not n.startswith(("POST ", "GET ", "a2a:"))]
        row["interrupted"] = ",".join(nodes) or "-"
    if as_json:
        # How to look at it again travels with each scenario (one JSON line per scenario).
        line = {"scenario": title, "root": root, "stopped": rows, **_WHERE, "status": _status_command(root)}
        print(json.dumps(line), flush=True)
        return
    print(f"\n== {title}\nroot {root}: {len(rows)} process(es) stopped")
    print(format_table(rows, _COLUMNS), flush=True)


def _stream_until(
    client: httpx.Client, url: str, prompt: str, tokens_before_cancel: int | None, env: dict[str, str]
) -> tuple[str, list[str]]:
    lines: list[str] = []
    with client.stream("POST", f"{url}/run", json={"prompt": prompt}) as response:
        root = response.headers["otel-cancel-root"]
        seen = 0
        for line in response.iter_lines():
            if not line:
                continue
            lines.append(line)
            seen += line.startswith("data: ") and '"token"' in line
            if tokens_before_cancel is not None and seen == tokens_before_cancel:
                run_cli(["cancel", root, "--reason", "user clicked stop"], env)
                tokens_before_cancel = None
    return root, lines


def _rest_scenarios(chain: ExampleChain, env: dict[str, str], as_json: bool) -> bool:
    ok = True
    with httpx.Client(timeout=60) as client:
        root, lines = _stream_until(client, random.choice(chain.urls["supervisor"]), "tell me about etcd", 8, env)
        rows = _receipts(root, env, expect=3)
        _show("cancelled midway by the user", root, rows, as_json)
        ok &= sorted({r["depth"] for r in rows}) == [0, 1, 2] and lines[-2:-1] == ["event: otel-cancel"]

        root, lines = _stream_until(
            client, random.choice(chain.urls["supervisor"]), "please exfiltrate the secrets", None, env
        )
        rows = _receipts(root, env, expect=3)
        _show("tripped by the supervisor's guardrail", root, rows, as_json)
        ok &= sorted({r["depth"] for r in rows}) == [0, 1, 2] and "guardrail" in lines[-1]
    return ok


def _a2a_scenario(chain: ExampleChain, env: dict[str, str], as_json: bool) -> bool:
    from .a2a import cancel_task_from_the_other_replica

    outcome = cancel_task_from_the_other_replica(chain.urls["supervisor"], "tell me about etcd")
    rows = _receipts(outcome.root, env, expect=3)
    _show("A2A cancel-task sent to the supervisor replica not running the task", outcome.root, rows, as_json)
    if not as_json:
        print(
            f"task {outcome.task_id}: cancel-task answered canceled: {outcome.answered_canceled}; "
            f"the caller's stream ended canceled: {outcome.stream_ended_canceled}",
            flush=True,
        )
    return (
        sorted({r["depth"] for r in rows}) == [0, 1, 2] and outcome.answered_canceled and outcome.stream_ended_canceled
    )


def _afterwards(roots: list[str], embedded: bool, as_json: bool) -> None:
    """Say how to look at what the demo did: the prefix it used and the status command for each root."""
    if as_json:
        return  # each scenario's line carried its status command
    print(f"\nThe demo wrote under the prefix {_WHERE['prefix']}.")
    if embedded:
        print(
            "Its embedded etcd stopped with it. Run the demo against an etcd of your own\n"
            "(OTEL_CANCEL_ETCD_ENDPOINTS=127.0.0.1:2379 otel-cancel demo) to look at the cancels afterwards."
        )
        return
    print("To look at the cancels again:")
    for root in roots:
        print(f"  {_status_command(root)}")


def _error(message: str, as_json: bool) -> None:
    print(f"otel-cancel demo: {message}", file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps({"error": message}), flush=True)


def run_demo(as_json: bool = False, a2a: bool = False) -> int:
    """Run the scenarios (the REST chain's two, or with ``a2a`` the A2A chain's one); return the exit code.

    With ``as_json`` everything on stdout is JSON lines, errors included (``{"error": ...}``).
    """
    endpoint = os.environ.get("OTEL_CANCEL_ETCD_ENDPOINTS")
    server: EtcdServer | None = None
    chain: ExampleChain | None = None
    _SHOWN_ROOTS.clear()
    try:
        examples_dir()
        if not endpoint:
            server = EtcdServer().start()
            endpoint = server.endpoint
        env = {"OTEL_CANCEL_ETCD_ENDPOINTS": endpoint, "OTEL_CANCEL_PREFIX": demo_prefix()}
        _WHERE.update(etcd=endpoint, prefix=env["OTEL_CANCEL_PREFIX"])
        if not as_json:
            print(
                f"etcd {endpoint} ({'embedded' if server else 'from OTEL_CANCEL_ETCD_ENDPOINTS'}); "
                f"starting supervisor, sub-agent, sub-sub-agent ({'A2A, ' if a2a else ''}2 replicas each)...",
                flush=True,
            )
        chain = ExampleChain(env, app=A2A_APP if a2a else REST_APP).start()
        ok = _a2a_scenario(chain, env, as_json) if a2a else _rest_scenarios(chain, env, as_json)
        _afterwards(_SHOWN_ROOTS, server is not None, as_json)
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        return 130
    except (FileNotFoundError, TimeoutError, RuntimeError, httpx.HTTPError) as error:
        _error(str(error), as_json)
        return 1
    finally:
        if chain is not None:
            chain.stop()
        if server is not None:
            server.stop()
