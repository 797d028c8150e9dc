"""Live work (``otel-cancel ps``): etcd writes per process, and what it adds to the request path.

    /work/venv/bin/python bench/live_work.py [--quick]

1. etcd writes per process per second while it serves 10 and 1,000 requests per
   second (each request a scope with labels, held 20 ms): a real etcd of its own,
   this process's runtime publishing with the default interval (250 ms) and lease
   (10 s). Writes are counted by etcd itself (its revision: nothing else writes to
   it) and by the publisher; the anchor is the request rate achieved in the same run.
2. The request-path cost: µs per ``scope()`` entered and left at a hop (root in the
   context), with and without three labels in baggage, against an empty ``async
   with`` in the same run; and the bookkeeping live work adds to each scope entry
   (reading the run's start time and labels from baggage, one timestamp), timed on
   its own, against the 20 µs per-hop budget.
3. ``otel-cancel cancel ROOT --wait 5`` against two worker processes
   (``bench/services/scope_holder.py``, two services) that hold the root: how long
   the command runs, against its 5 s timer and against ``otel-cancel cancel ROOT``
   without ``--wait`` in the same round (the process's own start-up and flag write).

Writes ``bench/results/live_work.json``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "services"))

import subprocess

from _common import PYTHON, SERVICES, base_parser, loadavg, say, service_env, table, write_results
from opentelemetry import context
from scope_holder import roots

import otel_cancel
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.labels import run_facts, with_labels
from otel_cancel._core.root import random_root, with_root
from otel_cancel._core.startup_wait import wait_for_listing
from otel_cancel.store.etcd import EtcdCancelStore
from otel_cancel.store.memory import MemoryCancelStore
from otel_cancel.testing import EtcdServer, ManagedProcess, configured, unique_prefix

HOP_BUDGET_US = 20.0
REQUEST_SECONDS = 0.02


async def _etcd_revision(runtime: Any) -> int:
    async def read() -> int:
        store = await runtime.watcher.store()
        return int((await store.list_flags()).revision)

    return await asyncio.wrap_future(io_loop().submit(read()))


async def drive(rate: int, seconds: float) -> int:
    """Start ``rate`` requests a second for ``seconds`` (in 10 ms batches); return how many ran."""
    done = 0

    async def request(index: int) -> None:
        nonlocal done
        with otel_cancel.labelled(tenant=f"t{index % 7}", user_id=f"u-{index % 101}"):
            async with otel_cancel.scope(name="GET /work"):
                await asyncio.sleep(REQUEST_SECONDS)
        done += 1

    tasks: set[asyncio.Task[None]] = set()
    began = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - began) < seconds:
        due = int(elapsed * rate) + 1
        while sent < due:
            task = asyncio.ensure_future(request(sent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    return done


async def writes_per_second(etcd: EtcdServer, seconds: float) -> list[dict[str, Any]]:
    rows = []
    with configured(endpoints=(etcd.endpoint,), prefix=unique_prefix(), service="bench-live") as runtime:
        await wait_for_listing(runtime)
        publisher = runtime.publisher
        for rate in (10, 1000):
            await asyncio.sleep(publisher.interval_seconds * 2)  # the previous rate's last write is out
            revision, writes, keepalives = await _etcd_revision(runtime), publisher.writes, publisher.keepalives
            began = time.monotonic()
            served = await drive(rate, seconds)
            elapsed = time.monotonic() - began
            etcd_writes = await _etcd_revision(runtime) - revision
            rows.append(
                {
                    "target_rps": rate,
                    "achieved_rps": round(served / elapsed, 1),
                    "seconds": round(elapsed, 2),
                    "etcd_writes": etcd_writes,
                    "etcd_writes_per_s": round(etcd_writes / elapsed, 2),
                    "publisher_writes": publisher.writes - writes,
                    "keepalives": publisher.keepalives - keepalives,
                    "writes_per_1000_requests": round(1000 * etcd_writes / max(served, 1), 2),
                    "bound_per_s": round(1 / publisher.interval_seconds, 2),
                }
            )
    return rows


class _Empty:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def _time_scopes(make: Any, iterations: int) -> float:
    began = time.perf_counter()
    for _ in range(iterations):
        async with make():
            pass
    return (time.perf_counter() - began) / iterations * 1e6


def _time_bookkeeping(ctx: Any, iterations: int) -> float:
    began = time.perf_counter()
    for _ in range(iterations):
        run_facts(ctx)
        time.time_ns()
    return (time.perf_counter() - began) / iterations * 1e6


async def request_path(iterations: int, repeats: int) -> dict[str, Any]:
    plain = with_root(random_root(), 1, context.Context())
    labelled = with_labels({"tenant": "acme", "user_id": "u-42", "thread_id": "thread-7"}, plain)
    rows = []
    with configured(store=MemoryCancelStore(), service="bench-live"):
        for name, ctx, make in (
            ("empty async with (baseline)", plain, _Empty),
            ("scope(), a hop, no labels", plain, otel_cancel.scope),
            ("scope(), a hop, 3 labels in baggage", labelled, otel_cancel.scope),
        ):
            token = context.attach(ctx)
            try:
                await _time_scopes(make, iterations // 10)
                samples = [await _time_scopes(make, iterations) for _ in range(repeats)]
            finally:
                context.detach(token)
            rows.append(
                {"case": name, "min_us": round(min(samples), 3), "median_us": round(statistics.median(samples), 3)}
            )
    bookkeeping = [_time_bookkeeping(labelled, iterations) for _ in range(repeats)]
    rows.append(
        {
            "case": "live-work bookkeeping per scope entry (start, labels, timestamp)",
            "min_us": round(min(bookkeeping), 3),
            "median_us": round(statistics.median(bookkeeping), 3),
        }
    )
    added = min(bookkeeping)
    return {
        "rows": rows,
        "bookkeeping_us": round(added, 3),
        "bookkeeping_share_of_budget_pct": round(100 * added / HOP_BUDGET_US, 1),
        "hop_budget_us": HOP_BUDGET_US,
        "iterations": iterations,
        "repeats": repeats,
    }


WAIT_TIMER_SECONDS = 5.0


def _cli_seconds(env: dict[str, str], *args: str) -> float:
    began = time.monotonic()
    result = subprocess.run([PYTHON, "-m", "otel_cancel", *args], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - began
    if result.returncode != 0 or "no receipt from" in result.stdout:
        raise RuntimeError(f"otel-cancel {' '.join(args)} failed: {result.stdout} {result.stderr}")
    return elapsed


async def _await_published(store: EtcdCancelStore, root: str, holders: int) -> None:
    deadline = time.monotonic() + 20
    while sum(entry.root == root for record in await store.list_live() for entry in record.roots) < holders:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{root} was not published by {holders} processes")
        await asyncio.sleep(0.02)


async def wait_knows_whom_to_expect(etcd: EtcdServer, rounds: int) -> dict[str, Any]:
    prefix = unique_prefix()
    env = {"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": prefix}
    workers = [
        ManagedProcess(
            [PYTHON, str(SERVICES / "scope_holder.py")],
            env=service_env({**env, "OTEL_SERVICE_NAME": service, "OTEL_CANCEL_INSTANCE": service}),
            name=service,
        )
        for service in ("holder-a", "holder-b")
    ]
    cli_env = {**os.environ, **service_env(env)}
    store = EtcdCancelStore([etcd.endpoint], prefix=prefix)
    waited, plain = [], []
    try:
        for worker in workers:
            worker.wait_for_line("READY", 30)
        for index in range(rounds):
            seed = f"wait-{index}"
            for worker in workers:
                worker.send(f"hold {seed} 2")
                worker.wait_for_line(f"HELD {seed}", 30)
            waited_root, plain_root = roots(seed, 2)
            for root in (waited_root, plain_root):
                await io_loop().call(_await_published(store, root, len(workers)))
            waited.append(_cli_seconds(cli_env, "cancel", waited_root, "--wait", f"{WAIT_TIMER_SECONDS:g}"))
            plain.append(_cli_seconds(cli_env, "cancel", plain_root))
    finally:
        await io_loop().call(store.close())
        for worker in workers:
            worker.stop()
    return {
        "timer_seconds": WAIT_TIMER_SECONDS,
        "rounds": rounds,
        "holders": len(workers),
        "wait_seconds": [round(x, 3) for x in waited],
        "plain_cancel_seconds": [round(x, 3) for x in plain],
        "wait_median_seconds": round(statistics.median(waited), 3),
        "plain_median_seconds": round(statistics.median(plain), 3),
        "wait_over_plain_median_seconds": round(
            statistics.median(w - p for w, p in zip(waited, plain, strict=True)), 3
        ),
        "wait_share_of_timer_pct": round(100 * statistics.median(waited) / WAIT_TIMER_SECONDS, 1),
    }


async def run(quick: bool) -> dict[str, Any]:
    with EtcdServer() as etcd:
        writes = await writes_per_second(etcd, 3.0 if quick else 10.0)
        wait = await wait_knows_whom_to_expect(etcd, 3 if quick else 10)
    costs = await request_path(5_000 if quick else 40_000, 3 if quick else 7)
    return {"quick": quick, "writes": writes, "request_path": costs, "wait": wait}


def main() -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    started, load_before = time.time(), loadavg()
    data = asyncio.run(run(args.quick))
    write_results("live_work", data, started, load_before)
    say("\netcd writes per process for live work")
    say(
        table(
            data["writes"],
            [
                "target_rps",
                "achieved_rps",
                "etcd_writes_per_s",
                "writes_per_1000_requests",
                "keepalives",
                "bound_per_s",
            ],
        )
    )
    say("\nrequest path, µs per scope entered and left")
    say(table(data["request_path"]["rows"], ["case", "min_us", "median_us"]))
    say(
        f"live-work bookkeeping: {data['request_path']['bookkeeping_us']} µs per scope entry, "
        f"{data['request_path']['bookkeeping_share_of_budget_pct']}% of the {HOP_BUDGET_US:g} µs per-hop budget"
    )
    wait = data["wait"]
    say(
        f"\ncancel --wait {wait['timer_seconds']:g} with {wait['holders']} holders: "
        f"median {wait['wait_median_seconds']} s "
        f"({wait['wait_share_of_timer_pct']}% of the timer); cancel without --wait: {wait['plain_median_seconds']} s; "
        f"waiting added {wait['wait_over_plain_median_seconds']} s (median of {wait['rounds']} rounds)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
