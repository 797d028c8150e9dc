"""``otel-cancel``: cancel a run by its root, see who stopped, check the set-up.

Commands::

    otel-cancel cancel ROOT [--reason TEXT] [--wait SECONDS] [--expect N] [--json]
    otel-cancel status ROOT [--json]
    otel-cancel list [--json]
    otel-cancel watch [--json]
    otel-cancel doctor [--json]
    otel-cancel demo [--a2a] [--json]

Configuration comes from the ``OTEL_CANCEL_*`` environment. Exit codes: 0 on
success (cancelling an already cancelled root included), 2 on bad input (a root
that is not 32 lowercase hex digits, an invalid setting), 1 with a one-line reason
when etcd cannot be reached or refuses the call.
"""

from __future__ import annotations

# Imports here are the ones every command needs. The rest is imported by the command
# that uses it: ``cancel`` talks to etcd through the standard library and imports
# neither asyncio, OpenTelemetry (unless spans are exported) nor the gRPC client.
import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ._request import CancelRequest, Receipt
from ._root_id import validate_root
from ._settings import Settings
from .exceptions import ConfigurationError, InvalidRootError, StoreError
from .store._keys import root_of_flag_key

if TYPE_CHECKING:
    from .store import CancelStore

EXIT_OK = 0
EXIT_STORE = 1
EXIT_USAGE = 2

_RECEIPT_COLUMNS = ("service", "instance", "depth", "interrupted", "latency_ms")


def _one_line(text: str) -> str:
    """``text`` with control characters and line breaks escaped: an error is one line, whatever was typed."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(message: str, code: int) -> int:
    print(f"otel-cancel: {_one_line(message)}", file=sys.stderr)
    return code


def _iso(epoch_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_ns / 1e9)) + f".{epoch_ns % 10**9 // 10**6:03d}Z"


def _receipt_row(receipt: Receipt) -> dict[str, Any]:
    return {
        "service": receipt.service,
        "instance": receipt.instance,
        "depth": receipt.depth,
        "interrupted": ",".join(receipt.interrupted) or "-",
        "latency_ms": round(receipt.latency_ms, 2),
        "tasks": receipt.tasks,
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned plain-text table with a header line."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _request_dict(request: CancelRequest) -> dict[str, Any]:
    return {
        "root": request.root,
        "reason": request.reason,
        "requested_at": request.requested_at,
        "requested_by": request.requested_by,
    }


# -- commands -------------------------------------------------------------------------------


class _FlagClient(Protocol):
    """What ``cancel`` needs from etcd, synchronously."""

    def create_flag(self, request: CancelRequest, ttl_seconds: int) -> tuple[CancelRequest, bool]: ...

    def list_receipts(self, root: str) -> list[Receipt]: ...

    def close(self) -> None: ...


class _StoreOnIoLoop:
    """The gRPC store, driven from this thread: for set-ups etcd's JSON gateway cannot serve."""

    def __init__(self, settings: Settings) -> None:
        from ._io_loop import io_loop

        self._io_loop = io_loop()
        self._store = settings.create_store()

    def create_flag(self, request: CancelRequest, ttl_seconds: int) -> tuple[CancelRequest, bool]:
        return self._io_loop.run(self._store.create_flag(request, ttl_seconds))

    def list_receipts(self, root: str) -> list[Receipt]:
        return self._io_loop.run(self._store.list_receipts(root))

    def close(self) -> None:
        self._io_loop.run(self._store.close())


def _cancel(settings: Settings, args: argparse.Namespace, spans_exported: bool) -> int:
    from .store.etcd_gateway import EtcdGatewayClient, EtcdGatewayUnusableError

    requester = f"cli:{os.environ.get('USER', 'unknown')}@{socket.gethostname()}"
    request = CancelRequest.new(args.root, args.reason, requester)
    # Spans only cost when they go somewhere: exported from here, or this run is
    # instrumented (OpenTelemetry already loaded). Otherwise they would be no-ops.
    traced = spans_exported or "opentelemetry" in sys.modules
    span: Any = None
    if traced:
        from . import telemetry
        from ._scope import parent_in_root_trace

        # The request span lands in the root's trace, next to the stops it causes.
        span = telemetry.start_request_span(args.root, args.reason, parent_in_root_trace(args.root))
    client: _FlagClient = EtcdGatewayClient(
        settings.endpoints,
        prefix=settings.prefix,
        timeout=settings.timeout_seconds,
        username=settings.username,
        password=settings.password,
        ca_cert=settings.ca_cert,
        cert=settings.cert,
        key=settings.key,
    )
    try:
        try:
            stored, created = client.create_flag(request, settings.ttl_seconds)
        except EtcdGatewayUnusableError:
            # Nothing was written: write it through the gRPC client instead (slower to start).
            client.close()
            client = _StoreOnIoLoop(settings)
            stored, created = client.create_flag(request, settings.ttl_seconds)
        finally:
            if span is not None:
                span.end()
        if traced:
            telemetry.cancel_requested(args.root, args.reason, created)
        if args.json:
            print(json.dumps({"created": created, "flag": _request_dict(stored)}), flush=True)
        elif created:
            print(f"cancelled {stored.root} (reason: {stored.reason})", flush=True)
        else:
            print(
                f"{stored.root} was already cancelled at {_iso(stored.requested_at)} "
                f"by {stored.requested_by} (reason: {stored.reason})",
                flush=True,
            )
        if args.wait:
            _wait_for_receipts(client, args)
    finally:
        client.close()
    return EXIT_OK


