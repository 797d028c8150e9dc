"""LangGraph's own cancel: ``client.runs.cancel`` on ``langgraph dev`` deployments.

    /work/venv/bin/python bench/langgraph_cancel.py [--quick]

Starts real ``langgraph dev`` servers (in-memory runtime, ``langgraph-cli[inmem]``,
``--no-browser --no-reload``, LangSmith tracing and analytics off) serving
``bench/services/lg_graphs.py``, and cancels runs with ``langgraph-sdk``:

- one deployment (depth 1): does ``runs.cancel`` stop the node, and how fast;
- a chain of deployments whose node streams the next deployment's run through
  ``RemoteGraph`` (depths 2 and 3), as ``RemoteGraph`` does by itself, and with
  ``on_disconnect="cancel"`` passed through (LangGraph's best case): ``runs.cancel``
  on the top run; does the leaf stop, and how fast.

Latency = the level's node loop end (``time.time_ns()``) - the moment
``runs.cancel`` was sent, on one machine clock. A level still running when its
work would have finished anyway is reported as not stopped.

``langgraph dev`` needs ``langgraph-cli[inmem]``, whose ``langgraph-api`` pins
``grpcio<1.82`` and ``protobuf<7`` and pulls ``uvloop`` (which uvicorn then picks up
everywhere). So it is installed into its own environment, ``bench/.venv-langgraph``
(created on first use with ``pip install -e '.[bench]'``), or taken from
``LANGGRAPH_BIN``. Writes ``bench/results/langgraph.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH,
    REPO,
    SERVICES,
    base_parser,
    langgraph_rows,
    loadavg,
    say,
    summary,
    table,
    until,
    write_results,
)

from otel_cancel.testing import ManagedProcess, free_port

VENV = BENCH / ".venv-langgraph"
TOKENS = 50
INTERVAL = 0.1


def langgraph_binary(setup: bool) -> tuple[str | None, str]:
    """The ``langgraph`` CLI to use, and how it was found (or why there is none)."""
    if os.environ.get("LANGGRAPH_BIN"):
        return os.environ["LANGGRAPH_BIN"], "LANGGRAPH_BIN"
    candidate = VENV / "bin" / "langgraph"
    if candidate.exists():
        return str(candidate), str(VENV.relative_to(REPO))
    if not setup:
        return None, f"{VENV} does not exist (run without --no-setup to create it)"
    say(f"creating {VENV.relative_to(REPO)} with otel-cancel[bench] (langgraph-cli[inmem]) ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", "-e", f"{REPO}[bench]"],
            check=True,
            timeout=1200,
        )
    except (subprocess.SubprocessError, OSError) as error:
        shutil.rmtree(VENV, ignore_errors=True)
        return None, f"could not install langgraph-cli[inmem] into {VENV}: {error}"
    return str(candidate), f"{VENV.relative_to(REPO)} (created now)"


class Deployment:
    """One ``langgraph dev`` server."""

    def __init__(self, binary: str, config_dir: str, name: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        # langgraph dev keeps its in-memory state in .langgraph_api/ under its working
        # directory: run it in the temporary config directory (env -C), not the checkout.
        command = [
            "env",
            "-C",
            config_dir,
            binary,
            "dev",
            "--no-browser",
            "--no-reload",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--config",
            os.path.join(config_dir, "langgraph.json"),
        ]
        full_env = {
            "LANGSMITH_TRACING": "false",
            "LANGCHAIN_TRACING_V2": "false",
            "LANGSMITH_TRACING_V2": "false",
            "LANGGRAPH_CLI_NO_ANALYTICS": "1",
            "LANGSMITH_API_KEY": "",
            "LANGCHAIN_API_KEY": "",
            "PYTHONPATH": str(SERVICES),
            "NO_COLOR": "1",
            **env,
        }
        self.process = ManagedProcess(command, env=full_env, name=name)

    def wait_ready(self, timeout: float = 180) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.process.poll() is not None:
                tail = "\n".join(self.process.lines[-30:])
                raise RuntimeError(f"{self.name} exited with {self.process.process.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/ok", timeout=1).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling a health endpoint: there is no event to await
        raise TimeoutError(f"{self.name} not ready after {timeout}s")

    def stop(self) -> None:
        self.process.stop()


def _events(deployments: list[Deployment]) -> dict[str, dict[int, dict[str, Any]]]:
    """run -> level -> {start, end, how} from every deployment's output."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for deployment in deployments:
        for line in list(deployment.process.lines):
            index = line.find("LGBENCH ")
            if index < 0:
                continue
            parts = line[index:].split()
            if len(parts) < 5:
                continue
            entry = found.setdefault(parts[2], {}).setdefault(int(parts[3]), {})
            if parts[1] == "START":
                entry["start"] = int(parts[4])
            elif parts[1] == "END":
                entry["end"] = int(parts[4])
                entry["how"] = parts[5] if len(parts) > 5 else ""
    return found


