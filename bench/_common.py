"""What every benchmark shares: the machine, percentiles, tables, results, processes.

Nothing here measures anything by itself; it describes where a measurement ran
(cores, CPU model, Python, etcd, load) and keeps the processes a benchmark starts
under control (every one is a :class:`~otel_cancel.testing.ManagedProcess`,
stopped by pid).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from otel_cancel.testing import ManagedProcess, find_etcd_binary, free_port

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
SERVICES = BENCH / "services"
PYTHON = sys.executable


# -- the machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def etcd_version() -> str:
    try:
        output = subprocess.run([find_etcd_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
    except Exception as error:
        return f"unknown ({error})"
    for line in output.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return output.strip().splitlines()[0] if output.strip() else "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "otel_cancel"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return commit + ("+dirty(otel_cancel)" if dirty else "")
    except Exception:
        return "unknown"


def library_fingerprint() -> str:
    """A hash of ``otel_cancel/`` as it is on disk (the working tree may differ from the commit)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((REPO / "otel_cancel").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine() -> dict[str, Any]:
    """Where the benchmark ran."""
    memory_kb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gb": round(memory_kb / 1024 / 1024, 1) if memory_kb else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "etcd": etcd_version(),
        "otel_cancel_commit": git_commit(),
        "otel_cancel_source_sha256": library_fingerprint(),
        "packages": {
            name: _version(name)
            for name in (
                "otel-cancel",
                "uvicorn",
                "starlette",
                "httpx",
                "opentelemetry-api",
                "opentelemetry-sdk",
                "opentelemetry-instrumentation-asgi",
                "grpcio",
                "aetcd",
                "langgraph",
                "langgraph-sdk",
            )
        },
        "hostname": socket.gethostname(),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class CpuSampler:
    """Samples machine-wide CPU busy % (from /proc/stat) and load average in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")

    @staticmethod
    def _times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def _run(self) -> None:
        total, idle = self._times()
        while not self._stop.wait(self.interval):
            new_total, new_idle = self._times()
            busy = 100.0 * (1 - (new_idle - idle) / max(1, new_total - total))
            self.samples.append({"t": time.time(), "busy_pct": round(busy, 1), "load1": round(os.getloadavg()[0], 2)})
            total, idle = new_total, new_idle

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def window(self, start: float, end: float) -> dict[str, float | None]:
        """Mean and max CPU busy % between two ``time.time()`` instants."""
        # A sample covers the interval before its timestamp: take every sample that overlaps.
        inside = [s["busy_pct"] for s in self.samples if start <= s["t"] <= end + self.interval]
        if not inside:
            later = [s for s in self.samples if s["t"] >= end]
            inside = [later[0]["busy_pct"]] if later else []
        if not inside:
            return {"cpu_busy_mean_pct": None, "cpu_busy_max_pct": None}
        return {
            "cpu_busy_mean_pct": round(sum(inside) / len(inside), 1),
            "cpu_busy_max_pct": round(max(inside), 1),
        }


# -- numbers -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summary(values: Sequence[float], digits: int = 2) -> dict[str, Any]:
    """n, min, p50, p90, p99, max, mean of ``values``."""
    if not values:
        return {"n": 0, "min": None, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "n": len(values),
        "min": r(min(values)),
        "p50": r(percentile(values, 50)),
        "p90": r(percentile(values, 90)),
        "p99": r(percentile(values, 99)),
        "max": r(max(values)),
        "mean": r(sum(values) / len(values)),
    }


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """Rows as a GitHub-flavoured markdown table (readable as plain text too)."""
    headers = list(headers or columns)

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body]
    return "\n".join(lines)


# -- results ---------------------------------------------------------------------------------------


def write_results(name: str, data: dict[str, Any], started: float, load_before: list[float]) -> Path:
    """Write ``bench/results/<name>.json`` with the machine, the load and ``data``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "started_at": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "command": " ".join([Path(PYTHON).name, *sys.argv]),
        "machine": machine(),
        "load_before": load_before,
        "load_after": loadavg(),
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    return path


def read_results(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, for development (results are marked quick)")
    return parser


def say(*parts: object) -> None:
    print(*parts, flush=True)


# -- processes --------------------------------------------------------------------------------------


def uvicorn_command(module: str, port: int, *, auto_instrument: bool = False) -> list[str]:
    """A uvicorn command for ``bench/services/<module>.py``.

    The event loop and HTTP parser are pinned (``asyncio``, ``h11``) so results do not
    change with whether uvloop or httptools happen to be installed.
    """
    command = [
        PYTHON,
        "-m",
        "uvicorn",
        f"{module}:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--app-dir",
        str(SERVICES),
        "--no-access-log",
        "--loop",
        "asyncio",
        "--http",
        "h11",
        "--backlog",
        "4096",
        "--timeout-keep-alive",
        "30",
    ]
    if auto_instrument:
        command = [str(Path(PYTHON).parent / "opentelemetry-instrument"), *command]
    return command


def service_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every benchmark service gets: no exporters, baggage propagated."""
    return {
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_PROPAGATORS": "tracecontext,baggage",
        "PYTHONPATH": os.pathsep.join([str(SERVICES), str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(extra or {}),
    }


def start_flag_writers(
    endpoint: str, prefix: str, seed: str, count: int, writers: int, rate: float, start_ns: int
) -> list[ManagedProcess]:
    """``writers`` processes writing ``count`` flags (roots from ``seed``) at ``rate`` per second
    between them, on one schedule starting at ``start_ns`` (``services/flag_writer.py``)."""
    return [
        ManagedProcess(
            [
                PYTHON,
                str(SERVICES / "flag_writer.py"),
                endpoint,
                prefix,
                seed,
                str(count),
                str(index),
                str(writers),
                str(rate),
                str(start_ns),
            ],
            env=service_env({}),
            name=f"writer-{index}",
        )
        for index in range(writers)
    ]


class ServiceChain:
    """``depth`` levels of ``replicas`` uvicorn processes; level 0 is the edge.

    Args:
        module: the service module under ``bench/services``.
        env: environment for every process (etcd endpoints, prefix...).
        level_env: per level index, extra environment.
        auto_instrument: run under ``opentelemetry-instrument``.
    """

    def __init__(
        self,
        depth: int,
        replicas: int,
        module: str,
        env: dict[str, str],
        *,
        level_env: dict[int, dict[str, str]] | None = None,
        auto_instrument: bool = False,
    ) -> None:
        self.depth = depth
        self.replicas = replicas
        self.module = module
        self.env = env
        self.level_env = level_env or {}
        self.auto_instrument = auto_instrument
        self.levels: list[list[tuple[str, ManagedProcess]]] = []

    def start(self, timeout: float = 120) -> ServiceChain:
        ports = [[free_port() for _ in range(self.replicas)] for _ in range(self.depth)]
        try:
            for level in range(self.depth):
                following = ports[level + 1] if level + 1 < self.depth else []
                here = []
                for replica, port in enumerate(ports[level]):
                    env = service_env(
                        {
                            **self.env,
                            "LEVEL": str(level),
                            "INSTANCE": f"L{level}r{replica}",
                            "NEXT_URLS": ",".join(f"http://127.0.0.1:{p}" for p in following),
                            "OTEL_SERVICE_NAME": f"bench-level-{level}",
                            "OTEL_CANCEL_INSTANCE": f"L{level}r{replica}",
                            "OTEL_CANCEL_TRUST_INCOMING": "false" if level == 0 else "true",
                            **self.level_env.get(level, {}),
                        }
                    )
                    command = uvicorn_command(self.module, port, auto_instrument=self.auto_instrument)
                    here.append(
                        (f"http://127.0.0.1:{port}", ManagedProcess(command, env=env, name=f"L{level}r{replica}"))
                    )
                self.levels.append(here)
            for process in self.processes():
                process.wait_for_line(lambda line: "Application startup complete" in line, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def urls(self, level: int = 0) -> list[str]:
        return [url for url, _ in self.levels[level]]

    def processes(self) -> list[ManagedProcess]:
        return [process for level in self.levels for _, process in level]

    def stop(self) -> None:
        for process in self.processes():
            process.stop()
        self.levels = []

    def __enter__(self) -> ServiceChain:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EventLog:
    """``START``/``END`` lines of a set of processes, parsed incrementally.

    ``level_app`` prints ``EVENT run level instance t_ns [how]``; this keeps, per run,
    the latest START and END per level (the instance and time).
    """

    def __init__(self, processes: Iterable[ManagedProcess]) -> None:
        self.processes = list(processes)
        self._seen = [0] * len(self.processes)
        self.start: dict[str, dict[int, int]] = {}
        self.end: dict[str, dict[int, tuple[int, str]]] = {}
        self._lock = threading.Lock()

    def update(self) -> None:
        with self._lock:
            for index, process in enumerate(self.processes):
                lines = process.lines
                count = len(lines)
                for line in lines[self._seen[index] : count]:
                    parts = line.split()
                    if len(parts) < 5 or parts[0] not in ("START", "END"):
                        continue
                    run, level, t_ns = parts[1], int(parts[2]), int(parts[4])
                    if parts[0] == "START":
                        self.start.setdefault(run, {})[level] = t_ns
                    else:
                        self.end.setdefault(run, {})[level] = (t_ns, parts[5] if len(parts) > 5 else "")
                self._seen[index] = count

    def started_everywhere(self, runs: Iterable[str], depth: int) -> bool:
        self.update()
        return all(len(self.start.get(run, {})) >= depth for run in runs)

    def ended_everywhere(self, runs: Iterable[str], depth: int) -> bool:
        self.update()
        return all(len(self.end.get(run, {})) >= depth for run in runs)


async def until(predicate: Callable[[], bool], timeout: float, poll: float = 0.01) -> bool:
    """Poll ``predicate`` on the event loop until it holds (True) or ``timeout`` passes (False).

    As :func:`wait_until`, the interval only bounds the harness's CPU use; measured
    latencies come from timestamps taken where the events happen.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(poll)
    return True


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> float:
    """Poll ``predicate`` until it holds; return the seconds it took.

    Benchmarks poll output that many processes write concurrently; the interval
    bounds the harness's own CPU use and never enters a measured latency (those
    come from timestamps taken where the events happen).
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f}s")
        time.sleep(poll)
    return time.monotonic() - start


@contextlib.contextmanager
def stopping(*processes: Any) -> Iterator[None]:
    """Stop every process (anything with ``stop()``) on the way out, in reverse order."""
    try:
        yield
    finally:
        for process in reversed(processes):
            with contextlib.suppress(Exception):
                process.stop()


def established_connections(pid: int, remote_port: int) -> int:
    """Established TCP connections of process ``pid`` to ``127.0.0.1:remote_port``.

    ``/proc/<pid>/net/tcp`` lists every socket of the network namespace, so the
    process's own sockets are found through the inodes of ``/proc/<pid>/fd``.
    """
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table_name in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table_name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if state == "01" and inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                count += 1
    return count


def etcd_metrics(client_port: int, names: Sequence[str]) -> dict[str, float]:
    """Selected series of etcd's ``/metrics`` (labels kept in the key)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{client_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        for name in names:
            if line.startswith(name):
                key, _, value = line.rpartition(" ")
                found[key] = float(value)
    return found


# -- rows shared by the benchmarks' own tables and bench/report.py ---------------------------

THROUGHPUT_COLUMNS = [
    "variant",
    "cpu_us_per_request_median",
    "rps_median",
    "rps_min",
    "rps_max",
    "p50_ms_median",
    "p99_ms_median",
    "non_2xx",
]
"""Columns of the three-hop throughput table (bench/overhead.py)."""

A2A_COLUMNS = ["target", "depth", "stopped", "p50", "p99", "max"]
A2A_HEADERS = ["cancel-task sent to", "depth", "stopped", "p50 ms", "p99 ms", "max ms"]
"""Columns and headers of the A2A cancel-task table (bench/a2a_cancel.py)."""


def cascade_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cascade configuration: how the deepest level stopped (bench/cascade.py)."""
    return [
        {
            "shape": r["shape"],
            "depth": r["depth"],
            "mechanism": r["mechanism"],
            "stopped": f"{r['deepest_stopped']}/{r['rounds']}",
            "p50": r["deepest_latency_ms"]["p50"],
            "p99": r["deepest_latency_ms"]["p99"],
            "max": r["deepest_latency_ms"]["max"],
            "ran_on": r["deepest_ran_on_ms"]["p50"],
        }
        for r in results
    ]


def langgraph_rows(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per LangGraph runs.cancel scenario: how the leaf stopped (bench/langgraph_cancel.py)."""
    return [
        {
            "scenario": s["scenario"],
            "depth": s["depth"],
            "stopped": f"{s['leaf_stopped']}/{s['rounds']}",
            "p50": s["leaf_latency_ms"]["p50"],
            "max": s["leaf_latency_ms"]["max"],
            "ran_on": s["leaf_ran_on_ms"]["p50"],
            "top": s["top_latency_ms"]["p50"],
            "call": s["cancel_call_ms"]["p50"],
            "status": ", ".join(s["top_run_status"]),
        }
        for s in scenarios
    ]