def _wait_for_receipts(client: _FlagClient, args: argparse.Namespace) -> None:
    # Receipts arrive from other processes; poll the acks prefix until --wait
    # runs out or --expect receipts have arrived, printing each one once.
    deadline = time.monotonic() + args.wait
    seen: set[tuple[str, str]] = set()
    header_printed = False
    while True:
        for receipt in client.list_receipts(args.root):
            key = (receipt.service, receipt.instance)
            if key in seen:
                continue
            seen.add(key)
            row = _receipt_row(receipt)
            if args.json:
                print(json.dumps({"receipt": row}), flush=True)
            else:
                table = format_table([row], _RECEIPT_COLUMNS).splitlines()
                if not header_printed:
                    print(table[0], flush=True)
                    header_printed = True
                print(table[1], flush=True)
        if (args.expect and len(seen) >= args.expect) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not args.json:
        print(f"{len(seen)} process(es) reported stopped work", flush=True)


async def _status(store: CancelStore, settings: Settings, args: argparse.Namespace) -> int:
    flag = await store.get_flag(args.root)
    receipts = sorted(await store.list_receipts(args.root), key=lambda r: (r.depth, r.stopped_at))
    if args.json:
        print(
            json.dumps(
                {
                    "root": args.root,
                    "cancelled": flag is not None,
                    "flag": _request_dict(flag) if flag else None,
                    "receipts": [_receipt_row(r) for r in receipts],
                }
            )
        )
        return EXIT_OK
    if flag is None:
        print(f"{args.root} is not cancelled")
        return EXIT_OK
    print(f"{flag.root} cancelled at {_iso(flag.requested_at)} by {flag.requested_by} (reason: {flag.reason})")
    if receipts:
        print(format_table([_receipt_row(r) for r in receipts], _RECEIPT_COLUMNS))
        from .timeline import render_timeline

        print()
        print(render_timeline(flag, receipts))
    else:
        print("no process has reported stopped work yet")
    return EXIT_OK


async def _list(store: CancelStore, settings: Settings, args: argparse.Namespace) -> int:
    listing = await store.list_flags()
    flags = []
    for event in listing.flags:
        root = root_of_flag_key(store.prefix, event.key)
        if root is None:
            continue
        try:
            flags.append(CancelRequest.from_json(event.value, root))
        except ValueError:
            flags.append(CancelRequest(root, "unknown (malformed flag)", 0, ""))
    if args.json:
        print(json.dumps({"revision": listing.revision, "flags": [_request_dict(f) for f in flags]}))
    elif not flags:
        print("no cancelled roots")
    else:
        rows = [
            {
                "root": f.root,
                "requested_at": _iso(f.requested_at) if f.requested_at else "-",
                "by": f.requested_by,
                "reason": f.reason,
            }
            for f in flags
        ]
        print(format_table(rows, ("root", "requested_at", "by", "reason")))
    return EXIT_OK


async def _watch(store: CancelStore, settings: Settings, args: argparse.Namespace) -> int:
    listing = await store.list_flags()
    revision = listing.revision
    for event in listing.flags:
        _print_event(store, event.kind, event.key, event.value, args.json)
    async for event in store.watch_flags(revision + 1):
        _print_event(store, event.kind, event.key, event.value, args.json)
    return EXIT_OK


def _print_event(store: CancelStore, kind: str, key: str, value: bytes, as_json: bool) -> None:
    root = root_of_flag_key(store.prefix, key)
    if root is None:
        return
    reason = ""
    if kind == "put":
        try:
            reason = CancelRequest.from_json(value, root).reason
        except ValueError:
            reason = "unknown (malformed flag)"
    if as_json:
        print(json.dumps({"event": "cancelled" if kind == "put" else "expired", "root": root, "reason": reason}))
    else:
        print(f"{'cancelled' if kind == 'put' else 'expired  '} {root} {reason}".rstrip())
    sys.stdout.flush()


