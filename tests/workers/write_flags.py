"""Write a cancel flag for each root read from stdin, retrying through etcd outages.

Configured from the ``OTEL_CANCEL_*`` environment. For each line (a root) it
prints ``WROTE <root> created|existed`` once the flag is in etcd, and ``RETRY
<root> <error>`` for each attempt etcd did not answer. Exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import sys

from otel_cancel._core.records import CancelRequest
from otel_cancel._core.settings import Settings
from otel_cancel.exceptions import StoreUnavailableError

RETRY_PAUSE_SECONDS = 0.05


async def main() -> None:
    settings = Settings.from_environment()
    store = settings.create_store()
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        root = line.strip()
        request = CancelRequest.new(root, "storm", "write_flags")
        while True:
            try:
                _, created = await store.create_flag(request, settings.ttl_seconds)
                break
            except StoreUnavailableError as error:
                print(f"RETRY {root} {error}", flush=True)
                # A retry pause, not a wait for an event: etcd is down and says nothing.
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
        print(f"WROTE {root} {'created' if created else 'existed'}", flush=True)
    await store.close()


asyncio.run(main())
