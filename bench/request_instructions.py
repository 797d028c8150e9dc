"""Instructions per request, counted by callgrind: the per-hop cost without the machine's noise.

    .venv/bin/python bench/request_instructions.py [--quick] [--case BODY:STACK ...]

Timing a request in process on a shared 2-core machine moves with everybody else's
load; counting the instructions it executes does not. Each case (a bare ASGI app,
``CancelMiddleware`` at an edge and at an internal hop, OpenTelemetry's ASGI
middleware with the SDK tracer alone and around ``CancelMiddleware``; a JSON
response and a 10-event stream) runs in its own ``python`` under
``valgrind --tool=callgrind`` once: after a warm-up, the requests run between two
calls of ``os.getppid()``, before each of which callgrind dumps its counters
(``--dump-before=getppid``), so the second dump holds those requests alone
(start-up, imports and warm-up are in the first). The added instructions are
then converted to microseconds at the rate the anchor itself runs at: the OTel
ASGI middleware's instructions per request against its microseconds per request
measured in ``bench/overhead.py``'s in-process run, when there is one.

Writes ``bench/results/request_instructions.json``; with ``--case`` (for example
``--case internal --case "stream x10:otel+internal"``: a stack alone means every body
that has it) only the chosen cases run and their counts are printed, nothing is written.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, base_parser, loadavg, read_results, say, table, write_results

CASES = {
    "json": ("bare", "edge", "internal", "otel", "otel+internal", "otel-plain", "otel+edge"),
    "stream x10": ("bare", "edge", "internal", "otel", "otel+internal", "otel-plain", "otel+edge"),
    "stream x10 (Starlette)": ("otel", "otel+internal"),
}
STACK_NAMES = {
    "bare": "bare app",
    "edge": "CancelMiddleware, edge (new root)",
    "internal": "CancelMiddleware, internal (root from baggage)",
    "otel": "OTel ASGI",
    "otel+internal": "OTel ASGI + CancelMiddleware, internal",
    "otel-plain": "OTel ASGI, request without baggage",
    "otel+edge": "OTel ASGI + CancelMiddleware, edge (new root)",
}
EDGE_STACKS = ("edge", "otel-plain", "otel+edge")
"""Requests from a client: no baggage (an edge's requests); the others carry what an otel-cancel edge sends."""


async def drive(body: str, stack: str, requests: int) -> None:
    """Serve ``requests`` requests in process (after a warm-up), for one case."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from overhead import _drive, _http_scope, json_app, starlette_stream_app, stream_app

    from otel_cancel._core.startup_wait import wait_for_listing
    from otel_cancel.asgi import CancelMiddleware
    from otel_cancel.store.memory import MemoryCancelStore
    from otel_cancel.testing import configured

    inner = {"json": json_app, "stream x10": stream_app}.get(body) or starlette_stream_app()
    app: Any = inner
    if stack in ("edge", "internal", "otel+internal", "otel+edge"):
        app = CancelMiddleware(inner, trust_incoming=not stack.endswith("edge"))
    if stack.startswith("otel"):
        app = OpenTelemetryMiddleware(app, tracer_provider=TracerProvider())
    with configured(store=MemoryCancelStore(), service="bench-instructions") as runtime:
        await wait_for_listing(runtime)
        scope = _http_scope(stack not in EDGE_STACKS)
        await _drive(app, scope, 200)
        os.getppid()  # callgrind dumps here: everything before, the warm-up included
        await _drive(app, scope, requests)
        os.getppid()  # and here: the requests alone


def _instructions(body: str, stack: str, requests: int, workdir: str) -> int:
    out = os.path.join(workdir, f"callgrind.{abs(hash((body, stack, requests)))}")
    command = [
        "valgrind",
        "--tool=callgrind",
        "--dump-before=getppid",
        f"--callgrind-out-file={out}",
        PYTHON,
        __file__,
        "--drive",
        body,
        stack,
        str(requests),
    ]
    subprocess.run(command, check=True, capture_output=True)
    dumps = sorted(Path(workdir).glob(Path(out).name + ".*"), key=lambda path: int(path.suffix[1:]))
    if len(dumps) < 2:
        raise RuntimeError(f"callgrind wrote {len(dumps)} dumps for {out}, expected at least 2")
    text = dumps[1].read_text(errors="replace")  # the dump before the second marker: the requests alone
    match = re.search(r"^summary:\s+(\d+)", text, re.M) or re.search(r"^totals:\s+(\d+)", text, re.M)
    if match is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(match.group(1))


def selected_cases(wanted: list[str] | None) -> dict[str, tuple[str, ...]]:
    """The cases ``--case`` names (``body:stack`` or a stack alone), or all of them."""
    if not wanted:
        return CASES
    chosen: dict[str, tuple[str, ...]] = {}
    for body, stacks in CASES.items():
        picked = tuple(s for s in stacks if s in wanted or f"{body}:{s}" in wanted)
        if picked:
            chosen[body] = picked
    known = {s for stacks in CASES.values() for s in stacks} | {f"{b}:{s}" for b, ss in CASES.items() for s in ss}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(known)}")
    return chosen


def measure(quick: bool, cases: dict[str, tuple[str, ...]] = CASES) -> dict[str, Any]:
    requests = 200 if quick else 1000
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for body, stacks in cases.items():
            for stack in stacks:
                started = time.monotonic()
                per_request = _instructions(body, stack, requests, workdir) / requests
                rows.append({"body": body, "stack": STACK_NAMES[stack], "instructions": round(per_request)})
                say(f"  {body:24} {STACK_NAMES[stack]:48} {per_request:>10,.0f} ({time.monotonic() - started:.0f} s)")
    # Microseconds per instruction, from the anchor's own timing where bench/overhead.py measured it.
    overhead = read_results("overhead")
    rate = None
    if overhead:
        timed = next(
            (r for r in overhead["in_process"]["asgi_otel"] if r["body"] == "json" and r["stack"] == "OTel ASGI"), None
        )
        counted = next((r for r in rows if r["body"] == "json" and r["stack"] == "OTel ASGI"), None)
        if timed and counted and counted["instructions"]:
            rate = timed["min_us"] / counted["instructions"]
    added = []
    for body in CASES:
        by_stack = {r["stack"]: r["instructions"] for r in rows if r["body"] == body}
        for stack, base in (
            ("CancelMiddleware, edge (new root)", "bare app"),
            ("CancelMiddleware, internal (root from baggage)", "bare app"),
            ("OTel ASGI + CancelMiddleware, internal", "OTel ASGI"),
            ("OTel ASGI + CancelMiddleware, edge (new root)", "OTel ASGI, request without baggage"),
        ):
            if stack in by_stack and base in by_stack:
                extra = by_stack[stack] - by_stack[base]
                added.append(
                    {
                        "body": body,
                        "added by": stack.replace("OTel ASGI + ", ""),
                        "over": base,
                        "instructions": extra,
                        "vs anchor %": round(100 * extra / by_stack[base], 1) if base != "bare app" else None,
                        "us_at_anchor_rate": round(extra * rate, 2) if rate else None,
                    }
                )
    return {"requests": requests, "rows": rows, "added": added, "us_per_instruction": rate}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--drive":
        asyncio.run(drive(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return 0
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--case", action="append", help="run only this case, 'body:stack' or a stack for every body (repeatable)"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        say("valgrind is not installed (Debian: apt-get install -y valgrind)")
        return 1
    if args.case:
        say("instructions per request under callgrind (chosen cases; nothing written) ...")
        measure(args.quick, selected_cases(args.case))
        return 0
    started, load_before = time.time(), loadavg()
    say("instructions per request under callgrind ...")
    data = {"quick": args.quick, **measure(args.quick)}
    path = write_results("request_instructions", data, started, load_before)
    say(table(data["added"], ["body", "added by", "over", "instructions", "vs anchor %", "us_at_anchor_rate"]))
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
