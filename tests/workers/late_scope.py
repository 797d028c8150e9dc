"""Enter one scope for ROOT as the process's first act; print REFUSED or RAN."""

from __future__ import annotations

import asyncio
import sys

import otel_cancel


async def main(root: str) -> None:
    try:
        async with otel_cancel.scope(root=root):
            print(f"RAN {root}", flush=True)
    except otel_cancel.Cancelled as error:
        print(f"REFUSED {error.root}", flush=True)


asyncio.run(main(sys.argv[1]))
