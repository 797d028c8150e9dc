"""Cost on the request path: microseconds per hop, throughput of a three-hop chain.

    /work/venv/bin/python bench/overhead.py [--quick]

1. In process (one event loop, real etcd behind the runtime, listing done):
   ``async with otel_cancel.scope()`` enter+exit (root already in the context,
   as behind ``CancelMiddleware``; explicit root; no root: a new one) and
   ``otel_cancel.check()``, against an empty ``async with``.
2. In process: one ASGI request through a bare app vs the same app behind
   ``CancelMiddleware`` (edge: new root; internal: root adopted from ``baggage``),
   with a plain JSON response and with a 10-chunk event stream, also behind
   OpenTelemetry's ASGI middleware with the SDK tracer (no exporter), with the
   spans one request makes counted. The difference is the per-hop cost of
   otel-cancel.
3. Over the network: requests per second through a chain of three uvicorn
   services (``GET /hop``, each calls the next with httpx), under
   ``opentelemetry-instrument`` (exporters ``none``) with otel-cancel off
   (``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=otel_cancel``) and on, plus the chain
   without OpenTelemetry for reference; ``wrk`` is the load generator. The three
   chains run side by side and the rounds are interleaved, so load from
   elsewhere hits all of them alike. CPU per request is what the chain's processes
   spend serving: what each chain spends with no traffic at all (the harness's
   event-loop-lag probe, otel-cancel's watcher and watchdog), measured before the
   rounds, is taken out of every round; the loss is the median over rounds of each
   round's pair (OpenTelemetry alone, then with otel-cancel).
4. The request path makes no etcd call: the otel-cancel chain has an etcd of its
   own, and etcd's own counters (``grpc_server_started_total`` on ``/metrics``)
   are read before and after every round, against the requests served, the
   watchdog's pings and the live-work publications (``otel-cancel ps``: at most
   one per ``OTEL_CANCEL_LIVE_INTERVAL_MS`` per process, whatever the request
   rate). The in-process part counts its calls at its etcd the same way.

Writes ``bench/results/overhead.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    THROUGHPUT_COLUMNS,
    CpuSampler,
    ServiceChain,
    base_parser,
    loadavg,
    read_results,
    say,
    service_env,
    table,
    uvicorn_command,
    write_results,
)
from opentelemetry import baggage, context

import otel_cancel
from otel_cancel import attributes
from otel_cancel._core.startup_wait import wait_for_listing
from otel_cancel.testing import EtcdServer, ManagedProcess, configured, free_port, unique_prefix
from otel_cancel.testing.etcd_metrics import etcd_grpc_calls

ROOT = "4bf92f3577b34da6a3ce929d0e0e4736"
STARTED = "1764990000000"
"""The run's start (epoch ms): an otel-cancel edge sends it with the root and depth."""


# -- 1. scope ---------------------------------------------------------------------------------------


class _Empty:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _root_context() -> context.Context:
    ctx = baggage.set_baggage(attributes.BAGGAGE_ROOT, ROOT)
    return baggage.set_baggage(attributes.BAGGAGE_DEPTH, "1", context=ctx)


async def _time_loop(make: Any, iterations: int) -> float:
    """Mean microseconds of one ``async with make():`` over ``iterations``."""
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            async with make():
                pass
        return (time.perf_counter_ns() - start) / iterations / 1000
    finally:
        gc.enable()


