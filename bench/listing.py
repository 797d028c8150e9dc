"""Listing at size: a fresh process on 100,000 live flags, against a bare paginated range.

    /work/venv/bin/python bench/listing.py [--quick]

1. Writes 100,000 flags (20,000 with ``--quick``) into a fresh etcd, in
   transactions of 128 puts, each a real ``CancelRequest`` (about 200 bytes).
2. Anchor, in the same run: a bare keys-only range over ``{prefix}flags/``, paged
   like the watcher pages (2,000 keys per page at one revision), straight through
   ``aetcd``'s gRPC stub; median of 5.
3. A fresh process (``bench/services/list_probe.py``): seconds from its watcher's
   start to the end of its first listing, and to the refusal of a scope for the
   last root in key order (median of 5 processes); the ratio to the anchor.
4. The same probe under ``tracemalloc``: the bytes still held after the listing
   and the peak while listing; and the same on an empty prefix, so the
   difference is what the cancelled-root set costs.
5. The old way, for reference: one unpaginated range with values, and whether
   it passes gRPC's 4 MiB limit.

Writes ``bench/results/listing.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aetcd
import aetcd.rpc
from _common import PYTHON, SERVICES, base_parser, loadavg, say, service_env, table, write_results

from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest
from otel_cancel._core.root import random_root
from otel_cancel.store import LIST_PAGE_SIZE
from otel_cancel.testing import EtcdServer, ManagedProcess

PREFIX = "/otel-cancel-bench/"
TXN_OPS = 128
REPEATS = 5


async def _write(client: aetcd.Client, roots: list[str]) -> None:
    for start in range(0, len(roots), TXN_OPS):
        puts = [
            client.transactions.put(
                f"{PREFIX}flags/{root}".encode(),
                CancelRequest.new(root, "client disconnected", "edge/edge-7f9c-1").to_json(),
            )
            for root in roots[start : start + TXN_OPS]
        ]
        await client.transaction(compare=[], success=puts, failure=[])


async def _bare_paged_range(client: aetcd.Client) -> tuple[float, int]:
    head = f"{PREFIX}flags/".encode()
    end = head[:-1] + bytes([head[-1] + 1])
    started = time.perf_counter()
    key, revision, count = head, 0, 0
    while True:
        response = await client.kvstub.Range(
            aetcd.rpc.RangeRequest(key=key, range_end=end, limit=LIST_PAGE_SIZE, revision=revision, keys_only=True),
            timeout=60,
        )
        revision = revision or response.header.revision
        count += len(response.kvs)
        if not response.more:
            return time.perf_counter() - started, count
        key = response.kvs[-1].key + b"\0"


async def _unpaginated(client: aetcd.Client) -> dict[str, object]:
    started = time.perf_counter()
    try:
        listing = await client.get_prefix(f"{PREFIX}flags/".encode())
    except aetcd.exceptions.ClientError as error:
        return {"ok": False, "error": str(error)[:200], "seconds": time.perf_counter() - started}
    return {"ok": True, "flags": len(list(listing)), "seconds": time.perf_counter() - started}


def _probe(etcd: EtcdServer, root: str, memory: bool, prefix: str = PREFIX) -> dict[str, float]:
    env = service_env({"OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint, "OTEL_CANCEL_PREFIX": prefix})
    command = [PYTHON, str(SERVICES / "list_probe.py"), root, *(["--memory"] if memory else [])]
    with ManagedProcess(command, env=env, name="list-probe") as probe:
        line = probe.wait_for_line("{", timeout=180)
    result: dict[str, float] = json.loads(line)
    return result


def listing_block(result: dict[str, Any] | None) -> str:
    """The generated block of BENCHMARKS.md section 6 (called by ``bench/report.py``)."""
    if not result:
        return "_Not run yet: `bench/listing.py`._"
    rows = [
        {
            "what": "bare paged keys-only range (anchor)",
            "median s": f"{result['anchor_median_s']:.3f}",
            "runs s": ", ".join(f"{v:.3f}" for v in result["anchor_bare_paged_range_s"]),
            "x anchor": "1.0",
        },
        {
            "what": "fresh process: start of its watcher -> listed",
            "median s": f"{result['listed_median_s']:.3f}",
            "runs s": ", ".join(f"{r['listed_s']:.3f}" for r in result["probe_runs"]),
            "x anchor": f"{result['listed_to_anchor']:.1f}",
        },
        {
            "what": "fresh process: start of its watcher -> late hop refused",
            "median s": f"{result['refused_median_s']:.3f}",
            "runs s": ", ".join(f"{r['refused_s']:.3f}" for r in result["probe_runs"]),
            "x anchor": f"{result['refused_median_s'] / result['anchor_median_s']:.1f}",
        },
    ]
    unpaginated = result["unpaginated_range"]
    old_way = f"fails: {unpaginated['error']}" if not unpaginated["ok"] else f"passes ({unpaginated['flags']} flags)"
    return (
        f"{result['flags']:,} live flags{' (quick)' if result.get('quick') else ''}, pages of "
        f"{result['page_size']:,} keys:\n\n"
        + table(rows, ["what", "median s", "runs s", "x anchor"])
        + f"\n\nMemory (tracemalloc, in the fresh process): **{result['set_mb']:.1f} MB** for the cancelled-root set "
        f"({result['set_bytes_per_root']:.0f} B per root: held after listing, {result['held_mb']:.1f} MB, minus the "
        f"same process on an empty prefix, {result['memory_probe_empty']['held_bytes'] / 1e6:.1f} MB); peak while "
        f"listing {result['peak_mb']:.1f} MB.\n\nOne unpaginated range with values over the same set (the old "
        f"listing): {old_way}."
    )


def main() -> None:
    args = base_parser(__doc__ or "").parse_args()
    flags = 20_000 if args.quick else 100_000
    started, load_before = time.time(), loadavg()
    roots = sorted(random_root() for _ in range(flags))
    with EtcdServer() as etcd:
        host, port = etcd.endpoint.split(":")

        async def prepare() -> dict[str, object]:
            async with aetcd.Client(host, int(port), timeout=120) as client:
                began = time.perf_counter()
                await _write(client, roots)
                say(f"wrote {flags} flags in {time.perf_counter() - began:.1f}s")
                anchors = [await _bare_paged_range(client) for _ in range(REPEATS)]
                assert all(count == flags for _, count in anchors)
                return {
                    "anchor_s": [seconds for seconds, _ in anchors],
                    "unpaginated": await _unpaginated(client),
                }

        prepared = io_loop().run(prepare(), timeout=600)
        timings = [_probe(etcd, roots[-1], memory=False) for _ in range(REPEATS)]
        memory = _probe(etcd, roots[-1], memory=True)
        # The same process on an empty prefix: what the runtime holds without any flag.
        empty = _probe(etcd, roots[-1], memory=True, prefix="/otel-cancel-bench-empty/")
    assert all(t["refused"] and t["roots"] == flags for t in timings), timings
    anchor = statistics.median(prepared["anchor_s"])  # type: ignore[arg-type]
    listed = statistics.median(t["listed_s"] for t in timings)
    refused = statistics.median(t["refused_s"] for t in timings)
    data = {
        "quick": args.quick,
        "flags": flags,
        "page_size": LIST_PAGE_SIZE,
        "anchor_bare_paged_range_s": prepared["anchor_s"],
        "anchor_median_s": anchor,
        "probe_runs": timings,
        "listed_median_s": listed,
        "refused_median_s": refused,
        "listed_to_anchor": listed / anchor,
        "memory_probe": memory,
        "memory_probe_empty": empty,
        "held_mb": memory["held_bytes"] / 1e6,
        "set_mb": (memory["held_bytes"] - empty["held_bytes"]) / 1e6,
        "set_bytes_per_root": (memory["held_bytes"] - empty["held_bytes"]) / flags,
        "peak_mb": memory["peak_bytes"] / 1e6,
        "unpaginated_range": prepared["unpaginated"],
    }
    path = write_results("listing", data, started, load_before)
    say(f"{flags} flags: bare paged keys-only range {anchor:.3f}s (median of {REPEATS})")
    say(f"fresh process: listed in {listed:.3f}s, refused a late hop at {refused:.3f}s ({listed / anchor:.1f}x anchor)")
    say(
        f"memory after listing: {data['held_mb']:.1f} MB held ({data['set_mb']:.1f} MB more than on an empty prefix, "
        f"{data['set_bytes_per_root']:.0f} B per root), {data['peak_mb']:.1f} MB peak while listing"
    )
    say(f"unpaginated range with values: {prepared['unpaginated']}")
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