async def one_round(top: Deployment, levels: list[int], deployments: list[Deployment]) -> dict[str, Any]:
    from langgraph_sdk import get_client

    client = get_client(url=top.url)
    run_id_text = uuid.uuid4().hex
    thread = await client.threads.create()
    run = await client.runs.create(
        thread["thread_id"], "agent", input={"run": run_id_text, "tokens": TOKENS, "interval": INTERVAL}
    )

    def started() -> bool:
        seen = _events(deployments).get(run_id_text, {})
        return all("start" in seen.get(level, {}) for level in levels)

    if not await until(started, 60, 0.02):
        raise TimeoutError(f"run {run_id_text} did not start at every level: {_events(deployments).get(run_id_text)}")
    await asyncio.sleep(0.05)
    sent_ns = time.time_ns()
    await client.runs.cancel(thread["thread_id"], run["run_id"])
    answered_ns = time.time_ns()

    def ended() -> bool:
        seen = _events(deployments).get(run_id_text, {})
        return all("end" in seen.get(level, {}) for level in levels)

    await until(ended, TOKENS * INTERVAL * len(levels) + 15, 0.05)
    seen = _events(deployments).get(run_id_text, {})
    status = (await client.runs.get(thread["thread_id"], run["run_id"]))["status"]
    out = []
    for position, level in enumerate(levels):
        entry = seen.get(level, {})
        out.append(
            {
                "hop": position,
                "how": entry.get("how", "running"),
                "latency_ms": round((entry["end"] - sent_ns) / 1e6, 3) if "end" in entry else None,
            }
        )
    return {"cancel_call_ms": round((answered_ns - sent_ns) / 1e6, 3), "top_run_status": status, "levels": out}


async def scenario(
    name: str, top: Deployment, levels: list[int], deployments: list[Deployment], rounds: int
) -> dict[str, Any]:
    results = []
    for _ in range(rounds):
        results.append(await one_round(top, levels, deployments))
        if len(results) >= 3 and not any(r["levels"][-1]["how"] == "stopped" for r in results):
            break
    leaf = [r["levels"][-1] for r in results]
    stopped = [lv["latency_ms"] for lv in leaf if lv["how"] == "stopped"]
    ran_on = [lv["latency_ms"] for lv in leaf if lv["how"] == "done"]
    top_level = [r["levels"][0]["latency_ms"] for r in results if r["levels"][0]["how"] == "stopped"]
    return {
        "scenario": name,
        "depth": len(levels),
        "rounds": len(results),
        "leaf_stopped": len(stopped),
        "leaf_latency_ms": summary(stopped),
        "leaf_ran_on_ms": summary(ran_on),
        "top_latency_ms": summary(top_level),
        "cancel_call_ms": summary([r["cancel_call_ms"] for r in results]),
        "top_run_status": sorted({r["top_run_status"] for r in results}),
        "samples": results,
    }


