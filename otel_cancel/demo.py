"""``otel-cancel demo``: watch a cancel land, on an embedded etcd.

This first version runs the core path only: an embedded etcd, two worker
processes holding scopes for two roots, and ``otel-cancel cancel`` from a third
process; it prints the receipts. (The example agent chain joins in a later
version.) Every process it starts is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from ._etcd_server import EtcdServer
from ._root import random_root
from .cli import format_table
from .testing import ManagedProcess, unique_prefix

_WORKER = textwrap.dedent(
    """
    import asyncio, sys, otel_cancel

    async def hold(root, name, ready):
        try:
            async with otel_cancel.scope(root=root, name=name):
                ready.set_result(None)
                await asyncio.Event().wait()
        except otel_cancel.Cancelled as error:
            print(f"STOPPED {name} {error.reason}", flush=True)

    async def main():
        loop = asyncio.get_running_loop()
        roots = sys.argv[1:]
        ready = [loop.create_future() for _ in roots]
        tasks = [asyncio.create_task(hold(root, f"task-{i}", f)) for i, (root, f) in enumerate(zip(roots, ready))]
        await asyncio.gather(*ready)
        print("READY", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)


def run_demo(as_json: bool = False) -> int:
    """Run the demo; return the exit code."""
    endpoint = os.environ.get("OTEL_CANCEL_ETCD_ENDPOINTS")
    server = None if endpoint else EtcdServer().start()
    processes: list[ManagedProcess] = []
    try:
        env = {
            "OTEL_CANCEL_ETCD_ENDPOINTS": endpoint or (server.endpoint if server else ""),
            "OTEL_CANCEL_PREFIX": unique_prefix().replace("test", "demo"),
        }
        cancelled, other = random_root(), random_root()
        print(f"etcd: {env['OTEL_CANCEL_ETCD_ENDPOINTS']} ({'embedded' if server else 'configured'})")
        for index in range(2):
            worker = ManagedProcess(
                [sys.executable, "-c", _WORKER, cancelled, cancelled, other],
                env={**env, "OTEL_SERVICE_NAME": "demo-worker", "OTEL_CANCEL_INSTANCE": f"worker-{index}"},
                name=f"worker-{index}",
            )
            processes.append(worker)
        for worker in processes:
            worker.wait_for_line("READY")
        print(f"2 processes hold work for root {cancelled} and for root {other}")
        print(f"$ otel-cancel cancel {cancelled} --wait 10 --expect 2")
        result = subprocess.run(
            [sys.executable, "-m", "otel_cancel", "cancel", cancelled, "--reason", "demo", "--wait", "10",
             "--expect", "2", "--json"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return result.returncode
        rows = [json.loads(line)["receipt"] for line in result.stdout.splitlines() if '"receipt"' in line]
        if as_json:
            print(json.dumps({"root": cancelled, "receipts": rows}))
        else:
            print(format_table(rows, ("service", "instance", "depth", "interrupted", "latency_ms")))
        untouched = all("STOPPED task-2" not in " ".join(w.lines) for w in processes)
        print(f"root {other}: {'still running, untouched' if untouched else 'WRONGLY STOPPED'}")
        return 0 if len(rows) == 2 and untouched else 1
    except KeyboardInterrupt:
        return 130
    finally:
        for process in processes:
            process.stop()
        if server is not None:
            server.stop()
