"""Load: a thousand concurrent runs through three levels, and a hundred thousand requests.

The runs are real streams through six uvicorn processes (three levels, two
replicas each). Every level holds its stream after its first token until the
test releases it, so "in flight" is a state the test awaits, not a guess about
timing. The hundred thousand requests go to one real uvicorn service over HTTP/1.1
keep-alive with pipelining (a hand-rolled client: httpx alone would take minutes),
and the service's registry, resident memory and open file descriptors are read
before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from collections import Counter

import aetcd
import httpx
import pytest
from debug_service import open_gated_stream, write_flags

from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.root import random_root
from otel_cancel.store._keys import acks_prefix
from otel_cancel.store.etcd import parse_endpoint
from otel_cancel.testing import ManagedProcess, wait_for_output

pytestmark = pytest.mark.anyio

EVENT_TIMEOUT = 60.0
"""How long any awaited event may take (generous: a 2-core machine with six services and etcd)."""


def _env(etcd_env: dict[str, str]) -> dict[str, str]:
    # The first request waits for the watcher's first listing, however slow the start.
    return {**etcd_env, "OTEL_CANCEL_STARTUP_WAIT_SECONDS": str(EVENT_TIMEOUT)}


class _Events:
    """Counts the ``EVENT root LEVEL`` lines of a chain's processes, reading each line once."""

    def __init__(self, processes: list[ManagedProcess]) -> None:
        self._processes = processes
        self._read = [0] * len(processes)
        self.by_root: Counter[tuple[str, str]] = Counter()
        self.totals: Counter[str] = Counter()

    def update(self) -> None:
        for index, process in enumerate(self._processes):
            lines = process.lines
            for line in lines[self._read[index] : len(lines)]:
                parts = line.split()
                if len(parts) == 3 and parts[0] in ("START", "DONE", "STOPPED"):
                    self.by_root[parts[0], parts[1]] += 1
                    self.totals[parts[0]] += 1
            self._read[index] = len(lines)

    async def until(self, predicate, what: str) -> None:
        def check() -> bool:
            self.update()
            return predicate()

        await asyncio.to_thread(wait_for_output, check, EVENT_TIMEOUT, what)


async def _receipt_puts(endpoint: str, prefix: str, roots: list[str], expected: int) -> Counter[str]:
    """Await (through an etcd watch from the first revision) ``expected`` receipt keys for ``roots``; puts per key."""
    host, port = parse_endpoint(endpoint)
    wanted = tuple(acks_prefix(prefix, root) for root in roots)
    puts: Counter[str] = Counter()
    async with aetcd.Client(host, port) as client:
        watch = await client.watch_prefix(f"{prefix}acks/".encode(), start_revision=1)
        try:

            async def collect() -> None:
                async for event in watch:
                    key = event.kv.key.decode()
                    if key.startswith(wanted):
                        puts[key] += 1
                        if len(puts) >= expected:
                            return

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(collect(), EVENT_TIMEOUT)
        finally:
            await watch.cancel()
    return puts


