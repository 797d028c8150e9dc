"""Propagation latency: flag written -> work stopped, in every process of a real chain.

    /work/venv/bin/python bench/propagation.py [--quick]

For each depth (1, 3, 5 levels of uvicorn services, two replicas per level,
otel-cancel wired with ``CancelMiddleware`` + httpx instrumentation, one real
etcd) and each concurrency (1, 100, 1000 streaming runs open at once, tokens
every 100 ms): open the runs at the edge, wait until every level of every run is
working, cancel 10% of them (at least one) by root with ``otel_cancel.cancel``,
spread evenly over a short window, and read the receipts every process writes.

A receipt's ``latency_ms`` is ``stopped_at - requested_at``: from the moment the
flag is written (``requested_at`` is stamped right before the etcd transaction)
to the moment the last of that process's work for the root stopped. Every
receipt of every process is one sample. The handler's own log line (the
``END`` time its work loop stopped, same clock) is a cross-check, and every
service reports how late its event loop ran a 20 ms timer during the cancels
(how overloaded it was).

Two more configurations separate depth from load on this machine:

- ``control``: depth 1 with 10 replicas, as many processes watching etcd as the
  depth-5 chain (2 x 5), at 1 and 100 runs;
- ``slow tokens``: 1000 runs through depth 5 at 1 token per second, so the
  chain is not saturated by relaying tokens.

``--depths`` and ``--runs`` pick a subset of the grid. Writes
``bench/results/propagation.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CpuSampler,
    EventLog,
    ServiceChain,
    base_parser,
    established_connections,
    etcd_metrics,
    loadavg,
    say,
    summary,
    table,
    write_results,
)

import otel_cancel
from otel_cancel._core.io_loop import io_loop
from otel_cancel.testing import EtcdServer, configured, unique_prefix

TOKEN_INTERVAL = 0.1
TOKENS = 3000  # far longer than a round: runs end by cancel or by the client closing
CANCEL_FRACTION = 0.1
CANCEL_WINDOW_SPACING = 0.02  # seconds between two cancels of one round
SAMPLES_WANTED = 20  # cancelled runs per configuration (rounds are repeated to get them)


@dataclasses.dataclass
class Run:
    root: str
    response: httpx.Response
    reader: asyncio.Task[None] | None = None
    tail: bytes = b""
    ended_ns: int | None = None


async def _read(run: Run) -> None:
    try:
        async for chunk in run.response.aiter_raw():
            run.tail = (run.tail + chunk)[-400:]
    except httpx.HTTPError:
        pass
    finally:
        run.ended_ns = time.time_ns()


async def until(predicate: Any, timeout: float, what: str, poll: float = 0.02) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f}s")
        await asyncio.sleep(poll)
    return time.monotonic() - start


async def open_runs(client: httpx.AsyncClient, urls: list[str], count: int, interval: float) -> list[Run]:
    gate = asyncio.Semaphore(50)

    async def open_one() -> Run:
        async with gate:
            request = client.build_request(
                "GET", f"{random.choice(urls)}/stream", params={"tokens": TOKENS, "interval": interval}
            )
            response = await client.send(request, stream=True)
            run = Run(response.headers["otel-cancel-root"], response)
            run.reader = asyncio.create_task(_read(run))
            return run

    return list(await asyncio.gather(*(open_one() for _ in range(count))))


async def receipts_for(runtime: Any, roots: list[str]) -> dict[str, list[Any]]:
    async def fetch() -> dict[str, list[Any]]:
        store = await runtime.watcher.store()
        found = await asyncio.gather(*(store.list_receipts(root) for root in roots))
        return dict(zip(roots, found, strict=True))

    result: dict[str, list[Any]] = await io_loop().call(fetch())
    return result


async def loop_lag(client: httpx.AsyncClient, chain: ServiceChain, since: float) -> dict[str, Any]:
    """The worst event-loop lag any service of the chain saw since ``since``."""
    found = []
    for level in range(chain.depth):
        for url in chain.urls(level):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                found.append((await client.get(f"{url}/debug/loop-lag", params={"since": since}, timeout=30)).json())
    found = [f for f in found if f.get("n")]
    worst = max(found, key=lambda f: f["max"], default=None)
    return {
        "loop_lag_p50_ms": max((f["p50"] for f in found), default=None),
        "loop_lag_p99_ms": max((f["p99"] for f in found), default=None),
        "loop_lag_max_ms": worst["max"] if worst else None,
        # The garbage collector's longest pause in the service with the worst stall, and anywhere.
        "gc_max_ms_worst_service": worst.get("gc_max_ms") if worst else None,
        "gc_max_ms": max((f.get("gc_max_ms") or 0 for f in found), default=None),
        "gc_gen2_collections": sum((f.get("gc_collections") or [0, 0, 0])[2] for f in found),
    }


async def _flag_of(runtime: Any, root: str) -> Any:
    store = await runtime.watcher.store()
    return await store.get_flag(root)


async def quiesce(etcd: EtcdServer, seconds: float = 0.5, timeout: float = 120) -> float:
    """Wait until etcd's revision stops moving (receipts and flags of a teardown written)."""
    start = time.monotonic()
    name = "etcd_debugging_mvc_current_revision"
    last = etcd_metrics(etcd.client_port, [name]).get(name)
    stable_since = time.monotonic()
    while time.monotonic() - start < timeout:
        await asyncio.sleep(0.25)
        now = etcd_metrics(etcd.client_port, [name]).get(name)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= seconds:
            break
    return time.monotonic() - start


