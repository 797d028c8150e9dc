"""Write cancel flags on a schedule (the storm's load generator), one process of several.

    python flag_writer.py ENDPOINT PREFIX SEED COUNT WRITER WRITERS RATE START_EPOCH_NS

Writes the flags of ``roots(SEED, COUNT)[i]`` for every ``i`` with
``i % WRITERS == WRITER``, flag ``i`` at ``START_EPOCH_NS + i / RATE`` seconds (all
writers share one schedule and one clock), with ``EtcdCancelStore.create_flag``
(lease + create-if-absent transaction, what ``otel-cancel cancel`` does). A write
does not wait for the previous one. Prints ``WROTE <root> <requested_at_ns>``
per flag, ``FAILED <root> <error>`` per failure, then ``DONE {json}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from scope_holder import roots

from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import CancelRequest
from otel_cancel.store.etcd import EtcdCancelStore


async def main(
    endpoint: str, prefix: str, seed: str, count: int, writer: int, writers: int, rate: float, start_ns: int
) -> None:
    store = EtcdCancelStore([endpoint], prefix=prefix)
    await store.ping()
    mine = [(i, root) for i, root in enumerate(roots(seed, count)) if i % writers == writer]
    lateness: list[float] = []
    out: list[str] = []

    async def one(index: int, root: str) -> None:
        due_ns = start_ns + int(index * 1e9 / rate)
        delay = (due_ns - time.time_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        lateness.append((time.time_ns() - due_ns) / 1e6)
        try:
            stored, _ = await store.create_flag(CancelRequest.new(root, "storm", f"bench/writer-{writer}"), 600)
            out.append(f"WROTE {root} {stored.requested_at}")
        except Exception as error:
            out.append(f"FAILED {root} {type(error).__name__}: {error}"[:300])
        if len(out) >= 50:
            sys.stdout.write("\n".join(out) + "\n")
            sys.stdout.flush()
            out.clear()

    first = time.time_ns()
    await asyncio.gather(*(one(i, r) for i, r in mine))
    last = time.time_ns()
    if out:
        sys.stdout.write("\n".join(out) + "\n")
    lateness.sort()
    sys.stdout.write(
        "DONE "
        + json.dumps(
            {
                "writer": writer,
                "flags": len(mine),
                "first_ns": first,
                "last_ns": last,
                "lateness_p50_ms": lateness[len(lateness) // 2] if lateness else None,
                "lateness_max_ms": lateness[-1] if lateness else None,
            }
        )
        + "\n"
    )
    sys.stdout.flush()
    await store.close()


if __name__ == "__main__":
    endpoint, prefix, seed, count, writer, writers, rate, start = sys.argv[1:9]
    coroutine = main(endpoint, prefix, seed, int(count), int(writer), int(writers), float(rate), int(start))
    # The store's gRPC channel lives on otel-cancel's IO loop (see otel_cancel._core.io_loop).
    io_loop().run(coroutine)