async def _time_call(call: Any, iterations: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            call()
        return (time.perf_counter_ns() - start) / iterations / 1000
    finally:
        gc.enable()


def _stats(samples: list[float]) -> dict[str, Any]:
    return {
        "min_us": round(min(samples), 3),
        "median_us": round(statistics.median(samples), 3),
        "repeats": len(samples),
    }


async def scope_costs(iterations: int, repeats: int) -> list[dict[str, Any]]:
    cases: list[tuple[str, Any, bool]] = [
        ("empty async with (baseline)", _Empty, True),
        ("scope(), root in context (a hop)", otel_cancel.scope, True),
        ("scope(root=...) explicit root", lambda: otel_cancel.scope(root=ROOT), False),
        ("scope(), no root (starts a root)", otel_cancel.scope, False),
    ]
    rows = []
    for name, make, with_root in cases:
        token = context.attach(_root_context()) if with_root else None
        try:
            await _time_loop(make, iterations // 10)  # warm up
            samples = [await _time_loop(make, iterations) for _ in range(repeats)]
        finally:
            if token is not None:
                context.detach(token)
        rows.append({"case": name, **_stats(samples)})
    token = context.attach(_root_context())
    try:
        samples = [await _time_call(otel_cancel.check, iterations) for _ in range(repeats)]
    finally:
        context.detach(token)
    rows.append({"case": "check(), root in context", **_stats(samples)})
    return rows


# -- 2. ASGI ----------------------------------------------------------------------------------------


async def json_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def starlette_stream_app() -> Any:
    """The same 10-event stream as a Starlette ``StreamingResponse`` (which listens for the client itself)."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def events() -> Any:
        for index in range(10):
            yield b"data: %d\n\n" % index

    async def hop(request: Any) -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/hop", hop)])


async def stream_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for index in range(10):
        await send({"type": "http.response.body", "body": b"data: %d\n\n" % index, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _http_scope(with_baggage: bool) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
    if with_baggage:
        # What an otel-cancel edge sends a hop behind it: the root, the depth and the run's start.
        entries = (
            f"{attributes.BAGGAGE_ROOT}={ROOT},{attributes.BAGGAGE_DEPTH}=1,{attributes.BAGGAGE_STARTED}={STARTED}"
        )
        headers.append((b"baggage", entries.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/hop",
        "raw_path": b"/hop",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def _drive(app: Any, scope: dict[str, Any], iterations: int) -> float:
    async def send(message: Any) -> None:
        return None

    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            state = {"sent": False}

            async def receive(state: dict[str, bool] = state) -> dict[str, Any]:
                if not state["sent"]:
                    state["sent"] = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                await asyncio.Future()  # a client that stays: only cancellation ends this
                raise AssertionError

            await app(dict(scope), receive, send)
        return (time.perf_counter_ns() - start) / iterations / 1000
    finally:
        gc.enable()


async def asgi_costs(iterations: int, repeats: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from opentelemetry import trace
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider

    from otel_cancel.asgi import CancelMiddleware

    cases: list[tuple[str, str, Any, bool]] = []
    for body, inner in (("json", json_app), ("stream x10", stream_app)):
        cases += [
            (body, "bare app", inner, False),
            (body, "CancelMiddleware, edge (new root)", CancelMiddleware(inner, trust_incoming=False), False),
            (
                body,
                "CancelMiddleware, internal (root from baggage)",
                CancelMiddleware(inner, trust_incoming=True),
                True,
            ),
        ]
    rows = []
    for body, name, app, with_baggage in cases:
        scope = _http_scope(with_baggage)
        await _drive(app, scope, iterations // 10)
        samples = [await _drive(app, scope, iterations) for _ in range(repeats)]
        rows.append({"body": body, "stack": name, **_stats(samples)})

    # The same under OpenTelemetry's ASGI middleware with the SDK tracer (spans recorded, not exported).
    trace.set_tracer_provider(TracerProvider())
    otel_rows = []
    for body, inner in (("json", json_app), ("stream x10", stream_app)):
        for name, app, with_baggage in (
            ("OTel ASGI", OpenTelemetryMiddleware(inner), True),
            (
                "OTel ASGI + CancelMiddleware, internal",
                OpenTelemetryMiddleware(CancelMiddleware(inner, trust_incoming=True)),
                True,
            ),
        ):
            scope = _http_scope(with_baggage)
            await _drive(app, scope, iterations // 20)
            samples = [await _drive(app, scope, iterations // 2) for _ in range(repeats)]
            otel_rows.append({"body": body, "stack": name, **_stats(samples)})
    # How many spans one request makes, with and without otel-cancel (an in-memory exporter).
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    counting = TracerProvider()
    counting.add_span_processor(SimpleSpanProcessor(exporter))
    starlette_stream = starlette_stream_app()
    for body, inner in (("stream x10 (Starlette)", starlette_stream),):
        for name, app in (
            ("OTel ASGI", OpenTelemetryMiddleware(inner)),
            (
                "OTel ASGI + CancelMiddleware, internal",
                OpenTelemetryMiddleware(CancelMiddleware(inner, trust_incoming=True)),
            ),
        ):
            scope = _http_scope(True)
            await _drive(app, scope, iterations // 20)
            samples = [await _drive(app, scope, iterations // 2) for _ in range(repeats)]
            otel_rows.append({"body": body, "stack": name, **_stats(samples)})
    for body, inner in (("json", json_app), ("stream x10", stream_app), ("stream x10 (Starlette)", starlette_stream)):
        for name, app in (
            ("OTel ASGI", OpenTelemetryMiddleware(inner, tracer_provider=counting)),
            (
                "OTel ASGI + CancelMiddleware, internal",
                OpenTelemetryMiddleware(CancelMiddleware(inner, trust_incoming=True), tracer_provider=counting),
            ),
        ):
            exporter.clear()
            await _drive(app, _http_scope(True), 200)
            spans = exporter.get_finished_spans()
            names: dict[str, int] = {}
            for span in spans:
                names[span.name] = names.get(span.name, 0) + 1
            row = next(r for r in otel_rows if r["body"] == body and r["stack"] == name)
            row["spans_per_request"] = round(len(spans) / 200, 2)
            row["span_names"] = {k: round(v / 200, 2) for k, v in names.items()}

    # Diagnostic: the same with CancelMiddleware's disconnect listener stubbed out.
    from otel_cancel.integrations import asgi as cancel_asgi

    original = cancel_asgi._CancellableRequest._listen_soon
    cancel_asgi._CancellableRequest._listen_soon = lambda self: None  # type: ignore[method-assign]
    try:
        for body, inner in (("json", json_app), ("stream x10", stream_app)):
            app = OpenTelemetryMiddleware(CancelMiddleware(inner, trust_incoming=True))
            scope = _http_scope(True)
            await _drive(app, scope, iterations // 20)
            samples = [await _drive(app, scope, iterations // 2) for _ in range(repeats)]
            otel_rows.append(
                {
                    "body": body,
                    "stack": "OTel ASGI + CancelMiddleware, listener stubbed (diagnostic)",
                    **_stats(samples),
                }
            )
    finally:
        cancel_asgi._CancellableRequest._listen_soon = original  # type: ignore[method-assign]
    return rows, otel_rows


def asgi_deltas(rows: list[dict[str, Any]], otel_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def delta(body: str, row: dict[str, Any], base: dict[str, Any], over: str) -> dict[str, Any]:
        return {
            "body": body,
            "added by": row["stack"].replace("OTel ASGI + ", ""),
            "over": over,
            "added_us_min": round(row["min_us"] - base["min_us"], 2),
            "added_us_median": round(row["median_us"] - base["median_us"], 2),
        }

    deltas = []
    for body in ("json", "stream x10", "stream x10 (Starlette)"):
        bare = [r for r in rows if r["body"] == body]
        if bare:
            base = next(r for r in bare if r["stack"] == "bare app")
            deltas += [delta(body, r, base, "bare app") for r in bare if r is not base]
        otel = [r for r in otel_rows if r["body"] == body]
        deltas += [delta(body, r, otel[0], "OTel ASGI (SDK)") for r in otel[1:]]
    return deltas


# -- 3. throughput ------------------------------------------------------------------------------------


WRK_LATENCY = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, seconds: float, connections: int) -> dict[str, Any]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s", url]
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    result: dict[str, Any] = {"raw": output}
    for line in output.splitlines():
        if line.startswith("Requests/sec:"):
            result["rps"] = float(line.split()[1])
        elif "requests in" in line:
            result["requests"] = int(line.split()[0])
        elif line.strip().startswith("Non-2xx"):
            result["non_2xx"] = int(line.split()[-1])
        elif line.strip().startswith("Socket errors"):
            result["socket_errors"] = line.strip()
        else:
            match = WRK_LATENCY.match(line)
            if match:
                result[f"p{match.group(1)}_ms"] = round(_ms(match.group(2), match.group(3)), 3)
    return result


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(chain: ServiceChain) -> float:
    """User + system CPU time used so far by the chain's processes (``/proc/<pid>/stat``)."""
    total = 0
    for process in chain.processes():
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def idle_cpu_per_second(chain: ServiceChain, seconds: float) -> float:
    """CPU seconds per second the chain's processes spend while no request arrives."""
    before, started = cpu_seconds(chain), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(chain) - before) / (time.monotonic() - started)


def debug_state(chain: ServiceChain) -> list[dict[str, Any]]:
    states = []
    for level in range(chain.depth):
        for url in chain.urls(level):
            states.append(httpx.get(f"{url}/debug/otel-cancel", timeout=10).json())
    return states


def throughput(etcd: EtcdServer, quick: bool, cpu: CpuSampler) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        return {"ran": False, "reason": "wrk is not installed (Debian: apt-get install -y wrk)"}
    # The measured otel-cancel chain talks to an etcd nobody else uses: etcd's own
    # counters then count that chain's calls, and nothing else's.
    with EtcdServer() as chain_etcd:
        return _throughput(etcd, chain_etcd, quick, cpu)


def _throughput(etcd: EtcdServer, chain_etcd: EtcdServer, quick: bool, cpu: CpuSampler) -> dict[str, Any]:
    seconds = 3 if quick else 8
    rounds = 2 if quick else 7
    connections = 16
    base = {"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": unique_prefix().replace("test", "bench")}
    variants = {
        "no OpenTelemetry": ({}, False),
        "OpenTelemetry": ({"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "otel_cancel"}, True),
        "OpenTelemetry + otel-cancel": ({"OTEL_CANCEL_ETCD_ENDPOINTS": chain_etcd.endpoint}, True),
    }
    chains: dict[str, ServiceChain] = {}
    try:
        for name, (extra, instrument) in variants.items():
            chains[name] = ServiceChain(3, 1, "level_app", {**base, **extra}, auto_instrument=instrument).start()
        # Each chain answers, and only the last one runs otel-cancel.
        checks = {}
        for name, chain in chains.items():
            response = httpx.get(f"{chain.urls(0)[0]}/hop", timeout=10)
            checks[name] = {
                "status": response.status_code,
                "otel_cancel_root_header": "otel-cancel-root" in response.headers,
                "body": response.json(),
            }
        for chain in chains.values():
            wrk(f"{chain.urls(0)[0]}/hop", 2, connections)  # warm-up
        # What each chain spends with no request at all (the harness's event-loop-lag probe,
        # otel-cancel's watcher and watchdog): per second, taken out of every round, so
        # that CPU per request is what serving requests costs.
        idle = {name: idle_cpu_per_second(chain, 3 if quick else 6) for name, chain in chains.items()}
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in chains}
        calls: list[dict[str, Any]] = []
        names = list(chains)
        for index in range(rounds):
            order = names[index % len(names) :] + names[: index % len(names)]
            for name in order:
                chain = chains[name]
                calls_before = etcd_grpc_calls(chain_etcd.client_url)
                cpu_before = cpu_seconds(chain)
                started = time.time()
                result = wrk(f"{chain.urls(0)[0]}/hop", seconds, connections)
                ended = time.time()
                cpu_used = cpu_seconds(chain) - cpu_before
                calls_made = etcd_grpc_calls(chain_etcd.client_url) - calls_before
                result["cpu_s_raw"] = round(cpu_used, 3)
                cpu_used -= idle[name] * (ended - started)
                # CPU time per request is what the chain's own processes spent: unlike req/s, load
                # from other processes on the machine does not change it much.
                if result.get("requests"):
                    result["cpu_us_per_request"] = round(1e6 * cpu_used / result["requests"], 1)
                result.update(cpu.window(started, ended))
                result["round"] = index
                result.pop("raw", None) if "rps" in result else None
                samples[name].append(result)
                if name == "OpenTelemetry + otel-cancel":
                    state = debug_state(chain)[0]
                    calls.append(
                        {
                            "round": index,
                            "seconds": round(ended - started, 2),
                            "requests_at_edge": result.get("requests"),
                            "services": chain.depth,
                            "etcd_calls": sum(calls_made.values()),
                            "etcd_calls_by_method": dict(sorted(calls_made.items())),
                            "watchdog_seconds": state["watchdog_seconds"],
                            "live_interval_ms": state["live_interval_ms"],
                        }
                    )
                say(f"  round {index + 1}/{rounds} {name:>28}: {result.get('rps', 0):,.0f} req/s")
    finally:
        for chain in chains.values():
            chain.stop()
    summary_rows = []
    for name, results in samples.items():
        rps = [r["rps"] for r in results if "rps" in r]
        cpu = [r["cpu_us_per_request"] for r in results if "cpu_us_per_request" in r]
        summary_rows.append(
            {
                "variant": name,
                "cpu_us_per_request_median": round(statistics.median(cpu), 1) if cpu else None,
                "cpu_us_per_request_min": round(min(cpu), 1) if cpu else None,
                "rps_median": round(statistics.median(rps), 1) if rps else None,
                "rps_min": round(min(rps), 1) if rps else None,
                "rps_max": round(max(rps), 1) if rps else None,
                "p50_ms_median": statistics.median([r["p50_ms"] for r in results if "p50_ms" in r])
                if results
                else None,
                "p99_ms_median": statistics.median([r["p99_ms"] for r in results if "p99_ms" in r])
                if results
                else None,
                "non_2xx": sum(r.get("non_2xx", 0) for r in results),
            }
        )
    by_name = {r["variant"]: r for r in summary_rows}
    otel, both = by_name["OpenTelemetry"]["rps_median"], by_name["OpenTelemetry + otel-cancel"]["rps_median"]
    # Paired: each round ran both variants back to back; compare within a round.
    paired = []
    for a, b in zip(samples["OpenTelemetry"], samples["OpenTelemetry + otel-cancel"], strict=False):
        if a.get("rps") and b.get("rps"):
            paired.append(round(100 * (a["rps"] - b["rps"]) / a["rps"], 2))
    # Paired on CPU too: each round's otel-cancel chain against the OpenTelemetry chain of the same round.
    paired_cpu = []
    for a, b in zip(samples["OpenTelemetry"], samples["OpenTelemetry + otel-cancel"], strict=False):
        if a.get("cpu_us_per_request") and b.get("cpu_us_per_request"):
            paired_cpu.append(round(100 * (1 - a["cpu_us_per_request"] / b["cpu_us_per_request"]), 2))

    def cpu_loss(variant: str) -> float | None:
        # At CPU saturation throughput is 1 / (CPU per request): the loss is 1 - cpu_otel / cpu_variant.
        base = by_name["OpenTelemetry"]["cpu_us_per_request_median"]
        other = by_name.get(variant, {}).get("cpu_us_per_request_median")
        return round(100 * (1 - base / other), 2) if base and other else None

    return {
        "ran": True,
        "cpu_us_per_hop_added": round(
            (
                by_name["OpenTelemetry + otel-cancel"]["cpu_us_per_request_median"]
                - by_name["OpenTelemetry"]["cpu_us_per_request_median"]
            )
            / 3,
            1,
        )
        if by_name["OpenTelemetry"]["cpu_us_per_request_median"]
        and by_name["OpenTelemetry + otel-cancel"]["cpu_us_per_request_median"]
        else None,
        "loss_pct_from_cpu_per_request": round(statistics.median(paired_cpu), 2) if paired_cpu else None,
        "loss_pct_from_cpu_per_request_paired_rounds": paired_cpu,
        "loss_pct_from_cpu_per_request_of_medians": cpu_loss("OpenTelemetry + otel-cancel"),
        "idle_cpu_ms_per_second": {name: round(1000 * rate, 2) for name, rate in idle.items()},
        "chain": "3 levels x 1 replica, GET /hop, each level calls the next with one shared httpx.AsyncClient",
        "load_generator": f"wrk -t1 -c{connections} -d{seconds}s",
        "rounds": rounds,
        "checks": checks,
        "variants": summary_rows,
        "samples": samples,
        "loss_pct_of_medians": round(100 * (otel - both) / otel, 2) if otel and both else None,
        "loss_pct_paired_rounds": paired,
        "loss_pct_paired_median": round(statistics.median(paired), 2) if paired else None,
        "per_request_added_us_at_saturation": round(1e6 / both - 1e6 / otel, 1) if otel and both else None,
        "etcd_calls": calls,
    }


# -- 3b. one hop at a time, wrk its only client ----------------------------------------------------------

RUNTIME_ONLY = "OpenTelemetry + otel-cancel's runtime, no middleware"
"""The single-hop variant that measures what a process pays for being cancellable at all."""

HOP_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def single_hops(etcd: EtcdServer, quick: bool) -> dict[str, Any]:
    """CPU per request of one hop with no client of its own, OpenTelemetry alone vs with otel-cancel.

    In the chain, every hop but the last is also an httpx client of the next, and that
    client (about 0.8-1 ms of CPU per call on this machine, measured alone, with
    round-to-round swings of its own of hundreds of µs) is most of a hop's CPU: it is the
    harness's, not the service's. Here each hop is a leaf (``level_app`` with no next
    level) driven by ``wrk`` from outside, so the process's CPU is the server's work
    alone: an edge (no incoming baggage, untrusted) and an internal hop (trusted, the
    ``traceparent`` and ``baggage`` an otel-cancel edge sends). A third variant runs
    otel-cancel's runtime (imports, watch, IO loop, live-work publisher) with no
    middleware: the floor no request path can go under. The variants of a role run
    back to back in each round (order alternating) and are compared per round.
    """
    if shutil.which("wrk") is None:
        return {"ran": False, "reason": "wrk is not installed (Debian: apt-get install -y wrk)"}
    seconds, rounds, connections = (3, 3, 8) if quick else (5, 7, 8)
    base = {"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": unique_prefix().replace("test", "bench")}
    variants: dict[str, dict[str, str]] = {
        "OpenTelemetry": {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "otel_cancel"},
        "OpenTelemetry + otel-cancel": {},
        # The floor no request path can go under: otel-cancel's runtime running (its
        # imports, the watch, the IO loop and the live-work publisher), no middleware.
        RUNTIME_ONLY: {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "otel_cancel", "BENCH_RUNTIME_ONLY": "1"},
    }
    roles = {
        "edge": ({"LEVEL": "0", "OTEL_CANCEL_TRUST_INCOMING": "false"}, []),
        "internal": (
            {"LEVEL": "1", "OTEL_CANCEL_TRUST_INCOMING": "true"},
            [
                f"traceparent: {HOP_TRACEPARENT}",
                f"baggage: {attributes.BAGGAGE_ROOT}={ROOT},{attributes.BAGGAGE_DEPTH}=0,"
                f"{attributes.BAGGAGE_STARTED}={STARTED}",
            ],
        ),
    }
    processes: dict[tuple[str, str], tuple[str, ManagedProcess]] = {}
    try:
        for role, (role_env, _) in roles.items():
            for variant, extra in variants.items():
                port = free_port()
                env = service_env({**base, **role_env, **extra, "NEXT_URLS": "", "OTEL_SERVICE_NAME": f"bench-{role}"})
                command = uvicorn_command("level_app", port, auto_instrument=True)
                process = ManagedProcess(command, env=env, name=f"{role}-{variant}")
                processes[(role, variant)] = (f"http://127.0.0.1:{port}/hop", process)
        for _, process in processes.values():
            process.wait_for_line(lambda line: "Application startup complete" in line, timeout=120)
        samples: dict[str, dict[str, list[float]]] = {role: {v: [] for v in variants} for role in roles}
        # Where a hop's CPU goes: the serving thread, the others (otel-cancel's IO loop and
        # gRPC's), and the garbage collector's pauses (on the serving thread, within its CPU).
        parts: dict[str, dict[str, dict[str, list[float]]]] = {
            role: {v: {"main_thread": [], "other_threads": [], "gc": []} for v in variants} for role in roles
        }
        for (role, _), (url, _) in processes.items():
            wrk_with(url, 2, connections, roles[role][1])  # warm-up
        for index in range(rounds):
            for role, (_, headers) in roles.items():
                order = list(variants) if index % 2 == 0 else list(reversed(variants))
                for variant in order:
                    url, process = processes[(role, variant)]
                    since = time.time()
                    before, main_before = _process_cpu(process.pid), _thread_cpu(process.pid, process.pid)
                    result = wrk_with(url, seconds, connections, headers)
                    used = _process_cpu(process.pid) - before
                    main = _thread_cpu(process.pid, process.pid) - main_before
                    if result.get("requests"):
                        requests = result["requests"]
                        samples[role][variant].append(round(1e6 * used / requests, 1))
                        gc_ms = httpx.get(url.replace("/hop", f"/debug/loop-lag?since={since}")).json()["gc_total_ms"]
                        split = parts[role][variant]
                        split["main_thread"].append(round(1e6 * main / requests, 1))
                        split["other_threads"].append(round(1e6 * (used - main) / requests, 1))
                        split["gc"].append(round(1e3 * gc_ms / requests, 1))
            say(f"  single hops round {index + 1}/{rounds}")
    finally:
        for _, process in processes.values():
            process.stop()
    out: dict[str, Any] = {"ran": True, "rounds": rounds, "load_generator": f"wrk -t1 -c{connections} -d{seconds}s"}
    per_role = {}
    for role in roles:
        otel, both = samples[role]["OpenTelemetry"], samples[role]["OpenTelemetry + otel-cancel"]
        paired = _paired(otel, both)
        runtime_only = _paired(otel, samples[role][RUNTIME_ONLY])
        per_role[role] = {
            "cpu_us_per_request_otel": otel,
            "cpu_us_per_request_both": both,
            "otel_median": statistics.median(otel) if otel else None,
            "both_median": statistics.median(both) if both else None,
            "added_us_paired": paired,
            "added_us_median": statistics.median(paired) if paired else None,
            "cpu_us_per_request_runtime_only": samples[role][RUNTIME_ONLY],
            "runtime_only_added_us_median": statistics.median(runtime_only) if runtime_only else None,
            "split_us_per_request_median": {
                variant: {part: statistics.median(values) if values else None for part, values in split.items()}
                for variant, split in parts[role].items()
            },
        }
    out["roles"] = per_role
    # The three-hop chain without its harness: an edge and two internal hops, server work only.
    losses = _chain_losses(per_role, "cpu_us_per_request_both")
    out["chain_loss_pct_paired_rounds"] = losses
    out["chain_loss_pct_median"] = statistics.median(losses) if losses else None
    floor = _chain_losses(per_role, "cpu_us_per_request_runtime_only")
    out["runtime_only_chain_loss_pct_median"] = statistics.median(floor) if floor else None
    return out


def _chain_losses(per_role: dict[str, dict[str, Any]], variant: str) -> list[float]:
    """Per round, the chain's loss (%) with ``variant``'s CPU per request against OpenTelemetry alone."""
    edge, internal = per_role["edge"], per_role["internal"]
    return [
        round(100 * (1 - (e_o + 2 * i_o) / (e_v + 2 * i_v)), 2)
        for e_o, e_v, i_o, i_v in zip(
            edge["cpu_us_per_request_otel"],
            edge[variant],
            internal["cpu_us_per_request_otel"],
            internal[variant],
            strict=False,
        )
    ]


def _paired(anchor: list[float], variant: list[float]) -> list[float]:
    """Each round's difference, ``variant`` minus ``anchor``."""
    return [round(b - a, 1) for a, b in zip(anchor, variant, strict=False)]


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _thread_cpu(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wrk_with(url: str, seconds: float, connections: int, headers: list[str]) -> dict[str, Any]:
    """``wrk`` with request headers."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run([*command, url], capture_output=True, text=True, timeout=seconds + 60).stdout
    for line in output.splitlines():
        if "requests in" in line:
            return {"requests": int(line.split()[0])}
    return {}


async def in_process(etcd: EtcdServer, quick: bool) -> dict[str, Any]:
    iterations = 5_000 if quick else 40_000
    repeats = 3 if quick else 7
    # Only this process uses ``etcd`` here: its counters are this process's calls.
    calls_before = await asyncio.to_thread(etcd_grpc_calls, etcd.client_url)
    with configured(endpoints=(etcd.endpoint,), prefix=unique_prefix(), service="bench-overhead") as runtime:
        await wait_for_listing(runtime)
        scope_rows = await scope_costs(iterations, repeats)
        asgi_iterations = 2_000 if quick else 20_000
        asgi_rows, otel_rows = await asgi_costs(asgi_iterations, repeats)
        calls = await asyncio.to_thread(etcd_grpc_calls, etcd.client_url) - calls_before
    baseline = scope_rows[0]["min_us"]
    for row in scope_rows[1:]:
        row["over_baseline_us"] = round(row["min_us"] - baseline, 3)
    return {
        "scope": scope_rows,
        "asgi": asgi_rows,
        "asgi_otel": otel_rows,
        "asgi_added": asgi_deltas(asgi_rows, otel_rows),
        "etcd_calls_in_process": dict(sorted(calls.items())),
        "iterations": {"scope": iterations, "asgi": asgi_iterations, "repeats": repeats},
    }


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--single-hops-only",
        action="store_true",
        help="run only the one-hop-at-a-time measurement and add it to the existing results",
    )
    args = parser.parse_args()
    started, load_before = time.time(), loadavg()
    if args.single_hops_only:
        previous = read_results("overhead")
        if previous is None:
            say("no bench/results/overhead.json yet: run bench/overhead.py first")
            return 1
        with EtcdServer() as etcd:
            hops = single_hops(etcd, args.quick)
        net = previous["data"]["throughput"] if "data" in previous else previous["throughput"]
        net["single_hops"] = hops
        net.setdefault("loss_pct_from_cpu_per_request_with_harness", net["loss_pct_from_cpu_per_request"])
        net["loss_pct_from_cpu_per_request"] = hops.get("chain_loss_pct_median")
        data = (
            previous["data"] if "data" in previous else {k: previous[k] for k in ("quick", "in_process", "throughput")}
        )
        path = write_results("overhead", data, started, load_before)
        say(json.dumps(hops, indent=1))
        say(f"wrote {path}")
        return 0
    with CpuSampler() as cpu, EtcdServer() as etcd:
        say("in process: scope and ASGI costs ...")
        micro = asyncio.run(in_process(etcd, args.quick))
        say("three-hop chain throughput (wrk) ...")
        net = throughput(etcd, args.quick, cpu)
        say("one hop at a time, wrk its only client ...")
        net["single_hops"] = single_hops(etcd, args.quick)
        if net.get("ran") and net["single_hops"].get("ran"):
            # The target's figure: the chain's loss with the harness's own client taken out.
            net["loss_pct_from_cpu_per_request_with_harness"] = net["loss_pct_from_cpu_per_request"]
            net["loss_pct_from_cpu_per_request"] = net["single_hops"]["chain_loss_pct_median"]
    data = {"quick": args.quick, "in_process": micro, "throughput": net}
    path = write_results("overhead", data, started, load_before)

    say("\nscope enter+exit, microseconds per operation (min / median of repeats)")
    say(table(micro["scope"], ["case", "min_us", "median_us", "over_baseline_us"]))
    say("\none ASGI request in process, microseconds")
    say(table(micro["asgi"] + micro["asgi_otel"], ["body", "stack", "min_us", "median_us", "spans_per_request"]))
    say("\nadded per hop by otel-cancel, microseconds")
    say(table(micro["asgi_added"], ["body", "added by", "over", "added_us_min", "added_us_median"]))
    if net.get("ran"):
        say(f"\nthree-hop chain, {net['load_generator']}, {net['rounds']} interleaved rounds")
        say(table(net["variants"], THROUGHPUT_COLUMNS))
        say(
            f"CPU per request: otel-cancel adds {net['cpu_us_per_hop_added']} µs per hop; throughput loss at "
            f"saturation {net['loss_pct_from_cpu_per_request']}% (median of paired rounds "
            f"{net['loss_pct_from_cpu_per_request_paired_rounds']}); idle CPU taken out, ms/s: "
            f"{net['idle_cpu_ms_per_second']}"
        )
        say(
            f"throughput loss with otel-cancel: {net['loss_pct_of_medians']}% (medians), "
            f"paired rounds {net['loss_pct_paired_rounds']} -> median {net['loss_pct_paired_median']}%"
        )
        say("\netcd calls by the otel-cancel chain's services while serving (counted at etcd)")
        say(
            table(
                net["etcd_calls"],
                ["round", "seconds", "requests_at_edge", "services", "etcd_calls", "etcd_calls_by_method"],
            )
        )
    else:
        say(f"\nthroughput not measured: {net.get('reason')}")
    say(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
