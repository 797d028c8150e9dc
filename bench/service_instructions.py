"""Instructions per request in a real service: what a hop costs where the in-process bench cannot see.

    .venv/bin/python bench/service_instructions.py [--quick]

``bench/request_instructions.py`` counts one request in process (no server, no socket,
the garbage collector off while timing). A real hop is a uvicorn process under
``opentelemetry-instrument``. Here two such leaves (``level_app``, ``GET /hop``), one
with OpenTelemetry alone (``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=otel_cancel``), one
with otel-cancel too, each run under ``valgrind --tool=callgrind`` with counting off;
after a warm-up, counting is switched on (``callgrind_control -i on``) for N requests
from one keep-alive client and the counters are dumped: every instruction of the
process (server, h11, OpenTelemetry, otel-cancel, its IO-loop thread, the garbage
collector) for those requests alone, for an edge hop (no baggage) and an internal one
(what an otel-cancel edge sends). A third leaf runs otel-cancel's runtime (imports, watch,
IO loop, live-work publisher) with no middleware: what the process pays before any
request path (``runtime only``, over OpenTelemetry alone). Under callgrind a request is about 50 times slower,
so work that follows the clock (the harness's loop-lag probe every 20 ms, in both
variants; otel-cancel's live-work publisher) weighs more per request than at full
speed: the added figure is an upper bound.

Writes ``bench/results/service_instructions.json``.
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, loadavg, say, service_env, table, uvicorn_command, write_results
from overhead import HOP_TRACEPARENT, ROOT, RUNTIME_ONLY, STARTED

from otel_cancel import attributes
from otel_cancel.testing import EtcdServer, ManagedProcess, free_port, unique_prefix

VARIANTS = {
    "OpenTelemetry": {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "otel_cancel"},
    "OpenTelemetry + otel-cancel": {},
    RUNTIME_ONLY: {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "otel_cancel", "BENCH_RUNTIME_ONLY": "1"},
}
ROLES = {
    "edge": ({"OTEL_CANCEL_TRUST_INCOMING": "false"}, {}),
    "internal": (
        {"OTEL_CANCEL_TRUST_INCOMING": "true"},
        {
            "traceparent": HOP_TRACEPARENT,
            "baggage": f"{attributes.BAGGAGE_ROOT}={ROOT},{attributes.BAGGAGE_DEPTH}=0,"
            f"{attributes.BAGGAGE_STARTED}={STARTED}",
        },
    ),
}


def _drive(port: int, requests: int, headers: dict[str, str]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        for _ in range(requests):
            connection.request("GET", "/hop", headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"GET /hop answered {response.status}")
    finally:
        connection.close()


def _count(role: str, variant: str, etcd: EtcdServer, requests: int, workdir: str) -> int:
    """Instructions the whole service process spends on ``requests`` requests."""
    role_env, headers = ROLES[role]
    port = free_port()
    env = service_env(
        {
            "OTEL_CANCEL_ETCD_ENDPOINTS": etcd.endpoint,
            "OTEL_CANCEL_PREFIX": unique_prefix().replace("test", "bench"),
            "LEVEL": "0" if role == "edge" else "1",
            "NEXT_URLS": "",
            "OTEL_SERVICE_NAME": f"bench-{role}",
            **role_env,
            **VARIANTS[variant],
        }
    )
    out = f"{workdir}/callgrind.{role}.{len(variant)}"
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--trace-children=yes",  # opentelemetry-instrument execs the interpreter
        f"--callgrind-out-file={out}.%p",
        *uvicorn_command("level_app", port, auto_instrument=True),
    ]
    process = ManagedProcess(command, env=env, name=f"{role}-{variant}")
    try:
        # Under valgrind the socket is bound well after the app's startup.
        process.wait_for_line(lambda line: "Uvicorn running on" in line, timeout=600)
        _drive(port, 300, headers)
        subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True)
        _drive(port, requests, headers)
        subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True)
    finally:
        process.stop()
    dumps = sorted(Path(workdir).glob(Path(out).name + ".*.1"))
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for {role} / {variant}")
    match = re.search(r"^summary:\s+(\d+)", dumps[-1].read_text(errors="replace"), re.M)
    if match is None:
        raise RuntimeError(f"no instruction total in {dumps[-1]}")
    return int(match.group(1))


def measure(quick: bool) -> dict[str, Any]:
    requests = 500 if quick else 2000
    rows = []
    with EtcdServer() as etcd, tempfile.TemporaryDirectory() as workdir:
        for role in ROLES:
            counts = {}
            for variant in VARIANTS:
                started = time.monotonic()
                counts[variant] = _count(role, variant, etcd, requests, workdir) / requests
                say(f"  {role:9} {variant:28} {counts[variant]:>12,.0f} ({time.monotonic() - started:.0f} s)")
            otel, both = counts["OpenTelemetry"], counts["OpenTelemetry + otel-cancel"]
            runtime = counts[RUNTIME_ONLY]
            rows.append(
                {
                    "hop": role,
                    "otel": round(otel),
                    "both": round(both),
                    "added": round(both - otel),
                    "added %": round(100 * (both - otel) / otel, 1),
                    "runtime only": round(runtime - otel),
                }
            )
    return {"requests": requests, "rows": rows}


def main() -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        say("valgrind is not installed (Debian: apt-get install -y valgrind)")
        return 1
    started, load_before = time.time(), loadavg()
    say("instructions per request in a real service, under callgrind ...")
    data = {"quick": args.quick, **measure(args.quick)}
    path = write_results("service_instructions", data, started, load_before)
    say(table(data["rows"], ["hop", "otel", "both", "added", "added %", "runtime only"]))
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