@pytest.mark.slow
async def test_a_thousand_concurrent_runs_through_three_levels_cancel_exactly_the_hundred_chosen(
    chain, etcd, etcd_env, prefix
):
    """1,000 streams through 3 levels x 2 replicas; 100 cancelled at random stop everywhere, the 900 others finish."""
    runs, chosen_count, levels = 1000, 100, 3
    chain.start(_env(etcd_env), module="debug_app")
    events = _Events(chain.processes())
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT * 2, limits=limits) as client:

        async def run(index: int) -> tuple[str, asyncio.Task[list[str]]]:
            url = chain.urls(0)[index % len(chain.urls(0))]
            return await open_gated_stream(client, url)

        started = await asyncio.gather(*(run(index) for index in range(runs)))
        roots = [root for root, _ in started]
        assert len(set(roots)) == runs
        await events.until(lambda: events.totals["START"] == runs * levels, "every run started at every level")
        assert all(events.by_root["START", root] == levels for root in roots)

        chosen = set(random.sample(roots, chosen_count))
        await write_flags([etcd.endpoint], prefix, sorted(chosen), "load")
        await events.until(
            lambda: all(events.by_root["STOPPED", root] == levels for root in chosen), "the chosen runs stopped"
        )
        for level in range(levels):
            for url in chain.urls(level):
                await client.post(f"{url}/debug/release")
        bodies = dict(zip(roots, await asyncio.gather(*(task for _, task in started)), strict=True))
        await events.until(lambda: events.totals["DONE"] == (runs - chosen_count) * levels, "the others finished")

        for root in roots:
            if root in chosen:
                assert bodies[root][-2] == "event: otel-cancel", bodies[root]
                assert events.by_root["DONE", root] == 0
            else:
                assert bodies[root][-1] == "data: A-2", bodies[root]
                assert events.by_root["DONE", root] == levels and events.by_root["STOPPED", root] == 0
        receipts = await io_loop().call(_receipt_puts(etcd.endpoint, prefix, sorted(chosen), chosen_count * levels))
        warnings = [line for process in chain.processes() for line in process.lines if line.startswith("WARNING")]
        assert len(receipts) == chosen_count * levels, warnings
        assert set(receipts.values()) == {1}  # one receipt per process and root, written once
        urls = [url for level in chain.levels for url, _ in level]
        states = [(await client.get(f"{url}/debug/state")).json() for url in urls]
    assert all(state["live_scopes"] == 0 and state["live_roots"] == 0 for state in states)
    print(
        f"load: {runs} runs x {levels} levels, {chosen_count} cancelled (all stopped at every level, "
        f"{len(receipts)} receipts), {runs - chosen_count} completed; registries empty"
    )


# -- a hundred thousand requests ---------------------------------------------------------------


