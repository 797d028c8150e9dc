"""``otel-cancel doctor``: what is on, what is missing, and what to do about it.

Checks, each reported as ``ok``, ``warn`` or ``fail`` with one line of advice:

- etcd reachable (a status call, then a read of the flags prefix);
- the configured propagators carry baggage (``OTEL_PROPAGATORS``);
- the otel-cancel instrumentor is installed and not disabled;
- for each kind of service this environment can run (Starlette/FastAPI, LangGraph,
  A2A), the packages it needs, with the ``pip install`` line that adds the missing
  ones; and the SDK that makes spans and metrics more than no-ops;
- the trust setting fits the service (an internal-looking service that trusts
  nothing breaks propagation).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from importlib.metadata import PackageNotFoundError, entry_points, version

from .._core.io_loop import io_loop
from .._core.settings import Settings
from ..exceptions import StoreError


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: str  # ok | warn | fail
    detail: str


def propagators_carry_baggage(value: str | None = None) -> bool:
    """Whether ``OTEL_PROPAGATORS`` (default ``tracecontext,baggage``) includes baggage."""
    raw = os.environ.get("OTEL_PROPAGATORS") if value is None else value
    if raw is None or raw.strip() == "":
        return True
    return "baggage" in {name.strip().lower() for name in raw.split(",")}


async def _check_etcd(settings: Settings) -> Check:
    store = settings.create_store()
    try:
        await store.ping()
        listing = await store.list_flags()
    except StoreError as error:
        return Check("etcd", "fail", f"{error}; set OTEL_CANCEL_ETCD_ENDPOINTS to a reachable etcd")
    finally:
        await store.close()
    return Check("etcd", "ok", f"{', '.join(settings.endpoints)} answers; {len(listing.flags)} cancelled root(s)")


def _check_propagators() -> Check:
    if propagators_carry_baggage():
        return Check("propagators", "ok", f"OTEL_PROPAGATORS={os.environ.get('OTEL_PROPAGATORS', '(default)')}")
    return Check(
        "propagators",
        "fail",
        f"OTEL_PROPAGATORS={os.environ['OTEL_PROPAGATORS']} drops baggage: roots will not cross HTTP hops; "
        "add 'baggage' (for example tracecontext,baggage)",
    )


def _check_instrumentation() -> Check:
    names = {ep.name for ep in entry_points(group="opentelemetry_instrumentor")}
    disabled = {n.strip() for n in os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")}
    if "otel_cancel" not in names:
        return Check("instrumentation", "fail", "the otel_cancel instrumentor entry point is not installed")
    if "otel_cancel" in disabled:
        return Check("instrumentation", "warn", "disabled by OTEL_PYTHON_DISABLED_INSTRUMENTATIONS")
    if "httpx" not in names:
        return Check("instrumentation", "warn", "installed, but not the httpx instrumentation: roots stay local")
    frameworks = sorted(names & {"starlette", "fastapi"})
    return Check("instrumentation", "ok", f"otel_cancel and httpx instrumentors installed ({', '.join(frameworks)})")


# Kind of service -> (module that reveals it, distributions it needs, the extra that brings them).
_SERVICE_KINDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "Starlette/FastAPI": (
        "starlette",
        (
            "opentelemetry-instrumentation-asgi",
            "opentelemetry-instrumentation-starlette",
            "opentelemetry-instrumentation-httpx",
        ),
        "http",
    ),
    # OpenTelemetry's Starlette instrumentation gives FastAPI apps no server span.
    "FastAPI": ("fastapi", ("opentelemetry-instrumentation-fastapi",), "http"),
    "LangGraph": ("langgraph", (), "langgraph"),
    "A2A": ("a2a", ("a2a-sdk", "opentelemetry-instrumentation-httpx"), "a2a"),
}
_SDK = ("opentelemetry-sdk", "opentelemetry-distro", "opentelemetry-exporter-otlp-proto-grpc")


def _installed(distribution: str) -> bool:
    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _check_service_kinds() -> list[Check]:
    """One check per kind of service found in this environment, naming what it lacks."""
    checks = []
    for kind, (module, needed, extra) in _SERVICE_KINDS.items():
        if not _module_present(module):
            continue
        missing = [d for d in needed if not _installed(d)]
        if missing:
            checks.append(
                Check(
                    kind,
                    "warn",
                    f"missing {', '.join(missing)}: roots or their spans will not follow requests; "
                    f"pip install 'otel-cancel[{extra}]'",
                )
            )
        else:
            checks.append(Check(kind, "ok", f"everything {kind} services need is installed"))
    missing_sdk = [d for d in _SDK if not _installed(d)]
    if missing_sdk:
        checks.append(
            Check(
                "sdk",
                "warn",
                f"missing {', '.join(missing_sdk)}: spans and metrics are no-ops; pip install 'otel-cancel[sdk]'",
            )
        )
    else:
        checks.append(Check("sdk", "ok", f"opentelemetry-sdk {version('opentelemetry-sdk')} and the OTLP exporter"))
    return checks


def _check_trust(settings: Settings) -> Check:
    if settings.trust_incoming:
        return Check("trust", "ok", "internal service: adopts incoming roots (OTEL_CANCEL_TRUST_INCOMING=true)")
    hint = settings.service.lower()
    if any(word in hint for word in ("sub", "internal", "worker", "backend")):
        return Check(
            "trust",
            "warn",
            f"service {settings.service!r} looks internal but trusts no incoming root; "
            "set OTEL_CANCEL_TRUST_INCOMING=true unless it is an edge",
        )
    return Check("trust", "ok", "edge: every request starts its own root (OTEL_CANCEL_TRUST_INCOMING=false)")


def run_doctor(settings: Settings, as_json: bool = False) -> int:
    """Print the report; exit 0 when nothing failed, 1 otherwise."""
    checks = [
        # On the IO loop, like every etcd call (see otel_cancel._core.io_loop).
        io_loop().run(_check_etcd(settings)),
        _check_propagators(),
        _check_instrumentation(),
        *_check_service_kinds(),
        _check_trust(settings),
    ]
    if as_json:
        print(json.dumps({"checks": [dataclasses.asdict(c) for c in checks]}))
    else:
        for check in checks:
            print(f"{check.status.upper():4}  {check.name:17} {check.detail}")
    return 1 if any(c.status == "fail" for c in checks) else 0
