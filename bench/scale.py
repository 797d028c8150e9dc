"""Scale: 10,000 scopes in one process, a storm of cancels, one watch per process.

    /work/venv/bin/python bench/scale.py [--quick]

1. Memory per scope (in this process, ``tracemalloc``): 10,000 tasks parked with
   a root in their context, with and without ``async with otel_cancel.scope()``;
   the difference divided by 10,000 (median of interleaved repeats).
2. Cancel latency for one root among 10,000 live scopes vs among none: a worker
   process (``bench/services/scope_holder.py``) holds the scopes; this process
   writes flags with ``EtcdCancelStore.create_flag`` (the path ``otel-cancel
   cancel`` takes), one at a time; the worker prints when each scope stopped.
   Latency = stop time - the flag's ``requested_at`` (same clock).
3. A storm: the worker holds scopes for 2,000 roots; flags for all of them are
   written at 1,000 per second by two writer processes sharing one schedule
   (``bench/services/flag_writer.py``; each write at its slot, not waiting for
   the previous one). Reports the rate achieved, apply latency percentiles
   and whether every flag stopped its scope and got a receipt.
4. etcd connections and watch streams: four workers holding 0, 100, 1,000 and
   10,000 scopes; per worker, established TCP connections to etcd's client port
   (through ``/proc/<pid>/fd`` and ``/proc/<pid>/net/tcp``), and etcd's own
   metrics (``etcd_debugging_mvc_watch_stream_total``,
   ``etcd_debugging_mvc_watcher_total``, ``grpc_server_started_total`` for
   ``Watch``) before and after the workers start.

Writes ``bench/results/scale.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "services"))

from _common import (
    PYTHON,
    SERVICES,
    CpuSampler,
    base_parser,
    established_connections,
    etcd_metrics,
    loadavg,
    say,
    service_env,
    start_flag_writers,
    summary,
    table,
    until,
    write_results,
)
from opentelemetry import baggage, context
from scope_holder import roots

import otel_cancel
from otel_cancel import attributes
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest
from otel_cancel._core.startup_wait import wait_for_listing
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.testing import EtcdServer, ManagedProcess, configured, unique_prefix

WATCH_METRICS = (
    # etcd 3.5 spells these etcd_debugging_mvcc_*; older releases etcd_debugging_mvc_*.
    "etcd_debugging_mvcc_watch_stream_total",
    "etcd_debugging_mvcc_watcher_total",
    "etcd_debugging_mvc_watch_stream_total",
    "etcd_debugging_mvc_watcher_total",
    'grpc_server_started_total{grpc_method="Watch"',
    'grpc_server_started_total{grpc_method="Range"',
    'grpc_server_started_total{grpc_method="Txn"',
    'grpc_server_started_total{grpc_method="LeaseGrant"',
    'grpc_server_started_total{grpc_method="Put"',
)


# -- 1. memory ------------------------------------------------------------------------------------------


async def _parked(root: str, with_scope: bool, ready: list[int], release: asyncio.Event) -> None:
    ctx = baggage.set_baggage(attributes.BAGGAGE_ROOT, root)
    token = context.attach(baggage.set_baggage(attributes.BAGGAGE_DEPTH, "1", context=ctx))
    try:
        if with_scope:
            async with otel_cancel.scope():
                ready[0] += 1
                await release.wait()
        else:
            ready[0] += 1
            await release.wait()
    finally:
        context.detach(token)


async def _memory_arm(count: int, with_scope: bool) -> int:
    all_roots = roots(f"mem-{with_scope}-{time.time_ns()}", count)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    release = asyncio.Event()
    ready = [0]
    tasks = [asyncio.create_task(_parked(root, with_scope, ready, release)) for root in all_roots]
    while ready[0] < count:
        await asyncio.sleep(0.01)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    release.set()
    await asyncio.gather(*tasks)
    del tasks
    gc.collect()
    return used


async def memory(count: int, repeats: int, etcd: EtcdServer) -> dict[str, Any]:
    with configured(endpoints=(etcd.endpoint,), prefix=unique_prefix(), service="bench-scale") as runtime:
        await wait_for_listing(runtime)
        await _memory_arm(count // 10, True)  # warm up: registry dicts, code paths
        with_scope, without = [], []
        for _ in range(repeats):
            without.append(await _memory_arm(count, False))
            with_scope.append(await _memory_arm(count, True))
        live_after = runtime.registry.live_scopes()
    per_scope = [(w - b) / count for w, b in zip(with_scope, without, strict=True)]
    return {
        "scopes": count,
        "repeats": repeats,
        "bytes_per_task_without_scope": round(statistics.median(without) / count),
        "bytes_per_task_with_scope": round(statistics.median(with_scope) / count),
        "bytes_per_scope": round(statistics.median(per_scope)),
        "bytes_per_scope_samples": [round(x) for x in per_scope],
        "live_scopes_after_release": live_after,
    }


# -- the worker ------------------------------------------------------------------------------------------


class Holder:
    """A ``scope_holder`` worker process."""

    def __init__(self, etcd: EtcdServer, prefix: str, name: str, extra_env: dict[str, str] | None = None) -> None:
        env = service_env(
            {
                "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
                "OTEL_CANCEL_PREFIX": prefix,
                "OTEL_SERVICE_NAME": "bench-holder",
                "OTEL_CANCEL_INSTANCE": name,
                **(extra_env or {}),
            }
        )
        self.process = ManagedProcess([PYTHON, str(SERVICES / "scope_holder.py")], env=env, name=name)
        self.process.wait_for_line("READY", timeout=60)
        self._stop_seen = 0
        self.stopped: dict[str, int] = {}

    def hold(self, seed: str, count: int, timeout: float = 300) -> list[str]:
        self.process.send(f"hold {seed} {count}")
        self.process.wait_for_line(f"HELD {seed} ", timeout=timeout)
        return roots(seed, count)

    def release(self, seed: str) -> None:
        self.process.send(f"release {seed}")
        self.process.wait_for_line(f"RELEASED {seed}", timeout=300)

    def stats(self) -> dict[str, Any]:
        """The worker's ``stats``; its flags applied and receipts written come from its otel-cancel metrics."""
        self.process.send("stats")
        return json.loads(self.process.wait_for_line("STATS ", timeout=60)[6:])

    def update(self) -> dict[str, int]:
        lines = self.process.lines
        count = len(lines)
        for line in lines[self._stop_seen : count]:
            if line.startswith("STOPPED "):
                _, root, t_ns = line.split()
                self.stopped[root] = int(t_ns)
        self._stop_seen = count
        return self.stopped

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.process.send("quit")
        self.process.stop()


