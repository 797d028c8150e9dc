"""The flag side of being cancellable, each figure beside a bare aetcd watcher in the same run.

    .venv/bin/python bench/flag_cost.py [--quick]

1. CPU per flag while flags arrive at 1,000 per second (two ``flag_writer.py``
   processes sharing one schedule): the process that stops work and writes a
   receipt (``scope_holder.py`` holding one scope per root), a bystander
   (``scope_holder.py`` holding nothing) and a bare ``aetcd`` watcher
   (``bare_watcher.py``, the anchor), all watching the same prefix during the same
   storm. CPU is each process's user + system time from ``/proc/<pid>/stat`` over
   the storm, divided by the flags (the holder counts its stops instead of printing
   a line per stop, so the harness's output is not counted); the holder's is also
   split between its main thread (the app's loop: the stops) and its other threads
   (otel-cancel's IO loop and gRPC: the watch, receipts, live work), and the bare watcher's
   between its main thread (its loop: the watch) and gRPC's threads; a thread that ended
   during the storm is in its process's total only. etcd's own RPC counters over the storm show
   what the receipts cost in etcd calls. Several rounds; medians. The holder and
   the bystander run an OpenTelemetry SDK meter provider (an in-memory reader): the
   harness reads their flags applied and receipts written from otel-cancel's own
   metrics, so each flag costs them what it costs a service that records metrics.
2. Flag -> work stopped against flag -> watch event delivered, one flag at a time:
   for the same flags, the holder's stop time and the bare watcher's delivery time,
   both minus the flag's ``requested_at`` (one clock), at 3 watching processes
   (holder, bystander, bare watcher) and at 11 (holder, bare watcher, 9 bystanders).

Writes ``bench/results/flag_cost.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "services"))

from _common import (
    PYTHON,
    SERVICES,
    base_parser,
    loadavg,
    say,
    service_env,
    start_flag_writers,
    summary,
    table,
    write_results,
)
from scale import Holder, process_cpu_seconds

from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import EtcdServer, ManagedProcess, unique_prefix
from otel_cancel.testing.etcd_metrics import etcd_grpc_calls

WRITERS = 2


class BareWatcher:
    """A ``bare_watcher`` process: one aetcd watch, nothing else."""

    def __init__(self, etcd: EtcdServer, prefix: str, name: str) -> None:
        command = [PYTHON, str(SERVICES / "bare_watcher.py"), etcd.endpoint, prefix]
        self.process = ManagedProcess(command, env=service_env({}), name=name)
        self.process.wait_for_line("READY", timeout=60)
        self.seen: dict[str, int] = {}

    def count(self) -> int:
        self.process.send("stats")
        return int(json.loads(self.process.wait_for_line("STATS ", timeout=60)[6:])["seen"])

    def dump(self) -> dict[str, int]:
        start = len(self.process.lines)
        self.process.send("dump")
        self.process.wait_for_line("DUMPED", timeout=60)
        for line in self.process.lines[start:]:
            if line.startswith("SEEN "):
                _, root, t_ns = line.split()
                self.seen[root] = int(t_ns)
        return self.seen

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.process.send("quit")
        self.process.stop()


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a process's main thread (the app's loop) and of all its other threads together
    (otel-cancel's IO loop, gRPC's poller), from ``/proc/<pid>/task``; ``grpc`` is the part of the
    others spent in gRPC's own threads (named ``event_engine`` and ``grpc_*``: no Python runs there)."""
    split = {"main": 0.0, "others": 0.0, "grpc": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = stat.split("(", 1)[1].rsplit(")", 1)[0]
            fields = stat.rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            split["main" if int(tid) == pid else "others"] += seconds
            if int(tid) != pid and name.startswith(("event_engine", "grpc")):
                split["grpc"] += seconds
    return split


def etcd_calls(etcd: EtcdServer) -> Counter[str]:
    """Every RPC etcd has started, by method (its own Prometheus counter)."""
    return etcd_grpc_calls(etcd.client_url)


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.05)