async def one_round(
    chain: ServiceChain, events: EventLog, runtime: Any, etcd: EtcdServer, concurrency: int, interval: float
) -> dict[str, Any]:
    depth = chain.depth
    timeout = 60 + concurrency * depth * 0.05
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as client:
        opened_at = time.monotonic()
        runs = await open_runs(client, chain.urls(0), concurrency, interval)
        roots = [run.root for run in runs]
        await until(lambda: events.started_everywhere(roots, depth), timeout, "every run working at every level")
        ramp_s = time.monotonic() - opened_at
        # At peak: one etcd connection and one watch stream per process, whatever the load.
        peak = etcd_metrics(etcd.client_port, ["etcd_debugging_mvcc_watch_stream_total"])
        per_process = [established_connections(p.pid, etcd.client_port) for p in chain.processes()]

        count = max(1, math.floor(concurrency * CANCEL_FRACTION))
        chosen = random.sample(runs, count)
        requested: dict[str, int] = {}
        window_start = time.time()
        for index, run in enumerate(chosen):
            result = await otel_cancel.cancel(run.root, reason="bench")
            requested[run.root] = result.request.requested_at
            if index + 1 < count:
                await asyncio.sleep(CANCEL_WINDOW_SPACING)
        cancelled = set(requested)

        # Every process of every cancelled run has written its receipt, and logged its end.
        receipts: dict[str, list[Any]] = {}

        async def all_receipts() -> bool:
            nonlocal receipts
            receipts = await receipts_for(runtime, list(cancelled))
            return all(len(r) >= depth for r in receipts.values())

        deadline = time.monotonic() + timeout
        while not await all_receipts():
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        with contextlib.suppress(TimeoutError):
            await until(lambda: events.ended_everywhere(cancelled, depth), 30, "cancelled runs ended at every level")
        window_end = time.time()
        lag = await loop_lag(client, chain, window_start - 0.5)

        # Streams of cancelled runs ended with the final otel-cancel event; none of the others ended.
        await until(lambda: all(run.ended_ns for run in chosen), 30, "cancelled streams ended at the client")
        clean_ends = sum(b"event: otel-cancel" in run.tail for run in chosen)
        events.update()
        collateral = [r for r in roots if r not in cancelled and r in events.end]
        # What stopped them: where each ended first, how, and the flag (if any) its root got.
        collateral_detail = []
        for root in collateral[:50]:
            ends = events.end[root]
            first_level = min(ends, key=lambda level: ends[level][0])
            flag = await io_loop().call(_flag_of(runtime, root))
            collateral_detail.append(
                {
                    "root": root,
                    "first_level": first_level,
                    "first_how": ends[first_level][1],
                    "first_end_vs_cancel_window_ms": round((ends[first_level][0] / 1e9 - window_start) * 1000, 1),
                    "levels_ended": sorted(ends),
                    "flag_reason": flag.reason if flag else None,
                    "flag_by": flag.requested_by if flag else None,
                    "flag_vs_cancel_window_ms": round((flag.requested_at / 1e9 - window_start) * 1000, 1)
                    if flag
                    else None,
                }
            )

        # Teardown: close the rest (each close cancels its root at the edge), wait for quiet.
        for run in runs:
            if run.reader is not None and not run.reader.done():
                run.reader.cancel()
        await asyncio.gather(*(run.reader for run in runs if run.reader), return_exceptions=True)
        await asyncio.gather(*(run.response.aclose() for run in runs), return_exceptions=True)
    with contextlib.suppress(TimeoutError):
        await until(lambda: events.ended_everywhere(roots, depth), timeout, "every run ended after teardown", 0.1)
    await quiesce(etcd)

    samples = []
    for root, found in receipts.items():
        for receipt in found:
            end = events.end.get(root, {}).get(receipt.depth)
            samples.append(
                {
                    "root": root,
                    "depth": receipt.depth,
                    "instance": receipt.instance,
                    "latency_ms": round(receipt.latency_ms, 3),
                    "seen_ms": round((receipt.seen_at - receipt.requested_at) / 1e6, 3),
                    "stop_after_seen_ms": round((receipt.stopped_at - receipt.seen_at) / 1e6, 3),
                    "handler_end_ms": round((end[0] - requested[root]) / 1e6, 3) if end else None,
                }
            )
    missing = {root: depth - len(found) for root, found in receipts.items() if len(found) < depth}
    return {
        "cancelled": len(cancelled),
        "receipts": sum(len(found) for found in receipts.values()),
        "receipts_missing": sum(missing.values()),
        "clean_stream_ends": clean_ends,
        "collateral_stops": len(collateral),
        "collateral_detail": collateral_detail,
        "ramp_s": round(ramp_s, 2),
        "round_s": round(time.monotonic() - opened_at, 1),
        "etcd_watch_streams_at_peak": peak.get("etcd_debugging_mvcc_watch_stream_total"),
        "etcd_connections_per_service": per_process,
        "load1": loadavg()[0],
        "window": (window_start, window_end),
        **lag,
        "samples": samples,
    }