async def _write_flag(store: EtcdCancelStore, root: str) -> int:
    request = CancelRequest.new(root, "bench", "bench/scale")

    async def write() -> int:
        stored, _ = await store.create_flag(request, 600)
        return stored.requested_at

    result: int = await io_loop().call(write())
    return result


# -- 2. one among many --------------------------------------------------------------------------------------


async def one_among(
    holder: Holder, store: EtcdCancelStore, background: int, targets: int, label: str
) -> dict[str, Any]:
    seed = f"{label}-{time.time_ns()}"
    if background:
        holder.hold(f"{seed}-bg", background)
    wanted = holder.hold(f"{seed}-target", targets)
    stats = holder.stats()
    latencies = []
    for root in wanted:
        requested_at = await _write_flag(store, root)
        if not await until(lambda r=root: r in holder.update(), 10):
            continue
        latencies.append((holder.stopped[root] - requested_at) / 1e6)
        await asyncio.sleep(0.02)
    if background:
        holder.release(f"{seed}-bg")
    return {
        "live_scopes": stats["live_scopes"],
        "cancels": len(wanted),
        "stopped": len(latencies),
        "latency_ms": summary(latencies, 3),
        "samples_ms": [round(x, 3) for x in latencies],
    }


# -- 3. storm -----------------------------------------------------------------------------------------------