async def storm_round(etcd: EtcdServer, prefix: str, count: int, rate: float) -> dict[str, Any]:
    """One storm of ``count`` flags at ``rate``/s, watched by a holder, a bystander and a bare watcher."""
    holder = Holder(etcd, prefix, "holder", {"BENCH_QUIET_STOPS": "1"})
    bystander = Holder(etcd, prefix, "bystander")
    bare = BareWatcher(etcd, prefix, "bare")
    try:
        seed = f"storm-{time.time_ns()}"
        holder.hold(seed, count)
        holder_before, bystander_before = holder.stats(), bystander.stats()
        bare_before = bare.count()
        cpu_before = {
            name: process_cpu_seconds(p.pid)
            for name, p in (("holder", holder), ("bystander", bystander), ("bare", bare))
        }
        threads_before = thread_cpu_seconds(holder.process.pid)
        bare_threads_before = thread_cpu_seconds(bare.pid)
        calls_before = await asyncio.to_thread(etcd_calls, etcd)
        start_ns = time.time_ns() + int(3e9)
        writers = start_flag_writers(etcd.endpoint, prefix, seed, count, WRITERS, rate, start_ns)
        try:
            for writer in writers:
                writer.wait_for_line("DONE ", timeout=60 + count / rate * 5)
            # Under heavy load a write can fail (its deadline passes): count what was written.
            written = sum(1 for w in writers for line in w.lines if line.startswith("WROTE "))
            failed = sum(1 for w in writers for line in w.lines if line.startswith("FAILED "))
        finally:
            for writer in writers:
                writer.stop()

        def receipts() -> int:
            return int(holder.stats()["receipts_written"] - holder_before["receipts_written"])

        try:
            await _until(lambda: receipts() >= written, 120, f"{written} receipts")
        except TimeoutError as error:
            raise TimeoutError(f"{error}: holder {holder.stats()}, {receipts()} receipts") from None
        await _until(
            lambda: bystander.stats()["flags_applied"] - bystander_before["flags_applied"] >= written, 60, "bystander"
        )
        await _until(lambda: bare.count() - bare_before >= written, 60, "bare watcher")
        cpu = {
            name: process_cpu_seconds(p.pid) - cpu_before[name]
            for name, p in (("holder", holder), ("bystander", bystander), ("bare", bare))
        }
        threads = {k: v - threads_before[k] for k, v in thread_cpu_seconds(holder.process.pid).items()}
        bare_threads = {k: v - bare_threads_before[k] for k, v in thread_cpu_seconds(bare.pid).items()}
        calls = await asyncio.to_thread(etcd_calls, etcd) - calls_before
    finally:
        for process in (holder, bystander, bare):
            process.stop()
    per_flag = {name: round(1e6 * seconds / written, 1) for name, seconds in cpu.items()}
    # The writers' calls: a lease and a transaction per flag (create-if-absent). The rest are the holder's receipts.
    receipt_calls = {
        method: n - (written + failed if method in ("LeaseGrant", "Txn") else 0)
        for method, n in calls.items()
        if method in ("Put", "Range", "LeaseGrant", "Txn")
    }
    return {
        "flags": count,
        "written": written,
        "write_failures": failed,
        "cpu_us_per_flag": per_flag,
        # The holder's split: its app loop (the stops) and its other threads (watch, receipts, live work).
        "holder_thread_cpu_us_per_flag": {name: round(1e6 * seconds / written, 1) for name, seconds in threads.items()},
        # The anchor's split the same way: its main thread runs its loop, gRPC's threads the rest.
        "bare_thread_cpu_us_per_flag": {
            name: round(1e6 * seconds / written, 1) for name, seconds in bare_threads.items()
        },
        "bystander_over_bare": round(per_flag["bystander"] / per_flag["bare"], 2) if per_flag["bare"] else None,
        "holder_over_bare": round(per_flag["holder"] / per_flag["bare"], 2) if per_flag["bare"] else None,
        "etcd_calls_for_receipts": receipt_calls,
        "etcd_calls_per_receipt": round(sum(receipt_calls.values()) / written, 3),
    }


