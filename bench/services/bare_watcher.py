"""A bare aetcd watcher: the anchor for otel-cancel's per-flag cost and delivery latency.

    python bare_watcher.py ENDPOINT PREFIX

One ``aetcd`` watch on ``{PREFIX}flags/`` (what otel-cancel's watcher holds, without
otel-cancel), on a plain asyncio loop; each event's value is parsed as JSON, as any
consumer must, and the time it arrived is kept in memory (printing per event would
cost more than the event). Commands on stdin, one per line: ``stats`` answers
``STATS {"seen": N}``; ``dump`` answers one ``SEEN <root> <t_ns>`` line per event
since the last dump, then ``DUMPED``; ``quit``. Prints ``READY`` once the watch is open.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aetcd


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def main(endpoint: str, prefix: str) -> None:
    host, port = endpoint.rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    flags = f"{prefix}flags/".encode()
    seen: list[tuple[str, int]] = []
    revision = (await client.get_prefix(flags)).header.revision
    watch = await client.watch_prefix(flags, start_revision=revision + 1)

    async def consume() -> None:
        async for event in watch:
            json.loads(event.kv.value)
            seen.append((event.kv.key[len(flags) :].decode(), time.time_ns()))

    consumer = asyncio.create_task(consume())
    _say("READY")
    loop = asyncio.get_running_loop()
    dumped = 0
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "stats":
            _say("STATS " + json.dumps({"seen": len(seen)}))
        elif line == "dump":
            batch, dumped = seen[dumped:], len(seen)
            sys.stdout.write("".join(f"SEEN {root} {t_ns}\n" for root, t_ns in batch))
            _say("DUMPED")
        elif line in ("quit", ""):
            break
    consumer.cancel()
    await watch.cancel()
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
