"""A process that sets otel-cancel up, then forks one child per root (a pre-fork server's master).

    python forking_worker.py ROOT [ROOT ...]

Configured from the ``OTEL_CANCEL_*`` environment, with an OpenTelemetry SDK tracer
provider (its resource carries a random ``service.instance.id``, as under
``opentelemetry-instrument``) set up before the fork, as gunicorn ``--preload`` does.
The parent builds otel-cancel's process state (as the instrumentor does when it loads),
prints ``PARENT <instance>``, then forks; child i enters a scope for ROOT i (its own watch
starts), prints ``ENTERED <root> <pid>``, and once
a flag stops it prints ``STOPPED <root> <pid> <instance>`` and waits for its receipt
(``RECEIPT <root>``). The parent prints ``DONE`` when every child has exited.
"""

from __future__ import annotations

import asyncio
import os
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import otel_cancel
from otel_cancel._core.process_state import get_process_state


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _child(root: str) -> None:
    try:
        async with otel_cancel.scope(root=root):
            _say(f"ENTERED {root} {os.getpid()}")
            await asyncio.Future()
    except otel_cancel.Cancelled:
        runtime = get_process_state()
        _say(f"STOPPED {root} {os.getpid()} {runtime.settings.instance}")
        if await runtime.wait_receipt(root, 30):
            _say(f"RECEIPT {root}")


def main(roots: list[str]) -> None:
    trace.set_tracer_provider(TracerProvider())
    _say(f"PARENT {get_process_state().settings.instance}")
    children = []
    for root in roots:
        pid = os.fork()
        if pid == 0:
            try:
                asyncio.run(_child(root))
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    _say("DONE")


if __name__ == "__main__":
    main(sys.argv[1:])