_STORE_COMMANDS = {"status": _status, "list": _list, "watch": _watch}


async def _run_store_command(settings: Settings, args: argparse.Namespace) -> int:
    store = settings.create_store()
    try:
        return await _STORE_COMMANDS[args.command](store, settings, args)
    finally:
        await store.close()


# -- argument parsing ------------------------------------------------------------------------


def _root_argument(value: str) -> str:
    try:
        return validate_root(value)
    except InvalidRootError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds_argument(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not 0 <= seconds <= 86400:
        raise argparse.ArgumentTypeError(f"seconds must be between 0 and 86400, got {value!r}")
    return seconds


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        # One line, exit 2 (argparse would print the whole usage first).
        print(f"otel-cancel: {_one_line(message)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="otel-cancel", description="Cancel a run everywhere by its root id.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cancel = commands.add_parser("cancel", help="cancel every piece of work of ROOT")
    cancel.add_argument("root", type=_root_argument, metavar="ROOT")
    cancel.add_argument("--reason", default="cancelled by operator", help="why (shown in receipts and spans)")
    cancel.add_argument(
        "--wait",
        type=_seconds_argument,
        default=0,
        metavar="SECONDS",
        help="print receipts as processes report stopped work, for up to SECONDS",
    )
    cancel.add_argument("--expect", type=int, default=0, metavar="N", help="with --wait: return after N receipts")
    cancel.add_argument("--json", action="store_true", help="JSON lines output")

    status = commands.add_parser("status", help="show whether ROOT is cancelled and who stopped")
    status.add_argument("root", type=_root_argument, metavar="ROOT")
    status.add_argument("--json", action="store_true")

    listing = commands.add_parser("list", help="list cancelled roots")
    listing.add_argument("--json", action="store_true")

    watch = commands.add_parser("watch", help="print cancels as they happen")
    watch.add_argument("--json", action="store_true")

    doctor = commands.add_parser("doctor", help="check etcd, propagators and instrumentation")
    doctor.add_argument("--json", action="store_true")

    demo = commands.add_parser("demo", help="run the example chain on an embedded etcd and cancel it")
    demo.add_argument("--json", action="store_true")
    demo.add_argument(
        "--a2a", action="store_true", help="run the chain speaking A2A and cancel with cancel-task on another replica"
    )
    return parser


def _export_spans_if_configured() -> Any:
    """Set up OTLP span and metric exporters when the environment asks for them (and the SDK is installed).

    Returns an object whose ``shutdown()`` flushes both, or ``None``.
    """
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "")
    if exporter.strip().lower() != "otlp":
        return None
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "otel-cancel-cli"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]
    )
    metrics.set_meter_provider(meter_provider)

    class _Providers:
        def shutdown(self) -> None:
            tracer_provider.shutdown()
            meter_provider.shutdown()

    return _Providers()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otel-cancel`` console script."""
    # gRPC's core logs failed connections (a TLS handshake refused, say) to stderr
    # at info level, before our one-line reason; keep its errors only, unless asked.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    args = build_parser().parse_args(argv)
    provider = _export_spans_if_configured() if args.command == "cancel" else None
    try:
        return _main(args, spans_exported=provider is not None)
    finally:
        if provider is not None:
            provider.shutdown()  # flush the request span before exiting


def _on_io_loop(command: Coroutine[Any, Any, int]) -> int:
    """Run a store command on the process's IO loop and wait for its exit code.

    Not on a loop of its own (``asyncio.run``): that loop would close with gRPC
    completions still in flight (the ones closing the channel), and gRPC would
    hand them to whichever other loop of the process polls next; there they raise
    "Event loop is closed". It matters when ``main()`` runs inside a program (or a
    test); every other etcd call otel-cancel makes runs on the IO loop already.
    """
    from ._io_loop import io_loop

    future = io_loop().submit(command)
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()  # cancels the command on the IO loop (the store closes)
        raise


def _main(args: argparse.Namespace, spans_exported: bool = False) -> int:
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(as_json=args.json, a2a=args.a2a)
        settings = Settings.from_environment()
        if args.command == "doctor":
            from .doctor import run_doctor

            return run_doctor(settings, as_json=args.json)
        if args.command == "cancel":
            return _cancel(settings, args, spans_exported)
        return _on_io_loop(_run_store_command(settings, args))
    except ConfigurationError as error:
        return _fail(str(error), EXIT_USAGE)
    except StoreError as error:
        return _fail(
            f"{error} (endpoints: {os.environ.get('OTEL_CANCEL_ETCD_ENDPOINTS', '127.0.0.1:2379')})", EXIT_STORE
        )
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