def configuration_summary(plan: dict[str, Any], rounds: list[dict[str, Any]], cpu: CpuSampler) -> dict[str, Any]:
    depth, concurrency = plan["depth"], plan["runs"]
    for r in rounds:
        r.update(cpu.window(*r.pop("window")))
    samples = [s for r in rounds for s in r["samples"]]
    latencies = [s["latency_ms"] for s in samples]
    by_level = {level: summary([s["latency_ms"] for s in samples if s["depth"] == level]) for level in range(depth)}
    handler = [s["handler_end_ms"] for s in samples if s["handler_end_ms"] is not None]
    cpu_means = [r["cpu_busy_mean_pct"] for r in rounds if r.get("cpu_busy_mean_pct") is not None]
    lags = [r["loop_lag_p99_ms"] for r in rounds if r.get("loop_lag_p99_ms") is not None]
    return {
        "label": plan["label"],
        "depth": depth,
        "replicas": plan["replicas"],
        "concurrency": concurrency,
        "token_interval_s": plan["interval"],
        "rounds": len(rounds),
        "loop_lag_p99_ms": max(lags) if lags else None,
        "loop_lag_max_ms": max((r["loop_lag_max_ms"] or 0 for r in rounds), default=None),
        "gc_max_ms": max((r.get("gc_max_ms") or 0 for r in rounds), default=None),
        "gc_gen2_collections": sum(r.get("gc_gen2_collections") or 0 for r in rounds),
        "cancelled_runs": sum(r["cancelled"] for r in rounds),
        "receipts": sum(r["receipts"] for r in rounds),
        "receipts_missing": sum(r["receipts_missing"] for r in rounds),
        "clean_stream_ends": sum(r["clean_stream_ends"] for r in rounds),
        "collateral_stops": sum(r["collateral_stops"] for r in rounds),
        "collateral_detail": [d for r in rounds for d in r["collateral_detail"]],
        "ramp_s_max": max(r["ramp_s"] for r in rounds),
        "watcher_processes": plan["replicas"] * depth + 1,
        "etcd_watch_streams_at_peak": max(r["etcd_watch_streams_at_peak"] or 0 for r in rounds),
        "etcd_connections_per_service_max": max(max(r["etcd_connections_per_service"]) for r in rounds),
        "cpu_busy_mean_pct": round(sum(cpu_means) / len(cpu_means), 1) if cpu_means else None,
        "load1_max": max(r["load1"] for r in rounds),
        "latency_ms": summary(latencies),
        "seen_ms": summary([s["seen_ms"] for s in samples]),
        "stop_after_seen_ms": summary([s["stop_after_seen_ms"] for s in samples]),
        "handler_end_ms": summary(handler),
        "latency_by_level_ms": by_level,
        "cascade_first_share": round(sum(s["stop_after_seen_ms"] < 0 for s in samples) / max(1, len(samples)), 3),
    }