WRITERS = 2


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def storm(
    holder: Holder, count: int, rate: float, etcd: EtcdServer, prefix: str, hold: bool = True
) -> dict[str, Any]:
    """The storm against ``holder``; with ``hold=False`` it holds nothing for those roots (a bystander)."""
    seed = f"storm-{time.time_ns()}"
    targets = holder.hold(seed, count) if hold else []
    before = holder.stats()
    cpu_before = process_cpu_seconds(holder.pid)
    # The writers share one schedule; start it once both have connected to etcd.
    start_ns = time.time_ns() + int(3e9)
    writers = start_flag_writers(etcd.endpoint, prefix, seed, count, WRITERS, rate, start_ns)
    try:
        done = [json.loads(w.wait_for_line("DONE ", timeout=60 + count / rate * 5)[5:]) for w in writers]
        requested: dict[str, int] = {}
        failures: list[str] = []
        for writer in writers:
            for line in writer.lines:
                if line.startswith("WROTE "):
                    _, root, at = line.split()
                    requested[root] = int(at)
                elif line.startswith("FAILED "):
                    failures.append(line[7:])
    finally:
        for writer in writers:
            writer.stop()
    # The write window, from the flags' own stamps (requested_at: when each flag was written).
    written_from = min(requested.values()) / 1e9 if requested else 0.0
    written_to = max(requested.values()) / 1e9 if requested else 0.0
    if hold:
        await until(lambda: len(holder.update()) >= len(requested), 60, 0.05)
    applied_by = time.time()
    # Receipts: every stopped scope's process writes one; wait for them to land.
    receipts_deadline = time.monotonic() + 60
    stats = holder.stats()
    while (
        stats["flags_applied"] - before["flags_applied"] < len(requested)
        or (hold and stats["receipts_written"] - before["receipts_written"] < len(requested))
    ) and time.monotonic() < receipts_deadline:
        await asyncio.sleep(0.2)
        stats = holder.stats()
    cpu_used = process_cpu_seconds(holder.pid) - cpu_before
    stopped = holder.update()
    latencies = [(stopped[root] - requested[root]) / 1e6 for root in requested if root in stopped]
    span = max(1e-9, written_to - written_from)
    del targets
    return {
        "flags": count,
        "target_rate_per_s": rate,
        "writer_processes": WRITERS,
        "written": len(requested),
        "write_failures": len(failures),
        "failure_examples": failures[:5],
        "write_seconds": round(span, 3),
        "achieved_rate_per_s": round((len(requested) - 1) / span, 1) if len(requested) > 1 else None,
        "schedule_lateness_max_ms": max(d["lateness_max_ms"] or 0 for d in done),
        "schedule_lateness_p50_ms": max(d["lateness_p50_ms"] or 0 for d in done),
        "stopped": len(latencies),
        # A bystander has nothing to stop: every flag applied to its registry is what counts.
        "all_applied": len(latencies) == count if hold else stats["flags_applied"] - before["flags_applied"] == count,
        "receipts_written": stats["receipts_written"] - before["receipts_written"],
        "flags_applied_by_worker": stats["flags_applied"] - before["flags_applied"],
        "last_stop_after_last_write_ms": round(
            (max(stopped[r] for r in requested if r in stopped) / 1e9 - written_to) * 1000, 1
        )
        if latencies
        else None,
        "apply_seconds_total": round(applied_by - written_from, 2),
        "holder_cpu_us_per_flag": round(1e6 * cpu_used / max(1, len(requested)), 1),
        "latency_ms": summary(latencies),
        "latency_by_window": _by_second(requested, stopped),
        "samples_ms": [round(x, 2) for x in latencies],
    }