class _Service:
    """A raw HTTP/1.1 client for one service: pipelined keep-alive pings, streams, /debug."""

    def __init__(self, url: str, pid: int) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port, self.pid = host, int(port), pid
        self.statuses: Counter[int] = Counter()

    @staticmethod
    def _request(path: str, root: str, close: bool = False) -> bytes:
        connection = b"connection: close\r\n" if close else b""
        return (
            f"GET {path} HTTP/1.1\r\nhost: test\r\nbaggage: otel_cancel.root={root},otel_cancel.depth=1\r\n".encode()
            + connection
            + b"\r\n"
        )

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(head[9:12]), await reader.readexactly(length)

    async def pings(self, roots: list[str], depth: int) -> None:
        """GET /ping once per root on one connection, ``depth`` requests in flight; the last one closes it."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            for start in range(0, len(roots), depth):
                batch = roots[start : start + depth]
                last = start + depth >= len(roots)
                writer.write(
                    b"".join(self._request("/ping", r, last and i == len(batch) - 1) for i, r in enumerate(batch))
                )
                for _ in batch:
                    status, _ = await self._response(reader)
                    self.statuses[status] += 1
            # The server closes first: its socket is gone once we read the end.
            assert await reader.read() == b""
        finally:
            writer.close()

    async def open_stream(self, root: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Start a gated stream on its own connection and read up to its first token."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(self._request("/stream?tokens=3&gate=1", root, close=True))
        await reader.readuntil(b"data: A-0")
        return reader, writer

    async def get(self, path: str, method: str = "GET") -> dict:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: 0\r\n\r\n".encode()
            )
            _, body = await self._response(reader)
            assert await reader.read() == b""
        finally:
            writer.close()
        return json.loads(body) if body.startswith(b"{") else {}

    def resident_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


LEAK_BYTES_PER_REQUEST = 16
"""Resident growth allowed per request after warm-up: anything a request left behind (a
registry entry, a task, a context) costs far more than this; allocator noise costs less."""


@pytest.mark.slow
async def test_after_a_hundred_thousand_requests_the_registry_is_empty_and_memory_and_fds_are_flat(
    chain, etcd, etcd_env, prefix
):
    """100,000 requests (pings, 409s, streams finished, cancelled or abandoned) leave nothing behind."""
    total, warm_up, connections, depth, streams_per_kind = 100_000, 10_000, 8, 32, 100
    chain.start(
        _env(etcd_env),
        levels=("A",),
        replicas=1,
        module="debug_app",
        level_env={"A": {"OTEL_CANCEL_TRUST_INCOMING": "true"}},
    )
    ((url, process),) = chain.levels[0]
    service = _Service(url, process.pid)
    late = [random_root() for _ in range(50)]  # cancelled before their requests come: 409
    await write_flags([etcd.endpoint], prefix, late, "late")
    applied = {f"APPLIED {root} A" for root in late}
    await asyncio.to_thread(
        wait_for_output, lambda: applied <= set(process.lines), EVENT_TIMEOUT, "the late flags applied"
    )
    flags, served, refused = len(late), 0, 0

    async def round_of(pings: int, cancel_streams: bool) -> None:
        nonlocal served, flags, refused
        roots = [late[i % len(late)] if i % 100 == 0 else random_root() for i in range(pings)]
        refused += sum(root in late for root in roots)
        share = -(-len(roots) // connections)
        pinging = asyncio.gather(*(service.pings(roots[i : i + share], depth) for i in range(0, len(roots), share)))
        # Streams: finished, abandoned by the client, and (warm-up only) cancelled by a flag mid-stream.
        finished = [await service.open_stream(random_root()) for _ in range(streams_per_kind)]
        abandoned_roots = [random_root() for _ in range(streams_per_kind)]
        for root in abandoned_roots:
            _, writer = await service.open_stream(root)
            writer.close()
        if cancel_streams:
            cancelled_roots = [random_root() for _ in range(streams_per_kind)]
            cancelled = [await service.open_stream(root) for root in cancelled_roots]
            await write_flags([etcd.endpoint], prefix, cancelled_roots, "load")
            flags += len(cancelled_roots)
            for reader, writer in cancelled:
                body = await reader.read()  # chunked: the last event, then the last chunk
                assert body.endswith(b'"reason": "load"}\n\n\r\n0\r\n\r\n'), body[-200:]
                writer.close()
            served += len(cancelled)
        await service.get("/debug/release", "POST")
        for reader, writer in finished:
            body = await reader.read()
            assert body.endswith(b"data: A-2\n\n\r\n0\r\n\r\n"), body[-200:]
            writer.close()
        expected = {f"STOPPED {root} A" for root in abandoned_roots}
        await asyncio.to_thread(
            wait_for_output, lambda: expected <= set(process.lines), EVENT_TIMEOUT, "the abandoned streams stopped"
        )
        await pinging
        served += pings + len(finished) + len(abandoned_roots)

    # Each cancelled root is remembered until its flag expires (a late hop must be
    # refused): memory that grows with live flags, not with requests. So the flags
    # are all written during the warm-up, and the measured round adds none.
    await round_of(warm_up - 3 * streams_per_kind, cancel_streams=True)
    state = await service.get("/debug/state")
    rss_before, fds_before = service.resident_bytes(), service.open_fds()
    await round_of(total - served - 2 * streams_per_kind, cancel_streams=False)
    state = await service.get("/debug/state")
    rss_after, fds_after = service.resident_bytes(), service.open_fds()

    assert served == total
    assert service.statuses == {200: total - 5 * streams_per_kind - refused, 409: refused}
    assert state["live_scopes"] == 0 and state["live_roots"] == 0
    assert state["cancelled_roots"] == flags
    assert fds_after == fds_before
    growth = rss_after - rss_before
    print(
        f"{total} requests (pings by status {dict(service.statuses)}, {5 * streams_per_kind} streams): "
        "registry empty, "
        f"fds {fds_before} -> {fds_after}, resident {rss_before // 1024} -> {rss_after // 1024} KiB "
        f"({growth / (total - warm_up):+.2f} bytes per request)"
    )
    assert growth <= LEAK_BYTES_PER_REQUEST * (total - warm_up)