def build_plan(args: Any) -> list[dict[str, Any]]:
    """Configurations, grouped by chain (depth x replicas) so each chain starts once."""
    depths = args.depths or ([1, 3] if args.quick else [1, 3, 5])
    runs = args.runs or ([1, 20] if args.quick else [1, 100, 1000])
    plan = [
        {"label": "grid", "depth": d, "replicas": 2, "runs": n, "interval": TOKEN_INTERVAL}
        for d in depths
        for n in runs
    ]
    if not args.grid_only:
        deepest = max(depths)
        control_runs = [n for n in runs if n <= 100]
        plan += [
            {"label": "control", "depth": 1, "replicas": 2 * deepest, "runs": n, "interval": TOKEN_INTERVAL}
            for n in control_runs
        ]
        plan.append({"label": "slow tokens", "depth": deepest, "replicas": 2, "runs": max(runs), "interval": 1.0})
    return plan


async def run(args: Any) -> dict[str, Any]:
    plan = build_plan(args)
    chains: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for item in plan:
        chains.setdefault((item["depth"], item["replicas"]), []).append(item)
    configurations: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    with CpuSampler() as cpu, EtcdServer() as etcd:
        prefix = unique_prefix().replace("test", "bench")
        env = {"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": prefix}
        with configured(endpoints=(etcd.endpoint,), prefix=prefix, service="bench-propagation") as runtime:
            await io_loop().call(runtime.watcher.store())
            runtime.start()
            for (depth, replicas), items in chains.items():
                say(f"depth {depth} x {replicas} replicas: starting ...")
                chain = ServiceChain(depth, replicas, "cancel_app", env).start()
                try:
                    events = EventLog(chain.processes())
                    for item in items:
                        concurrency, interval = item["runs"], item["interval"]
                        wanted = 3 if args.quick else SAMPLES_WANTED
                        per_round = max(1, math.floor(concurrency * CANCEL_FRACTION))
                        rounds_needed = max(1, math.ceil(wanted / per_round))
                        rounds = []
                        try:
                            for _ in range(rounds_needed):
                                rounds.append(await one_round(chain, events, runtime, etcd, concurrency, interval))
                        except (TimeoutError, httpx.HTTPError, OSError) as error:
                            reason = f"{type(error).__name__}: {error}"
                            say(f"  {item['label']} depth {depth} x {concurrency}: could not run: {reason}")
                            skipped.append({**item, "reason": reason[:500]})
                            if not rounds:
                                continue
                        row = configuration_summary(item, rounds, cpu)
                        row["samples"] = [s for r in rounds for s in r["samples"]]
                        configurations.append(row)
                        lat = row["latency_ms"]
                        say(
                            f"  {item['label']:>11} depth {depth} x{replicas} {concurrency:>4} runs @{interval:g}s: "
                            f"{row['cancelled_runs']} cancelled, {row['receipts']} receipts, p50 {lat['p50']} ms, "
                            f"p99 {lat['p99']} ms, max {lat['max']} ms (cpu {row['cpu_busy_mean_pct']}%, "
                            f"loop lag p99 {row['loop_lag_p99_ms']} ms)"
                        )
                finally:
                    chain.stop()
        fsync = etcd_metrics(
            etcd.client_port,
            ["etcd_disk_wal_fsync_duration_seconds_sum", "etcd_disk_wal_fsync_duration_seconds_count"],
        )
    fsync_count = fsync.get("etcd_disk_wal_fsync_duration_seconds_count", 0)
    fsync_mean_ms = (
        1000 * fsync.get("etcd_disk_wal_fsync_duration_seconds_sum", 0) / fsync_count if fsync_count else None
    )
    return {
        "quick": args.quick,
        "token_interval_s": TOKEN_INTERVAL,
        "cancel_fraction": CANCEL_FRACTION,
        "cancel_spacing_s": CANCEL_WINDOW_SPACING,
        "replicas_per_level": 2,
        "wiring": "CancelMiddleware + HTTPXClientInstrumentor (no OTel SDK), uvicorn --loop asyncio --http h11",
        "etcd_wal_fsync_mean_ms": round(fsync_mean_ms, 3) if fsync_mean_ms else None,
        "configurations": configurations,
        "skipped": skipped,
    }


