"""Hostile ``baggage`` headers against a real service: its log stays bounded whatever clients send."""

from __future__ import annotations

import httpx
import pytest
from debug_service import EVENT_TIMEOUT

pytestmark = pytest.mark.anyio

REQUESTS_PER_KIND = 60
MAX_LINE_CHARS = 1000


def _hostile_headers(index: int) -> list[str]:
    """One of each kind of bad baggage OpenTelemetry's propagator warns about, varied per request."""
    return [
        f"k{index}=v,=broken{index},",  # an entry with no name
        f"k{index}=" + "x" * 5000,  # one entry over the per-entry limit
        ",".join(f"e{i}={index}" for i in range(200)),  # over the number of entries
        "k=" + "y" * 70_000,  # a header 70,000 characters long
        f"noequals{index}",  # an entry without "="
    ]


async def test_hostile_baggage_headers_log_a_bounded_number_of_short_lines(chain, etcd_env):
    """Hundreds of bad baggage headers yield a handful of log lines, none of them long; every request is served."""
    chain.start(etcd_env, levels=("A",), replicas=1)
    (url,) = chain.urls(0)
    (process,) = chain.processes()
    before = len(process.lines)
    sent = 0
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT) as client:
        for index in range(REQUESTS_PER_KIND):
            for header in _hostile_headers(index):
                response = await client.get(f"{url}/healthz", headers={"baggage": header})
                assert response.status_code == 200
                sent += 1
        # The service's output so far is in: one more request, answered after every earlier one.
        assert (await client.get(f"{url}/healthz")).status_code == 200
    logged = [line for line in process.lines[before:] if "aggage" in line]
    assert sent == REQUESTS_PER_KIND * 5
    assert 0 < len(logged) <= 10, logged[:20]
    assert max(len(line) for line in logged) <= MAX_LINE_CHARS
