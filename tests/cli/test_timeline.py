"""The timeline `otel-cancel status` draws stays a few short lines whatever the receipts say."""

from __future__ import annotations

import os
import subprocess
import time

from conftest import cli

from otel_cancel._core.cancel_request import CancelRequest
from otel_cancel._core.io_loop import io_loop
from otel_cancel._core.records import Receipt
from otel_cancel._core.root import random_root
from otel_cancel._core.settings import Settings
from otel_cancel.cli.timeline import render_timeline

_WIDTH = 40


def _bars(text: str) -> list[str]:
    """What lies between the two '|' of each bar line."""
    return [line[line.index("|") + 1 : line.rindex("|")] for line in text.splitlines() if "|" in line]


def test_status_of_work_stopped_before_the_flag_stays_short(etcd_env):
    """`status` of a root whose work stopped before its flag was written prints bars of the usual width."""
    root = random_root()
    store = Settings.from_environment(etcd_env).create_store()

    async def write() -> None:
        stored, _ = await store.create_flag(CancelRequest.new(root, "superseded", "cli@test"), 60)
        written = stored.requested_at
        # LangGraph stopped the run 5 ms before the relay wrote the flag; the process saw it 1.7 ms after.
        receipt = Receipt(root, "graph", "host-1", 2, written + 1_700_000, written - 5_000_000, written)
        await store.put_receipt(receipt, 60)
        await store.close()

    io_loop().run(write())
    env = {**os.environ, **etcd_env}
    result = subprocess.run(cli("status", root), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) < 2000, result.stdout[:3000]
    bars = _bars(result.stdout[result.stdout.index("flag written") :])
    assert len(bars) == 2 and all(len(bar) == _WIDTH - 1 or len(bar) == _WIDTH for bar in bars), bars


def test_hostile_receipt_times_draw_inside_the_bar():
    """Receipts dated before the flag, far after it, negative or beyond a float draw within the bar's width."""
    root = random_root()
    now = time.time_ns()
    odd_times = [(now - 10**12, now - 10**15), (now + 10**400, now), (-(10**30), 10**30), (0, -1), (now, now)]
    receipts = [
        Receipt(root, "s" * 300, f"i{n}", depth, seen, stopped, now)
        for n, (seen, stopped) in enumerate(odd_times)
        for depth in (0, 2**70)
    ]
    for flag_time in (now, 0, -(10**20)):
        text = render_timeline(CancelRequest(root, "r", flag_time, "cli@test"), receipts, width=_WIDTH)
        lines = text.splitlines()
        assert len(lines) == 1 + 2 + len(receipts), text
        for bar in _bars(text)[1:]:
            assert len(bar) == _WIDTH and bar.strip(" ") and set(bar) <= {" ", "█"}, bar
        assert len({line.index("|") for line in lines if "|" in line}) == 1, text