def flatness(configurations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Depth d vs depth 1, per concurrency (the grid only): how much p50 and p99 grow."""
    rows = []
    grid = [c for c in configurations if c["label"] == "grid"]
    for concurrency in sorted({c["concurrency"] for c in grid}):
        by_depth = {c["depth"]: c for c in grid if c["concurrency"] == concurrency}
        base = by_depth.get(1)
        for depth, config in sorted(by_depth.items()):
            if base is None or depth == 1:
                continue
            row = {"concurrency": concurrency, "depth": depth}
            for stat in ("p50", "p99"):
                here, there = config["latency_ms"][stat], base["latency_ms"][stat]
                row[f"{stat}_vs_depth1_pct"] = round(100 * (here - there) / there, 1) if here and there else None
            rows.append(row)
    return rows


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", help="chain depths (default 1 3 5)")
    parser.add_argument("--runs", type=int, nargs="+", help="concurrent runs (default 1 100 1000)")
    parser.add_argument("--grid-only", action="store_true", help="skip the control and slow-token configurations")
    args = parser.parse_args()
    started, load_before = time.time(), loadavg()
    data = asyncio.run(run(args))
    data["flatness"] = flatness(data["configurations"])
    path = write_results("propagation", data, started, load_before)

    rows = []
    for c in data["configurations"]:
        rows.append(
            {
                "label": c["label"],
                "depth": f"{c['depth']} x{c['replicas']}",
                "tokens": f"{c['token_interval_s']:g}s",
                "lag": c["loop_lag_p99_ms"],
                "runs": c["concurrency"],
                "cancelled": c["cancelled_runs"],
                "receipts": f"{c['receipts']}/{c['receipts'] + c['receipts_missing']}",
                "p50": c["latency_ms"]["p50"],
                "p99": c["latency_ms"]["p99"],
                "max": c["latency_ms"]["max"],
                "seen_p50": c["seen_ms"]["p50"],
                "handler_p99": c["handler_end_ms"]["p99"],
                "cpu": c["cpu_busy_mean_pct"],
            }
        )
    say("\nflag written -> work stopped, per process (receipts), ms")
    say(
        table(
            rows,
            [
                "label",
                "depth",
                "runs",
                "tokens",
                "cancelled",
                "receipts",
                "p50",
                "p99",
                "max",
                "seen_p50",
                "handler_p99",
                "cpu",
                "lag",
            ],
            [
                "",
                "depth x replicas",
                "runs",
                "token every",
                "cancelled",
                "receipts",
                "p50",
                "p99",
                "max",
                "flag seen p50",
                "handler end p99",
                "CPU %",
                "loop lag p99",
            ],
        )
    )
    if data["flatness"]:
        say("\nlatency vs depth 1 (same concurrency)")
        say(table(data["flatness"], ["concurrency", "depth", "p50_vs_depth1_pct", "p99_vs_depth1_pct"]))
    for skip in data["skipped"]:
        say(f"\nnot measured: {skip['label']} depth {skip['depth']} x {skip['runs']}: {skip['reason']}")
    say(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
