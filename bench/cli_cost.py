"""What ``otel-cancel cancel`` costs a user at the terminal, against ``etcdctl put`` in the same run.

    .venv/bin/python bench/cli_cost.py [--quick] [--pairs N]

Paired runs against one real etcd: ``etcdctl put`` of a key, then ``otel-cancel
cancel`` of a fresh root (the console script, as a user runs it), wall time of each
process from start to exit; the ratio of each pair, and its median. Also ``python -c
pass`` (the interpreter's own start) and, in one extra run, the modules the command
imported (``-X importtime``), to show that nothing it does not use is loaded: a plain
``cancel`` writes through etcd's HTTP gateway and loads no gRPC, aetcd, protobuf,
asyncio or OpenTelemetry.

As a user runs it means with bytecode: pip compiles an installed package's modules
(``.pyc``), while this tree is installed editable and the test environment sets
``PYTHONDONTWRITEBYTECODE``, which would make every run compile the package from
source. The measured commands run without that variable and with their bytecode in a
temporary ``PYTHONPYCACHEPREFIX`` (written by the warm-up runs); each pair also times
one ``cancel`` without bytecode, reported beside it.

Writes ``bench/results/cli_cost.json``.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, base_parser, loadavg, say, summary, table, write_results

from otel_cancel._core.root_id import random_root
from otel_cancel.testing import EtcdServer, find_etcdctl_binary

CONSOLE_SCRIPT = str(Path(PYTHON).parent / "otel-cancel")
# What a plain `cancel` does not use: it writes its flags through etcd's HTTP gateway with the
# standard library (the gRPC store, asyncio and OpenTelemetry serve --wait, --all and span export).
HEAVY = (
    "grpc",
    "aetcd",
    "google.protobuf",
    "asyncio",
    "opentelemetry",
    "otel_cancel.store.etcd",
    "otel_cancel.asgi",
    "otel_cancel.a2a",
    "otel_cancel.langgraph",
    "otel_cancel.demo",
    "otel_cancel.cli.doctor",
    "langgraph",
    "a2a",
    "httpx",
    "starlette",
    "uvicorn",
)


def _timed(command: list[str], env: dict[str, str]) -> float:
    return _timed_with_cpu(command, env)[0]


def _timed_with_cpu(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system, of the process and its children), in ms."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    wall = (time.perf_counter() - started) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return wall, cpu


def imported_modules(env: dict[str, str]) -> dict[str, Any]:
    """The modules one ``cancel`` imports, and the heavy ones among them."""
    result = subprocess.run(
        [PYTHON, "-X", "importtime", CONSOLE_SCRIPT, "cancel", random_root()],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    lines = [line.split("|") for line in result.stderr.splitlines() if line.count("|") == 2]
    timed = [(int(cumulative), name) for _, cumulative, name in lines if cumulative.strip().isdigit()]
    modules = [name.strip() for _, name in timed]
    # Top-level imports (no indentation) add up to the whole import time.
    total_us = sum(cumulative for cumulative, name in timed if not name.startswith("  "))
    return {
        "modules": len(modules),
        "heavy": sorted({m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)}),
        "import_ms": round(total_us / 1000, 1),
    }


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, help="paired runs (default 40, 10 with --quick); more on a busy machine")
    args = parser.parse_args()
    started, load_before = time.time(), loadavg()
    pairs = args.pairs or (10 if args.quick else 40)
    with EtcdServer() as etcd, tempfile.TemporaryDirectory(prefix="otel-cancel-pyc-") as bytecode:
        env = {
            **os.environ,
            "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
            "OTEL_CANCEL_PREFIX": "/otel-cancel-bench-cli/",
            "PYTHONPYCACHEPREFIX": bytecode,
        }
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        no_bytecode_env = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
        no_bytecode_env.pop("PYTHONPYCACHEPREFIX")
        etcdctl = [find_etcdctl_binary(), "--endpoints", etcd.endpoint, "put"]
        for _ in range(3):  # warm the page cache for both
            _timed([*etcdctl, "/warm", "v"], env)
            _timed([CONSOLE_SCRIPT, "cancel", random_root()], env)
        rows = []
        for index in range(pairs):
            root = random_root()
            put_ms, put_cpu_ms = _timed_with_cpu([*etcdctl, f"/otel-cancel-bench-put/{root}", "v"], env)
            cancel_ms, cancel_cpu_ms = _timed_with_cpu([CONSOLE_SCRIPT, "cancel", root], env)
            pass_ms = _timed([PYTHON, "-c", "pass"], env)
            cold_ms = _timed([CONSOLE_SCRIPT, "cancel", random_root()], no_bytecode_env)
            rows.append(
                {
                    "pair": index,
                    "etcdctl_put_ms": put_ms,
                    "otel_cancel_ms": cancel_ms,
                    "python_pass_ms": pass_ms,
                    "otel_cancel_no_bytecode_ms": cold_ms,
                    "etcdctl_put_cpu_ms": put_cpu_ms,
                    "otel_cancel_cpu_ms": cancel_cpu_ms,
                }
            )
        imports = imported_modules(env)
    ratios = [r["otel_cancel_ms"] / r["etcdctl_put_ms"] for r in rows]
    data = {
        "quick": args.quick,
        "pairs": pairs,
        "etcdctl_put_ms": summary([r["etcdctl_put_ms"] for r in rows]),
        "otel_cancel_ms": summary([r["otel_cancel_ms"] for r in rows]),
        "python_pass_ms": summary([r["python_pass_ms"] for r in rows]),
        "otel_cancel_no_bytecode_ms": summary([r["otel_cancel_no_bytecode_ms"] for r in rows]),
        "bytecode": "PYTHONPYCACHEPREFIX (temporary), PYTHONDONTWRITEBYTECODE unset",
        "ratio": summary(ratios),
        "ratio_median": round(statistics.median(ratios), 2),
        # CPU time is steadier than wall time on a shared machine (context, not the target).
        "etcdctl_put_cpu_ms": summary([r["etcdctl_put_cpu_ms"] for r in rows]),
        "otel_cancel_cpu_ms": summary([r["otel_cancel_cpu_ms"] for r in rows]),
        "cpu_ratio_median": round(
            statistics.median(r["otel_cancel_cpu_ms"] / max(r["etcdctl_put_cpu_ms"], 0.001) for r in rows), 2
        ),
        "imports": imports,
        "samples": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
    }
    path = write_results("cli_cost", data, started, load_before)
    say(
        table(
            [
                {"command": name, **{k: data[key][k] for k in ("p50", "p90", "min", "max")}}
                for name, key in (
                    ("etcdctl put", "etcdctl_put_ms"),
                    ("otel-cancel cancel", "otel_cancel_ms"),
                    ("python -c pass", "python_pass_ms"),
                    ("otel-cancel cancel, no bytecode", "otel_cancel_no_bytecode_ms"),
                )
            ],
            ["command", "p50", "p90", "min", "max"],
        )
    )
    say(f"ratio otel-cancel / etcdctl, median of {pairs} pairs: {data['ratio_median']}")
    say(f"CPU time ratio, median: {data['cpu_ratio_median']}")
    say(f"imports: {imports}")
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
