"""Run every benchmark, then redraw the plot and the tables of BENCHMARKS.md.

    /work/venv/bin/python bench/run_all.py [--quick] [--only NAME ...]

Each benchmark runs in its own process, one after the other (they share the
machine's cores, so running them side by side would measure each other), and
writes ``bench/results/<name>.json``. Then ``plot.py`` draws
``bench/results/latency.png`` and ``report.py`` regenerates the measured
sections of ``BENCHMARKS.md``. A benchmark that fails is reported and the others
still run; the exit code says whether all succeeded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BENCHMARKS = {
    "propagation": "propagation.py",
    "cascade": "cascade.py",
    "langgraph": "langgraph_cancel.py",
    "overhead": "overhead.py",
    "scale": "scale.py",
    "a2a": "a2a_cancel.py",
    "listing": "listing.py",
    "live_work": "live_work.py",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (development)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    failed = []
    for name in args.only or list(BENCHMARKS):
        command = [sys.executable, str(BENCH / BENCHMARKS[name])] + (["--quick"] if args.quick else [])
        print(f"\n=== {name}: {' '.join(command)}", flush=True)
        started = time.monotonic()
        code = subprocess.call(command)
        print(f"=== {name}: exit {code} after {time.monotonic() - started:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    for script in ("plot.py", "report.py"):
        if subprocess.call([sys.executable, str(BENCH / script)]) != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