async def latency(etcd: EtcdServer, prefix: str, bystanders: int, flags: int) -> dict[str, Any]:
    """Flag -> stop (holder) against flag -> delivery (bare watcher), one flag at a time."""
    holder = Holder(etcd, prefix, "holder-latency")
    bare = BareWatcher(etcd, prefix, "bare-latency")
    others = [Holder(etcd, prefix, f"bystander-{i}") for i in range(bystanders)]
    store = EtcdCancelStore([etcd.endpoint], prefix=prefix)
    try:
        seed = f"latency-{time.time_ns()}"
        targets = holder.hold(seed, flags)
        requested: dict[str, int] = {}
        for root in targets:
            stored, _ = await io_loop().call(
                store.create_flag(CancelRequest.new(root, "bench", "bench/flag_cost"), 600)
            )
            requested[root] = stored.requested_at
            holder.process.wait_for_line(f"STOPPED {root} ", timeout=30)
            # Let the other processes finish with this flag too, so the next one meets quiet processes.
            await asyncio.sleep(0.03)
        await _until(lambda: len(bare.dump()) >= flags, 30, "bare watcher deliveries")
        stopped = holder.update()
    finally:
        await io_loop().call(store.close())
        for process in (holder, bare, *others):
            process.stop()
    stop_ms = [(stopped[r] - requested[r]) / 1e6 for r in targets if r in stopped]
    seen_ms = [(bare.seen[r] - requested[r]) / 1e6 for r in targets if r in bare.seen]
    stop, seen = summary(stop_ms), summary(seen_ms)
    return {
        "watching_processes": 2 + bystanders,
        "flags": flags,
        "flag_to_stop_ms": stop,
        "flag_to_bare_delivery_ms": seen,
        "p50_ratio": round(stop["p50"] / seen["p50"], 2) if stop["p50"] and seen["p50"] else None,
    }


async def run(args: Any) -> dict[str, Any]:
    rounds = 2 if args.quick else 5
    count = 500 if args.quick else 2_000
    flags = 30 if args.quick else 100
    with EtcdServer() as etcd:
        prefix = unique_prefix().replace("test", "bench")
        storms = []
        for index in range(rounds):
            say(f"storm {index + 1}/{rounds}: {count:,} flags at 1,000/s ...")
            result = await storm_round(etcd, prefix, count, 1000.0)
            calls = result["etcd_calls_per_receipt"]
            say(
                f"  CPU µs per flag {result['cpu_us_per_flag']} (holder's threads "
                f"{result['holder_thread_cpu_us_per_flag']}; bare's {result['bare_thread_cpu_us_per_flag']}), "
                f"etcd calls per receipt {calls}"
            )
            storms.append(result)
        latencies = []
        for bystanders in (1, 9):
            say(f"one flag at a time, {2 + bystanders} watching processes ...")
            result = await latency(etcd, prefix, bystanders, flags)
            stop, bare = result["flag_to_stop_ms"]["p50"], result["flag_to_bare_delivery_ms"]["p50"]
            say(f"  stop p50 {stop} ms vs bare delivery p50 {bare} ms")
            latencies.append(result)
    medians = {
        name: round(statistics.median(s["cpu_us_per_flag"][name] for s in storms), 1)
        for name in ("holder", "bystander", "bare")
    }
    return {
        "quick": args.quick,
        "storms": storms,
        "cpu_us_per_flag_median": medians,
        "bystander_over_bare_median": round(statistics.median(s["bystander_over_bare"] for s in storms), 2),
        "holder_thread_cpu_us_per_flag_median": {
            name: round(statistics.median(s["holder_thread_cpu_us_per_flag"][name] for s in storms), 1)
            for name in ("main", "others", "grpc")
        },
        "bare_thread_cpu_us_per_flag_median": {
            name: round(statistics.median(s["bare_thread_cpu_us_per_flag"][name] for s in storms), 1)
            for name in ("main", "others", "grpc")
        },
        "etcd_calls_per_receipt_median": statistics.median(s["etcd_calls_per_receipt"] for s in storms),
        "latency": latencies,
    }


def main() -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    started, load_before = time.time(), loadavg()
    data = asyncio.run(run(args))
    path = write_results("flag_cost", data, started, load_before)
    say("\nCPU µs per flag at 1,000 flags/s (per storm)")
    rows = [
        {
            "storm": i,
            **s["cpu_us_per_flag"],
            "bystander/bare": s["bystander_over_bare"],
            "etcd calls per receipt": s["etcd_calls_per_receipt"],
        }
        for i, s in enumerate(data["storms"])
    ]
    say(table(rows, list(rows[0])))
    say(f"medians: {data['cpu_us_per_flag_median']}, bystander/bare {data['bystander_over_bare_median']}")
    say("\nflag -> stop vs flag -> bare watch delivery")
    say(
        table(
            [
                {
                    "watching": r["watching_processes"],
                    "stop p50": r["flag_to_stop_ms"]["p50"],
                    "bare p50": r["flag_to_bare_delivery_ms"]["p50"],
                    "ratio": r["p50_ratio"],
                }
                for r in data["latency"]
            ],
            ["watching", "stop p50", "bare p50", "ratio"],
        )
    )
    say(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