def _by_second(requested: dict[str, int], stopped: dict[str, int]) -> list[dict[str, Any]]:
    if not requested:
        return []
    t0 = min(requested.values())
    buckets: dict[int, list[float]] = {}
    for root, at in requested.items():
        if root in stopped:
            buckets.setdefault(int((at - t0) // 250_000_000), []).append((stopped[root] - at) / 1e6)
    return [{"window_ms": f"{k * 250}-{(k + 1) * 250}", **summary(v)} for k, v in sorted(buckets.items())]


# -- 4. connections and watches -------------------------------------------------------------------------------


def connections(etcd: EtcdServer, prefix: str, sizes: list[int], bench_pid: int) -> dict[str, Any]:
    before = etcd_metrics(etcd.client_port, WATCH_METRICS)
    bench_connections = established_connections(bench_pid, etcd.client_port)
    workers: list[Holder] = []
    try:
        rows = []
        for index, size in enumerate(sizes):
            holder = Holder(etcd, prefix, f"conn-{index}")
            workers.append(holder)
            if size:
                holder.hold(f"conn-{index}", size)
        time.sleep(0.5)  # let every watch be created server-side; etcd exposes no event to await
        after = etcd_metrics(etcd.client_port, WATCH_METRICS)
        for holder in workers:
            rows.append(
                {
                    "worker_pid": holder.pid,
                    "scopes": holder.stats()["live_scopes"],
                    "etcd_tcp_connections": established_connections(holder.pid, etcd.client_port),
                    "threads": len(list(Path(f"/proc/{holder.pid}/task").iterdir())),
                }
            )
    finally:
        for holder in workers:
            holder.stop()
    after_stop = etcd_metrics(etcd.client_port, WATCH_METRICS)
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    return {
        "workers": rows,
        "bench_process_connections": bench_connections,
        "etcd_metrics_before": before,
        "etcd_metrics_with_workers": after,
        "etcd_metrics_after_workers_stopped": after_stop,
        "delta_with_workers": delta,
    }


async def run(args: Any) -> dict[str, Any]:
    count = 2_000 if args.quick else 10_000
    with CpuSampler() as cpu, EtcdServer() as etcd:
        say(f"memory per scope ({count:,} scopes) ...")
        mem = await memory(count, 2 if args.quick else 5, etcd)
        say(f"  {mem['bytes_per_scope']} bytes per scope")

        prefix = unique_prefix().replace("test", "bench")
        store = EtcdCancelStore([etcd.endpoint], prefix=prefix)
        await io_loop().call(store.ping())
        holder = Holder(etcd, prefix, "holder-latency")
        try:
            targets = 10 if args.quick else 50
            say("one root among none vs among many ...")
            alone = await one_among(holder, store, 0, targets, "alone")
            t0 = time.time()
            crowd = await one_among(holder, store, count, targets, "crowd")
            crowd.update(cpu.window(t0, time.time()))
            for name, row in (("among none", alone), (f"among {count:,}", crowd)):
                say(
                    f"  {name}: p50 {row['latency_ms']['p50']} ms, p99 {row['latency_ms']['p99']} ms "
                    f"({row['live_scopes']} live)"
                )
        finally:
            holder.stop()

        storm_count = 500 if args.quick else 2_000
        storms = {}
        for label, extra, hold in (
            ("receipts on", {}, True),
            ("receipts off (diagnostic)", {"BENCH_RECEIPTS": "off"}, True),
            ("bystander: no scope for these roots", {}, False),
        ):
            holder = Holder(etcd, prefix, f"holder-storm-{len(storms)}", extra)
            try:
                say(f"storm ({label}): {storm_count:,} flags at 1,000/s ...")
                t0 = time.time()
                result = await storm(holder, storm_count, 1000.0, etcd, prefix, hold=hold)
                result.update(cpu.window(t0, time.time()))
                result["receipts"] = label
                storms[label] = result
                say(
                    f"  written at {result['achieved_rate_per_s']}/s, {result['stopped']}/{storm_count} stopped, "
                    f"p50 {result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} ms, "
                    f"{result['holder_cpu_us_per_flag']} µs CPU per flag in the process"
                )
            finally:
                holder.stop()
        storm_result = storms["receipts on"]

        say("connections and watch streams ...")
        sizes = [0, 100, 1_000, count]
        conn = await asyncio.to_thread(connections, etcd, prefix, sizes, __import__("os").getpid())
        await io_loop().call(store.close())
    return {
        "quick": args.quick,
        "memory": mem,
        "latency_alone": alone,
        "latency_crowd": crowd,
        "storm": storm_result,
        "storm_without_receipts": storms["receipts off (diagnostic)"],
        "storm_bystander": storms["bystander: no scope for these roots"],
        "connections": conn,
    }


def main() -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    started, load_before = time.time(), loadavg()
    data = asyncio.run(run(args))
    path = write_results("scale", data, started, load_before)
    mem = data["memory"]
    say(
        f"\nmemory: {mem['bytes_per_scope']} bytes per scope "
        f"({mem['scopes']:,} scopes, tracemalloc, median of {mem['repeats']})"
    )
    say(
        f"  a parked task with a root in its context: {mem['bytes_per_task_without_scope']} B; "
        f"with a scope: {mem['bytes_per_task_with_scope']} B"
    )
    rows = []
    for name, row in (("among none", data["latency_alone"]), ("among many", data["latency_crowd"])):
        rows.append({"case": name, "live scopes": row["live_scopes"], "cancels": row["cancels"], **row["latency_ms"]})
    say("\nflag written -> scope stopped, one root at a time, ms")
    say(table(rows, ["case", "live scopes", "cancels", "p50", "p90", "p99", "max"]))
    s = data["storm"]
    storm_rows = [data["storm"], data["storm_without_receipts"], data["storm_bystander"]]
    say(
        f"\nstorm: {s['flags']:,} flags scheduled at {s['target_rate_per_s']:,.0f}/s by {s['writer_processes']} writers"
    )
    say(
        table(
            [{**r, **{k: r["latency_ms"][k] for k in ("p50", "p90", "p99", "max")}} for r in storm_rows],
            [
                "receipts",
                "written",
                "achieved_rate_per_s",
                "write_failures",
                "stopped",
                "receipts_written",
                "holder_cpu_us_per_flag",
                "all_applied",
                "p50",
                "p90",
                "p99",
                "max",
            ],
            [
                "receipts",
                "written",
                "rate/s",
                "write failures",
                "stopped",
                "receipts written",
                "CPU µs per flag",
                "all applied",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
            ],
        )
    )
    c = data["connections"]
    say("\netcd connections per process")
    say(table(c["workers"], ["worker_pid", "scopes", "etcd_tcp_connections", "threads"]))
    say("etcd metrics, change with the workers running:")
    for key, value in c["delta_with_workers"].items():
        say(f"  {key}: {value:+g}")
    say(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