async def run(args: Any) -> dict[str, Any]:
    binary, found_how = langgraph_binary(setup=not args.no_setup)
    if binary is None:
        say(f"langgraph dev not available: {found_how}")
        return {"quick": args.quick, "ran": False, "reason": found_how, "scenarios": []}
    version = subprocess.run(
        [
            str(Path(binary).parent / "python"),
            "-c",
            "import importlib.metadata as m;"
            "print(m.version('langgraph-cli'), m.version('langgraph-api'), m.version('langgraph-runtime-inmem'),"
            " m.version('langgraph'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    versions = dict(
        zip(("langgraph-cli", "langgraph-api", "langgraph-runtime-inmem", "langgraph"), version, strict=False)
    )
    rounds = 3 if args.quick else 10
    config_dir = tempfile.mkdtemp(prefix="otel-cancel-bench-lg-")
    Path(config_dir, "langgraph.json").write_text(
        json.dumps({"dependencies": [str(SERVICES)], "graphs": {"agent": f"{SERVICES / 'lg_graphs.py'}:graph"}})
    )
    deployments: list[Deployment] = []
    scenarios = []
    try:
        leaf = Deployment(binary, config_dir, "lg-L2", {"LG_LEVEL": "2"})
        deployments.append(leaf)
        plain = [leaf]
        mid = Deployment(binary, config_dir, "lg-L1", {"LG_LEVEL": "1", "LG_NEXT_URL": leaf.url})
        deployments.append(mid)
        top = Deployment(binary, config_dir, "lg-L0", {"LG_LEVEL": "0", "LG_NEXT_URL": mid.url})
        deployments.append(top)
        mid_c = Deployment(
            binary, config_dir, "lg-L1c", {"LG_LEVEL": "11", "LG_NEXT_URL": leaf.url, "LG_ON_DISCONNECT": "cancel"}
        )
        deployments.append(mid_c)
        top_c = Deployment(
            binary, config_dir, "lg-L0c", {"LG_LEVEL": "10", "LG_NEXT_URL": mid_c.url, "LG_ON_DISCONNECT": "cancel"}
        )
        deployments.append(top_c)
        startup = {d.name: round(d.wait_ready(), 1) for d in deployments}
        say(f"langgraph dev x {len(deployments)} ready ({found_how}): startup seconds {startup}")
        plan = [
            ("one deployment", leaf, [2]),
            ("RemoteGraph chain (as shipped)", mid, [1, 2]),
            ("RemoteGraph chain (as shipped)", top, [0, 1, 2]),
            ('RemoteGraph chain, on_disconnect="cancel"', mid_c, [11, 2]),
            ('RemoteGraph chain, on_disconnect="cancel"', top_c, [10, 11, 2]),
        ]
        for name, entry, levels in plan:
            row = await scenario(name, entry, levels, deployments, rounds)
            scenarios.append(row)
            lat = row["leaf_latency_ms"]
            say(
                f"{name:>42} depth {row['depth']}: leaf stopped {row['leaf_stopped']}/{row['rounds']}"
                + (f", p50 {lat['p50']} ms, max {lat['max']} ms" if lat["n"] else "")
                + (f", ran on {row['leaf_ran_on_ms']['p50']} ms" if row["leaf_ran_on_ms"]["n"] else "")
            )
        errors = [
            line
            for d in deployments
            for line in d.process.lines
            if any(word in line.lower() for word in ("error", "warning", "fail", "langsmith", "unreachable"))
        ][:30]
        del plain
    except (RuntimeError, TimeoutError, httpx.HTTPError) as error:
        say(f"langgraph benchmark failed: {error}")
        tails = {d.name: d.process.lines[-40:] for d in deployments}
        return {"quick": args.quick, "ran": False, "reason": str(error)[:2000], "logs": tails, "scenarios": scenarios}
    finally:
        for deployment in deployments:
            deployment.stop()
        shutil.rmtree(config_dir, ignore_errors=True)
    return {
        "quick": args.quick,
        "ran": True,
        "langgraph_from": found_how,
        "versions": versions,
        "startup_s": startup,
        "tokens": TOKENS,
        "token_interval_s": INTERVAL,
        "environment": "LANGSMITH_TRACING=false LANGGRAPH_CLI_NO_ANALYTICS=1, no LangSmith key, loopback only",
        "server_error_lines": errors,
        "scenarios": scenarios,
    }


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-setup", action="store_true", help="do not create bench/.venv-langgraph when missing")
    args = parser.parse_args()
    started, load_before = time.time(), loadavg()
    data = asyncio.run(run(args))
    path = write_results("langgraph", data, started, load_before)
    rows = langgraph_rows(data["scenarios"])
    if rows:
        say("\nruns.cancel on the top run -> the leaf's node stops, ms")
        say(
            table(
                rows,
                ["scenario", "depth", "stopped", "p50", "max", "ran_on", "top", "status"],
                [
                    "scenario",
                    "depth",
                    "leaf stopped",
                    "p50",
                    "max",
                    "not stopped: ran on (p50)",
                    "top hop p50",
                    "run status",
                ],
            )
        )
    if not data.get("ran"):
        say(f"\nnot measured: {data.get('reason')}")
    say(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
