"""Where a process's CPU goes per flag: cProfile on every thread of a holder or a bystander.

    .venv/bin/python bench/flag_profile.py [--holder | --bystander] [--flags N] [--rate R]

A diagnostic beside ``bench/flag_cost.py`` (which measures; this attributes): a real
etcd, this process configured like ``services/scope_holder.py`` (holding one scope per
root with ``--holder``, nothing with ``--bystander``), ``services/flag_writer.py``
writing the flags from its own process at ``R`` per second. The profiler runs on the
app's loop (the stops) and on otel-cancel's IO loop (watch, receipts), timing each
thread's own CPU; the top functions of each are printed by own time. Writes nothing to ``bench/results``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "services"))

from _common import start_flag_writers
from scope_holder import roots

import otel_cancel
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.startup_wait import wait_for_listing
from otel_cancel.attributes import METRIC_FLAGS_APPLIED, METRIC_RECEIPTS
from otel_cancel.testing import CancelMetrics, EtcdServer, configured, unique_prefix


def _top(profile: cProfile.Profile, title: str, lines: int) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(lines)
    return f"== {title}\n{out.getvalue()}"


async def _profile(etcd: EtcdServer, holder: bool, count: int, rate: float, dump: str | None = None) -> None:
    prefix = unique_prefix().replace("test", "bench")
    metrics = CancelMetrics()  # receipts are read from otel-cancel's own metric, as a service exports it
    with configured(endpoints=(etcd.endpoint,), prefix=prefix, service="flag-profile") as runtime:
        await wait_for_listing(runtime)
        seed = f"p{time.time_ns()}"
        wanted = roots(seed, count)
        stopped = 0
        entered = asyncio.Event()
        inside = 0

        async def hold(root: str) -> None:
            nonlocal stopped, inside
            try:
                async with otel_cancel.scope(root=root):
                    inside += 1
                    if inside == count:
                        entered.set()
                    await asyncio.Event().wait()
            except otel_cancel.Cancelled:
                stopped += 1

        tasks = [asyncio.create_task(hold(root)) for root in wanted] if holder else []
        if holder:
            await entered.wait()
        # CPU time of the profiled thread, not wall time: a function that waits for the GIL
        # (a self-pipe write while the other loop runs) is not charged for the wait.
        io_profile = cProfile.Profile(time.thread_time)
        io_loop().submit(_enable(io_profile)).result()
        app_profile = cProfile.Profile(time.thread_time)
        app_profile.enable()
        start_ns = time.time_ns() + 500_000_000
        (writer,) = start_flag_writers(etcd.endpoint, prefix, seed, count, 1, rate, start_ns)
        try:
            # Off the app's loop: blocking it would hold every stop back until the storm ends.
            await asyncio.to_thread(writer.wait_for_line, lambda line: line.startswith("DONE"), timeout=120)
            deadline = time.monotonic() + 30
            while metrics.total(METRIC_FLAGS_APPLIED) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if holder:
                while metrics.total(METRIC_RECEIPTS) < count and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
        finally:
            app_profile.disable()
            io_loop().submit(_disable(io_profile)).result()
            writer.stop()
        for task in tasks:
            task.cancel()
        applied, receipts = metrics.total(METRIC_FLAGS_APPLIED), metrics.total(METRIC_RECEIPTS)
        print(f"flags applied {applied:.0f}, stopped {stopped}, receipts {receipts:.0f}")
        print(_top(io_profile, "otel-cancel's IO loop (watch, receipts)", 35))
        print(_top(app_profile, "the app's loop (stops)", 25))
        if dump:
            # For pstats' callers/callees views, which the own-time tables above leave out.
            io_profile.dump_stats(f"{dump}.io.prof")
            app_profile.dump_stats(f"{dump}.app.prof")


async def _enable(profile: cProfile.Profile) -> None:
    profile.enable()


async def _disable(profile: cProfile.Profile) -> None:
    profile.disable()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--holder", action="store_true", default=True)
    mode.add_argument("--bystander", action="store_true")
    parser.add_argument("--flags", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--dump", metavar="PATH", help="also write PATH.io.prof and PATH.app.prof (pstats files)")
    args = parser.parse_args()
    with EtcdServer() as etcd:
        asyncio.run(_profile(etcd, not args.bystander, args.flags, args.rate, args.dump))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
