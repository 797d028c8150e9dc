"""Plot the latency distributions of the last runs: ``bench/results/latency.png``.

    /work/venv/bin/python bench/plot.py

Reads ``bench/results/{propagation,cascade,langgraph,scale}.json`` (whichever
exist) and draws, as cumulative distributions on a log scale:

1. otel-cancel, flag written -> work stopped, every receipt, by depth and
   number of concurrent runs;
2. "the user goes away" -> the deepest level stops: the HTTP-disconnect cascade
   vs otel-cancel, and LangGraph's ``runs.cancel`` -> the leaf stops; mechanisms
   whose leaf never stopped are listed instead of drawn;
3. one process: one root among none vs among 10,000 scopes, and the storm
   (1,000 flags/s) with receipts on and off.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, read_results


def _ecdf(ax: Any, values: list[float], label: str, **style: Any) -> None:
    values = sorted(v for v in values if v is not None and v > 0)
    if not values:
        return
    n = len(values)
    ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n})", **style)


def _finish(ax: Any, title: str, xlabel: str) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of stops")
    ax.grid(True, which="both", alpha=0.3)
    ax.axvline(10, color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize=7, loc="lower right")


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    propagation = read_results("propagation")
    cascade = read_results("cascade")
    langgraph = read_results("langgraph")
    scale = read_results("scale")
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))

    ax = axes[0]
    if propagation:
        colors = {1: "tab:blue", 3: "tab:orange", 5: "tab:green"}
        styles = {1: ":", 100: "-", 1000: "--", 20: "-"}
        for config in propagation["configurations"]:
            label = config.get("label", "grid")
            name = f"depth {config['depth']}, {config['concurrency']} runs"
            color = colors.get(config["depth"], "black")
            style = styles.get(config["concurrency"], "-")
            if label == "control":
                name = f"control: depth 1 x {config['replicas']} replicas, {config['concurrency']} runs"
                color = "grey"
            elif label == "slow tokens":
                name = f"depth {config['depth']}, {config['concurrency']} runs, 1 token/s"
                color, style = "tab:olive", "-."
            _ecdf(ax, [s["latency_ms"] for s in config["samples"]], name, color=color, linestyle=style)
    _finish(ax, "otel-cancel: flag written -> work stopped (every process)", "ms (log)")

    ax = axes[1]
    never: list[str] = []
    if cascade:
        colors = {"disconnect": "tab:red", "otel-cancel": "tab:blue"}
        styles = {
            ("stream", 1): ":",
            ("stream", 3): "-",
            ("stream", 5): "--",
            ("buffered-call", 3): "-.",
            ("rpc-endpoint", 3): (0, (1, 3)),
        }
        for row in cascade["results"]:
            deepest = [r["levels"][-1] for r in row["samples"]]
            stops = [lv["latency_ms"] for lv in deepest if lv["how"] == "stopped"]
            label = f"{row['mechanism']}: {row['shape']} d{row['depth']}"
            if not stops:
                never.append(f"{label}: leaf never stopped (ran to completion)")
                continue
            _ecdf(
                ax,
                stops,
                label,
                color=colors[row["mechanism"]],
                linestyle=styles.get((row["shape"], row["depth"]), "-"),
            )
    if langgraph and langgraph.get("ran"):
        for index, row in enumerate(langgraph["scenarios"]):
            stops = [r["levels"][-1]["latency_ms"] for r in row["samples"] if r["levels"][-1]["how"] == "stopped"]
            label = f"LangGraph {row['scenario']} d{row['depth']}"
            if not stops:
                never.append(f"{label}: leaf never stopped")
                continue
            _ecdf(ax, stops, label, color="tab:purple", linestyle=["-", "--", ":", "-.", "-"][index % 5])
    _finish(ax, "user leaves / runs.cancel -> deepest level stopped", "ms (log)")
    if never:
        ax.text(
            0.02,
            0.98,
            "\n".join(never),
            transform=ax.transAxes,
            fontsize=7,
            va="top",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "grey"},
        )

    ax = axes[2]
    if scale:
        _ecdf(ax, scale["latency_alone"]["samples_ms"], "one root among none", color="tab:blue")
        _ecdf(
            ax,
            scale["latency_crowd"]["samples_ms"],
            f"one root among {scale['latency_crowd']['live_scopes']:,} scopes",
            color="tab:green",
        )
        _ecdf(ax, scale["storm"]["samples_ms"], "storm 1,000 flags/s, receipts on", color="tab:red")
        if "storm_without_receipts" in scale:
            _ecdf(
                ax,
                scale["storm_without_receipts"]["samples_ms"],
                "storm, receipts off (diagnostic)",
                color="tab:orange",
                linestyle="--",
            )
    _finish(ax, "one process: flag written -> scope stopped", "ms (log)")

    fig.suptitle("Cancel latency distributions (cumulative; dotted line: 10 ms)", fontsize=12)
    fig.tight_layout()
    path = RESULTS / "latency.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
